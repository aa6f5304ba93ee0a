"""The OpenAI-compatible surface, through the real ``openai`` client on a loopback server:
chat completions, server-sent-event streaming, log-probabilities, echo, usage and error bodies.

Every answer is compared with the same prompt run offline (tiny random Llama with the SmolLM2
tokenizer; the real SmolLM2-135M-Instruct where a chat template is needed).
"""

from __future__ import annotations

import copy
import json
import time

import httpx
import openai
import pytest
import test_server
import torch
import torch.nn.functional as F
from test_server import PROMPTS, LiveServer, make_app, wait_for

from softprompt import engine as engine_mod
from softprompt import server as srv
from softprompt.server import ServeSettings, create_app

bank = test_server.bank  # the module's fixtures: saved adapters, the offline reference
ref = test_server.ref


@pytest.fixture(scope="module")
def live(bank):
    server = LiveServer(make_app(bank))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)


def greedy_ids(model, ids, name, max_tokens, eos):
    """Greedy continuation of ``ids`` alone (ids, stopped before EOS)."""
    out = model.generate(
        input_ids=torch.tensor([ids]),
        adapter_names=[name],
        max_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=eos,
    )[0, len(ids) :].tolist()
    stop = next((i for i, t in enumerate(out) if t in eos), None)
    return out if stop is None else out[:stop]


