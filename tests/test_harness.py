"""softprompt.harness: the lm-eval model class against direct computations with softprompt."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDERS, method_config, perturb
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

import softprompt as sp
from softprompt.harness import SoftPromptLM
from softprompt.loading import load_base

CASES = [("llama", "prompt"), ("llama", "prefix"), ("gpt2", "prompt"), ("gpt2", "prefix")]
TEXTS = [
    ("The cat sat on", " the mat."),
    ("Paris is the capital of", " France"),
    ("One, two,", " three, four, five"),
    ("A", " b"),
    ("Review: a joyless, overlong slog.\nSentiment:", " negative"),
]


@pytest.fixture(scope="module")
def bases(tiny_folders, tmp_path_factory):
    """Saved tiny Llama (from conftest) and GPT-2 folders with the SmolLM2 tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_folders["llama"])
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    ids = dict(vocab=len(tok), pad=tok.pad_token_id, bos=tok.bos_token_id, eos=tok.eos_token_id)
    BUILDERS["gpt2"](**ids).save_pretrained(path)
    tok.save_pretrained(path)
    return {"llama": tiny_folders["llama"], "gpt2": str(path)}


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    """One saved, perturbed adapter per (family, method) in CASES."""
    out = {}
    for family, method in CASES:
        base, tok = load_base(bases[family])
        model = sp.attach(base, method_config(method), name=f"{family}-{method}")
        perturb(model)
        out[family, method] = str(model.save_adapter(tmp_path_factory.mktemp(f"{family}{method}")))
    return out


def reference(bases, family, adapter):
    base, tok = load_base(bases[family])
    return sp.load_adapter(base, adapter), tok


def plain_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log P(ids[t] | ids[:t]) for t >= 1 from one unpadded forward of ids[:-1] (the last
    token is only predicted, as in the harness).  Returns (T-1,)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()  # (T-1, V)
    return F.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def requests(kind: str, args) -> list[Instance]:
    return [Instance(kind, {}, a, idx=0) for a in args]


@pytest.mark.parametrize("family,method", CASES)
def test_loglikelihood_equals_a_plain_forward(bases, adapters, family, method):
    lm = SoftPromptLM(adapter=adapters[family, method], batch_size=3)  # base from the adapter
    assert lm.pretrained == bases[family]
    got = lm.loglikelihood(requests("loglikelihood", TEXTS), disable_tqdm=True)
    model, tok = reference(bases, family, adapters[family, method])
    for (ctx, cont), (logp, greedy) in zip(TEXTS, got, strict=True):
        whole, head = tok.encode(ctx + cont), tok.encode(ctx)
        n = len(whole) - len(head)
        lp = plain_logprobs(model, whole)[-n:]
        torch.testing.assert_close(logp, float(lp.sum()), atol=1e-5, rtol=0)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([whole])).logits[0, :-1]
        assert greedy == bool((logits[-n:].argmax(-1) == torch.tensor(whole[-n:])).all())
    # The same scores through softprompt.lm (labels on the continuation) and through the bare
    # model differ: the adapter is really on.
    ids = tok.encode(TEXTS[0][0] + TEXTS[0][1])
    labels = torch.tensor(
        [[-100] * len(tok.encode(TEXTS[0][0])) + ids[len(tok.encode(TEXTS[0][0])) :]]
    )
    direct = sp_logprob(model, ids, labels)
    torch.testing.assert_close(got[0][0], direct, atol=1e-5, rtol=0)
    model.set_active(None)
    assert abs(sp_logprob(model, ids, labels) - got[0][0]) > 1e-3


def sp_logprob(model, ids, labels) -> float:
    from softprompt.lm import sequence_logprobs

    with torch.no_grad():
        return float(sequence_logprobs(model, torch.tensor([ids]), None, labels)[0])


