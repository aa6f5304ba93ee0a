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


def test_chat_without_max_tokens_runs_to_the_limit_or_the_context(bank, ref):  # noqa: F811
    """No ``max_tokens``: as OpenAI's chat, until the answer ends, bounded by --max-tokens-limit
    and by the positions the context leaves after the prompt; legacy completions keep 16."""
    live = LiveServer(make_app(bank, max_tokens_limit=20))
    try:
        engine = live.server.config.app.state.engine
        ids = base_chat_ids(ref, CHAT)
        stop_ids = engine._base_chat_stop_ids()
        body = {"model": "base", "messages": CHAT, "temperature": 0}
        plain = {"model": "base", "prompt": "say hello", "temperature": 0}
        legacy = httpx.post(f"{live.url}/v1/completions", json=plain, timeout=60).json()
        assert legacy["usage"]["completion_tokens"] == 16
        assert legacy["choices"][0]["finish_reason"] == "length"
        # the limit bounds it, then the context (both above the legacy default of 16)
        for positions, want_tokens in ((None, 20), (len(ids) + 18, 18)):
            if positions is not None:
                engine.max_positions = positions  # a model of that many positions
            row = srv.GenerationRow(ids, None, want_tokens, stop_ids=stop_ids)
            want = srv.generate_rows(ref.model, ref.tok, [row])[0]
            assert want["completion_tokens"] == want_tokens  # no end of turn before
            got = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60).json()
            choice = got["choices"][0]
            assert choice["message"]["content"] == want["text"], got
            assert choice["finish_reason"] == "length"
            assert got["usage"]["completion_tokens"] == want_tokens
        engine.max_positions = len(ids)  # the prompt fills the context: a 400 naming it
        r = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    finally:
        live.stop()


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"temperature": 5}, "temperature"),
        ("/v1/completions", {"n": 0}, "n"),
        ("/v1/completions", {"logprobs": 25}, "logprobs"),
        ("/v1/completions", {"tools": []}, "tools"),  # unknown on legacy completions
        ("/v1/completions", {"prompt": ["a", 3]}, "prompt"),  # every union member's error
        ("/v1/completions", {"model": None}, "model"),
        ("/v1/completions", {"n": 0, "temperature": 5}, None),  # two fields at fault
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": 5}]},
            "messages.0.content",
        ),
        ("/v1/chat/completions", {"metadata": {"a": 1}}, "metadata.a"),
        ("/v1/chat/completions", {"top_p": 0}, "top_p"),
    ],
)
def test_validation_errors_name_the_field_in_param(live, path, body, param):
    base = {"model": "base", "max_tokens": 2}
    base.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT})
    r = httpx.post(f"{live.url}{path}", json={**base, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert (param or next(iter(body))).split(".")[0] in err["message"]


def test_models_retrieve_and_405_is_a_client_error(live, client):
    got = client.models.retrieve("gen-deep")
    want = next(m for m in client.models.list().data if m.id == "gen-deep")
    assert got.model_dump() == want.model_dump()
    assert got.model_extra["method"] == "deep" and got.model_extra["num_virtual_tokens"] == 4
    engine = live.server.config.app.state.engine
    assert client.models.retrieve("base").id == engine.base_name
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.body["param"] == "model" and "'nope' does not exist" in e.value.body["message"]
    r = httpx.get(f"{live.url}/v1/completions", timeout=30)
    assert r.status_code == 405
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": {"type": "text"}},
        {"tool_choice": "none"},
        {"tools": [], "tool_choice": "auto", "parallel_tool_calls": False},
        {"parallel_tool_calls": True},
        {"store": False, "metadata": {"user": "u1", "run": "7"}},
    ],
)
def test_chat_options_at_neutral_values_change_nothing(client, extra):
    kw = dict(model="base", messages=CHAT, max_tokens=6, temperature=0)
    plain = client.chat.completions.create(**kw)
    got = client.chat.completions.create(**kw, extra_body=extra)
    assert got.choices[0].message.content == plain.choices[0].message.content
    assert got.usage.model_dump() == plain.usage.model_dump()


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [TOOL]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"store": True}, "store"),
    ],
)
def test_chat_options_that_need_tools_or_json_mode_are_400s(live, extra, param):
    body = {"model": "base", "messages": CHAT, "max_tokens": 2, **extra}
    r = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "unsupported_parameter"
    assert err["message"].startswith(f"{param}:") and "leave it out" in err["message"]