def token_logprobs(model, ids, name) -> torch.Tensor:
    """(T, V) log-probabilities of the next token at each position of ``ids`` alone."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), adapter_names=[name]).logits[0]
    return F.log_softmax(logits.float(), dim=-1)


# ------------------------------------------------------------------------------ completions


@pytest.mark.parametrize("model", ["gen-deep", "gen-ptuning", "base"])
def test_streamed_completion_equals_the_non_streamed_one(client, ref, model):
    real = None if model == "base" else model
    for prompt in PROMPTS[:2]:
        full = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        want = ref.greedy(real, prompt, 8)
        assert full.choices[0].text == want["text"]
        assert full.choices[0].finish_reason == want["finish_reason"]
        chunks = list(
            client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == want["text"]
        finals = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finals[-1] == want["finish_reason"] and set(finals[:-1]) <= {None}
        assert chunks[-1].usage.model_dump() == full.usage.model_dump()
        assert len(chunks) > 2  # the text came in pieces, not at the end


def test_streamed_n_and_stop_strings_match_the_non_streamed(client, ref):
    full = ref.greedy("gen-ptuning", PROMPTS[2], 10)["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    kw = dict(model="gen-ptuning", prompt=PROMPTS[2], max_tokens=10, stop=[stop])
    one = client.completions.create(temperature=0, **kw)
    assert one.choices[0].text == full[: full.find(stop)]
    assert one.choices[0].finish_reason == "stop"
    texts = {0: "", 1: ""}
    for c in client.completions.create(temperature=0.9, seed=3, n=2, stream=True, **kw):
        texts[c.choices[0].index] += c.choices[0].text
    sampled = client.completions.create(temperature=0.9, seed=3, n=2, **kw)
    assert [texts[0], texts[1]] == [c.text for c in sampled.choices]
    for t in texts.values():
        assert stop not in t


def test_completion_logprobs_are_the_models(client, ref):
    prompt, name = PROMPTS[3], "gen-deep"
    ids = ref.ids(name, prompt)
    new = greedy_ids(ref.model, ids, name, 6, ref.eos)
    logp = token_logprobs(ref.model, ids + new, name)
    out = client.completions.create(
        model=name, prompt=prompt, max_tokens=6, temperature=0, logprobs=3
    )
    lp = out.choices[0].logprobs
    assert lp.tokens == [ref.tok.decode([t]) for t in new]
    want = [float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(new)]
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs, want, strict=True)) < 1e-4
    for got, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and abs(max(top.values()) - got) < 1e-6  # greedy: the top token
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.text_offset == offsets  # each token's offset in the choice's text
    streamed, streamed_offsets = [], []
    for c in client.completions.create(
        model=name, prompt=prompt, max_tokens=6, temperature=0, logprobs=3, stream=True
    ):
        if c.choices and c.choices[0].logprobs:
            streamed += c.choices[0].logprobs.token_logprobs
            streamed_offsets += c.choices[0].logprobs.text_offset
    assert streamed == lp.token_logprobs
    assert streamed_offsets == lp.text_offset  # the count goes on from chunk to chunk


@pytest.mark.parametrize(
    "model,use_template", [("base", True), ("gen-deep", False), ("gen-deep", True)]
)
def test_echo_with_max_tokens_0_gives_the_prompts_logprobs(
    client,
    ref,
    model,
    use_template,
):
    """What log-likelihood evaluation over a completions API (lm-eval) asks for."""
    real = None if model == "base" else model
    prompts = PROMPTS[:2]
    out = client.completions.create(
        model=model,
        prompt=prompts,
        max_tokens=0,
        echo=True,
        logprobs=1,
        temperature=0,
        extra_body={"use_template": use_template},
    )
    assert out.usage.completion_tokens == 0
    for prompt, choice in zip(prompts, out.choices, strict=True):
        ids = ref.ids(real, prompt) if use_template else ref.tok(prompt)["input_ids"]
        logp = token_logprobs(ref.model, ids, real)
        real_pos = [i for i, t in enumerate(ids) if t >= 0]
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(real_pos)
        if real_pos[0] == 0:
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for got, i in zip(lp.token_logprobs, real_pos, strict=True):
            if i > 0:
                assert abs(got - float(logp[i - 1, ids[i]])) < 1e-4
        if model == "base" or not use_template:
            assert choice.text == prompt
    assert out.usage.prompt_tokens == sum(
        len(ref.tok(p)["input_ids"])
        if not use_template or real is None
        else sum(t >= 0 for t in ref.ids(real, p))
        for p in prompts
    )
    # echo with generation: the prompt's entries, then the completion's
    both = client.completions.create(
        model="base", prompt=PROMPTS[0], max_tokens=3, echo=True, logprobs=0, temperature=0
    )
    gen = ref.greedy(None, PROMPTS[0], 3)["text"]
    assert both.choices[0].text == PROMPTS[0] + gen
    n_prompt = len(ref.tok(PROMPTS[0])["input_ids"])
    assert len(both.choices[0].logprobs.tokens) == n_prompt + both.usage.completion_tokens


# ------------------------------------------------------------------------------ errors


def test_errors_are_openai_bodies_naming_the_field(client, live):
    cases = [
        (dict(model="gen-deep", messages=[]), "messages"),
        (dict(model="base", messages=[{"role": "wizard", "content": "hi"}]), "messages.0.role"),
        (
            dict(model="base", messages=[{"role": "user", "content": "a"}, {"role": "user"}]),
            "messages.1.content",
        ),
        (dict(model="sent-prompt", messages=[{"role": "user", "content": "hi"}]), "model"),
        (
            dict(model="base", messages=[{"role": "user", "content": "hi"}], top_logprobs=2),
            "top_logprobs",
        ),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**kw)
        err = e.value.body
        assert err["param"] == param and err["type"] == "invalid_request_error", err
        assert param.split(".")[0] in err["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt="hi", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"


def test_a_client_that_leaves_mid_stream_frees_its_row(bank, monkeypatch):
    app = make_app(bank, max_tokens_limit=400)
    engine = app.state.engine
    results = []
    real = engine_mod.RowDecoder.finish

    def spy(self, *a, **kw):
        real(self, *a, **kw)
        results.append(self.result)

    monkeypatch.setattr(engine_mod.RowDecoder, "finish", spy)
    live = LiveServer(app)
    try:
        body = {
            "model": "gen-deep",
            "prompt": PROMPTS[0],
            "max_tokens": 400,
            "temperature": 0,
            "stream": True,
            "stop": ["\u00a7\u00a7never"],
        }
        with httpx.Client(base_url=live.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert json.loads(first[6:])["object"] == "text_completion"
            # the connection is closed here, long before 400 tokens
        wait_for(lambda: engine.stats["aborted_rows"] == 1 and results)
        assert results[0]["finish_reason"] == "aborted"
        assert results[0]["completion_tokens"] < 400
        wait_for(lambda: engine.running == 0)
    finally:
        live.stop()


@pytest.mark.parametrize("scheduling", ["step", "batch"])
def test_a_non_streamed_client_that_times_out_frees_its_row(bank, monkeypatch, scheduling):
    """A client that gives up on a non-streamed answer (a timeout, Ctrl-C) closes its
    connection: its row is aborted at the next decode step instead of decoding to max_tokens."""
    app = make_app(bank, max_tokens_limit=400, scheduling=scheduling)
    engine = app.state.engine
    results = []
    real_finish, real_push = engine_mod.RowDecoder.finish, engine_mod.RowDecoder.push

    def spy(self, *a, **kw):
        real_finish(self, *a, **kw)
        results.append(self.result)

    def slow_push(self, token):  # 400 tokens take >= 4 s: the row is decoding when it leaves
        time.sleep(0.01)
        return real_push(self, token)

    monkeypatch.setattr(engine_mod.RowDecoder, "finish", spy)
    monkeypatch.setattr(engine_mod.RowDecoder, "push", slow_push)
    live = LiveServer(app)
    try:
        body = {
            "model": "gen-deep",
            "prompt": PROMPTS[0],
            "max_tokens": 400,
            "temperature": 0,
            "stop": ["\u00a7\u00a7never"],
        }
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{live.url}/v1/completions", json=body, timeout=0.5)
        wait_for(lambda: engine.stats["aborted_rows"] == 1 and results, timeout=10)
        assert results[0]["finish_reason"] == "aborted"
        assert results[0]["completion_tokens"] < 400
        wait_for(lambda: engine.running == 0, timeout=10)
        r = httpx.post(f"{live.url}/v1/completions", json={**body, "max_tokens": 2}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        live.stop()


# ------------------------------------------------------------------------------ chat


@pytest.fixture(scope="module")
def smol():
    from softprompt.loading import load_base

    return load_base("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def chat_live(smol):
    base, tok = smol
    server = LiveServer(create_app(base, copy.deepcopy(tok), {}, ServeSettings(max_wait_ms=5)))
    yield server
    server.stop()


CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour. \u00e9\u00e8 \u4f60\u597d"},
]


@pytest.mark.slow
def test_chat_completions_base_uses_the_chat_template(smol, chat_live):
    base, tok = smol
    client = openai.OpenAI(base_url=f"{chat_live.url}/v1", api_key="none", max_retries=0)
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    engine = chat_live.server.config.app.state.engine
    eos = list(engine._base_chat_stop_ids())
    model = engine.model
    new = greedy_ids(model, ids, None, 12, eos)
    want = tok.decode(new, skip_special_tokens=True)
    out = client.chat.completions.create(
        model="base", messages=CHAT, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(new)
    logp = token_logprobs(model, ids + new, None)
    got = [c.logprob for c in choice.logprobs.content]
    want_lp = [float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(new)]
    assert max(abs(a - b) for a, b in zip(got, want_lp, strict=True)) < 1e-4
    assert all(len(c.top_logprobs) == 2 for c in choice.logprobs.content)
    # streamed: the same text, role first, finish_reason last
    chunks = list(
        client.chat.completions.create(
            model="base", messages=CHAT, max_tokens=12, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


@pytest.mark.slow
def test_multibyte_text_streams_whole_characters(smol, chat_live):
    """A character split over tokens (CJK, emoji in byte-level BPE) is never sent in halves."""
    client = openai.OpenAI(base_url=f"{chat_live.url}/v1", api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": "Write 你好世界 and 🎉🎉 ten times."}]
    kw = dict(model="base", messages=msgs, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    pieces = [
        c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
    ]
    assert "".join(pieces) == full
    assert not any("\ufffd" in p for p in pieces) or "\ufffd" in full


@pytest.mark.slow
def test_chat_logprob_bytes_rebuild_the_content(chat_live):
    """Each ``logprobs.content`` entry's ``bytes`` are the token's own bytes: Chinese text in
    SmolLM2's byte-level BPE splits characters over tokens, and the entries' bytes joined are
    the content's UTF-8 (their ``token`` texts alone are U+FFFD)."""
    msgs = [{"role": "user", "content": "Repeat exactly, nothing else: 你好世界，今天天气很好"}]
    body = {"model": "base", "messages": msgs, "max_tokens": 20, "temperature": 0}
    r = httpx.post(
        f"{chat_live.url}/v1/chat/completions",
        json={**body, "logprobs": True, "top_logprobs": 2},
        timeout=120,
    ).json()
    choice = r["choices"][0]
    content, entries = choice["message"]["content"], choice["logprobs"]["content"]
    assert any("\u4e00" <= ch <= "\u9fff" for ch in content), content  # CJK came out
    assert any(e["token"] == "\ufffd" for e in entries)  # part of a character
    assert bytes(b for e in entries for b in e["bytes"]) == content.encode("utf-8")
    for e in entries:  # greedy: the top alternative is the token itself, bytes included
        assert e["top_logprobs"][0]["bytes"] == e["bytes"]