@pytest.mark.parametrize("family,method", CASES[:3:2])
def test_is_greedy_on_token_requests(bases, adapters, family, method):
    lm = SoftPromptLM(pretrained=bases[family], adapter=adapters[family, method], batch_size=2)
    model, tok = reference(bases, family, adapters[family, method])
    ctx = tok.encode("Once upon a time")
    greedy = []
    for _ in range(3):  # the model's own greedy continuation, token by token
        with torch.no_grad():
            greedy.append(int(model(input_ids=torch.tensor([ctx + greedy])).logits[0, -1].argmax()))
    other = [(greedy[0] + 1) % len(tok)] + greedy[1:]
    (lp1, g1), (lp2, g2) = lm._loglikelihood_tokens([(None, ctx, greedy), (None, ctx, other)])
    assert (g1, g2) == (True, False)
    torch.testing.assert_close(
        lp1, float(plain_logprobs(model, ctx + greedy)[-3:].sum()), atol=1e-5, rtol=0
    )
    assert lp1 > lp2


@pytest.mark.parametrize("family,method", CASES)
def test_loglikelihood_rolling_sums_token_logprobs(bases, adapters, family, method):
    text = "It was the best of times, it was the worst of times, it was the age of wisdom."
    model, tok = reference(bases, family, adapters[family, method])
    ids = tok.encode(text)
    full = [tok.bos_token_id] + ids
    lm = SoftPromptLM(adapter=adapters[family, method], batch_size=2)
    (one,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), True)
    torch.testing.assert_close(one, float(plain_logprobs(model, full).sum()), atol=1e-5, rtol=0)
    # Windows of 7 tokens: each token once, after the (up to 7) tokens before it that fit.
    short = SoftPromptLM(adapter=adapters[family, method], batch_size=3, max_length=7)
    (win,) = short.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), True)
    expected = 0.0
    for s in range(0, len(ids), 7):
        e = min(s + 7, len(ids))  # predict ids[s:e] = full[s+1:e+1]
        window = full[max(0, e - 7) : e + 1]
        expected += float(plain_logprobs(model, window)[-(e - s) :].sum())
    torch.testing.assert_close(win, expected, atol=1e-5, rtol=0)
    assert abs(win - one) > 1e-3  # the windows really lose context


@pytest.mark.parametrize("family,method", CASES)
def test_generate_until_is_greedy_text_cut_at_the_stop(bases, adapters, family, method):
    model, tok = reference(bases, family, adapters[family, method])
    prompts = ["Once upon a time", "The weather today is", "1, 2, 3,"]
    refs = []
    for p in prompts:
        ids = torch.tensor([tok.encode(p)])
        out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=2)
        refs.append(out[0, ids.shape[1] :].tolist())
    texts = [tok.decode(r, skip_special_tokens=True) for r in refs]
    stop = tok.decode(refs[0][4:6])  # a string the first row generates in its middle
    assert stop.strip() and stop in texts[0]
    lm = SoftPromptLM(adapter=adapters[family, method], batch_size=2)
    gen = {"until": [stop], "max_gen_toks": 12, "do_sample": False}
    got = lm.generate_until(requests("generate_until", [(p, gen) for p in prompts]), True)
    assert got == [t.split(stop)[0] for t in texts]
    assert len(got[0]) < len(texts[0])
    # max_gen_toks alone bounds the length.
    gen5 = {"until": [], "max_gen_toks": 5, "do_sample": False}
    got5 = lm.generate_until(requests("generate_until", [(p, gen5) for p in prompts]), True)
    assert got5 == [tok.decode(r[:5], skip_special_tokens=True) for r in refs]


def test_registered_and_clear_errors(bases, adapters, tmp_path, tiny_folders):
    assert get_model("softprompt") is SoftPromptLM
    with pytest.raises(sp.SoftPromptError, match="pretrained=MODEL, adapter=DIR"):
        SoftPromptLM()
    with pytest.raises(sp.SoftPromptError, match=r"unknown model_args \['adaptr'\]"):
        SoftPromptLM.create_from_arg_string(f"adaptr={adapters['llama', 'prompt']}", {})
    base, _ = load_base(tiny_folders["t5"])  # append: an encoder's (refused on decoder LMs)
    model = sp.attach(base, sp.PromptTuningConfig(num_virtual_tokens=2, placement="append"))
    model.save_adapter(tmp_path / "append")
    with pytest.raises(sp.SoftPromptError, match="placement='append'"):
        SoftPromptLM(adapter=str(tmp_path / "append"))
    with pytest.raises(sp.SoftPromptError, match="made for another base model"):
        SoftPromptLM(pretrained=bases["gpt2"], adapter=adapters["llama", "prompt"])
    # max_length leaves room for the virtual tokens: GPT-2's 64 positions minus 4.
    assert SoftPromptLM(adapter=adapters["gpt2", "prompt"]).max_length == 60
    assert SoftPromptLM(adapter=adapters["gpt2", "prefix"]).max_length == 64


