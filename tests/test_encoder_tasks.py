"""Encoder tasks (softprompt.encoder_tasks): token classification and extractive QA.

The data here is SYNTHETIC, built from the embedded Rotten Tomatoes snippets:
* tag: words of a snippet, tagged WORK (a determiner + a film word, or a bare film word, from a
  fixed word list) and NUM (a word of digits): a lexicon lookup, easy for any encoder;
* extract: a snippet with two made-up facts inserted ("It was directed by <name>.", "It came out
  in <year>."), the question asking for one of them: the model must read the question.
They show that the heads, the alignment, the losses and the metrics work and learn; they say
nothing about accuracy on real NER/QA data (CoNLL, SQuAD), which is not available offline.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import method_config, perturb, tiny_model
from safetensors.torch import load_file

import softprompt as sp
from softprompt.cli import main
from softprompt.data import DataError, Example, load_examples
from softprompt.encoder_tasks import ExtractTask, TagTask
from softprompt.errors import SoftPromptError
from softprompt.metrics import bio_spans, extract_metrics, span_f1
from softprompt.tasks import Task, TaskSpec

FILM = {"film", "films", "movie", "movies", "documentary", "comedy", "drama", "thriller"}
DET = {"the", "this", "a", "that"}


def snippets(n: int, seed: int = 0) -> list[str]:
    from softprompt.assets import resolve_data

    rows = [json.loads(x) for x in Path(resolve_data("rotten-tomatoes", "train")).open()]
    random.Random(seed).shuffle(rows)
    return [r["text"] for r in rows[: n * 4]]


def tag_rows(n: int, seed: int = 0) -> list[dict]:
    """Synthetic BIO rows: WORK = [det] film-word, NUM = digits; rows with >= 1 entity."""
    out = []
    for text in snippets(n, seed):
        words = text.split()
        if not 4 <= len(words) <= 40:
            continue
        low = [re.sub(r"\W", "", w.lower()) for w in words]
        tags = ["O"] * len(words)
        for i, w in enumerate(low):
            if w in FILM:
                if i > 0 and low[i - 1] in DET:
                    tags[i - 1], tags[i] = "B-WORK", "I-WORK"
                else:
                    tags[i] = "B-WORK"
            elif w.isdigit():
                tags[i] = "B-NUM"
        if any(t != "O" for t in tags):
            out.append({"tokens": words, "tags": tags})
        if len(out) == n:
            break
    return out


def extract_rows(n: int, seed: int = 0) -> list[dict]:
    """Synthetic QA rows: a snippet plus a director fact and a year fact; one is asked for."""
    rng = random.Random(seed)
    texts = snippets(n, seed + 1)
    vocab = sorted({w for t in texts for w in re.findall(r"[a-z]{5,}", t)})
    out = []
    for text in texts[:n]:
        name = f"{rng.choice(vocab).title()} {rng.choice(vocab).title()}"
        year = str(rng.randint(1950, 2020))
        facts = [f"It was directed by {name}.", f"It came out in {year}."]
        rng.shuffle(facts)
        context = (
            f"{facts[0]} {text} {facts[1]}" if rng.random() < 0.5 else f"{text} {' '.join(facts)}"
        )
        if rng.random() < 0.5:
            out.append({"question": "Who directed it?", "context": context, "answer": name})
        else:
            out.append({"question": "When did it come out?", "context": context, "answer": year})
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def examples(rows, task) -> list[Example]:
    from softprompt.data import _check_row

    return [Example(_check_row(dict(r), task, ()), "mem", i + 1) for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def minilm_tok():
    from transformers import AutoTokenizer

    from softprompt.assets import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2"))


def tiny_bert(tok):
    """The tiny random BERT of conftest with MiniLM's vocabulary."""
    from conftest import BUILDERS

    torch.manual_seed(0)
    return BUILDERS["bert"](vocab=len(tok), pad=tok.pad_token_id).eval()


def make_task(kind, tok, method="deep", labels=None, names=("a",), n=3):
    model = sp.attach(tiny_bert(tok), tokenizer=tok)
    labels = labels or (["O", "B-WORK", "I-WORK", "B-NUM"] if kind == "tag" else ["start", "end"])
    spec = TaskSpec(kind=kind, template="", labels=labels, head=True, max_length=64)
    for name in names:
        ad = model.add_adapter(name, method_config(method, n=n), tok)
        ad.task = spec.to_dict()
        ad.set_task_head(len(labels))
    model.set_active(names[0])
    perturb(model)
    return model, Task(spec, model, tok)


