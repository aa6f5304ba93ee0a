"""The HTTP server: mixed-adapter batches, the OpenAI-style API, limits, adapters at run time.

Tiny random Llama with the real SmolLM2 tokenizer; four adapters of four methods with different
numbers of virtual tokens. Every answer is compared with the same prompt run alone offline.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import mean_reference, perturb, tiny_model
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import softprompt as sp
from softprompt import engine as engine_mod
from softprompt import server as srv
from softprompt.lm import pad_left
from softprompt.server import GenerationRow, ServeSettings, create_app, generate_rows
from softprompt.tasks import Task, TaskSpec

PROMPTS = [
    "a wonderful, moving film",
    "boring and far too long",
    "say hello to everyone",
    "the plot is thin but the jokes land",
    "great acting",
    "what a waste of time",
]
CLASSIFY_WORDS = TaskSpec(
    kind="classify",
    template="Review: {text}\nSentiment: {label}",
    labels=["negative", "positive"],
)
CLASSIFY_PHRASES = TaskSpec(  # multi-token label words: the full-sequence scoring path
    kind="classify",
    template="{text} Verdict: {label}",
    labels=["bad", "good"],
    verbalizer={"bad": "a terrible movie", "good": "a great film"},
)
GENERATE = TaskSpec(kind="generate", template="Input: {input}\nOutput: {target}")
ADAPTERS = {  # name: (config, task)
    "sent-prompt": (sp.PromptTuningConfig(num_virtual_tokens=3), CLASSIFY_WORDS),
    "sent-prefix": (
        sp.PrefixTuningConfig(num_virtual_tokens=2, encoder_hidden_size=16),
        CLASSIFY_PHRASES,
    ),
    "gen-deep": (sp.DeepPromptConfig(num_virtual_tokens=4), GENERATE),
    "gen-ptuning": (sp.PTuningConfig(num_virtual_tokens=5, encoder_hidden_size=16), GENERATE),
}
CLASSIFIERS = ("sent-prompt", "sent-prefix")
GENERATORS = ("gen-deep", "gen-ptuning")


@pytest.fixture(scope="module")
def bank(tiny_folders, tmp_path_factory):
    """Four saved adapters (prompt, prefix+MLP, deep, P-tuning) on the tiny Llama, one on T5."""
    root = tmp_path_factory.mktemp("adapters")
    folder = tiny_folders["llama"]
    tok = AutoTokenizer.from_pretrained(folder)
    model = sp.attach(AutoModelForCausalLM.from_pretrained(folder), tokenizer=tok)
    for name, (config, task) in ADAPTERS.items():
        model.add_adapter(name, copy.deepcopy(config)).task = task.to_dict()
    perturb(model)
    for name in ADAPTERS:
        model.save_adapter(root / name, name)
    t5 = sp.attach(AutoModelForSeq2SeqLM.from_pretrained(tiny_folders["t5"]))
    t5.add_adapter("t5", sp.DeepPromptConfig(num_virtual_tokens=2))
    t5.save_adapter(root / "t5-deep", "t5")
    return {
        "root": root,
        "folder": folder,
        "tok": tok,
        "dirs": {name: str(root / name) for name in ADAPTERS},
    }


class Reference:
    """The offline truth: the same adapters on another copy of the model, one prompt at a time."""

    def __init__(self, bank) -> None:
        self.tok = bank["tok"]
        model = sp.attach(AutoModelForCausalLM.from_pretrained(bank["folder"]), tokenizer=self.tok)
        for name, path in bank["dirs"].items():
            sp.load_adapter(model, path, name=name)
        self.model = model
        self.tasks = {
            n: Task(TaskSpec.from_dict(model.adapters[n].task), model, self.tok) for n in ADAPTERS
        }
        self.eos = srv.eos_ids(model, self.tok)
        self.cache = {}

    def ids(self, name: str | None, text: str) -> list[int]:
        if name is None:
            return self.tok(text)["input_ids"]
        task = self.tasks[name]
        return task.prompt_ids({"text" if task.spec.kind == "classify" else "input": text})

    def greedy(self, name: str | None, text: str, max_tokens: int) -> dict:
        """model.generate on the prompt alone."""
        key = ("greedy", name, text, max_tokens)
        if key not in self.cache:
            ids = self.ids(name, text)
            out = self.model.generate(
                input_ids=torch.tensor([ids]),
                adapter_names=[name],
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=srv.pad_id(self.tok),
                eos_token_id=self.eos,
            )
            new = out[0, len(ids) :].tolist()
            stop = next((i for i, t in enumerate(new) if t in self.eos), None)
            new = new if stop is None else new[:stop]
            text_out = self.tok.decode(new, skip_special_tokens=True)
            self.cache[key] = {
                "text": text_out,
                "finish_reason": "length" if stop is None else "stop",
            }
        return self.cache[key]

    def sampled(self, name: str, text: str, max_tokens: int, seed: int) -> dict:
        key = ("sample", name, text, max_tokens, seed)
        if key not in self.cache:
            row = GenerationRow(
                self.ids(name, text), name, max_tokens, temperature=0.8, top_p=0.9, seed=seed
            )
            got = generate_rows(self.model, self.tok, [row])[0]
            self.cache[key] = {k: got[k] for k in ("text", "finish_reason")}
        return self.cache[key]

    def classify(self, name: str, text: str) -> dict:
        key = ("classify", name, text)
        if key not in self.cache:
            task = self.tasks[name]
            with torch.no_grad():
                probs = task.class_scores([self.ids(name, text)], [name]).softmax(-1)[0]
            labels = task.spec.labels
            self.cache[key] = {
                "label": labels[int(probs.argmax())],
                "scores": dict(zip(labels, probs.tolist(), strict=True)),
            }
        return self.cache[key]


@pytest.fixture(scope="module")
def ref(bank):
    return Reference(bank)


def make_app(bank, adapters=None, **settings):
    model = AutoModelForCausalLM.from_pretrained(bank["folder"])
    tok = copy.deepcopy(bank["tok"])
    settings.setdefault("max_wait_ms", 5)
    return create_app(
        model, tok, bank["dirs"] if adapters is None else adapters, ServeSettings(**settings)
    )


def complete(client, model, prompt, **kw):
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, **kw})


def assert_scores(got: dict, want: dict) -> None:
    assert got["label"] == want["label"]
    assert got["scores"].keys() == want["scores"].keys()
    for k in want["scores"]:
        assert abs(got["scores"][k] - want["scores"][k]) <= 1e-5, (k, got, want)


# ------------------------------------------------------------------------------ the bank


def test_bank_rows_equal_rows_alone_and_prefix_mlp_never_runs(ref):
    """Mixed methods and prompt lengths in one forward/generate; each row as if alone."""
    model, names = ref.model, [*ADAPTERS, None]
    calls = []
    for name in ("sent-prefix", "gen-ptuning"):  # reparameterisations: baked at load
        ad = model.adapters[name]
        assert ad.is_baked
        for module in ad.children():
            module.register_forward_hook(lambda *a: calls.append(1))
    prompts = [ref.tok(p)["input_ids"] for p in PROMPTS[: len(names)]]
    ids, mask = pad_left(prompts, srv.pad_id(ref.tok))
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        for b, (p, name) in enumerate(zip(prompts, names, strict=True)):
            alone = model(input_ids=torch.tensor([p]), adapter_names=[name]).logits[0]
            torch.testing.assert_close(mixed[b, -len(p) :], alone, atol=1e-4, rtol=0)
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=srv.pad_id(ref.tok))
        gen = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kw)
        for b, (p, name) in enumerate(zip(prompts, names, strict=True)):
            one = model.generate(input_ids=torch.tensor([p]), adapter_names=[name], **kw)
            new = one[0, len(p) :].tolist()
            assert gen[b, ids.shape[1] :].tolist()[: len(new)] == new
    assert calls == []


def test_classify_rows_with_heads_uses_each_rows_own_head():
    """Encoders (P-tuning v2 heads): one forward, each row read by its own adapter's head."""
    model = sp.attach(tiny_model("bert"))
    tok = type("Tok", (), {"pad_token_id": 0})()
    tasks = {}
    for i, name in enumerate(("h1", "h2")):
        ad = model.add_adapter(name, sp.DeepPromptConfig(num_virtual_tokens=2 + i))
        ad.set_task_head(2 + i)
        spec = TaskSpec("classify", "{text}", labels=[f"l{j}" for j in range(2 + i)], head=True)
        tasks[name] = Task(spec, model, tok)
    perturb(model)
    rows = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    names = ["h1", "h2", "h1"]
    with torch.no_grad():
        got = srv.classify_rows(model, rows, names, [tasks[n] for n in names])
        for row, name, scores in zip(rows, names, got, strict=True):
            alone = tasks[name].class_scores([row], [name])[0]
            torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)