class _ChatTask:
    """The chat-task contract the server relies on (softprompt.tasks.Task, kind "chat")."""

    class spec:  # noqa: N801
        kind = "chat"

    def __init__(self, tok) -> None:
        self.tok = tok
        self.stop_ids = [tok.convert_tokens_to_ids("<|im_end|>")]

    def prompt_ids(self, row: dict) -> list[int]:
        text = self.tok.apply_chat_template(
            row["messages"], add_generation_prompt=True, tokenize=False
        )
        return list(self.tok(text, add_special_tokens=False)["input_ids"])


def test_a_chat_adapter_renders_through_its_task(bank, ref):
    """``"model": <adapter>`` with a chat task: Task.prompt_ids(messages), Task.stop_ids."""
    app = make_app(bank)
    entry = app.state.engine.entries["gen-deep"]
    entry.task = _ChatTask(ref.tok)  # a stand-in: the contract alone, before "chat" merges
    live = LiveServer(app)
    try:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)
        msgs = [{"role": "user", "content": PROMPTS[0]}]
        ids = entry.task.prompt_ids({"messages": msgs})
        kw = dict(model="gen-deep", messages=msgs, max_tokens=5, temperature=0)
        got = client.chat.completions.create(**kw)
        row = srv.GenerationRow(ids, "gen-deep", 5, stop_ids=tuple(entry.task.stop_ids))
        want = srv.generate_rows(ref.model, ref.tok, [row])[0]
        assert got.choices[0].message.content == want["text"]
        assert got.usage.prompt_tokens == len(ids)
        chunks = client.chat.completions.create(stream=True, **kw)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want["text"]
        with pytest.raises(openai.BadRequestError) as e:  # a chat adapter takes messages
            client.completions.create(model="gen-deep", prompt="hi", max_tokens=2)
        assert e.value.body["param"] == "model" and "chat" in e.value.body["message"]
    finally:
        live.stop()