# ------------------------------------------------------------------------------ metrics


def test_bio_spans_follow_conlleval():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-PER", "I-PER"]
    assert bio_spans(tags) == {("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4), ("PER", 5, 6)}


def test_span_f1_counts_whole_spans_only():
    gold = [["B-WORK", "I-WORK", "O", "B-NUM"], ["O", "B-NUM"]]
    pred = [["B-WORK", "O", "O", "B-NUM"], ["O", "B-NUM"]]
    m = span_f1(gold, pred)
    # gold spans: WORK(0-1), NUM(3), NUM(1); predicted: WORK(0), NUM(3), NUM(1): 2 of 3 right
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["span_f1"] == pytest.approx(2 / 3)
    assert m["per_type"]["NUM"]["f1"] == 1.0 and m["per_type"]["WORK"]["f1"] == 0.0
    assert m["token_accuracy"] == pytest.approx(5 / 6)
    with pytest.raises(SoftPromptError, match="one tag per word"):
        span_f1([["O"]], [["O", "O"]])


def test_extract_metrics_are_squads():
    m = extract_metrics(["The Cat.", "dog house", "x"], ["cat", "a dog", "y"])
    assert m["exact_match"] == pytest.approx(1 / 3)
    # F1: 1, 2*(1/2*1)/(1/2+1) = 2/3, 0
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    # answers that normalise to nothing ("the", "."): SQuAD v1.1's script gives EM 1 and F1 0
    assert extract_metrics(["the"], ["."]) == {"exact_match": 1.0, "f1": 0.0, "n": 1}


# ------------------------------------------------------------------------------ data


@pytest.mark.parametrize(
    "row, message",
    [
        ({"tokens": ["a", "b"], "tags": ["O"]}, "2 tokens but 1 tags"),
        ({"tokens": "a b", "tags": ["O", "O"]}, "expected a list of strings"),
        ({"tokens": ["a", ""], "tags": ["O", "O"]}, "item 1 is empty"),
        ({"tokens": ["a"], "tags": ["PER"]}, "not a BIO tag"),
        ({"tokens": ["a"]}, "field 'tags' is missing"),
    ],
)
def test_bad_tag_rows_name_file_and_line(tmp_path, row, message):
    f = write_jsonl(tmp_path / "t.jsonl", [{"tokens": ["ok"], "tags": ["O"]}, row])
    with pytest.raises(DataError, match=rf"t\.jsonl:2: .*{re.escape(message)}"):
        load_examples(f, "tag")
    seen = []
    kept = load_examples(f, "tag", skip_bad=True, warn=seen.append)
    assert len(kept) == 1 and kept[0].line == 1 and len(seen) == 2


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "q?", "context": "abc", "answer": "x"}, "does not occur in the context"),
        ({"question": "q?", "context": "abc", "answer": "b", "answer_start": 0}, "reads 'a'"),
        ({"question": "q?", "context": "abc", "answer": "b", "answer_start": "1"}, "integer"),
        ({"question": "", "context": "abc", "answer": "b"}, "field 'question' is empty"),
        ({"question": "q?", "context": "abc"}, "field 'answer' is missing"),
    ],
)
def test_bad_extract_rows_name_file_and_line(tmp_path, row, message):
    good = {"question": "q?", "context": "abc", "answer": "bc"}
    f = write_jsonl(tmp_path / "x.jsonl", [good, row])
    with pytest.raises(DataError, match=rf"x\.jsonl:2: .*{re.escape(message)}"):
        load_examples(f, "extract")
    kept = load_examples(f, "extract", skip_bad=True, warn=lambda m: None)
    assert [ex.fields["answer_start"] for ex in kept] == [1]


def test_tag_rows_from_csv_say_to_use_jsonl(tmp_path):
    (tmp_path / "t.csv").write_text("tokens,tags\na b,O O\n")
    with pytest.raises(DataError, match=r"t\.csv:2: .*CSV/TSV cells hold no lists"):
        load_examples(tmp_path / "t.csv", "tag")


# ------------------------------------------------------------------------------ encoding


