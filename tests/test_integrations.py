"""transformers.Trainer, trl.SFTTrainer and pipelines with a SoftPromptModel (tiny random LMs with
the real SmolLM2 tokenizer; one slow test on SmolLM2 itself). Real packages, no mocks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDERS, _tokenizer, method_config, perturb
from datasets import Dataset
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import (
    DataCollatorForLanguageModeling,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    pipeline,
)

import softprompt as sp
from softprompt import _hf
from softprompt.data import Example
from softprompt.integrations import ClassifierView, SaveAdapterCallback
from softprompt.tasks import Task, TaskSpec

TEXTS = [
    "Review: A joy to watch.\nSentiment: positive",
    "Review: Dull and overlong.\nSentiment: negative",
    "Review: Great fun for everyone.\nSentiment: positive",
    "Review: Bad.\nSentiment: negative",
]
MB = 1 << 20


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def tiny_lm(tok, family: str = "llama"):
    torch.manual_seed(0)
    ids = dict(vocab=len(tok), pad=tok.pad_token_id, bos=tok.bos_token_id, eos=tok.eos_token_id)
    return BUILDERS[family](**ids).eval()


def wrapped(tok, method: str, family: str = "llama") -> sp.SoftPromptModel:
    model = sp.attach(tiny_lm(tok, family), method_config(method), name="a")
    perturb(model)
    return model


def lm_dataset(tok) -> Dataset:
    return Dataset.from_dict({"text": TEXTS}).map(lambda r: tok(r["text"]), remove_columns=["text"])


def args(out: Path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,  # the whole set: every step sees the same batch
        per_device_eval_batch_size=4,
        learning_rate=3e-2,
        logging_steps=1,
        save_steps=3,
        report_to="none",
        use_cpu=True,
        optim="adamw_torch_fused",  # what Trainer picks on torch >= 2.8: updates in place
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def trainer(model, tok, out: Path, callbacks=None, **kw) -> Trainer:
    ds = lm_dataset(tok)
    return Trainer(
        model=model,
        args=args(out, **kw),
        train_dataset=ds,
        eval_dataset=ds,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        callbacks=callbacks,
    )


def one_batch(tok) -> dict:
    return DataCollatorForLanguageModeling(tok, mlm=False)([tok(t) for t in TEXTS])


def losses(tr) -> list[float]:
    return [h["loss"] for h in tr.state.log_history if "loss" in h]


def assert_adapter_only(folder: Path, model: sp.SoftPromptModel, limit: int = 4 * MB) -> None:
    sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    assert max(sizes.values()) < limit, sizes
    keys = set(load_file(str(folder / "model.safetensors")))
    assert keys == set(model.state_dict())
    assert all(k.startswith("adapters.a.") for k in keys), keys
    base_keys = {f"base_model.{k}" for k in model.base_model.state_dict()}
    assert not keys & base_keys


# ------------------------------------------------------------------------------ transformers.Trainer


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
def test_trainer_trains_evaluates_and_checkpoints_the_adapter(tmp_path, tok, method):
    model = wrapped(tok, method)
    tr = trainer(model, tok, tmp_path, callbacks=[SaveAdapterCallback()])
    before = tr.evaluate()["eval_loss"]
    tr.train()
    after = tr.evaluate()["eval_loss"]
    logged = losses(tr)
    assert logged[-1] < logged[0] - 0.05, logged
    assert after < before - 0.05, (before, after)
    for step in (3, 6):
        ckpt = tmp_path / f"checkpoint-{step}"
        assert_adapter_only(ckpt, model)
        meta = json.loads((ckpt / "adapter_config.json").read_text())
        assert meta["method"] == method and meta["has_trainable"]
    # the last checkpoint's softprompt files are the trained adapter; Trainer's eval (no grad,
    # after fused AdamW steps) scores what a reloaded copy scores
    fresh = sp.load_adapter(tiny_lm(tok), tmp_path / "checkpoint-6")
    batch = one_batch(tok)
    model.eval()
    with torch.no_grad():
        ref = fresh(**batch)
        got = model(**batch)
    assert_close(got.logits, ref.logits, atol=1e-5, rtol=0)
    assert after == pytest.approx(ref.loss.item(), abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_trainer_logged_loss_is_the_models_own_loss(tmp_path, tok, family):
    """Trainer divides the summed loss by the number of labelled tokens it counts; it counts
    them shifted only when the model's ``loss_type`` says causal LM (without it: 0.92x here).
    Its ``model.train()`` leaves the frozen model's dropout off (GPT-2 has dropout 0.1)."""
    model = wrapped(tok, "prefix", family)
    batch = one_batch(tok)
    model.eval()
    with torch.no_grad():
        ref = model(**batch).loss.item()
    tr = trainer(model, tok, tmp_path, max_steps=1, learning_rate=0.0, save_strategy="no")
    tr.train()
    assert losses(tr)[0] == pytest.approx(ref, abs=1e-4)
    assert model.training and not model.base_model.training