CHOICES = ["positive", "negative", "not sure at all"]
DOCS = [
    {"text": "A joy to watch.", "label": 0},
    {"text": "Dull and overlong.", "label": 1},
    {"text": "Two hours I will never get back.", "label": 1},
    {"text": "The best film of the year.", "label": 0},
    {"text": "Fine, I suppose.", "label": 2},
    {"text": "Loved every minute.", "label": 0},
    {"text": "Boring.", "label": 1},
]


def write_task(root) -> str:
    data = root / "reviews.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / "sp_reviews.yaml").write_text(
        f"""task: sp_reviews
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Review: {{{{text}}}}\\nSentiment:"
doc_to_choice: {json.dumps(CHOICES)}
doc_to_target: label
metric_list:
  - metric: acc
"""
    )
    return str(root)


def direct_scores(bases, family, adapter) -> list[list[float]]:
    """log P(" choice" | "Review: text\\nSentiment:") per doc and choice, one forward each."""
    model, tok = reference(bases, family, adapter)
    out = []
    for d in DOCS:
        ctx = f"Review: {d['text']}\nSentiment:"
        row = []
        for c in CHOICES:
            whole, n = tok.encode(ctx + " " + c), len(tok.encode(ctx))
            row.append(float(plain_logprobs(model, whole)[n - 1 :].sum()))
        out.append(row)
    return out


def accuracy(scores: list[list[float]]) -> float:
    hits = [
        max(range(len(CHOICES)), key=row.__getitem__) == d["label"]
        for row, d in zip(scores, DOCS, strict=True)
    ]
    return sum(hits) / len(DOCS)


