"""The server through the real ``openai`` client (more): base-model chat on the tiny model,
not, log-probabilities, echo with max_tokens 0, and OpenAI-shaped 4xx bodies.

Same tiny random Llama (real SmolLM2-Instruct tokenizer and chat template) and adapters as
tests/test_server.py.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F
from test_server import LiveServer, make_app
from test_server import bank as bank  # noqa: F401  (fixtures)
from test_server import ref as ref  # noqa: F401

from softprompt import server as srv

CHAT = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Say hello to everyone"},
]


@pytest.fixture(scope="module")
def live(bank):  # noqa: F811
    server = LiveServer(make_app(bank, max_batch=8))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def base_chat_ids(ref, messages) -> list[int]:  # noqa: F811
    text = ref.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(ref.tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("model", ["gen-deep", "base"])
def test_completions_stream_equals_non_stream_and_the_offline_run(client, ref, model):  # noqa: F811
    prompt = "say hello to everyone"
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    want = ref.greedy(None if model == "base" else model, prompt, 12)
    assert whole.choices[0].text == text == want["text"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason == want["finish_reason"]
    assert all(f is None for f in finishes[:-1]) and len(finishes) >= 2  # text came in pieces
    n_prompt = sum(t >= 0 for t in ref.ids(None if model == "base" else model, prompt))
    assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens == n_prompt
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens
    assert whole.usage.total_tokens == n_prompt + whole.usage.completion_tokens


def test_base_chat_stream_equals_non_stream_and_the_template_run(client, ref):  # noqa: F811
    whole = client.chat.completions.create(
        model="base", messages=CHAT, max_tokens=10, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="base", messages=CHAT, max_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert whole.choices[0].message.content == text
    assert whole.choices[0].message.role == "assistant"
    # the offline truth: the chat template's ids, greedy, stopped at EOS / <|im_end|>
    ids = base_chat_ids(ref, CHAT)
    stop = {ref.tok.convert_tokens_to_ids("<|im_end|>"), *ref.eos}
    out = ref.model.generate(
        input_ids=torch.tensor([ids]),
        adapter_names=[None],
        max_new_tokens=10,
        do_sample=False,
        pad_token_id=srv.pad_id(ref.tok),
        eos_token_id=sorted(stop),
    )
    new = out[0, len(ids) :].tolist()
    end = next((i for i, t in enumerate(new) if t in stop), None)
    want = ref.tok.decode(new if end is None else new[:end], skip_special_tokens=True)
    assert text == want
    assert whole.usage.prompt_tokens == len(ids)
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason


def test_completion_logprobs_are_the_models_and_n_with_seed_repeats(client, ref):  # noqa: F811
    prompt = "great acting"
    r = client.completions.create(
        model="gen-ptuning", prompt=prompt, max_tokens=6, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3
        assert abs(chosen - max(top.values())) < 1e-5  # greedy: the chosen token is the top one
    # the first generated token's log-probability, offline
    ids = ref.ids("gen-ptuning", prompt)
    with torch.no_grad():
        logits = ref.model(input_ids=torch.tensor([ids]), adapter_names=["gen-ptuning"]).logits
    want = F.log_softmax(logits[0, -1].float(), -1).max().item()
    assert abs(lp.token_logprobs[0] - want) < 1e-4
    # n with a seed: the same seed gives the same choices again
    a = client.completions.create(
        model="gen-deep", prompt=prompt, max_tokens=6, temperature=1.0, n=3, seed=7
    )
    b = client.completions.create(
        model="gen-deep", prompt=prompt, max_tokens=6, temperature=1.0, n=3, seed=7
    )
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]


def test_echo_with_max_tokens_0_gives_the_prompts_log_likelihood(client, ref):  # noqa: F811
    prompt = "the plot is thin but the jokes land"
    r = (
        client.completions.create(
            model="base", prompt=prompt, max_tokens=0, echo=True, logprobs=0, use_template=False
        )
        if False
        else client.completions.create(
            model="base", prompt=prompt, max_tokens=0, echo=True, logprobs=0
        )
    )
    choice = r.choices[0]
    assert choice.text == prompt
    ids = ref.tok(prompt)["input_ids"]
    with torch.no_grad():
        logits = ref.model(input_ids=torch.tensor([ids]), adapter_names=[None]).logits[0]
    logp = F.log_softmax(logits.float(), -1)
    want = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    got = choice.logprobs.token_logprobs
    assert got[0] is None and len(got) == len(ids)
    assert max(abs(g - w) for g, w in zip(got[1:], want, strict=True)) < 1e-4
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)


def test_chat_logprobs_and_stop_strings(client):
    r = client.chat.completions.create(
        model="base", messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert all(abs(c.logprob - c.top_logprobs[0].logprob) < 1e-5 for c in content)
    text = r.choices[0].message.content
    if len(text) > 3:  # a stop string cuts the text before it
        cut = text[2:4]
        s = client.chat.completions.create(
            model="base", messages=CHAT, max_tokens=8, temperature=0, stop=[cut]
        )
        assert s.choices[0].message.content == text[: text.find(cut)]
        assert s.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"model": "gen-deep"}, "model"),  # an adapter whose task is not chat
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_bad_chat_requests_are_openai_400s_naming_the_field(live, body, param):
    full = {"model": "base", "messages": CHAT, "max_tokens": 4, **body}
    r = httpx.post(f"{live.url}/v1/chat/completions", json=full, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_bad_request_raises_the_openai_clients_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="base", messages=[], max_tokens=4)
    assert e.value.status_code == 400 and "messages" in str(e.value)