def test_trainer_resume_continues_to_the_same_adapter(tmp_path, tok):
    full = wrapped(tok, "prefix")
    trainer(full, tok, tmp_path / "full").train()
    resumed = wrapped(tok, "prefix")
    tr = trainer(resumed, tok, tmp_path / "full")  # reads checkpoint-3 of the same run folder
    tr.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert tr.state.global_step == 6
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert_close(b[k], a[k], atol=1e-6, rtol=0)
    moved = wrapped(tok, "prefix").state_dict()
    assert any((a[k] - moved[k]).abs().max() > 1e-3 for k in a)  # training moved it


def test_trainer_load_best_model_at_end(tmp_path, tok):
    model = wrapped(tok, "ptuning")
    tr = trainer(
        model,
        tok,
        tmp_path,
        eval_strategy="steps",
        eval_steps=3,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
    )
    tr.train()
    best = tr.state.best_model_checkpoint
    assert best is not None
    saved = load_file(str(Path(best) / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert_close(v, saved[k], atol=0, rtol=0)


class _CountLayerCalls(TrainerCallback):
    def __init__(self, layer) -> None:
        self.calls = 0
        layer.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def test_trainer_gradient_checkpointing_recomputes_and_trains_the_same(tmp_path, tok):
    runs = {}
    for ckpt in (False, True):
        model = wrapped(tok, "prefix")
        counter = _CountLayerCalls(model.base_model.model.layers[1].input_layernorm)
        with warnings.catch_warnings():  # gradient_checkpointing is deprecated for
            warnings.simplefilter("ignore", FutureWarning)  # activation_checkpointing in 5.x
            tr = trainer(model, tok, tmp_path / str(ckpt), gradient_checkpointing=ckpt, max_steps=2)
        tr.train()
        runs[ckpt] = (model.state_dict(), counter.calls)
        assert model.base_model.model.layers[1].gradient_checkpointing is ckpt
    (plain, n_plain), (ckpt, n_ckpt) = runs[False], runs[True]
    assert (n_plain, n_ckpt) == (2, 4)  # checkpointed: each layer's body runs again in backward
    for k in plain:
        assert_close(ckpt[k], plain[k], atol=1e-5, rtol=0)


def test_use_reentrant_checkpointing_is_refused(tok):
    with pytest.raises(sp.SoftPromptError, match="use_reentrant"):
        wrapped(tok, "prefix").gradient_checkpointing_enable({"use_reentrant": True})


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # gpt2 splices the prompt, llama shares it
def test_trainer_metrics_see_logits_of_the_labels_shape(tmp_path, tok, family):
    model = wrapped(tok, "prompt", family)
    seen = {}

    def metrics(pred):
        logits, labels = torch.tensor(pred.predictions), torch.tensor(pred.label_ids)
        seen["shapes"] = (tuple(logits.shape), tuple(labels.shape))
        keep = labels[:, 1:] != -100
        hit = logits[:, :-1].argmax(-1)[keep] == labels[:, 1:][keep]
        seen["logits"] = logits
        return {"token_accuracy": hit.float().mean().item()}

    tr = trainer(model, tok, tmp_path, save_strategy="no")
    tr.compute_metrics = metrics
    tr.evaluate()
    batch = one_batch(tok)
    (b, t, v), labels_shape = seen["shapes"]
    assert labels_shape == (b, t) == tuple(batch["labels"].shape)
    with torch.no_grad():
        ref = model(**batch).logits
    assert ref.shape == (b, t, v)
    assert_close(seen["logits"], ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ TRL


def sft(model, tok, out: Path, **kw):
    from trl import SFTConfig, SFTTrainer

    conf = dict(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=3e-2,
        logging_steps=1,
        save_steps=3,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        activation_checkpointing=True,  # SFTConfig's default (under its deprecated name)
    )
    conf.update(kw)
    ds = Dataset.from_dict({"text": TEXTS})
    return SFTTrainer(
        model=model,
        args=SFTConfig(**conf),
        train_dataset=ds,
        eval_dataset=ds,
        processing_class=tok,
        callbacks=[SaveAdapterCallback()],
    )


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_sft_trainer_trains_evaluates_and_checkpoints_the_adapter(tmp_path, tok, method):
    model = wrapped(tok, method)
    tr = sft(model, tok, tmp_path)
    batch = next(iter(tr.get_eval_dataloader()))
    model.eval()
    with torch.no_grad():
        own_before = model(**batch).loss.item()
    before = tr.evaluate()[
        "eval_loss"
    ]  # TRL's fused head, under bf16 autocast (SFTConfig's default)
    assert before == pytest.approx(own_before, abs=1e-3)
    tr.train()
    assert tr.args.bf16 and not torch.is_autocast_enabled("cpu")  # bf16 autocast did not leak
    after = tr.evaluate()["eval_loss"]
    logged = losses(tr)
    assert logged[-1] < logged[0] - 0.05, logged
    assert after < before - 0.05
    # accelerate keeps the model's forward under bf16 autocast after training; unwrap to float32
    tr.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    with torch.no_grad():
        assert after == pytest.approx(model(**batch).loss.item(), abs=1e-3)
    assert_adapter_only(tmp_path / "checkpoint-6", model)
    fresh = sp.load_adapter(tiny_lm(tok), tmp_path / "checkpoint-6")
    with torch.no_grad():
        assert_close(fresh(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_trl_fused_lm_head_scores_the_callers_labels(tmp_path, tok, family):
    """trl#3812/#4168: prompt learning made the logits (and TRL's label mask) longer than the
    labels. Here the fused head sees the caller's labels, position for position."""
    model = wrapped(tok, "prompt", family)
    tr = sft(model, tok, tmp_path, max_steps=1)  # patches model.forward with TRL's fused head
    assert "forward" in vars(model)
    batch = next(iter(tr.get_eval_dataloader()))
    labels = batch["labels"]
    out = model(**batch, fused_lm_head=True)
    assert out.label_mask.shape == labels[:, 1:].shape
    assert torch.equal(out.label_mask, labels[:, 1:] != -100)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert logits.shape[:2] == labels.shape
    ref = -F.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100
    )
    assert_close(out.log_probs, ref, atol=1e-4, rtol=0)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters_to_train())


def test_sft_trainer_takes_no_softprompt_peft_config(tok):
    """TRL only accepts a ``peft.PeftConfig`` and builds the model with PEFT's get_peft_model;
    the README's way is ``SFTTrainer(model=softprompt.attach(base, config), ...)``."""
    from trl import SFTConfig, SFTTrainer

    with pytest.raises(TypeError, match="PeftConfig"):
        SFTTrainer(
            model=tiny_lm(tok),
            args=SFTConfig(
                "unused", report_to="none", use_cpu=True, activation_checkpointing=False
            ),
            train_dataset=Dataset.from_dict({"text": TEXTS}),
            processing_class=tok,
            peft_config=method_config("prompt"),
        )


# ------------------------------------------------------------------------------ pipelines


def test_text_generation_pipeline_per_adapter(tok):
    model = sp.attach(tiny_lm(tok), method_config("prefix"), name="a")
    model.add_adapter("b", method_config("prompt"))
    perturb(model)
    model.set_active("a")
    config_before = model.generation_config.to_dict()
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    prompt = "Review: A joy to watch.\nSentiment:"
    ids = tok(prompt, return_tensors="pt")
    n = ids.input_ids.shape[1]

    def direct(name):
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, adapter_names=[name])
        return prompt + tok.decode(out[0, n:], skip_special_tokens=True)

    def piped(**kw):
        return pipe(prompt, max_new_tokens=6, do_sample=False, **kw)[0]["generated_text"]

    expected = {name: direct(name) for name in ("a", "b", None)}
    assert len(set(expected.values())) == 3  # the adapters make a difference
    assert piped() == expected["a"]  # the active adapter
    assert piped(adapter_names="b") == expected["b"]  # per call, through generate's kwargs
    with model.using("b"):
        assert piped() == expected["b"]
    with model.using(None):
        assert piped() == expected[None]
    assert model.active == "a"
    assert model.generation_config.to_dict() == config_before  # no state left behind
    assert _hf._GENERATE_STATE.get() is None


def test_text_classification_pipeline_equals_task_predict(tok):
    model = sp.attach(tiny_lm(tok), method_config("prefix"), name="a")
    model.add_adapter("b", method_config("ptuning"))
    perturb(model)
    spec = TaskSpec(
        kind="classify",
        template="Review: {text}\nSentiment: {label}",
        labels=["negative", "positive"],
    )
    for name in ("a", "b"):
        model.adapters[name].task = spec.to_dict()
    model.set_active("a")
    texts = ["A joy to watch.", "Dull and overlong.", "Great fun for everyone."]
    pipe = pipeline("text-classification", model=ClassifierView(model, tok), tokenizer=tok)
    for name in ("a", "b"):
        with model.using(name):
            want = Task(spec, model, tok).predict(
                [Example({"text": t}, "x", i) for i, t in enumerate(texts)]
            )
            got = pipe(texts, top_k=None)
        for w, g in zip(want, got, strict=True):
            scores = {d["label"]: d["score"] for d in g}
            assert max(scores, key=scores.get) == w["prediction"]
            for lab in spec.labels:
                assert scores[lab] == pytest.approx(w["scores"][lab], abs=1e-5)
    assert model.active == "a"


def test_classifier_view_refuses_an_adapter_without_a_classify_task(tok):
    model = wrapped(tok, "prompt")
    with pytest.raises(sp.SoftPromptError, match="not a classification adapter"):
        ClassifierView(model, tok)


# ------------------------------------------------------------------------------ SmolLM2


@pytest.mark.slow
def test_trainer_checkpoints_smollm2_without_its_weights(tmp_path):
    """Trainer saved the whole wrapper's state before: SmolLM2's tied embedding and LM head
    made safetensors stop with a RuntimeError (shared tensors) before the first checkpoint."""
    from softprompt.loading import load_base

    torch.set_num_threads(2)
    base, tok = load_base("smollm2-135m-instruct")
    model = sp.attach(base, sp.PromptTuningConfig(num_virtual_tokens=4), name="a")
    tr = trainer(
        model,
        tok,
        tmp_path,
        max_steps=4,
        save_steps=2,
        learning_rate=1e-2,
        callbacks=[SaveAdapterCallback()],
    )
    tr.train()
    logged = losses(tr)
    assert logged[-1] < logged[0], logged
    for step in (2, 4):
        ckpt = tmp_path / f"checkpoint-{step}"
        assert_adapter_only(ckpt, model, limit=5 * MB)  # the tokenizer.json is 3.5 MB
        assert (ckpt / "model.safetensors").stat().st_size < 64 * 1024
    fresh = sp.load_adapter(load_base("smollm2-135m-instruct")[0], tmp_path / "checkpoint-4")
    batch = one_batch(tok)
    with torch.no_grad():
        assert_close(fresh(**batch).logits, model(**batch).logits, atol=1e-4, rtol=0)