@pytest.mark.parametrize("family,method", [("llama", "prefix"), ("gpt2", "prompt")])
def test_simple_evaluate_on_a_local_multiple_choice_task(
    bases, adapters, tmp_path, monkeypatch, family, method
):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    include = write_task(tmp_path)
    adapter = adapters[family, method]
    out = simple_evaluate(
        model="softprompt",
        model_args=f"adapter={adapter},batch_size=4",
        tasks=["sp_reviews"],
        task_manager=TaskManager(include_path=include),
        log_samples=True,
    )
    scores = direct_scores(bases, family, adapter)
    samples = sorted(out["samples"]["sp_reviews"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    for s, row in zip(samples, scores, strict=True):
        got = [float(r[0]) for r in s["filtered_resps"]]
        torch.testing.assert_close(got, row, atol=1e-5, rtol=0)
    assert out["results"]["sp_reviews"]["acc,none"] == pytest.approx(accuracy(scores))
    assert out["config"]["model"] == "softprompt"


def test_cli_through_python_m_softprompt_harness(bases, adapters, tmp_path):
    include = write_task(tmp_path)
    adapter = adapters["llama", "prompt"]
    env_run = subprocess.run(
        [
            sys.executable,
            "-m",
            "softprompt.harness",
            "--model",
            "softprompt",
            "--model_args",
            f"pretrained={bases['llama']},adapter={adapter},batch_size=3",
            "--tasks",
            "sp_reviews",
            "--include_path",
            include,
            "--output_path",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1"},
        timeout=300,
    )
    assert env_run.returncode == 0, env_run.stderr[-3000:]
    (path,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(path.read_text())["results"]["sp_reviews"]
    scores = direct_scores(bases, "llama", adapter)
    assert results["acc,none"] == pytest.approx(accuracy(scores))


@pytest.mark.slow
def test_smollm2_sentence_loglikelihood_with_a_prefix(tmp_path):
    torch.set_num_threads(2)
    base, tok = load_base("smollm2-135m-instruct")
    model = sp.attach(
        base,
        sp.PrefixTuningConfig(num_virtual_tokens=5, init="text", init_text="Movie review"),
        tokenizer=tok,
    )
    perturb(model, scale=0.2)
    model.save_adapter(tmp_path / "prefix")
    lm = SoftPromptLM(adapter=str(tmp_path / "prefix"), batch_size=2)
    assert lm.pretrained.endswith("smollm2-135m-instruct")  # the cache folder it recorded
    pairs = [("The capital of France is", " Paris."), ("Two plus two is", " four.")]
    got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for (ctx, cont), (logp, _) in zip(pairs, got, strict=True):
        whole, n = tok.encode(ctx + cont), len(tok.encode(ctx))
        want = float(plain_logprobs(model, whole)[n - 1 :].sum())
        # a padded batch of 2 vs one unpadded row through 30 fp32 layers: 2.7e-4 seen on a
        # fresh venv (2026-12-02) on a sum near -61, about 4e-6 relative
        torch.testing.assert_close(logp, want, atol=5e-4, rtol=1e-6)
    model.set_active(None)
    whole, n = (
        tok.encode("The capital of France is Paris."),
        len(tok.encode("The capital of France is")),
    )
    assert abs(float(plain_logprobs(model, whole)[n - 1 :].sum()) - got[0][0]) > 1e-2


def test_t5_loglikelihood_and_generate(tiny_folders, tmp_path):
    base, tok = load_base(tiny_folders["t5"])
    model = sp.attach(base, method_config("prompt"))
    perturb(model)
    model.save_adapter(tmp_path / "t5")
    lm = SoftPromptLM(adapter=str(tmp_path / "t5"), batch_size=3)
    assert lm.backend == "seq2seq"
    got = lm.loglikelihood(requests("loglikelihood", TEXTS), disable_tqdm=True)
    for (ctx, cont), (logp, _) in zip(TEXTS, got, strict=True):
        src, tgt = tok.encode(ctx), tok.encode(cont)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([src]), labels=torch.tensor([tgt])).logits[0]
        want = F.log_softmax(logits.float(), -1).gather(1, torch.tensor(tgt)[:, None]).sum()
        torch.testing.assert_close(logp, float(want), atol=1e-5, rtol=0)
    ref = model.generate(input_ids=torch.tensor([tok.encode("Once upon a time")]), max_new_tokens=6)
    text = tok.decode(ref[0], skip_special_tokens=True)
    gen = {"until": [], "max_gen_toks": 6, "do_sample": False}
    (out,) = lm.generate_until(requests("generate_until", [("Once upon a time", gen)]), True)
    assert out == text and text


def write_generation_task(root) -> str:
    data = root / "prompts.jsonl"
    rows = [{"q": q, "a": "-"} for q in ("Once upon a time", "The weather today is", "1, 2, 3,")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "sp_gen.yaml").write_text(
        f"""task: sp_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["e"]
  max_gen_toks: 10
  do_sample: false
metric_list:
  - metric: exact_match
"""
    )
    return str(root)


def test_generate_until_through_softprompt_serve_and_local_completions(
    bases, adapters, tmp_path, monkeypatch
):
    """lm-eval's own completions client against ``softprompt serve`` gives the texts the
    in-process model gives (generation only: loglikelihood needs echo/logprobs)."""
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api] (tenacity)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    include = write_generation_task(tmp_path)
    adapter = adapters["llama", "prefix"]

    def texts(model: str, args: str) -> list[str]:
        out = simple_evaluate(
            model=model,
            model_args=args,
            tasks=["sp_gen"],
            task_manager=TaskManager(include_path=include),
            log_samples=True,
        )
        samples = sorted(out["samples"]["sp_gen"], key=lambda s: s["doc_id"])
        return [s["resps"][0][0] for s in samples]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["serve", "--model", bases["llama"], "--adapter", f"p={adapter}", "--port", str(port)]
    proc = subprocess.Popen([sys.executable, "-m", "softprompt.cli", *cmd])
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        served = texts(
            "local-completions",
            f"model=p,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={bases['llama']},tokenized_requests=False,num_concurrent=1",
        )
    finally:
        proc.terminate()
        proc.wait(30)
    local = texts("softprompt", f"adapter={adapter}")
    assert served == local and any(local)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bare_model_answers_as_lm_evals_own_hf_model(bases, family):
    """Without an adapter, every request type gives what lm-eval's ``hf`` model gives."""
    from lm_eval.models.huggingface import HFLM

    ours = SoftPromptLM(pretrained=bases[family], batch_size=3)
    theirs = HFLM(pretrained=bases[family], device="cpu", dtype="float32", batch_size=3)
    ll = requests("loglikelihood", TEXTS)
    pairs = zip(ours.loglikelihood(ll, True), theirs.loglikelihood(ll, True), strict=True)
    for (a, ga), (b, gb) in pairs:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert ga == gb
    text = [("It was the best of times, it was the worst of times, it was the age of wisdom.",)]
    roll = requests("loglikelihood_rolling", text)
    torch.testing.assert_close(
        ours.loglikelihood_rolling(roll, True),
        theirs.loglikelihood_rolling(roll, True),
        atol=1e-5,
        rtol=0,
    )
    gen = {"until": ["e"], "max_gen_toks": 8, "do_sample": False}
    prompts = requests("generate_until", [(p, gen) for p in ("Once upon a time", "1, 2, 3,")])
    assert ours.generate_until(prompts, True) == theirs.generate_until(prompts, True)


def test_position_offset_counts_against_max_length(bases, tmp_path):
    """A cartridge on GPT-2 numbers the real tokens from P (``position_offset``): the context
    holds 64 - P tokens, long texts are scored in windows of that many, and a larger
    ``max_length`` is refused instead of indexing past GPT-2's position table."""
    from softprompt.methods.cartridge import CartridgeConfig

    base, tok = load_base(bases["gpt2"])
    ids = tok.encode("hello world " * 20)
    model = sp.attach(base, CartridgeConfig(num_virtual_tokens=16, init_token_ids=ids[:16]))
    assert model.adapters["default"].position_offset == 16
    model.save_adapter(tmp_path / "cart")
    lm = SoftPromptLM(adapter=str(tmp_path / "cart"), batch_size=2)
    assert lm.max_length == 64 - 16
    text = " ".join(f"word{i}" for i in range(40))
    model, tok = reference(bases, "gpt2", str(tmp_path / "cart"))
    ids = tok.encode(text)
    full = [tok.bos_token_id] + ids
    assert len(full) > 2 * 48
    (got,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), True)
    expected = 0.0
    for s in range(0, len(ids), 48):
        e = min(s + 48, len(ids))  # predict ids[s:e] after up to 48 tokens of context
        window = full[max(0, e - 48) : e + 1]
        expected += float(plain_logprobs(model, window)[-(e - s) :].sum())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    (ll,) = lm.loglikelihood(requests("loglikelihood", [(text, " end")]), True)
    whole, n = tok.encode(text + " end"), len(tok.encode(" end"))
    want = plain_logprobs(model, whole[-49:])[-n:].sum()
    torch.testing.assert_close(ll[0], float(want), atol=1e-5, rtol=0)
    with pytest.raises(sp.SoftPromptError, match=r"max_length=64 does not fit.*<= 48"):
        SoftPromptLM(adapter=str(tmp_path / "cart"), max_length=64)
    with pytest.raises(sp.SoftPromptError, match=r"max_length=65 does not fit.*<= 64"):
        SoftPromptLM(pretrained=bases["gpt2"], max_length=65)
    assert SoftPromptLM(adapter=str(tmp_path / "cart"), max_length=48).max_length == 48


def seq2seq_logprob(model, src: list[int], tgt: list[int]) -> float:
    """log P(tgt | src) from one unpadded encoder-decoder forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([src]), labels=torch.tensor([tgt])).logits[0]
    return float(F.log_softmax(logits.float(), -1).gather(1, torch.tensor(tgt)[:, None]).sum())


@pytest.mark.parametrize("method", [None, "prompt", "prefix"])
def test_bart_batch_size_does_not_change_scores(tiny_folders, tmp_path, method):
    """BART numbers its encoder positions 0..T-1 whatever the mask says: encoder inputs are
    right-padded, so a row scores (and generates) the same alone and in a batch of 5."""
    path = tiny_folders["bart"]
    adapter = None
    if method is not None:
        base, _ = load_base(path)
        model = sp.attach(base, method_config(method))
        perturb(model)
        adapter = str(model.save_adapter(tmp_path / method))
    base, tok = load_base(path)
    model = sp.load_adapter(base, adapter) if adapter else sp.attach(base)
    scores, texts = {}, {}
    gen = {"until": [], "max_gen_toks": 5, "do_sample": False}
    prompts = [ctx for ctx, _ in TEXTS]
    for bs in (1, 5):
        lm = SoftPromptLM(pretrained=path, adapter=adapter, batch_size=bs)
        scores[bs] = [s for s, _ in lm.loglikelihood(requests("loglikelihood", TEXTS), True)]
        texts[bs] = lm.generate_until(requests("generate_until", [(p, gen) for p in prompts]), True)
    torch.testing.assert_close(scores[5], scores[1], atol=1e-5, rtol=0)
    want = [seq2seq_logprob(model, tok.encode(c), tok.encode(x)) for c, x in TEXTS]
    torch.testing.assert_close(scores[5], want, atol=1e-5, rtol=0)
    refs = []
    for p in prompts:
        out = model.generate(input_ids=torch.tensor([tok.encode(p)]), max_new_tokens=5)
        refs.append(tok.decode(out[0], skip_special_tokens=True))
    assert texts[5] == texts[1] == refs


def test_seq2seq_max_length_leaves_room_for_an_encoder_prompt(tiny_folders, tmp_path):
    """BART's encoder reads a learned position table of 256: a 4-token prompt leaves 252 for the
    context (cut from the left); T5's relative positions take no room from it."""
    lengths = {}
    for family in ("bart", "t5"):
        base, tok = load_base(tiny_folders[family])
        model = sp.attach(base, method_config("prompt"))
        perturb(model)
        model.save_adapter(tmp_path / family)
        lengths[family] = SoftPromptLM(adapter=str(tmp_path / family)).max_length
    bare_t5 = SoftPromptLM(pretrained=tiny_folders["t5"])
    assert lengths == {"bart": 256 - 4, "t5": bare_t5.max_length}
    assert bare_t5.position_bound() is None
    lm = SoftPromptLM(adapter=str(tmp_path / "bart"), batch_size=2)
    model, tok = reference({"bart": tiny_folders["bart"]}, "bart", str(tmp_path / "bart"))
    ctx = " ".join(f"w{i}" for i in range(200))
    src = tok.encode(ctx)
    assert len(src) > 256
    got = lm.loglikelihood(requests("loglikelihood", [(ctx, " end"), ("A", " b")]), True)
    want = seq2seq_logprob(model, src[-252:], tok.encode(" end"))
    torch.testing.assert_close(got[0][0], want, atol=1e-5, rtol=0)
    gen = {"until": [], "max_gen_toks": 3, "do_sample": False}
    (text,) = lm.generate_until(requests("generate_until", [(ctx, gen)]), True)
    out = model.generate(input_ids=torch.tensor([src[-252:]]), max_new_tokens=3)
    assert text == tok.decode(out[0], skip_special_tokens=True)
    with pytest.raises(sp.SoftPromptError, match=r"4 input-level virtual tokens.*<= 252"):
        SoftPromptLM(adapter=str(tmp_path / "bart"), max_length=256)


def test_without_lm_eval_the_harness_says_which_extra_installs_it(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "softprompt.harness")
    with pytest.raises(sp.SoftPromptError, match=r"needs the lm-eval package.*softprompt\[eval\]"):
        importlib.import_module("softprompt.harness")