def test_an_encoder_decoder_model_is_served(tiny_folders, bank):
    folder = tiny_folders["t5"]
    ref = sp.load_adapter(AutoModelForSeq2SeqLM.from_pretrained(folder), bank["root"] / "t5-deep")
    tok = copy.deepcopy(bank["tok"])
    app = create_app(
        AutoModelForSeq2SeqLM.from_pretrained(folder),
        tok,
        {"t5": bank["root"] / "t5-deep"},
        ServeSettings(max_wait_ms=20),
    )
    with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
        futs = [
            pool.submit(complete, c, name, PROMPTS[:2], max_tokens=3, temperature=0)
            for name in ("t5", "base")
        ]
        for name, fut in zip(("t5", "base"), futs, strict=True):
            r = fut.result()
            assert r.status_code == 200, r.text
            for p, choice in zip(PROMPTS, r.json()["choices"], strict=False):
                ids = torch.tensor([tok(p)["input_ids"]])
                out = ref.generate(
                    input_ids=ids,
                    adapter_names=[None if name == "base" else "t5"],
                    max_new_tokens=3,
                    do_sample=False,
                )
                new = [t for t in out[0, 1:].tolist() if t != tok.eos_token_id]  # drop start
                assert choice["text"] == tok.decode(new, skip_special_tokens=True)


# ------------------------------------------------------------------------------ in process


def test_completions_models_and_health(bank, ref):
    app = make_app(bank)
    engine = app.state.engine
    calls = []
    for name in ("sent-prefix", "gen-ptuning"):
        for module in engine.model.adapters[name].children():
            module.register_forward_hook(lambda *a: calls.append(1))
    with TestClient(app) as client:
        assert client.get("/health").json()["status"] == "ok"
        models = client.get("/v1/models").json()
        ids = [m["id"] for m in models["data"]]
        assert models["object"] == "list" and ids == [engine.base_name, *ADAPTERS]
        by_id = {m["id"]: m for m in models["data"]}
        assert by_id["sent-prefix"]["method"] == "prefix"
        assert by_id["gen-ptuning"]["num_virtual_tokens"] == 5
        assert by_id["sent-prompt"]["labels"] == ["negative", "positive"]
        for name in [*ADAPTERS, "base"]:
            r = complete(client, name, PROMPTS[:3], max_tokens=3, temperature=0)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "text_completion" and body["model"] == name
            assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
            real = None if name == "base" else name
            for i, choice in enumerate(body["choices"]):
                want = ref.greedy(real, PROMPTS[i], 3)
                assert choice["index"] == i
                assert (choice["text"], choice["finish_reason"]) == (
                    want["text"],
                    want["finish_reason"],
                )
            prompt_tokens = sum(sum(t >= 0 for t in ref.ids(real, p)) for p in PROMPTS[:3])
            usage = body["usage"]
            assert usage["prompt_tokens"] == prompt_tokens
            assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]
        # the base model's own name works as well as "base"
        r = complete(client, engine.base_name, PROMPTS[0], max_tokens=2, temperature=0)
        assert r.json()["choices"][0]["text"] == ref.greedy(None, PROMPTS[0], 2)["text"]
        # seeded sampling: the same text every time, batched or alone
        one = complete(
            client, "gen-deep", PROMPTS[1], max_tokens=4, temperature=0.8, top_p=0.9, seed=7
        )
        two = complete(
            client, "gen-deep", PROMPTS[1], max_tokens=4, temperature=0.8, top_p=0.9, seed=7
        )
        assert one.json()["choices"] == two.json()["choices"]
        assert one.json()["choices"][0]["text"] == ref.sampled("gen-deep", PROMPTS[1], 4, 7)["text"]
        # n copies get seeds seed, seed+1, ...
        r = complete(
            client, "gen-deep", PROMPTS[1], max_tokens=4, temperature=0.8, top_p=0.9, seed=6, n=2
        )
        assert r.json()["choices"][1]["text"] == one.json()["choices"][0]["text"]
        # a stop string cuts the text before it
        full = ref.greedy("gen-ptuning", PROMPTS[2], 6)["text"]
        cut = len(full) // 2
        stop = full[cut : cut + 2]
        r = complete(client, "gen-ptuning", PROMPTS[2], max_tokens=6, temperature=0, stop=[stop])
        choice = r.json()["choices"][0]
        assert choice["text"] == full[: full.find(stop)] and choice["finish_reason"] == "stop"
        stats = client.get("/v1/stats").json()
        assert stats["model_calls"] >= 1 and stats["failed_calls"] == 0
    assert calls == []  # prefix MLP / P-tuning encoder never ran: baked when loaded
    assert not engine._thread.is_alive()  # lifespan shutdown stopped the worker


def test_classify_matches_task_class_scores(bank, ref):
    # the worker waits up to 2 s for a full batch: both requests' 12 rows go in ONE model call
    app = make_app(bank, max_wait_ms=2000)
    engine = app.state.engine
    calls = []
    with TestClient(app) as client:
        forward = engine.model.forward
        engine.model.forward = lambda *a, **kw: (
            calls.append((kw["input_ids"].shape[0], set(kw.get("adapter_names") or [])))
            or forward(*a, **kw)
        )
        with ThreadPoolExecutor(2) as pool:  # both adapters in one batch: mixed answers
            futs = {
                name: pool.submit(
                    client.post, "/v1/classify", json={"model": name, "input": PROMPTS}
                )
                for name in CLASSIFIERS
            }
            results = {name: fut.result() for name, fut in futs.items()}
        stats = client.get("/v1/stats").json()
        assert stats["model_calls"] == 1 and stats["mixed_adapter_calls"] == 1, stats
        assert stats["batch_sizes"] == {str(2 * len(PROMPTS)): 1}
        # one forward with rows of both adapters (multi-token label words: each prompt is
        # scored with each of the 2 labels, so 12 prompts make 24 sequences)
        assert len(calls) == 1 and calls[0][1] == set(CLASSIFIERS), calls
        assert calls[0][0] == 2 * len(PROMPTS) * 2
        del engine.model.forward
        for name, r in results.items():
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "classification" and body["model"] == name
            for i, item in enumerate(body["data"]):
                assert item["index"] == i
                assert_scores(item, ref.classify(name, PROMPTS[i]))
        # one adapter alone: the single-token path; an object of template fields works too
        r = client.post(
            "/v1/classify", json={"model": "sent-prompt", "input": {"text": PROMPTS[4]}}
        )
        assert_scores(r.json()["data"][0], ref.classify("sent-prompt", PROMPTS[4]))
        r = client.post("/v1/classify", json={"model": "gen-deep", "input": "x"})
        assert (
            r.status_code == 400 and "not a classification adapter" in r.json()["error"]["message"]
        )


