"""Tasks: encoding and class scores, including a mixed-adapter batch with per-adapter heads."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb, tiny_model
from torch.testing import assert_close

import softprompt as sp
from softprompt.data import Example
from softprompt.lm import answer_logprobs, lm_loss, pad_left
from softprompt.tasks import CHAT_TEMPLATE, Task, TaskSpec


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


# ------------------------------------------------------------------------------ chat forms


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Review: a joy to watch"},
    {"role": "assistant", "content": "positive"},
]


@pytest.fixture(scope="module")
def tok():
    from conftest import _tokenizer

    return _tokenizer()


def ids_of(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_old_task_specs_load_with_the_new_defaults():
    old = {"kind": "generate", "template": "{input}", "max_new_tokens": 8}
    spec = TaskSpec.from_dict(old)
    assert (spec.placement, spec.loss_turns, spec.soft_tokens, spec.chat) == (
        "start",
        "all",
        0,
        False,
    )
    with pytest.raises(sp.SoftPromptError, match="placement"):
        TaskSpec.from_dict({"kind": "chat", "template": CHAT_TEMPLATE, "placement": "middle"})
    with pytest.raises(sp.SoftPromptError, match="chat"):
        TaskSpec(kind="generate", template="{input}", chat=True)


def _chat_model(tok, soft=4):
    from conftest import BUILDERS

    torch.manual_seed(0)
    base = BUILDERS["llama"](
        vocab=len(tok), pad=tok.pad_token_id, bos=tok.bos_token_id, eos=tok.eos_token_id
    ).eval()
    model = sp.attach(base, tokenizer=tok)
    model.add_adapter(
        "p", sp.PromptTuningConfig(num_virtual_tokens=soft, placement="template"), tok
    )
    return model


def test_a_chat_task_supervises_its_answers_and_stops_at_the_end_of_turn(tok):
    model = _chat_model(tok)
    spec = TaskSpec(kind="chat", template=CHAT_TEMPLATE, soft_tokens=4, placement="user")
    task = Task(spec, model, tok)
    assert task.stop_ids == [tok.convert_tokens_to_ids("<|im_end|>")]
    row = Example({"messages": CONV}, "mem", 1)
    item = task.encode(row)
    assert item["prompt"] == task.prompt_ids({"messages": CONV[:4]})
    assert item["target"] == ids_of(tok, "positive") + [task.stop_ids[0]]
    assert tok.decode([t for t in item["prompt_labels"] if t != -100]) == "Hello!<|im_end|>"
    last = Task(
        TaskSpec(kind="chat", template=CHAT_TEMPLATE, soft_tokens=4, loss_turns="last"), model, tok
    )
    assert set(last.encode(row)["prompt_labels"]) == {-100}
    # the loss is the LM loss on exactly the assistant tokens
    seq = item["prompt"] + item["target"]
    labels = item["prompt_labels"] + item["target"]
    ids, mask = pad_left([seq], 0)
    lab, _ = pad_left([labels], -100)
    with torch.no_grad():
        torch.testing.assert_close(task.loss([item]), lm_loss(model, ids, mask, lab))
    # generation passes the end-of-turn id as the stop token
    seen = {}
    real = model.generate

    def spy(**kw):
        seen.update(kw)
        return real(**kw)

    model.generate = spy
    (pred,) = task.predict([row])
    assert seen["eos_token_id"] == task.stop_ids and isinstance(pred["prediction"], str)


def test_classify_in_chat_form_scores_labels_after_the_generation_prompt(tok):
    model = _chat_model(tok, soft=2)
    spec = TaskSpec(
        kind="classify",
        template="{text}",
        labels=["negative", "positive"],
        chat=True,
        system="Answer positive or negative.",
        soft_tokens=2,
        placement="answer",
    )
    task = Task(spec, model, tok)
    ids = task.prompt_ids({"text": "a joy to watch"})
    msgs = [
        {"role": "system", "content": "Answer positive or negative."},
        {"role": "user", "content": "a joy to watch"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ids == ids_of(tok, text) + [-1, -2]
    assert task.answers == [ids_of(tok, "negative"), ids_of(tok, "positive")]  # no leading space
    # the score of a label is log P(label tokens | rendered prompt)
    with torch.no_grad():
        scores = task.class_scores([ids])
        ref = answer_logprobs(model, [ids], task.answers, pad_id=tok.pad_token_id)
    torch.testing.assert_close(scores, ref)
    assert task.prompt_ids({"messages": msgs}) == ids  # a row may also come as messages


def test_encode_examples_names_the_row_that_cannot_be_encoded_and_skip_bad_skips_it(tok):
    """A conversation too long for max_length even with its user messages emptied: an error
    naming file and line (before, a bare message with neither), or with skip_bad a warning and
    the row left out; prompts cut to max_length are reported by file and line, then counted."""
    model = _chat_model(tok)
    spec = TaskSpec(kind="chat", template=CHAT_TEMPLATE, soft_tokens=4, max_length=64)
    task = Task(spec, model, tok)
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    long_answer = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "word " * 80},  # an earlier turn: cannot be cut
        *short,
    ]
    long_user = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]
    rows = [
        Example({"messages": m}, "train.jsonl", i + 1)
        for i, m in enumerate([short, long_answer, *[long_user] * 5])
    ]
    with pytest.raises(sp.SoftPromptError, match=r"^train\.jsonl:2: the conversation needs"):
        task.encode_examples(rows)
    said = []
    items, kept = task.encode_examples(rows, skip_bad=True, warn=said.append)
    assert [ex.line for ex in kept] == [1, 3, 4, 5, 6, 7] and len(items) == 6
    assert said[0].startswith("train.jsonl:2: the conversation needs") and "skipped" in said[0]
    cut = [m for m in said if "cut to max_length=64" in m]
    assert [m.split(":")[1] for m in cut[:3]] == ["3", "4", "5"]
    assert all(len(i["prompt"]) <= 64 for i in items)
    whole = len(
        Task(
            TaskSpec(kind="chat", template=CHAT_TEMPLATE, soft_tokens=4, max_length=4096),
            model,
            tok,
        ).encode(rows[2])["prompt"]
    )
    assert f"the prompt is {whole} tokens" in cut[0]
    assert said[-1].startswith("5 of 6 training rows were cut to max_length=64")
    with pytest.raises(sp.SoftPromptError, match="no training row could be encoded"):
        task.encode_examples(rows[1:2], skip_bad=True, warn=said.append)


def test_a_cut_template_prompt_is_reported(tok):
    model = _chat_model(tok)
    task = Task(TaskSpec(kind="generate", template="{input} =", max_length=16), model, tok)
    said = []
    rows = [Example({"input": "word " * 40, "target": "x"}, "d.csv", 7)]
    (item,), _ = task.encode_examples(rows, warn=said.append)
    assert len(item["prompt"]) <= 16 and item["cut_from"] > 40
    assert said == [f"d.csv:7: the prompt is {item['cut_from']} tokens, cut to max_length=16"]


@pytest.mark.parametrize("family", ["bart", "t5"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_an_encoder_decoder_rows_loss_does_not_depend_on_the_rows_beside_it(tok, family, method):
    """Encoder inputs are right-padded (``lm.pad_prompts``): BART's learned positions count
    from column 0 whatever the mask, so a left-padded short row beside a long one took other
    positions (1.6e-4 off in the loss on tiny BART, more on a real one)."""
    from conftest import BUILDERS, method_config, perturb

    torch.manual_seed(0)
    ids = dict(vocab=len(tok), pad=tok.pad_token_id, bos=tok.bos_token_id, eos=tok.eos_token_id)
    model = sp.attach(BUILDERS[family](**ids).eval(), tokenizer=tok)
    model.add_adapter(method, method_config(method))
    perturb(model)
    model.eval()
    task = Task(TaskSpec(kind="generate", template="{input}"), model, tok)
    rows = [
        Example({"input": "a b c d e f g h i j", "target": "x y"}, "m", 1),
        Example({"input": "k", "target": "z w v"}, "m", 2),
    ]
    items = [task.encode(r) for r in rows]
    units = [task.loss_units(i) for i in items]
    with torch.no_grad():
        both = task.loss(items)
        alone = sum(task.loss([i]) * n for i, n in zip(items, units, strict=True)) / sum(units)
        torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-5)
        gen = dict(max_new_tokens=5, min_new_tokens=5)
        assert task.predict(rows, batch_size=2, **gen) == task.predict(rows, batch_size=1, **gen)


def test_a_blank_verbalizer_word_is_refused():
    for word in ("", " ", "\t\n"):
        with pytest.raises(sp.SoftPromptError) as err:
            TaskSpec(kind="classify", template="{text} {label}", labels=["neg", "pos"],
                     verbalizer={"pos": word})  # fmt: skip
        assert str(err.value) == (
            "task field 'verbalizer': the word of label 'pos' is empty; give every label a word "
            "(or leave the label out to score the label itself)"
        )


class _DroppingTok(_Tok):
    """Encodes the word '<gone>' to nothing (as a tokenizer may drop what it cannot encode)."""

    def __call__(self, text, add_special_tokens=True, **kw):
        return {"input_ids": [self._id(w) for w in text.split() if w != "<gone>"]}


def test_a_verbalizer_word_that_encodes_to_no_tokens_is_refused():
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("p", sp.PromptTuningConfig(num_virtual_tokens=2))
    spec = TaskSpec(
        kind="classify",
        template="{text} {label}",
        labels=["neg", "pos"],
        verbalizer={"pos": "<gone>"},
    )
    with pytest.raises(sp.SoftPromptError) as err:
        Task(spec, model, _DroppingTok())
    assert str(err.value) == (
        "label 'pos': its word '<gone>' tokenizes to no tokens, so it cannot be scored; give it "
        "another word with --verbalizer"
    )


def test_verbalizer_words_are_stripped_before_the_template_adds_its_space():
    from conftest import _tokenizer

    tok = _tokenizer()  # SmolLM2's byte-level BPE: "  good" starts with a lone-space token
    assert tok.encode("  good", add_special_tokens=False) != tok.encode(" good")
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("p", sp.PromptTuningConfig(num_virtual_tokens=2))
    answers = []
    for words in ({"pos": "good", "neg": "bad"}, {"pos": " good ", "neg": "\tbad"}):
        spec = TaskSpec(
            kind="classify", template="Review: {text} Sentiment: {label}", labels=["neg", "pos"],
            verbalizer=words,
        )  # fmt: skip
        answers.append(Task(spec, model, tok).answers)
    expected = [tok.encode(" bad", add_special_tokens=False), tok.encode(" good")]
    assert answers == [expected, expected]


def test_labels_with_the_same_words_are_named():
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("p", sp.PromptTuningConfig(num_virtual_tokens=2))
    spec = TaskSpec(
        kind="classify",
        template="{text} {label}",
        labels=["a", "b", "c"],
        verbalizer={"a": "yes", "c": "yes"},
    )
    with pytest.raises(sp.SoftPromptError) as err:
        Task(spec, model, _Tok())
    assert str(err.value) == (
        "labels 'a' (word 'yes') and 'c' (word 'yes') tokenize to the same tokens, so they cannot "
        "be told apart; give them different words in --verbalizer"
    )
