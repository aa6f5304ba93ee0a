"""Tasks: encoding and class scores, including a mixed-adapter batch with per-adapter heads."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb, tiny_model
from torch.testing import assert_close

import softprompt as sp
from softprompt.tasks import Task, TaskSpec


class _Tok:
    """A whitespace tokenizer over a tiny vocabulary (ids 3..)."""

    eos_token_id, pad_token_id, bos_token_id = 2, 0, None

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def _id(self, w):
        return self.vocab.setdefault(w, 3 + len(self.vocab) % 100)

    def __call__(self, text, add_special_tokens=True, **kw):
        return {"input_ids": [self._id(w) for w in text.split()]}

    def encode(self, text, add_special_tokens=True):
        return self(text)["input_ids"]


def test_each_row_uses_its_own_adapters_head():
    model = sp.attach(tiny_model("bert"))
    tok = _Tok()
    spec = TaskSpec(kind="classify", template="{text}", labels=["a", "b", "c"], head=True)
    for name in ("x", "y"):
        ad = model.add_adapter(name, sp.DeepPromptConfig(num_virtual_tokens=2))
        ad.set_task_head(3)
        ad.task = spec.to_dict()
    perturb(model)
    task = Task(spec, model, tok)
    prompts = [tok("good fun")["input_ids"], tok("bad")["input_ids"]]
    with torch.no_grad():
        mixed = task.class_scores(prompts, ["x", "y"])
        x = task.class_scores(prompts[:1], ["x"])
        y = task.class_scores(prompts[1:], ["y"])
    assert_close(mixed[0], x[0], atol=1e-5, rtol=0)
    assert_close(mixed[1], y[0], atol=1e-5, rtol=0)
    assert (mixed[1] - task.class_scores(prompts[1:], ["x"])[0]).abs().max() > 1e-4


def test_verbalizer_scores_are_label_word_logprobs():
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("p", sp.PromptTuningConfig(num_virtual_tokens=2))
    tok = _Tok()
    spec = TaskSpec(
        kind="classify",
        template="Text: {text} Label: {label}",
        labels=["neg", "pos"],
        verbalizer={"pos": "good"},
    )
    task = Task(spec, model, tok)
    prompt = task.prompt_ids({"text": "fine film"})
    with torch.no_grad():
        scores = task.class_scores([prompt])
        logp = model(input_ids=torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    ids = [tok.vocab["neg"], tok.vocab["good"]]
    assert_close(scores[0], logp[ids], atol=1e-5, rtol=0)


def test_a_template_without_the_input_field_is_refused():
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("p", sp.PromptTuningConfig(num_virtual_tokens=2))
    for kind, template, field in (
        ("classify", "Sentiment: {label}", "{text}"),
        ("generate", "Summarise {text}: {target}", "{input}"),
    ):
        spec = TaskSpec(kind=kind, template=template, labels=["a", "b"])
        with pytest.raises(sp.SoftPromptError, match=f"has no {field}: the model would never"):
            Task(spec, model, _Tok())


@pytest.mark.parametrize(
    "data, message",
    [
        ([1], "a task is a JSON object, got list"),
        ({"kind": "classify"}, "a task needs the field(s) ['template']"),
        ({"kind": "classify", "template": "{text}", "extra": 1}, "no field(s) ['extra']"),
        ({"kind": "sing", "template": "{text}"}, "task field 'kind' must be one of"),
        ({"kind": "classify", "template": 5}, "task field 'template' must be a string"),
        ({"kind": "classify", "template": "{text}", "labels": "ab"}, "'labels' must be a list"),
        ({"kind": "generate", "template": "{input}", "max_new_tokens": 0}, "an integer >= 1"),
        ({"kind": "classify", "template": "{text}", "verbalizer": {"a": 1}}, "'verbalizer'"),
    ],
)
def test_task_spec_from_a_file_is_checked(data, message):
    with pytest.raises(sp.SoftPromptError) as err:
        TaskSpec.from_dict(data)
    assert message in str(err.value)


def test_predict_refuses_a_batch_size_below_one():
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("p", sp.PromptTuningConfig(num_virtual_tokens=2))
    task = Task(
        TaskSpec(kind="classify", template="{text} {label}", labels=["a", "b"]), model, _Tok()
    )
    with pytest.raises(sp.SoftPromptError, match="--batch-size must be >= 1, got 0"):
        task.predict([], batch_size=0)