def test_lm_evals_loglikelihood_over_the_completions_api(bank, ref, live):
    """lm-eval's ``local-completions`` (echo, max_tokens 1, logprobs 1) gets the model's
    log-likelihoods: the sum over the continuation's tokens of a plain forward's."""
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api] (tenacity)")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    lm = get_model("local-completions").create_from_arg_string(
        f"model=base,base_url={live.url}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={bank['folder']},tokenized_requests=False,num_concurrent=1"
    )
    pairs = [("The cat sat on", " the mat"), ("One, two,", " three, four")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, idx=0) for p in pairs], True)
    for (ctx, cont), (logp, greedy) in zip(pairs, got, strict=True):
        whole, head = ref.tok(ctx + cont)["input_ids"], ref.tok(ctx)["input_ids"]
        table = token_logprobs(ref.model, whole, None)
        steps = range(len(head), len(whole))
        want = sum(float(table[i - 1, whole[i]]) for i in steps)
        assert abs(logp - want) < 1e-3, (ctx, logp, want)
        assert greedy == all(int(table[i - 1].argmax()) == whole[i] for i in steps)


def test_a_real_chat_adapter_answers_chat_completions(bank, ref, tmp_path):
    """An adapter trained with ``--task chat`` (``softprompt.chat``; skipped until it is
    merged): its Task renders the messages with its soft tokens; the served text equals
    ``generate_rows`` on ``Task.prompt_ids`` with ``Task.stop_ids``, streamed or not."""
    pytest.importorskip("softprompt.chat", reason="the chat task is not merged yet")
    from conftest import perturb
    from transformers import AutoModelForCausalLM

    import softprompt as sp
    from softprompt.tasks import CHAT_TEMPLATE, Task, TaskSpec

    model = sp.attach(AutoModelForCausalLM.from_pretrained(bank["folder"]), tokenizer=ref.tok)
    spec = TaskSpec(kind="chat", template=CHAT_TEMPLATE, soft_tokens=3, placement="user")
    config = sp.PromptTuningConfig(num_virtual_tokens=3, placement="template")
    model.add_adapter("chat", config, ref.tok).task = spec.to_dict()
    perturb(model)
    model.save_adapter(tmp_path / "chat", "chat")
    task = Task(spec, model, ref.tok)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}]
    ids = task.prompt_ids({"messages": msgs})
    assert any(t < 0 for t in ids)  # the soft tokens are in the prompt
    row = srv.GenerationRow(ids, "chat", 6, stop_ids=tuple(task.stop_ids))
    want = srv.generate_rows(model, ref.tok, [row])[0]
    live = LiveServer(make_app(bank, adapters={"chat": str(tmp_path / "chat")}))
    try:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)
        kw = dict(model="chat", messages=msgs, max_tokens=6, temperature=0)
        got = client.chat.completions.create(**kw)
        assert got.choices[0].message.content == want["text"]
        assert got.choices[0].finish_reason == want["finish_reason"]
        assert got.usage.prompt_tokens == sum(t >= 0 for t in ids)
        chunks = client.chat.completions.create(stream=True, **kw)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want["text"]
    finally:
        live.stop()


