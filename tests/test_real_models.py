"""The points only real pretrained weights prove: SmolLM2-135M-Instruct and all-MiniLM-L6-v2."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import softprompt as sp
from softprompt.assets import resolve_model
from softprompt.lm import lm_loss, pad_left

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smollm():
    path = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), tok


@pytest.fixture(scope="module")
def minilm():
    path = resolve_model("all-minilm-l6-v2")
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_text_init_reads_like_the_text(smollm):
    base, tok = smollm
    text = "Classify the sentiment of this movie review:"
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    model = sp.attach(
        base,
        sp.PromptTuningConfig(num_virtual_tokens=n, init="text", init_text=text),
        tokenizer=tok,
    )
    review = tok(" A warm, funny and beautifully acted film.", add_special_tokens=False)[
        "input_ids"
    ]
    with torch.no_grad():
        got = model(input_ids=torch.tensor([review])).logits[0, -1]
        full = tok(text, add_special_tokens=False)["input_ids"] + review
        ref = base(input_ids=torch.tensor([full])).logits[0, -1]
    assert_close(got, ref, atol=1e-4, rtol=0)
    model.delete_adapter("default")


@pytest.mark.parametrize("method", ["prompt", "prefix", "deep", "ptuning"])
def test_a_few_steps_lower_the_loss_on_real_text(smollm, method):
    base, tok = smollm
    cfg = {
        "prompt": sp.PromptTuningConfig(num_virtual_tokens=8),
        "prefix": sp.PrefixTuningConfig(num_virtual_tokens=8),
        "deep": sp.DeepPromptConfig(num_virtual_tokens=8),
        "ptuning": sp.PTuningConfig(num_virtual_tokens=8),
    }[method]
    lr = {"prompt": 3e-2, "prefix": 1e-3, "deep": 1e-2, "ptuning": 1e-3}[method]
    model = sp.attach(base, cfg, name=method)
    reviews = [
        ("A tedious, joyless slog.", "negative"),
        ("Smart, moving and funny.", "positive"),
        ("Dull and overlong.", "negative"),
        ("A triumph of warmth.", "positive"),
    ]
    rows, labs = [], []
    for text, label in reviews:
        p = tok(f"Review: {text}\nSentiment:", add_special_tokens=False)["input_ids"]
        a = tok(f" {label}", add_special_tokens=False)["input_ids"]
        rows.append(p + a)
        labs.append([-100] * len(p) + a)
    ids, mask = pad_left(rows, 0)
    labels, _ = pad_left(labs, -100)
    before = {k: v.clone() for k, v in base.state_dict().items() if "layers.0." in k}
    opt = torch.optim.AdamW(model.parameters_to_train(), lr=lr)
    model.train()
    losses = []
    for _ in range(6):
        loss = lm_loss(model, ids, mask, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    for k, v in before.items():
        assert torch.equal(base.state_dict()[k], v)
    model.delete_adapter(method)


def test_real_adapter_round_trip_and_rows(smollm, tmp_path):
    base, tok = smollm
    model = sp.attach(base)
    model.add_adapter(
        "p",
        sp.PrefixTuningConfig(
            num_virtual_tokens=10, init="text", init_text="Sentiment of the review:"
        ),
        tok,
    )
    model.add_adapter("q", sp.PromptTuningConfig(num_virtual_tokens=6))
    model.save_adapter(tmp_path / "p", name="p")
    ids, mask = pad_left(
        [
            tok("Great film", add_special_tokens=False)["input_ids"],
            tok("It was a bad, bad movie", add_special_tokens=False)["input_ids"],
        ],
        0,
    )
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, adapter_names=["p", "q"]).logits
        model.delete_adapter("p")
        sp.load_adapter(model, tmp_path / "p")
        got = model(input_ids=ids, attention_mask=mask, adapter_names=["p", "q"]).logits
        n = int(mask[0].sum())
        alone = model(input_ids=ids[:1, -n:], adapter_names=["p"]).logits
    assert torch.equal(got, ref)
    assert_close(got[0, -n:], alone[0], atol=1e-4, rtol=0)
    # the loaded adapter is baked (inference form): nothing of it trains; q is 6 x 576
    assert model.trainable_parameters()[0] == 0
    model.set_active("q")
    n_train, total, line = model.trainable_parameters()
    assert line.startswith("trainable ") and n_train == 6 * 576
    for name in ("p", "q"):
        model.delete_adapter(name)


@pytest.mark.parametrize("method", ["prompt", "deep", "prefix", "ptuning"])
def test_minilm_encoder(minilm, method, tmp_path):
    base, tok = minilm
    cfg = {
        "prompt": sp.PromptTuningConfig(num_virtual_tokens=5),
        "deep": sp.DeepPromptConfig(num_virtual_tokens=5, layers="top_half"),
        "prefix": sp.PrefixTuningConfig(num_virtual_tokens=5),
        "ptuning": sp.PTuningConfig(num_virtual_tokens=5),
    }[method]
    model = sp.attach(base, cfg, name=method)
    enc = tok(["a gripping thriller", "boring"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).last_hidden_state
        alone = model(**tok(["boring"], return_tensors="pt")).last_hidden_state
        bare = base(**enc).last_hidden_state
    assert out.shape == bare.shape
    n = int(enc["attention_mask"][1].sum())
    assert_close(out[1, :n], alone[0], atol=1e-4, rtol=0)
    assert (out - bare).abs().max() > 1e-3
    model.save_adapter(tmp_path / "m")
    model.delete_adapter(method)
    again = sp.load_adapter(model, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(**enc).last_hidden_state, out)
    again.delete_adapter(method)


def test_bfloat16_training_matches_float32_on_real_reviews(tmp_path):
    """The same prompt-tuning run (seed, rows, steps) on a bfloat16 and a float32 SmolLM2: the
    bf16 loss falls, the adapter, its gradients and AdamW's state stay float32 at every step,
    and the bf16 run (trained and evaluated in bf16) scores within 1 accuracy point of the
    fp32 one on the same 100 Rotten Tomatoes test rows."""
    from softprompt.data import load_examples
    from softprompt.loading import DTYPES, load_base
    from softprompt.tasks import Task, TaskSpec
    from softprompt.trainer import TrainArgs, Trainer

    def short(split: str, n: int):  # short reviews keep the two runs within a minute
        rows = load_examples(f"rotten-tomatoes:{split}", "classify")
        return [r for r in rows if len(r.fields["text"].split()) <= 12][:n]

    train, test = short("train", 16), short("test", 100)
    spec = TaskSpec(
        kind="classify",
        template="Review: {text}\nSentiment: {label}",
        labels=["negative", "positive"],
    )
    runs = {}
    for dtype in ("float32", "bfloat16"):
        base, tok = load_base("smollm2-135m-instruct", dtype, device="cpu")
        torch.manual_seed(0)
        model = sp.attach(base, sp.PromptTuningConfig(num_virtual_tokens=8), tokenizer=tok)
        task = Task(spec, model, tok)
        args = TrainArgs(
            output_dir=str(tmp_path / dtype), batch_size=8, max_steps=4, lr=1e-2,
            eval_every=100, log_every=2, progress=False,
        )  # fmt: skip
        tr = Trainer(model, task, train, None, args, log=lambda _: None)
        checked = []

        def before_step(opt, *_, tr=tr):
            assert all(p.dtype == p.grad.dtype == torch.float32 for p in tr.params)

        def after_step(opt, *_, checked=checked):
            state = [v for st in opt.state.values() for v in st.values() if v.dim()]
            assert state and all(v.dtype == torch.float32 for v in state)
            checked.append(len(state))

        tr.opt.register_step_pre_hook(before_step)
        tr.opt.register_step_post_hook(after_step)
        tr.train()
        model.eval()
        # the trainer's own mean loss over the 16 rows: epoch 1 (steps 1-2), epoch 2 (3-4)
        logged = [json.loads(x) for x in (tmp_path / dtype / "metrics.jsonl").open()]
        before, after = (r["loss"] for r in logged if "loss" in r)
        metrics, preds = tr.evaluate(test)
        assert base.get_input_embeddings().weight.dtype == DTYPES[dtype]
        assert len(checked) == 4
        runs[dtype] = (before, after, metrics["accuracy"], [p["prediction"] for p in preds])
    (b16, a16, acc16, pred16), (b32, a32, acc32, pred32) = runs["bfloat16"], runs["float32"]
    assert a16 < 0.8 * b16, runs["bfloat16"][:3]
    assert abs(a16 - a32) < 0.05 * a32, (a16, a32)
    assert abs(acc16 - acc32) <= 0.01 + 1e-9, (acc16, acc32)
    print(
        f"fp32 loss {b32:.4f} -> {a32:.4f}, acc {acc32:.3f}; bf16 loss {b16:.4f} -> {a16:.4f}, "
        f"acc {acc16:.3f}; {sum(a != b for a, b in zip(pred16, pred32, strict=True))} of "
        f"{len(test)} predictions differ"
    )