def test_adapters_load_and_unload_at_run_time(bank, ref, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (bank["root"] / "escape").unlink(missing_ok=True)
    (bank["root"] / "escape").symlink_to(outside, target_is_directory=True)
    with TestClient(make_app(bank, adapters={"sent-prompt": bank["dirs"]["sent-prompt"]})) as c:
        assert complete(c, "late", PROMPTS[0], max_tokens=2).status_code == 404
        r = c.post("/v1/adapters", json={"name": "late", "path": "gen-deep"})
        assert r.status_code == 201, r.text
        assert r.json()["id"] == "late" and r.json()["method"] == "deep"
        r = complete(c, "late", PROMPTS[0], max_tokens=3, temperature=0)
        assert r.json()["choices"][0]["text"] == ref.greedy("gen-deep", PROMPTS[0], 3)["text"]
        assert "late" in [m["id"] for m in c.get("/v1/models").json()["data"]]
        # absolute paths inside the root are fine
        r = c.post("/v1/adapters", json={"name": "abs", "path": bank["dirs"]["gen-ptuning"]})
        assert r.status_code == 201
        assert c.delete("/v1/adapters/late").json() == {
            "id": "late",
            "object": "model",
            "deleted": True,
        }
        r = complete(c, "late", PROMPTS[0], max_tokens=2)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert c.delete("/v1/adapters/late").status_code == 404
        assert "late" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
        # refused: traversal, absolute paths outside, symlinks out, bad names, clashes, other models
        for path in ("../../etc", "/etc", str(outside), "escape", "gen-deep/../../.."):
            r = c.post("/v1/adapters", json={"name": "x", "path": path})
            assert r.status_code == 403, (path, r.text)
            assert "outside the allowed adapter folders" in r.json()["error"]["message"]
        r = c.post("/v1/adapters", json={"name": "x", "path": "no-such-adapter"})
        assert r.status_code == 400
        for bad in ("../x", "a b", "x" * 65, "", "a.b"):
            r = c.post("/v1/adapters", json={"name": bad, "path": "gen-deep"})
            assert r.status_code == 400 and "invalid" in r.json()["error"]["message"], bad
        assert c.post("/v1/adapters", json={"name": "abs", "path": "gen-deep"}).status_code == 409
        assert c.post("/v1/adapters", json={"name": "base", "path": "gen-deep"}).status_code == 409
        r = c.post("/v1/adapters", json={"name": "t5", "path": "t5-deep"})
        assert r.status_code == 409, r.text
        assert "made for another base model" in r.json()["error"]["message"]
        assert "t5" not in [m["id"] for m in c.get("/v1/models").json()["data"]]


def test_bad_requests_get_clear_errors(bank):
    app = make_app(
        bank, api_key="sekrit", max_prompt_tokens=12, max_tokens_limit=8, max_body_bytes=2000
    )
    auth = {"Authorization": "Bearer sekrit"}
    with TestClient(app) as c:

        def post(body=None, **kw):
            return c.post("/v1/completions", json=body, headers=kw.pop("headers", auth), **kw)

        ok = {"model": "gen-deep", "prompt": "hi", "max_tokens": 2}
        assert post(ok).status_code == 200
        assert c.get("/health").status_code == 200  # open without a key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            r = post(ok, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/models").status_code == 401
        r = post({**ok, "model": "nope"})
        assert r.status_code == 404 and "'nope' does not exist" in r.json()["error"]["message"]
        r = post({**ok, "prompt": "word " * 500})
        assert r.status_code == 413 and "2000 bytes" in r.json()["error"]["message"]
        r = post({**ok, "prompt": "word " * 50})
        assert r.status_code == 400 and "limit is 12 tokens" in r.json()["error"]["message"]
        r = post({**ok, "max_tokens": 9})
        assert r.status_code == 400 and "limit is 8" in r.json()["error"]["message"]
        r = c.post(
            "/v1/completions",
            content=b'{"model": "gen-deep", "prompt": ',
            headers={**auth, "content-type": "application/json"},
        )
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        for body, field in (
            ({**ok, "max_tokens": "2"}, "max_tokens"),
            ({**ok, "prompt": 5}, "prompt"),
            ({**ok, "temperature": -1}, "temperature"),
            ({**ok, "prompt": ["a", 3]}, "prompt"),
            ({"prompt": "hi"}, "model"),
            ({**ok, "frobnicate": 1}, "frobnicate"),
            ({**ok, "stream": True, "echo": True}, "echo"),
            ({**ok, "max_tokens": 0}, "max_tokens"),
            ({**ok, "logit_bias": {"5": 1.0}}, "logit_bias"),
            ({**ok, "prompt": []}, "prompt"),
            ({**ok, "model": "base", "prompt": ""}, "prompt"),
            ([1, 2], "body"),
        ):
            r = post(body)
            assert r.status_code == 400, (body, r.text)
            assert field in r.json()["error"]["message"], (field, r.json())
        assert c.get("/v1/nothing-here", headers=auth).status_code == 404
        assert post(ok).status_code == 200  # and the server still answers


@pytest.mark.parametrize("scheduling", ["step", "batch"])
def test_queue_full_is_429_and_a_failing_row_fails_alone(bank, ref, monkeypatch, scheduling):
    app = make_app(bank, max_queue=2, max_wait_ms=0, scheduling=scheduling)
    engine = app.state.engine
    poison = ref.ids("gen-deep", "POISON")
    if scheduling == "batch":
        real = srv.generate_rows

        def flaky(model, tok, rows, *a, **kw):
            if any(r.ids == poison for r in rows):
                raise ValueError("poisoned row")
            return real(model, tok, rows, *a, **kw)

        monkeypatch.setattr(engine_mod, "generate_rows", flaky)
    else:  # the prefill of the rows that join
        real_add = engine_mod.StepBatch.add

        def flaky_add(self, decoders):
            if any(d.row.ids == poison for d in decoders):
                raise ValueError("poisoned row")
            return real_add(self, decoders)

        monkeypatch.setattr(engine_mod.StepBatch, "add", flaky_add)
    with TestClient(app) as c, ThreadPoolExecutor(4) as pool:
        engine.model_lock.acquire()  # hold the worker: requests pile up
        try:
            first = pool.submit(complete, c, "gen-deep", PROMPTS[0], max_tokens=2, temperature=0)
            wait_for(lambda: engine.running == 1)
            queued = [
                pool.submit(complete, c, "gen-deep", "POISON", max_tokens=2, temperature=0),
                pool.submit(complete, c, "gen-ptuning", PROMPTS[1], max_tokens=2, temperature=0),
            ]
            wait_for(lambda: engine.queued == 2)
            r = complete(c, "gen-deep", PROMPTS[2], max_tokens=2)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert "queue is full" in r.json()["error"]["message"]
        finally:
            engine.model_lock.release()
        assert (
            first.result().json()["choices"][0]["text"]
            == ref.greedy("gen-deep", PROMPTS[0], 2)["text"]
        )
        bad, good = (f.result() for f in queued)
        assert bad.status_code == 500 and "poisoned row" in bad.json()["error"]["message"]
        assert good.status_code == 200, good.text
        assert good.json()["choices"][0]["text"] == ref.greedy("gen-ptuning", PROMPTS[1], 2)["text"]
        assert engine.stats["failed_calls"] == 2  # the batch of two, then the poisoned row alone
        assert engine.stats["rejected_queue_full"] == 1


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


# ------------------------------------------------------------------------------ a real server


class LiveServer:
    """uvicorn on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})
        self.thread.start()
        wait_for(lambda: self.server.started)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def plan(client: int, j: int):
    """The load test's request number j of a client: (path, body, expected)."""
    k = client * 21 + j  # 21: coprime to 4, 5 and 6, so concurrent clients differ
    prompt = PROMPTS[k % len(PROMPTS)]
    kind = k % 4
    if client % 8 == 0 and j == 10:
        return "/v1/completions", {"model": "nope", "prompt": prompt}, 404
    if client % 8 == 1 and j == 10:
        return "/v1/completions", {"model": "gen-deep", "prompt": prompt, "max_tokens": 10**6}, 400
    if client % 8 == 2 and j == 10:
        return "/v1/classify", {"model": "sent-prompt", "input": 7}, 400
    if kind in (0, 1):
        name = [*ADAPTERS, "base"][k % 5]
        n = 2 + k % 2
        body = {"model": name, "prompt": prompt, "max_tokens": n, "temperature": 0}
        return "/v1/completions", body, ("greedy", None if name == "base" else name, prompt, n)
    if kind == 2:
        name = list(ADAPTERS)[k % 4]
        seed = PROMPTS.index(prompt)
        body = {
            "model": name,
            "prompt": prompt,
            "max_tokens": 3,
            "temperature": 0.8,
            "top_p": 0.9,
            "seed": seed,
        }
        return "/v1/completions", body, ("sample", name, prompt, 3, seed)
    name = CLASSIFIERS[k % 2]
    return "/v1/classify", {"model": name, "input": prompt}, ("classify", name, prompt)


def expected(ref, spec):
    kind, *rest = spec
    return {"greedy": ref.greedy, "sample": ref.sampled, "classify": ref.classify}[kind](*rest)


def test_load_on_a_real_server_then_graceful_shutdown(bank, ref, monkeypatch):
    clients, per_client = 32, 20
    specs = [plan(c, j)[2] for c in range(clients) for j in range(per_client)]
    for spec in specs:  # offline, one prompt at a time
        if not isinstance(spec, int):
            expected(ref, spec)
    app = make_app(bank, max_batch=16, max_wait_ms=20, max_queue=1024)
    engine = app.state.engine
    invocations = []  # (entry point, distinct adapters) of every model call the engine makes
    for entry in ("generate", "forward"):
        real = getattr(engine.model, entry)

        def spy(*a, _real=real, _entry=entry, **kw):
            invocations.append((_entry, len(set(kw.get("adapter_names") or [None]))))
            return _real(*a, **kw)

        setattr(engine.model, entry, spy)
    real_add = engine_mod.StepBatch.add  # scheduling "step": generation rows join by prefill

    def add_spy(self, decoders):
        invocations.append(("generate", len({d.row.adapter for d in decoders})))
        return real_add(self, decoders)

    monkeypatch.setattr(engine_mod.StepBatch, "add", add_spy)
    live = LiveServer(app)
    try:

        def run_client(c: int) -> list[tuple]:
            out = []
            with httpx.Client(base_url=live.url, timeout=60) as http:
                for j in range(per_client):
                    path, body, spec = plan(c, j)
                    out.append((spec, http.post(path, json=body)))
            return out

        t0 = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            answers = [a for part in pool.map(run_client, range(clients)) for a in part]
        elapsed = time.monotonic() - t0
        errors, checked = [], 0
        for spec, r in answers:
            if isinstance(spec, int):
                if r.status_code != spec:
                    errors.append((spec, r.status_code, r.text))
                continue
            if r.status_code != 200:
                errors.append((spec, r.status_code, r.text))
                continue
            want = expected(ref, spec)
            if spec[0] == "classify":
                assert_scores(r.json()["data"][0], want)
            else:
                choice = r.json()["choices"][0]
                assert (choice["text"], choice["finish_reason"]) == (
                    want["text"],
                    want["finish_reason"],
                ), spec
            checked += 1
        assert errors == []
        assert checked == clients * per_client - 12  # 12 planned bad requests answered 4xx
        stats = engine.snapshot()
        print(f"\n{len(answers)} requests in {elapsed:.1f}s; stats {json.dumps(stats)}")
        sizes = {int(k): v for k, v in stats["batch_sizes"].items()}
        assert stats["rows"] == checked and stats["failed_calls"] == 0
        assert stats["model_calls"] < checked / 3  # batching happened
        assert max(sizes) > 4 and stats["mixed_adapter_calls"] > 0
        assert stats["max_adapters_in_call"] >= 3
        # each engine call was ONE model invocation, rows of several adapters in it
        assert len(invocations) == stats["model_calls"], (len(invocations), stats)
        assert max(n for kind, n in invocations if kind == "generate") >= 3
        assert stats["decode_steps"] > 0 and stats["mixed_adapter_steps"] > 0

        # graceful shutdown: requests in flight when the server is told to stop still complete
        engine.model_lock.acquire()
        try:
            with ThreadPoolExecutor(3) as pool:
                futs = [
                    pool.submit(
                        httpx.post, f"{live.url}/v1/completions", json=plan(0, j)[1], timeout=60
                    )
                    for j in (0, 1, 5)
                ]
                wait_for(lambda: engine.running + engine.queued == 3)
                live.server.should_exit = True
                wait_for(lambda: not _port_open(live.url))  # no new connections
                engine.model_lock.release()
                for j, fut in zip((0, 1, 5), futs, strict=True):
                    r = fut.result()
                    assert r.status_code == 200, r.text
                    want = expected(ref, plan(0, j)[2])
                    assert r.json()["choices"][0]["text"] == want["text"]
        finally:
            if engine.model_lock.locked():
                engine.model_lock.release()
    finally:
        live.stop()
    assert not live.thread.is_alive() and not engine._thread.is_alive()


def _port_open(url: str) -> bool:
    host, port = url.rsplit("//", 1)[1].split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return True
    except OSError:
        return False


def test_chunked_body_over_the_limit_is_413(bank):
    live = LiveServer(make_app(bank, max_body_bytes=1000))
    try:

        def chunks():
            yield b'{"model": "gen-deep", "prompt": "'
            for _ in range(100):
                yield b"word " * 10
            yield b'"}'

        r = httpx.post(
            f"{live.url}/v1/completions",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413 and "1000 bytes" in r.json()["error"]["message"]
        ok = httpx.post(
            f"{live.url}/v1/completions",
            json={"model": "gen-deep", "prompt": "hi", "max_tokens": 1},
        )
        assert ok.status_code == 200
    finally:
        live.stop()


# ------------------------------------------------------------------------------ CLI glue


def test_serve_command_line(bank, monkeypatch):
    parser = argparse.ArgumentParser(prog="softprompt")
    srv.add_serve_parser(parser.add_subparsers(dest="command"))
    d = bank["dirs"]
    args = parser.parse_args(
        ["serve", "--adapter", f"a={d['gen-deep']}", "--adapter", f"b={d['sent-prompt']}"]
    )
    assert (args.host, args.port, args.func) == ("127.0.0.1", 8000, srv.cmd_serve)
    monkeypatch.setenv("SOFTPROMPT_API_KEY", "from-env")
    model, adapters, settings = srv.settings_from_args(args)
    assert model == bank["folder"]  # the adapters name their base model
    assert adapters == {"a": d["gen-deep"], "b": d["sent-prompt"]}
    assert settings.api_key == "from-env" and settings.adapter_roots is None
    for bad in ("nodir", "=x", "a/b=x"):
        with pytest.raises(sp.SoftPromptError, match="--adapter"):
            srv.settings_from_args(parser.parse_args(["serve", "--adapter", bad]))
    seen = {}

    def run(server):
        cfg = server.config
        seen.update(app=cfg.app, host=cfg.host, port=cfg.port, grace=cfg.timeout_graceful_shutdown)

    monkeypatch.setattr("uvicorn.Server.run", run)
    args = parser.parse_args(
        ["serve", "--model", bank["folder"], "--adapter", f"a={d['gen-deep']}", "--port", "0"]
    )
    assert args.func(args) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 0)
    assert seen["grace"] == 60 + srv.GRACE_MARGIN_S  # the engine answers at 60 s, uvicorn after
    with TestClient(seen["app"]) as c:
        r = c.get("/v1/models", headers={"Authorization": "Bearer from-env"})
        assert [m["id"] for m in r.json()["data"]] == [bank["folder"], "a"]
    monkeypatch.delenv("SOFTPROMPT_API_KEY")
    args = parser.parse_args(
        ["serve", "--model", bank["folder"], "--adapter", "a=" + str(os.devnull)]
    )
    with pytest.raises(sp.SoftPromptError, match="does not exist|not a softprompt adapter"):
        args.func(args)


# ------------------------------------------------------------------------------ hardening


def _raw(client, path, text: str, **kw):
    """POST a JSON body given as text (lone surrogates as \\ud800 escapes survive)."""
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


def assert_error(r, status: int, field: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert field in err["message"] or err["param"] == field, (field, err)
    return err


def test_seed_outside_64_bits_is_400_before_the_batch(bank, ref):
    with TestClient(make_app(bank)) as c:
        engine = c.app.state.engine
        base = {"model": "gen-deep", "prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0.8}
        for seed in (2**64, 2**63, -(2**63) - 1, 10**30):
            err = assert_error(complete(c, **{**base, "seed": seed}), 400, "seed")
            assert err["message"].startswith("seed:")
        assert engine.stats["model_calls"] == 0  # never reached a batch
        # the ends of the range work, with n copies past 2**63 - 1 (seed + i)
        top = complete(c, **{**base, "top_p": 0.9, "seed": 2**63 - 1, "n": 3})
        assert top.status_code == 200, top.text
        low = complete(c, **{**base, "top_p": 0.9, "seed": -(2**63)})
        assert low.status_code == 200, low.text
        one = complete(c, **{**base, "top_p": 0.9, "seed": 7})
        assert one.json()["choices"][0]["text"] == ref.sampled("gen-deep", PROMPTS[1], 4, 7)["text"]
        assert engine.stats["failed_calls"] == 0


def test_a_tiny_temperature_samples_the_greedy_token(bank, ref):
    """T -> 0 is greedy; logits / 1e-300 used to overflow to NaN probabilities (500)."""
    with TestClient(make_app(bank)) as c:
        want = ref.greedy("gen-deep", PROMPTS[2], 3)["text"]
        for t in (1e-300, 5e-324, 1e-30):
            r = complete(c, "gen-deep", PROMPTS[2], max_tokens=3, temperature=t, seed=1)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want, t


def test_lone_surrogates_are_400_naming_the_field(bank):
    with TestClient(make_app(bank)) as c:
        engine = c.app.state.engine
        cases = [
            ("/v1/completions", '{"model": "gen-deep", "prompt": "a\\ud800b"}', "prompt"),
            ("/v1/completions", '{"model": "gen-deep", "prompt": ["ok", "\\udfff"]}', "prompt.1"),
            ("/v1/completions", '{"model": "\\ud800", "prompt": "hi"}', "model"),
            ("/v1/completions", '{"model": "base", "prompt": "hi", "stop": "\\ud800"}', "stop"),
            ("/v1/completions", '{"model": "base", "prompt": "hi", "user": "\\ud800"}', "user"),
            ("/v1/classify", '{"model": "sent-prompt", "input": "\\ud800"}', "input"),
            ("/v1/classify", '{"model": "sent-prompt", "input": {"\\ud800": "x"}}', "input"),
            ("/v1/classify", '{"model": "sent-prompt", "input": [{"text": "\\udc00"}]}', "input"),
            ("/v1/adapters", '{"name": "\\ud800", "path": "gen-deep"}', "name"),
            ("/v1/adapters", '{"name": "x", "path": "gen-\\ud800"}', "path"),
            ("/v1/completions", '{"model": "base", "prompt": "hi", "\\ud800": 1}', "body"),
        ]
        for path, body, field in cases:
            err = assert_error(_raw(c, path, body), 400, field)
            assert err["type"] == "invalid_request_error"
            if field != "body":
                assert "lone surrogate" in err["message"], (body, err)
        # a surrogate pair (an escaped emoji) is valid text
        r = _raw(
            c, "/v1/completions", '{"model": "base", "prompt": "\\ud83d\\ude00", "max_tokens": 1}'
        )
        assert r.status_code == 200, r.text
        assert engine.stats["failed_calls"] == 0


def test_more_rows_than_the_queue_holds_is_400_not_429(bank):
    with TestClient(make_app(bank, max_queue=3)) as c:
        r = complete(c, "gen-deep", PROMPTS[:4], max_tokens=1)
        err = assert_error(r, 400, "prompt")
        assert "--max-queue" in err["message"] and "4 rows" in err["message"]
        assert "retry-after" not in r.headers
        err = assert_error(complete(c, "gen-deep", PROMPTS[:2], max_tokens=1, n=2), 400, "prompt")
        assert "--max-queue" in err["message"]
        r = c.post("/v1/classify", json={"model": "sent-prompt", "input": PROMPTS[:4]})
        assert "--max-queue" in assert_error(r, 400, "input")["message"]
        assert complete(c, "gen-deep", PROMPTS[:3], max_tokens=1).status_code == 200
        assert c.app.state.engine.stats["rejected_queue_full"] == 0


def test_adapter_files_symlinked_out_of_the_roots_are_refused(bank, ref, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    src = bank["root"] / "gen-deep"
    (outside / "adapter.safetensors").write_bytes((src / "adapter.safetensors").read_bytes())
    (outside / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    cases = {  # folder name: the file that leads out
        "link-weights": "adapter.safetensors",
        "link-config": "adapter_config.json",
        "link-trainable": "trainable.safetensors",
    }
    for name, file in cases.items():
        d = bank["root"] / name
        d.mkdir(exist_ok=True)
        for f in ("adapter_config.json", "adapter.safetensors"):
            (d / f).unlink(missing_ok=True)
            (d / f).write_bytes((src / f).read_bytes())
        (d / file).unlink(missing_ok=True)
        (d / file).symlink_to(outside / ("adapter.safetensors" if "safetensors" in file else file))
    inside = bank["root"] / "link-inside"  # a file symlink that stays inside the root is fine
    inside.mkdir(exist_ok=True)
    (inside / "adapter_config.json").unlink(missing_ok=True)
    (inside / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    (inside / "adapter.safetensors").unlink(missing_ok=True)
    (inside / "adapter.safetensors").symlink_to(src / "adapter.safetensors")
    app = make_app(bank, adapters={"sent-prompt": bank["dirs"]["sent-prompt"]})
    with TestClient(app) as c:
        for name, file in cases.items():
            r = c.post("/v1/adapters", json={"name": "x", "path": name})
            err = assert_error(r, 403, "path")
            assert file in err["message"] and "--adapter-root" in err["message"]
        assert "x" not in app.state.engine.entries
        r = c.post("/v1/adapters", json={"name": "ok", "path": "link-inside"})
        assert r.status_code == 201, r.text
        r = complete(c, "ok", PROMPTS[0], max_tokens=3, temperature=0)
        assert r.json()["choices"][0]["text"] == ref.greedy("gen-deep", PROMPTS[0], 3)["text"]


def test_a_non_finite_adapter_is_a_4xx_never_a_500(bank, tmp_path):
    from safetensors.torch import load_file, save_file

    for name in ("sent-prompt", "gen-deep"):
        bad = bank["root"] / f"nan-{name}"
        bad.mkdir(exist_ok=True)
        src = bank["root"] / name
        (bad / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
        tensors = load_file(src / "adapter.safetensors")
        save_file(
            {k: torch.full_like(v, float("nan")) for k, v in tensors.items()},
            bad / "adapter.safetensors",
        )
    app = make_app(bank, adapters={"sent-prompt": bank["dirs"]["sent-prompt"]}, max_wait_ms=50)
    with TestClient(app) as c:
        for name in ("sent-prompt", "gen-deep"):
            r = c.post("/v1/adapters", json={"name": f"nan-{name}", "path": f"nan-{name}"})
            if r.status_code != 201:  # refused at load (non-finite weights): a 4xx
                assert 400 <= r.status_code < 500 and r.json()["error"]["message"], r.text
                continue
            if name == "sent-prompt":  # with a good row in the same batch: it is answered
                with ThreadPoolExecutor(2) as pool:
                    good = pool.submit(c.post, "/v1/classify", json={"model": name, "input": "x"})
                    r = c.post("/v1/classify", json={"model": f"nan-{name}", "input": "x"})
                    assert good.result().status_code == 200
            else:
                r = complete(c, f"nan-{name}", "x", max_tokens=2, temperature=0)
            err = assert_error(r, 400, "model")
            assert "not finite" in err["message"], err


def test_drain_lets_rows_finish_within_the_grace_then_answers_503(bank, ref):
    app = make_app(bank, max_batch=1, max_tokens_limit=2000, max_wait_ms=0)
    engine = app.state.engine
    with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
        engine.model_lock.acquire()  # both rows wait: the drain starts with them in flight
        try:
            short = pool.submit(complete, c, "gen-deep", PROMPTS[0], max_tokens=3, temperature=0)
            wait_for(lambda: engine.running == 1)
            long = pool.submit(complete, c, "gen-deep", PROMPTS[1], max_tokens=2000, temperature=0)
            wait_for(lambda: engine.queued == 1)
            t0 = time.monotonic()
            engine.drain(1.0)
            wait_for(lambda: engine._stopping)
            err = assert_error(complete(c, "gen-deep", PROMPTS[2], max_tokens=2), 503, "")
            assert err["code"] == "shutting_down"
        finally:
            engine.model_lock.release()
        r = short.result()  # finished within the grace: answered as usual
        assert r.json()["choices"][0]["text"] == ref.greedy("gen-deep", PROMPTS[0], 3)["text"]
        r = long.result()  # still generating at the grace: 503 at once
        elapsed = time.monotonic() - t0
        err = assert_error(r, 503, "")
        assert err["code"] == "shutting_down" and "--graceful-timeout" in err["message"]
        assert 1.0 - 0.05 <= elapsed < 1.0 + 3, elapsed
        engine._thread.join(5)
        assert not engine._thread.is_alive()  # the worker stopped: nothing left to run


def test_sigterm_answers_503_at_the_graceful_timeout_and_exits(bank, tmp_path):
    """A real `softprompt serve` process: SIGTERM mid-generation; the long request gets its
    grace, then a JSON 503; the process exits long before the request would have finished."""
    import signal
    import subprocess
    import sys

    grace = 1.5
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["serve", "--model", bank["folder"], "--adapter", f"gen={bank['dirs']['gen-deep']}"]
    argv += ["--port", str(port), "--graceful-timeout", str(grace), "--max-tokens-limit", "2000"]
    argv += ["--max-batch", "1", "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "softprompt.cli", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        long = {"model": "gen", "prompt": "go", "max_tokens": 2000, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/completions", json=long, timeout=120)
            wait_for(lambda: httpx.get(f"{url}/v1/stats").json()["running"] == 1)
            queued = pool.submit(httpx.post, f"{url}/v1/completions", json=long, timeout=120)
            wait_for(lambda: httpx.get(f"{url}/v1/stats").json()["queued"] == 1)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in (first, queued)]
            answered = time.monotonic() - t0
            proc.wait(timeout=grace + 30)
            exited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for r in answers:
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["type"] == "service_unavailable" and err["code"] == "shutting_down"
        assert "--graceful-timeout" in err["message"]
    assert grace - 0.2 <= answered < grace + 3, answered  # in flight got the grace, no more
    assert exited < grace + 4 < grace + srv.GRACE_MARGIN_S, exited  # not uvicorn's cut-off
    assert proc.returncode in (0, -signal.SIGTERM), proc.returncode


def test_a_run_folder_loads_its_adapter_inside_the_roots_only(bank, tmp_path):
    """POST /v1/adapters takes the run folder `softprompt train` wrote (its adapter/), and the
    allowed-root check applies to the adapter folder it resolves to."""
    import shutil

    run = bank["root"] / "run-x"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(bank["dirs"]["gen-deep"], run / "adapter")
    escape = bank["root"] / "run-escape"
    shutil.rmtree(escape, ignore_errors=True)
    escape.mkdir()
    outside = tmp_path / "elsewhere"
    shutil.copytree(bank["dirs"]["gen-deep"], outside)
    (escape / "adapter").symlink_to(outside, target_is_directory=True)
    with TestClient(make_app(bank, adapters={"sent-prompt": bank["dirs"]["sent-prompt"]})) as c:
        r = c.post("/v1/adapters", json={"name": "run", "path": "run-x"})
        assert r.status_code == 201 and r.json()["method"] == "deep", r.text
        r = c.post("/v1/adapters", json={"name": "esc", "path": "run-escape"})
        assert r.status_code == 403, r.text
        assert "outside the allowed adapter folders" in r.json()["error"]["message"]


def test_a_short_request_finishes_while_a_long_one_decodes(bank, ref):
    """Scheduling "step": a 2-token request that arrives while a 300-token one runs joins at
    the next decode step and is answered long before the long one ends; both answers equal
    the same request run alone (scheduling "batch" gives the same answers)."""
    for scheduling in ("step", "batch"):
        app = make_app(bank, scheduling=scheduling, max_tokens_limit=400, max_wait_ms=0)
        engine = app.state.engine
        assert engine.scheduling == scheduling
        never = ["\u00a7\u00a7never"]
        with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
            long = pool.submit(
                complete, c, "gen-deep", PROMPTS[0], max_tokens=300, temperature=0, stop=never
            )
            wait_for(lambda e=engine: e.running == 1)
            steps_before = engine.stats["decode_steps"]
            short = complete(c, "gen-ptuning", PROMPTS[1], max_tokens=2, temperature=0)
            long_done_first = long.done()
            assert short.status_code == 200
            assert (
                short.json()["choices"][0]["text"]
                == ref.greedy("gen-ptuning", PROMPTS[1], 2)["text"]
            )
            got = long.result().json()["choices"][0]
            want = generate_rows(
                ref.model,
                ref.tok,
                [
                    GenerationRow(
                        ref.ids("gen-deep", PROMPTS[0]), "gen-deep", 300, stop=tuple(never)
                    )
                ],
            )[0]
            assert (got["text"], got["finish_reason"]) == (want["text"], want["finish_reason"])
        if scheduling == "step":
            assert not long_done_first and engine.stats["decode_steps"] > steps_before
            assert want["completion_tokens"] == 300
        else:  # one generate call ran the long row to its end; no per-step decoding
            assert engine.stats["decode_steps"] == 0


def test_a_classify_ensemble_combines_its_adapters_in_one_call(bank, tmp_path):
    """``"model": [a, b, c]``: each input through every adapter (three prompt-tuning seeds of
    one task), rows of one model call, combined by mean probability (or majority vote, ties
    to the higher mean) as softprompt.ensemble; equal to combining the single answers."""
    tok = bank["tok"]
    model = sp.attach(AutoModelForCausalLM.from_pretrained(bank["folder"]), tokenizer=tok)
    names = ["seed0", "seed1", "seed2"]
    for k, name in enumerate(names):
        model.add_adapter(
            name, sp.PromptTuningConfig(num_virtual_tokens=3)
        ).task = CLASSIFY_WORDS.to_dict()
        perturb(model, seed=10 + k)
        model.save_adapter(tmp_path / name, name)
    app = make_app(bank, {n: tmp_path / n for n in names}, max_wait_ms=50, max_batch=64)
    engine = app.state.engine
    with TestClient(app) as client:
        singles = {
            n: client.post("/v1/classify", json={"model": n, "input": PROMPTS}).json()["data"]
            for n in names
        }
        assert len({singles[n][0]["scores"]["positive"] for n in names}) == 3  # they differ
        for combine in ("mean", "vote"):
            before = engine.stats["model_calls"]
            r = client.post(
                "/v1/classify", json={"model": names, "input": PROMPTS, "combine": combine}
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["combine"] == combine and engine.stats["model_calls"] == before + 1
            for i, item in enumerate(body["data"]):
                one = [singles[n][i] for n in names]
                labels = list(one[0]["scores"])
                mean = {lb: sum(s["scores"][lb] for s in one) / len(names) for lb in labels}
                for lb in labels:
                    assert abs(item["scores"][lb] - mean[lb]) <= 1e-5
                votes = {lb: sum(s["label"] == lb for s in one) for lb in labels}
                if combine == "mean":
                    best = max(labels, key=mean.__getitem__)
                else:
                    best = max(labels, key=lambda lb, v=votes, m=mean: (v[lb], m[lb]))
                assert item["label"] == best
                assert item["members"] == {n: s["label"] for n, s in zip(names, one, strict=True)}
        for body, param in (
            ({"model": [names[0], "nope"], "input": "x"}, "model.1"),
            ({"model": [names[0], names[0]], "input": "x"}, "model"),
            ({"model": names, "input": "x", "combine": "max"}, "combine"),
            ({"model": [], "input": "x"}, "model"),
        ):
            r = client.post("/v1/classify", json=body)
            assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text


def _generation_members(bank, tmp_path, config, seeds):
    """Generation adapters ``config`` with random weights (name, seed), saved under tmp_path;
    returns the model that holds them."""
    model = sp.attach(AutoModelForCausalLM.from_pretrained(bank["folder"]), tokenizer=bank["tok"])
    for name, seed in seeds:
        model.add_adapter(name, copy.deepcopy(config)).task = GENERATE.to_dict()
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            for p in model.adapters[name].parameters():
                p.normal_(0, 1.0, generator=g)
        model.save_adapter(tmp_path / name, name)
    return model


@pytest.mark.parametrize("scheduling", ["step", "batch"])
def test_a_mean_probability_ensemble_decodes_one_text_from_its_members(bank, tmp_path, scheduling):
    """``"combine": "mean"`` on /v1/completions: every token is the argmax of the mean of the
    members' next-token probabilities (equal to decoding that by full forwards, no cache), the
    members' rows in one model call; log-probabilities are the ensemble's. An ensemble larger
    than the batch is a 400 naming ``model``."""
    tok = bank["tok"]
    config = sp.PrefixTuningConfig(num_virtual_tokens=3)
    model = _generation_members(bank, tmp_path, config, (("m0", 21), ("m1", 22), ("m2", 23)))
    for name in ("m0", "m1", "m2"):
        model.adapters[name].bake()
    model.eval()
    names = ["m1", "m0", "m2"]
    app = make_app(bank, {n: tmp_path / n for n in names}, max_wait_ms=50, scheduling=scheduling)
    engine = app.state.engine
    eos = set(srv.eos_ids(model, tok))
    with TestClient(app) as client:
        before = engine.stats["model_calls"]
        body = {"prompt": PROMPTS[:3], "max_tokens": 6, "temperature": 0}
        r = client.post(
            "/v1/completions", json={**body, "model": names, "combine": "mean", "logprobs": 1}
        )
        assert r.status_code == 200, r.text
        assert engine.stats["model_calls"] == before + 1
        out = r.json()
        differs, used = False, 0
        for choice, prompt in zip(out["choices"], PROMPTS[:3], strict=True):
            ids = engine.encode_completion(engine.resolve(names[0]), prompt, True)
            want = mean_reference(model, ids, names, 6, eos)
            assert choice["text"] == tok.decode(want, skip_special_tokens=True)
            assert choice["ensemble"] == {"combine": "mean", "members": names}
            assert len(choice["logprobs"]["tokens"]) == len(want)  # the stop token's included
            used += len(want) - (want[-1] in eos)
            for n in names:
                alone = client.post("/v1/completions", json={**body, "model": n, "prompt": prompt})
                differs |= alone.json()["choices"][0]["text"] != choice["text"]
        assert differs  # some member alone answers otherwise: the mean is not one member
        assert out["usage"]["completion_tokens"] == 3 * used  # every member decoded each token
        # streamed: the same texts and log-probabilities, one choice per prompt, usage of all
        stream = {**body, "model": names, "combine": "mean", "logprobs": 1, "stream": True}
        stream["stream_options"] = {"include_usage": True}
        with client.stream("POST", "/v1/completions", json=stream) as r:
            assert r.status_code == 200
            chunks = [
                json.loads(line[6:])
                for line in r.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"
            ]
        for i, choice in enumerate(out["choices"]):
            mine = [
                c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i
            ]
            assert "".join(c["text"] for c in mine) == choice["text"]
            assert [t for c in mine for t in (c["logprobs"] or {}).get("tokens", [])] == choice[
                "logprobs"
            ]["tokens"]
            assert mine[-1]["finish_reason"] == choice["finish_reason"]
        assert chunks[-1]["usage"]["completion_tokens"] == out["usage"]["completion_tokens"]
        engine.settings.max_batch = 2
        r = client.post("/v1/completions", json={**body, "model": names, "combine": "mean"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
        assert "--max-batch" in r.json()["error"]["message"]


@pytest.mark.parametrize("scheduling", ["step", "batch"])
def test_a_generation_ensemble_votes_over_its_members_outputs(bank, tmp_path, scheduling):
    """``/v1/completions`` with ``"model": [a, b, c]``: each member's greedy completion is a row
    of the same batch (one model call), the answer is the majority text (a tie: the earliest
    listed member), every member's text is reported and equals that adapter alone."""
    config = sp.PromptTuningConfig(num_virtual_tokens=3)  # g2 is a copy of g0
    _generation_members(bank, tmp_path, config, (("g0", 11), ("g1", 12), ("g2", 11)))
    names = ["g0", "g1", "g2"]
    app = make_app(
        bank,
        {**{n: tmp_path / n for n in names}, "sent-prompt": bank["dirs"]["sent-prompt"]},
        max_wait_ms=50,
        max_batch=64,
        scheduling=scheduling,
    )
    engine = app.state.engine
    with TestClient(app) as client:
        singles, used = {}, {}
        for n in names:
            r = client.post(
                "/v1/completions",
                json={"model": n, "prompt": PROMPTS[:3], "max_tokens": 6, "temperature": 0},
            )
            assert r.status_code == 200, r.text
            singles[n] = [c["text"] for c in r.json()["choices"]]
            used[n] = r.json()["usage"]["completion_tokens"]
        assert singles["g0"] == singles["g2"] and singles["g0"] != singles["g1"]
        for order in (["g1", "g0", "g2"], ["g1", "g0"]):
            before = engine.stats["model_calls"]
            r = client.post(
                "/v1/completions",
                json={
                    "model": order,
                    "prompt": PROMPTS[:3],
                    "max_tokens": 6,
                    "temperature": 0,
                    "combine": "vote",
                },
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert engine.stats["model_calls"] == before + 1  # all members' rows in one call
            for i, choice in enumerate(body["choices"]):
                texts = [singles[n][i] for n in order]
                record = choice["ensemble"]
                assert [m["text"] for m in record["members"]] == texts
                assert [m["model"] for m in record["members"]] == order
                if len(order) == 3 and texts[0] != texts[1]:  # g0 and g2 outvote g1
                    assert (choice["text"], record["winner"], record["votes"]) == (
                        texts[1],
                        "g0",
                        2,
                    )
                elif len(order) == 2 and texts[0] != texts[1]:  # a tie: the first listed
                    assert (choice["text"], record["winner"], record["votes"]) == (
                        texts[0],
                        "g1",
                        1,
                    )
                assert (
                    choice["text"]
                    == texts[[m["model"] for m in record["members"]].index(record["winner"])]
                )
            assert body["usage"]["completion_tokens"] == sum(used[n] for n in order)
        for extra, param in (
            ({"model": ["g0", "nope"]}, "model.1"),
            ({"model": ["g0", "g0"]}, "model"),
            ({"model": ["g0"]}, "model"),
            ({"model": ["g0", "base"]}, "model.1"),
            ({"model": ["g0", "g1"], "combine": "max"}, "combine"),
            ({"model": "g0", "combine": "vote"}, "combine"),
            ({"model": ["g0", "g1"], "stream": True}, "stream"),  # vote: needs every text
            ({"model": ["g0", "g1"], "n": 2}, "n"),
            ({"model": ["g0", "g1"], "logprobs": 1}, "logprobs"),
            ({"model": ["g0", "sent-prompt"]}, "model.1"),
        ):
            r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, **extra})
            assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text


def test_an_ensembles_rows_are_taken_and_retried_together(bank):
    """The queue gives a mean-probability ensemble's members all or none (even when other rows
    are queued between them), and a failed batch is retried per row and per ensemble."""
    app = make_app(bank)
    engine = app.state.engine

    def row(group=None):
        return engine_mod._Row("generate", None, [5], GenerationRow([5], None, 2, group=group))

    a, g1, b, g2, g3, c = row(), row("g"), row(), row("g"), row("g"), row()
    engine._queue.extend([a, g1, b, g2, g3, c])
    assert engine._pop(3) == [a]  # the group (3 rows) does not fit beside it
    assert engine._pop(3) == [g1, g2, g3]  # its members, wherever they are queued
    assert engine._pop(3) == [b, c]
    assert engine_mod._units([a, g1, b, g2, g3, c]) == [[a], [g1, g2, g3], [b], [c]]


@pytest.mark.parametrize("scheduling", ["step", "batch"])
def test_a_completion_ends_at_the_models_eos(bank, ref, scheduling):
    """/v1/completions stops at the model's EOS (the generation config's, no ``stop`` given):
    finish_reason "stop", the text and token count up to it (as ``model.generate`` with that
    EOS gives), the stop token's log-probability last, streamed or not; base and adapter."""
    app = make_app(bank, scheduling=scheduling)
    engine = app.state.engine
    tok = bank["tok"]
    with TestClient(app) as client:
        for name in (None, "gen-deep"):
            ids = ref.ids(name, PROMPTS[2])
            with torch.no_grad():
                free = ref.model.generate(
                    input_ids=torch.tensor([ids]),
                    adapter_names=[name],
                    max_new_tokens=8,
                    do_sample=False,
                    pad_token_id=srv.pad_id(tok),
                    eos_token_id=ref.eos,
                )[0, len(ids) :].tolist()
            assert len(free) == 8  # no EOS in 8 tokens: pick one of them to be the EOS
            k = next(i for i in range(2, 8) if free[i] not in free[:i])
            engine.model.base_model.generation_config.eos_token_id = free[k]
            want = tok.decode(free[:k], skip_special_tokens=True)
            body = {
                "model": name or "base",
                "prompt": PROMPTS[2],
                "max_tokens": 8,
                "temperature": 0,
                "logprobs": 0,
            }
            out = client.post("/v1/completions", json=body).json()
            choice = out["choices"][0]
            assert (choice["text"], choice["finish_reason"]) == (want, "stop"), out
            assert out["usage"]["completion_tokens"] == k
            assert len(choice["logprobs"]["tokens"]) == k + 1  # the stop token's entry last
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                chunks = [
                    json.loads(line[6:])
                    for line in r.iter_lines()
                    if line.startswith("data: ") and line != "data: [DONE]"
                ]
            assert "".join(c["choices"][0]["text"] for c in chunks) == want
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_rows_stop_ids_end_that_row_alone_in_a_batch(ref):
    """``--scheduling batch`` (one ``generate_rows`` call): a row's own stop ids (a chat row's
    end of turn) end that row only; a completion beside it that generates one of them goes on
    and equals itself alone (tokens and log-probabilities)."""
    ids = ref.ids("gen-deep", PROMPTS[2])
    alone = generate_rows(ref.model, ref.tok, [GenerationRow(ids, "gen-deep", 8, logprobs=0)])[0]
    assert alone["finish_reason"] == "length" and len(alone["token_ids"]) == 8
    k = next(i for i in range(2, 8) if alone["token_ids"][i] not in alone["token_ids"][:i])
    turn_end = alone["token_ids"][k]  # the other row's stop id, mid-way through this row
    chat = GenerationRow(ref.ids(None, PROMPTS[1]), None, 8, stop_ids=(turn_end, *ref.eos))
    chat_alone = generate_rows(ref.model, ref.tok, [chat])[0]
    both = generate_rows(ref.model, ref.tok, [GenerationRow(ids, "gen-deep", 8, logprobs=0), chat])
    assert both[0]["token_ids"] == alone["token_ids"]
    assert (both[0]["text"], both[0]["finish_reason"]) == (alone["text"], "length")
    got = [e["logprob"] for e in both[0]["logprobs"]]
    want = [e["logprob"] for e in alone["logprobs"]]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)
    assert both[1]["token_ids"] == chat_alone["token_ids"]
    assert both[1]["finish_reason"] == chat_alone["finish_reason"]


def test_token_bytes_are_each_tokens_raw_bytes(bank):
    """Chat logprobs' ``bytes``: byte-level BPE tokens mapped back through GPT-2's byte table
    (a token holding part of a character gives those bytes, though its text is U+FFFD);
    SentencePiece ``<0xNN>`` pieces are that byte and U+2581 a space."""
    tok = bank["tok"]
    assert engine_mod.token_scheme(tok) == "byte_level"
    text = "Write 你好世界 and 🎉, é"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    got = engine_mod.token_bytes(tok, ids, "byte_level")
    assert b"".join(got) == text.encode("utf-8")
    assert any(tok.decode([i]) == "\ufffd" for i in ids)  # partial characters are in there
    assert got[0] == b"Write" and b" and" in got
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert engine_mod.token_bytes(tok, [end], "byte_level") == [b"<|im_end|>"]

    class Pieces:  # a SentencePiece vocabulary with byte fallback
        sp_model = object()
        vocab = ["\u2581Hello", "<0xE4>", "<0xBD>", "<0xA0>", "\u2581w\u00f6rld", "</s>"]

        def convert_ids_to_tokens(self, ids):
            return [self.vocab[i] for i in ids]

        def decode(self, ids):
            return "".join(self.vocab[i] for i in ids)

    assert engine_mod.token_scheme(Pieces()) == "sentencepiece"
    from tokenizers import decoders

    class Fast:  # a Llama-style fast tokenizer's decoder: "▁" -> " ", byte fallback
        class backend_tokenizer:  # noqa: N801
            decoder = decoders.Sequence(
                [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            )

    assert engine_mod.token_scheme(Fast()) == "sentencepiece"
    got = engine_mod.token_bytes(Pieces(), [0, 1, 2, 3, 4], "sentencepiece")
    assert got == [b" Hello", b"\xe4", b"\xbd", b"\xa0", " w\u00f6rld".encode()]
    assert b"".join(got).decode("utf-8") == " Hello你 wörld"


def test_composing_cartridges_never_holds_up_the_event_loop(bank, tmp_path):
    """``"model": "a+b"`` is composed on first use under the model lock, which a running
    ``generate`` call (``--scheduling batch``) holds for its whole length: the composing runs
    in the thread pool, so other requests are answered meanwhile."""
    from softprompt.methods.cartridge import CartridgeConfig

    model = sp.attach(AutoModelForCausalLM.from_pretrained(bank["folder"]), tokenizer=bank["tok"])
    plain = {"kind": "generate", "template": "{input}"}
    for name, text in (("a", "The lighthouse stands on a cliff."), ("b", "Ada Morrow built it.")):
        config = CartridgeConfig(num_virtual_tokens=5, init_text=text)
        model.add_adapter(name, config, bank["tok"]).task = plain
        model.save_adapter(tmp_path / name, name)
    dirs = {n: str(tmp_path / n) for n in ("a", "b")}
    live = LiveServer(make_app(bank, adapters=dirs, scheduling="batch"))
    engine = live.server.config.app.state.engine
    body = {"model": "a+b", "prompt": "who built it", "max_tokens": 2, "temperature": 0}
    try:
        with ThreadPoolExecutor(1) as pool:
            engine.model_lock.acquire()  # a long generate call is running
            try:
                composed = pool.submit(
                    httpx.post, f"{live.url}/v1/completions", json=body, timeout=60
                )
                time.sleep(0.3)  # the request waits for the lock
                health = httpx.get(f"{live.url}/health", timeout=5)
                assert health.status_code == 200 and not composed.done()
            finally:
                engine.model_lock.release()
            r = composed.result()
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2
        assert engine.entries["a+b"].parts == ("a", "b")
    finally:
        live.stop()


def test_peft_folders_trainable_folders_and_long_classify_inputs(bank, tmp_path):
    """A PEFT folder's weights symlinked out of the root are a 403 (the check listed only
    softprompt's file names); a corrupt PEFT file for this very model is a 400 invalid_adapter,
    not a 409 "another base model" (a PEFT folder records only its hidden size); a folder with
    the trainable form beside the baked one is served baked (no prefix MLP per request); a
    classify input that fits --max-prompt-tokens but not the model's positions is a 400
    context_length_exceeded, not a 500."""
    from softprompt.peft_compat import save_peft

    root = bank["root"]
    model = sp.attach(AutoModelForCausalLM.from_pretrained(bank["folder"]))
    model.add_adapter("p", sp.PromptTuningConfig(num_virtual_tokens=3))
    for name in ("peft-link", "peft-bad"):
        shutil.rmtree(root / name, ignore_errors=True)
        save_peft(model, root / name, "p", base_name=bank["folder"])
    outside = tmp_path / "w.safetensors"
    shutil.move(root / "peft-link" / "adapter_model.safetensors", outside)
    (root / "peft-link" / "adapter_model.safetensors").symlink_to(outside)
    (root / "peft-bad" / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
    pre = sp.attach(AutoModelForCausalLM.from_pretrained(bank["folder"]))
    pre.add_adapter(
        "t", copy.deepcopy(ADAPTERS["sent-prefix"][0])
    ).task = CLASSIFY_PHRASES.to_dict()
    shutil.rmtree(root / "with-trainable", ignore_errors=True)
    pre.save_adapter(root / "with-trainable", "t", trainable=True)
    assert (root / "with-trainable" / "trainable.safetensors").exists()
    app = make_app(
        bank, adapters={"sent-prompt": bank["dirs"]["sent-prompt"]}, max_prompt_tokens=4096
    )
    with TestClient(app) as c:
        r = c.post("/v1/adapters", json={"name": "pl", "path": "peft-link"})
        assert r.status_code == 403 and "adapter_model.safetensors" in r.json()["error"]["message"]
        r = c.post("/v1/adapters", json={"name": "pb", "path": "peft-bad"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter", r.text
        assert (
            c.post("/v1/adapters", json={"name": "t", "path": "with-trainable"}).status_code == 201
        )
        engine = app.state.engine
        assert engine.model.adapters["t"].is_baked
        positions = engine.max_positions
        r = c.post("/v1/classify", json={"model": "sent-prompt", "input": "word " * positions})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert r.json()["error"]["param"] == "input"


def test_a_chunked_body_over_the_limit_is_the_same_413_and_a_405_says_allow(bank):
    app = make_app(bank, max_body_bytes=300)

    def chunks():
        yield b'{"model": "gen-deep", "prompt": "'
        for _ in range(10):
            yield b"x" * 50
        yield b'"}'

    with TestClient(app) as c:
        r = c.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = c.get("/v1/completions")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert r.json()["error"]["type"] == "invalid_request_error"