def test_tag_labels_first_subword_and_predictions_per_word(minilm_tok):
    model, task = make_task("tag", minilm_tok)
    assert isinstance(task, TagTask)
    ex = examples(
        [
            {
                "tokens": ["Unbelievably", "good", "film", "1999"],
                "tags": ["O", "O", "B-WORK", "B-NUM"],
            }
        ],
        "tag",
    )[0]
    item = task.encode(ex)
    words = minilm_tok.convert_ids_to_tokens(item["prompt"])
    # [CLS] un ##bel ##ie ##va ##bly good film 1999 [SEP]: only each word's first subword labelled
    firsts = item["first"]
    assert [words[i] for i in firsts] == ["un", "good", "film", "1999"]
    labelled = [i for i, y in enumerate(item["labels"]) if y != -100]
    assert labelled == firsts
    assert [item["labels"][i] for i in firsts] == [0, 0, 1, 3]
    pred = task.predict([ex])[0]["prediction"]
    assert len(pred) == 4 and set(pred) <= set(task.spec.labels)


def test_a_word_with_no_subword_is_said_not_dropped_silently(minilm_tok):
    """A tagged word the tokenizer turns into nothing (a zero-width space) cannot be trained or
    predicted: a warning names the row and the word; the other words keep their labels."""
    _, task = make_task("tag", minilm_tok)
    row = {"tokens": ["good", "\u200b", "film"], "tags": ["O", "B-WORK", "B-WORK"]}
    ex = examples([row], "tag")[0]
    with pytest.warns(UserWarning, match=r":1: word 1 \('\\u200b'\) tokenize to no subword: not"):
        item = task.encode(ex)
    assert item["first"][1] == -1 and item["first"][0] >= 0 and item["first"][2] >= 0


def test_extract_span_maps_to_context_characters(minilm_tok):
    model, task = make_task("extract", minilm_tok)
    assert isinstance(task, ExtractTask)
    row = {
        "question": "Who directed it?",
        "context": "Great fun. It was directed by Ann Lee.",
        "answer": "Ann Lee",
    }
    ex = examples([row], "extract")[0]
    item = task.encode(ex)
    s, e = item["start"], item["end"]
    a, z = item["offsets"][s][0], item["offsets"][e][1]
    assert row["context"][a:z] == "Ann Lee"
    # the question's tokens are never a candidate: logits there are -inf after masking
    start, end = task.span_logits([item])
    ctx = torch.tensor(item["context"]).bool()
    assert (
        torch.isfinite(start[0, ctx]).all()
        and (start[0, ~ctx] == torch.finfo(start.dtype).min).all()
    )
    pred = task.predict([ex])[0]
    assert (
        pred["prediction"] == row["context"][pred["prediction_start"] :][: len(pred["prediction"])]
    )
    assert pred["prediction"] in row["context"]


def test_extract_truncated_context_warns_and_trains_nothing(minilm_tok):
    model, task = make_task("extract", minilm_tok)
    task.spec.max_length = 16
    row = {"question": "Who?", "context": "word " * 40 + "Ann", "answer": "Ann"}
    ex = examples([row], "extract")[0]
    with pytest.warns(UserWarning, match="mem:1: the answer lies beyond max_length 16"):
        item = task.encode(ex)
    assert item["start"] == -100 and len(item["prompt"]) == 16
    loss = task.loss([item])
    assert float(loss.detach()) == 0.0


# ------------------------------------------------------------------------------ alignment


@pytest.mark.parametrize("method", ["prompt", "ptuning", "deep", "prefix"])
def test_outputs_have_the_real_tokens_length(minilm_tok, method):
    """PEFT returns P + T positions for prompt tuning / P-tuning (the head would label virtual
    tokens); here the head sees exactly the T real tokens for every method."""
    model, task = make_task("tag", minilm_tok, method=method, n=5)
    ex = examples(tag_rows(3), "tag")
    items = [task.encode(e) for e in ex]
    logits, mask = task.token_logits(items)
    width = max(len(it["prompt"]) for it in items)
    assert logits.shape == (3, width, 4) and mask.shape == (3, width)


def test_prompt_tuning_logits_match_a_manual_computation(minilm_tok):
    """Real token t's logits = head(encoder([prompt; embed(ids)])[P + t]): no shift."""
    model, task = make_task("tag", minilm_tok, method="prompt", n=5)
    ex = examples(tag_rows(3), "tag")[0]
    item = task.encode(ex)
    logits, _ = task.token_logits([item])  # (1, T, C)
    ad = model.adapters["a"]
    base = model.base_model
    ids = torch.tensor([item["prompt"]])
    with torch.no_grad():
        prompt = ad.input_prompt()  # (P, d)
        emb = torch.cat([prompt[None], base.get_input_embeddings()(ids)], dim=1)
        hidden = base(inputs_embeds=emb, token_type_ids=torch.zeros_like(emb[..., 0]).long())
        manual = ad.task_head(hidden.last_hidden_state[:, prompt.shape[0] :])
    torch.testing.assert_close(logits, manual, atol=1e-5, rtol=1e-5)
    # and the adapter matters: the same head without the prompt gives other logits
    with torch.no_grad():
        bare = ad.task_head(base(input_ids=ids).last_hidden_state)
    assert (bare - logits).abs().max() > 1e-3