def test_token_id_prompts_are_used_as_they_are(client, ref):
    """OpenAI's token-id prompts (one list of ids, or a list of them): no template, the ids as
    given; text and echo as for the same text sent with use_template false; ids outside the
    vocabulary are a 400 naming the position."""
    texts = PROMPTS[:2]
    ids = [ref.tok(t)["input_ids"] for t in texts]
    for model in ("gen-deep", "base"):
        as_text = client.completions.create(
            model=model,
            prompt=texts,
            max_tokens=5,
            temperature=0,
            extra_body={"use_template": False},
        )
        as_ids = client.completions.create(model=model, prompt=ids, max_tokens=5, temperature=0)
        assert [c.text for c in as_ids.choices] == [c.text for c in as_text.choices]
        assert as_ids.usage.prompt_tokens == sum(map(len, ids))
        one = client.completions.create(model=model, prompt=ids[0], max_tokens=5, temperature=0)
        assert len(one.choices) == 1 and one.choices[0].text == as_text.choices[0].text
    echo = client.completions.create(
        model="base", prompt=ids[0], max_tokens=0, echo=True, logprobs=0
    )
    assert echo.choices[0].text == ref.tok.decode(ids[0], skip_special_tokens=True)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt=[5, 10**7], max_tokens=2)
    assert e.value.body["param"] == "prompt" and "position 1" in e.value.body["message"]


def test_a_chat_ensemble_through_the_openai_client_votes(bank, ref, tmp_path):
    """``chat.completions.create(model=[a, b, c])``: three chat adapters (c a copy of a), each
    member's answer equals that adapter alone, the message is the majority's; ``combine``
    "mean" of two copies is that adapter's answer, log-probabilities included; 400s name the
    field (``stream`` with an ensemble)."""
    from transformers import AutoModelForCausalLM

    import softprompt as sp
    from softprompt.tasks import CHAT_TEMPLATE, TaskSpec

    model = sp.attach(AutoModelForCausalLM.from_pretrained(bank["folder"]), tokenizer=ref.tok)
    spec = TaskSpec(kind="chat", template=CHAT_TEMPLATE, soft_tokens=3, placement="user")
    for name, seed in (("c0", 3), ("c1", 4), ("c2", 3)):
        config = sp.PromptTuningConfig(num_virtual_tokens=3, placement="template")
        model.add_adapter(name, config, ref.tok).task = spec.to_dict()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.adapters[name].parameters():
                p.normal_(0, 1.0, generator=g)
        model.save_adapter(tmp_path / name, name)
    names = ["c1", "c0", "c2"]
    live = LiveServer(make_app(bank, adapters={n: str(tmp_path / n) for n in names}))
    try:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)
        msgs = [{"role": "user", "content": PROMPTS[1]}]
        kw = dict(messages=msgs, max_tokens=6, temperature=0)
        alone = {n: client.chat.completions.create(model=n, **kw) for n in names}
        texts = [alone[n].choices[0].message.content for n in names]
        assert texts[1] == texts[2] and texts[0] != texts[1]
        got = client.chat.completions.create(model=names, extra_body={"combine": "vote"}, **kw)
        record = got.choices[0].model_extra["ensemble"]
        assert [m["text"] for m in record["members"]] == texts
        assert got.choices[0].message.content == texts[1]
        assert (record["winner"], record["votes"]) == ("c0", 2)
        assert got.usage.completion_tokens == sum(alone[n].usage.completion_tokens for n in names)
        # combine "mean": the mean of two copies' distributions is that adapter's own, so the
        # ensemble [c0, c2] decodes c0's answer; log-probabilities come with it
        same = client.chat.completions.create(
            model=["c0", "c2"], extra_body={"combine": "mean"}, logprobs=True, **kw
        )
        assert same.choices[0].message.content == texts[1]
        assert same.choices[0].model_extra["ensemble"] == {
            "combine": "mean",
            "members": ["c0", "c2"],
        }
        solo = client.chat.completions.create(model="c0", logprobs=True, **kw)
        pairs = zip(same.choices[0].logprobs.content, solo.choices[0].logprobs.content, strict=True)
        for a, b in pairs:
            assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        parts = list(
            client.chat.completions.create(
                model=["c0", "c2"], extra_body={"combine": "mean"}, stream=True, **kw
            )
        )
        assert "".join(p.choices[0].delta.content or "" for p in parts) == texts[1]
        with pytest.raises(openai.BadRequestError) as e:  # a vote needs every member's text
            list(client.chat.completions.create(model=names, stream=True, **kw))
        assert e.value.body["param"] == "stream"
    finally:
        live.stop()