def test_padding_does_not_change_a_rows_logits(minilm_tok):
    model, task = make_task("extract", minilm_tok, method="prompt", n=4)
    rows = examples(extract_rows(3), "extract")
    items = [task.encode(e) for e in rows]
    batch, _ = task.token_logits(items)
    for i, it in enumerate(items):
        alone, _ = task.token_logits([it])
        torch.testing.assert_close(batch[i, : len(it["prompt"])], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["tag", "extract"])
def test_per_row_adapters_use_their_own_prompt_and_head(minilm_tok, kind):
    model, task = make_task(kind, minilm_tok, method="prompt", names=("a", "b"))
    model.adapters["b"].config  # noqa: B018 - both exist
    rows = examples(tag_rows(2) if kind == "tag" else extract_rows(2), kind)
    items = [task.encode(e) for e in rows]
    mixed, _ = task.token_logits(items, adapter_names=["a", "b"])
    for i, name in enumerate(["a", "b"]):
        alone, _ = task.token_logits([items[i]], adapter_names=[name])
        n = len(items[i]["prompt"])
        torch.testing.assert_close(mixed[i, :n], alone[0], atol=1e-5, rtol=1e-4)
    other, _ = task.token_logits([items[0]], adapter_names=["b"])
    assert (other[0] - mixed[0, : other.shape[1]]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["tag", "extract"])
def test_head_is_saved_in_the_adapter_file(tmp_path, minilm_tok, kind):
    model, task = make_task(kind, minilm_tok)
    sp.save_adapter(model, tmp_path / "ad", "a")
    tensors = load_file(tmp_path / "ad" / "adapter.safetensors")
    c = 4 if kind == "tag" else 2
    assert tensors["task_head.weight"].shape == (c, 32) and tensors["task_head.bias"].shape == (c,)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["task"]["kind"] == kind and cfg["task_head"] == [32, c]
    again = sp.load_adapter(tiny_bert(minilm_tok), tmp_path / "ad", name="a")
    torch.testing.assert_close(
        again.adapters["a"].task_head.weight, model.adapters["a"].task_head.weight
    )
    rows = examples(tag_rows(2) if kind == "tag" else extract_rows(2), kind)
    items = [task.encode(e) for e in rows]
    t2 = Task(TaskSpec.from_dict(cfg["task"]), again, minilm_tok)
    torch.testing.assert_close(t2.token_logits(items)[0], task.token_logits(items)[0])


def test_encoder_tasks_refuse_language_models(minilm_tok):
    model = sp.attach(tiny_model("gpt2"))
    spec = TaskSpec(kind="tag", template="", labels=["O", "B-X"], head=True)
    with pytest.raises(SoftPromptError, match="needs an encoder model"):
        Task(spec, model, minilm_tok)


# ------------------------------------------------------------------------------ CLI end to end


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_refuses_encoder_tasks_with_a_template(tmp_path, capsys):
    f = write_jsonl(tmp_path / "t.jsonl", tag_rows(4))
    code, _, err = run_cli(
        capsys,
        "train",
        "--model",
        "all-minilm-l6-v2",
        "--task",
        "tag",
        "--train",
        f,
        "--output",
        tmp_path / "o",
        "--template",
        "{tokens}",
    )
    assert code == 2 and "--template does not apply to --task tag" in err


def test_cli_refuses_encoder_tasks_on_a_language_model(tmp_path, capsys):
    f = write_jsonl(tmp_path / "t.jsonl", tag_rows(4))
    code, _, err = run_cli(
        capsys, "train", "--model", "smollm2-135m-instruct", "--task", "tag", "--train", f,
        "--output", tmp_path / "o",
    )  # fmt: skip
    assert code == 2 and "--task tag needs an encoder model" in err and "causal" in err


def test_cli_bad_rows_stop_with_file_and_line(tmp_path, capsys):
    rows = [*tag_rows(4), {"tokens": ["a", "b"], "tags": ["O"]}]
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    argv = ["train", "--model", "all-minilm-l6-v2", "--task", "tag", "--train", f]
    code, _, err = run_cli(capsys, *argv, "--output", tmp_path / "o")
    assert code == 2 and "t.jsonl:5: 2 tokens but 1 tags; give one tag per token" in err
    assert not (tmp_path / "o" / "adapter").exists()


def _curve(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_cli_tag_on_minilm_learns_the_synthetic_entities(tmp_path, capsys):
    rows = tag_rows(300)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:200])
    dev = write_jsonl(tmp_path / "dev.jsonl", rows[200:300])
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys,
        "train",
        "--model",
        "all-minilm-l6-v2",
        "--method",
        "deep",
        "--task",
        "tag",
        "--train",
        train,
        "--eval",
        dev,
        "--output",
        out,
        "--max-steps",
        100,
        "--batch-size",
        8,
        "--eval-every",
        50,
        "--num-virtual-tokens",
        8,
        "--lr",
        "3e-2",
        "--no-progress",
    )
    assert code == 0, err
    losses = _curve(out)
    assert len(losses) >= 4 and losses[-1] < 0.5 * losses[0], losses
    tensors = load_file(out / "adapter" / "adapter.safetensors")
    assert tensors["task_head.weight"].shape == (4, 384)  # O, B-NUM, B-WORK, I-WORK
    code, stdout, err = run_cli(capsys, "eval", "--adapter", out / "adapter", "--data", dev)
    assert code == 0, err
    m = json.loads(stdout)
    baseline = span_f1(
        [r["tags"] for r in rows[200:]], [["O"] * len(r["tags"]) for r in rows[200:]]
    )
    assert baseline["span_f1"] == 0.0
    assert m["span_f1"] > 0.7, m  # measured 0.88 after 120 steps
    code, stdout, err = run_cli(
        capsys, "generate", "--adapter", out / "adapter", "a truly awful movie from 1999"
    )
    assert code == 0, err
    assert json.loads(stdout)["tags"] == ["O", "O", "O", "B-WORK", "O", "B-NUM"]


@pytest.mark.slow
def test_cli_extract_on_minilm_reads_the_question(tmp_path, capsys):
    rows = extract_rows(300)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:200])
    dev = write_jsonl(tmp_path / "dev.jsonl", rows[200:300])
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys,
        "train",
        "--model",
        "all-minilm-l6-v2",
        "--method",
        "deep",
        "--task",
        "extract",
        "--train",
        train,
        "--eval",
        dev,
        "--output",
        out,
        "--max-steps",
        80,
        "--batch-size",
        8,
        "--eval-every",
        40,
        "--num-virtual-tokens",
        8,
        "--lr",
        "3e-2",
        "--no-progress",
    )
    assert code == 0, err
    losses = _curve(out)
    assert len(losses) >= 4 and losses[-1] < 0.5 * losses[0], losses
    tensors = load_file(out / "adapter" / "adapter.safetensors")
    assert tensors["task_head.weight"].shape == (2, 384)
    code, stdout, err = run_cli(capsys, "eval", "--adapter", out / "adapter", "--data", dev)
    assert code == 0, err
    m = json.loads(stdout)
    # a baseline that ignores the question: always answer the year (half the rows ask for it)
    year = [re.search(r"came out in (\d+)", r["context"]).group(1) for r in rows[200:]]
    base = extract_metrics(year, [r["answer"] for r in rows[200:]])
    assert base["exact_match"] == pytest.approx(0.5, abs=0.15)
    assert m["exact_match"] > base["exact_match"] + 0.2, (m, base)  # measured 0.81 at 75 steps
    context = "A warm, funny picture. It came out in 1977. It was directed by Ann Lee."
    code, stdout, err = run_cli(
        capsys, "generate", "--adapter", out / "adapter", "Who directed it?", context
    )
    assert code == 0, err
    got = json.loads(stdout)
    assert context[got["start"] :].startswith(got["answer"]) and got["answer"]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # PEFT's own transformers deprecations
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_token_classification_returns_virtual_positions():
    """The contrast: PEFT 0.21.2 prompt tuning on a BERT token classifier gives logits for
    P + T positions (the first P belong to virtual tokens), so they no longer line up with the
    T labels; softprompt's head sees T (test_outputs_have_the_real_tokens_length)."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
        num_labels=3,
    )
    peft_model = get_peft_model(
        BertForTokenClassification(cfg).eval(),
        PromptTuningConfig(task_type=TaskType.TOKEN_CLS, num_virtual_tokens=5),
    )
    ids = torch.randint(5, 100, (2, 7))
    with torch.no_grad():
        logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.shape == (2, 5 + 7, 3)
