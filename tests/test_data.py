"""Tests for softprompt.data: every source format, every kind of bad input, skip_bad, labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from softprompt import SoftPromptError
from softprompt.assets import resolve_data
from softprompt.data import (
    DataError,
    Example,
    check_eval_labels,
    label_set,
    load_examples,
    parse_source,
)

SKIP = "or pass --skip-bad to skip bad rows"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def raises(path, task="classify", **kw) -> str:
    with pytest.raises(DataError) as err:
        load_examples(path, task, **kw)
    assert isinstance(err.value, SoftPromptError)
    return str(err.value)


# ------------------------------------------------------------------------------------------------
# Good input
# ------------------------------------------------------------------------------------------------


def test_jsonl_classify_rows_lines_and_labels(tmp_path):
    p = write(
        tmp_path / "train.jsonl",
        jsonl(
            {"text": "good", "label": "positive", "id": 7}, "", "   ", {"text": "bad", "label": 0}
        ),
    )
    got = load_examples(p, "classify")
    assert got == [
        Example({"text": "good", "label": "positive", "id": 7}, str(p), 1),
        Example({"text": "bad", "label": "0"}, str(p), 4),  # blank lines count, int label -> str
    ]


def test_jsonl_generate_and_required_fields(tmp_path):
    p = write(tmp_path / "g.jsonl", jsonl({"input": "a b", "target": "c", "title": "T", "n": 0}))
    got = load_examples(p, "generate", required_fields=["title", "n", "input"])
    assert got == [Example({"input": "a b", "target": "c", "title": "T", "n": 0}, str(p), 1)]


def test_json_array_line_numbers(tmp_path):
    p = write(
        tmp_path / "rows.json",
        '[\n  {"text": "a", "label": "x"},\n\n  {\n    "text": "b",\n    "label": "y"\n  }\n]\n',
    )
    got = load_examples(p, "classify")
    assert [(e.fields["text"], e.line) for e in got] == [("a", 2), ("b", 4)]


def test_json_file_with_one_object_per_line(tmp_path):
    p = write(
        tmp_path / "rows.json", jsonl({"text": "a", "label": "x"}, {"text": "b", "label": "y"})
    )
    assert [(e.fields["label"], e.line) for e in load_examples(p, "classify")] == [
        ("x", 1),
        ("y", 2),
    ]


def test_csv_line_numbers_count_header_and_multiline_records(tmp_path):
    p = write(
        tmp_path / "train.csv",
        'text,label\n"one, quoted",pos\n\n"two\nlines",neg\nthree,pos\n',
    )
    got = load_examples(p, "classify")
    assert got == [
        Example({"text": "one, quoted", "label": "pos"}, str(p), 2),
        Example({"text": "two\nlines", "label": "neg"}, str(p), 4),
        Example({"text": "three", "label": "pos"}, str(p), 6),
    ]


def test_labels_are_stripped_so_stray_spaces_make_no_new_class(tmp_path):
    """A CSV's "ugly, neg" and a JSON "pos " are the classes neg and pos, not " neg" and
    "pos " beside them."""
    p = write(tmp_path / "train.csv", "text,label\nugly, neg\nfine,pos\nbad,neg\n")
    q = write(tmp_path / "more.jsonl", jsonl({"text": "good", "label": "pos "}))
    rows = load_examples(p, "classify") + load_examples(q, "classify")
    assert [r.fields["label"] for r in rows] == ["neg", "pos", "neg", "pos"]
    assert label_set(rows) == ["neg", "pos"]


def test_trl_prompt_completion_rows_are_generate_and_chat_rows(tmp_path):
    """TRL's standard and conversational prompt-completion datasets load as they are."""
    p = write(tmp_path / "pc.jsonl", jsonl({"prompt": "2 + 2 =", "completion": " 4"}))
    (ex,) = load_examples(p, "generate")
    assert (ex.fields["input"], ex.fields["target"]) == ("2 + 2 =", " 4")
    user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    answer = [{"role": "assistant", "content": "Hello."}]
    q = write(tmp_path / "conv.jsonl", jsonl({"prompt": user, "completion": answer}))
    (ex,) = load_examples(q, "chat")
    assert ex.fields["messages"] == user + answer
    # a completion that is not an assistant answer is the chat row's error, naming the message
    bad = write(tmp_path / "bad.jsonl", jsonl({"prompt": user, "completion": user[1:]}))
    assert raises(bad, "chat").startswith(f"{bad}:1: ")
    # the wrong kinds for the task are not guessed at: the usual missing-field error
    assert "field 'input' is missing" in raises(q, "generate")


def test_tsv(tmp_path):
    p = write(tmp_path / "dev.tsv", "input\ttarget\textra\nin, with comma\tout\t\n")
    got = load_examples(p, "generate")
    assert got == [Example({"input": "in, with comma", "target": "out", "extra": ""}, str(p), 2)]


def test_embedded_rotten_tomatoes_dev():
    got = load_examples("rotten-tomatoes:dev", "classify")
    assert len(got) == 1275
    assert got[0].source == str(resolve_data("rotten-tomatoes", "dev"))
    assert (got[0].line, got[-1].line) == (1, 1275)
    assert label_set(got) == ["negative", "positive"]
    # split given as an argument instead, and an alias
    assert len(load_examples("rt", "classify", split="test")) == 1275


def test_embedded_aclsum_generate():
    got = load_examples("aclsum:dev", "generate")
    assert len(got) == 50
    assert all(e.fields["input"] and e.fields["target"] for e in got)


def test_parse_source():
    assert parse_source("rotten-tomatoes") == ("rotten-tomatoes", None)
    assert parse_source("ACL-SUM:test") == ("aclsum", "test")
    assert parse_source("smollm2") is None  # a model, not a data set
    assert parse_source("data/train.jsonl") is None
    assert parse_source(Path("rotten-tomatoes")) is None


# ------------------------------------------------------------------------------------------------
# Bad input: one test per kind, exact messages
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "task", "required", "message"),
    [
        (
            [{"text": "ok", "label": "a"}, '{"text": "x", "label": }'],
            "classify",
            (),
            f"2: not valid JSON (Expecting value at column 24); write one JSON object per line, {SKIP}",
        ),
        (
            [["text", "label"]],
            "classify",
            (),
            f'1: row is a list, not an object; write each row as {{"text": ..., "label": ...}}, {SKIP}',
        ),
        (
            ['"just a string"'],
            "generate",
            (),
            f'1: row is a str, not an object; write each row as {{"input": ..., "target": ...}}, {SKIP}',
        ),
        (
            [{"text": "ok", "label": "a"}, {"text": "ok"}],
            "classify",
            (),
            f"2: field 'label' is missing (row has: 'text'); add 'label' to every row, {SKIP}",
        ),
        (
            [{}],
            "classify",
            (),
            f"1: field 'text' is missing (row has: none); add 'text' to every row, {SKIP}",
        ),
        (
            [{"text": "  ", "label": "a"}],
            "classify",
            (),
            f"1: field 'text' is empty; fill it in, {SKIP}",
        ),
        (
            [{"text": "x", "label": ""}],
            "classify",
            (),
            f"1: field 'label' is empty; fill it in, {SKIP}",
        ),
        (
            [{"text": 5, "label": "a"}],
            "classify",
            (),
            f"1: field 'text' is a number (5), expected a string; fix the row, {SKIP}",
        ),
        (
            [{"text": "x", "label": 1.5}],
            "classify",
            (),
            f"1: field 'label' is a number (1.5), expected a string or an integer; fix the row, {SKIP}",
        ),
        (
            [{"text": "x", "label": True}],
            "classify",
            (),
            "1: field 'label' is a boolean (true), expected a string or an integer; write labels "
            f"as strings, {SKIP}",
        ),
        (
            [{"input": None, "target": "t"}],
            "generate",
            (),
            f"1: field 'input' is null, expected a string; fix the row, {SKIP}",
        ),
        (
            [{"input": "i", "target": ["t"]}],
            "generate",
            (),
            f"1: field 'target' is a list, expected a string; fix the row, {SKIP}",
        ),
        (
            [{"text": "x", "label": "a", "topic": ""}],
            "classify",
            ("topic",),
            f"1: field 'topic' is empty; fill it in, {SKIP}",
        ),
        (
            [{"text": "x", "label": "a", "topic": {"k": 1}}],
            "classify",
            ("topic",),
            f"1: field 'topic' is an object, expected text; fix the row, {SKIP}",
        ),
        (
            [{"text": "x", "label": "a"}],
            "classify",
            ("topic",),
            f"1: field 'topic' is missing (row has: 'text', 'label'); add 'topic' to every row, {SKIP}",
        ),
    ],
)
def test_bad_jsonl_rows(tmp_path, lines, task, required, message):
    p = write(tmp_path / "train.jsonl", jsonl(*lines))
    assert raises(p, task, required_fields=required) == f"{p}:{message}"


def test_error_at_line_17(tmp_path):
    rows = [{"text": f"t{i}", "label": "a"} for i in range(16)] + [{"text": "", "label": "a"}]
    p = write(tmp_path / "train.jsonl", jsonl(*rows))
    assert raises(p) == f"{p}:17: field 'text' is empty; fill it in, {SKIP}"


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jsonl"
    assert raises(p) == (
        f"{p}: no such file or folder; check the path, or use an embedded data set: "
        "rotten-tomatoes[:train|dev|test], aclsum[:train|dev|test]"
    )


@pytest.mark.parametrize(
    ("name", "text"),
    [("e.jsonl", ""), ("e.jsonl", "\n  \n"), ("e.json", ""), ("e.json", "[]"), ("e.csv", "")],
)
def test_empty_sources(tmp_path, name, text):
    p = write(tmp_path / name, text)
    assert (
        raises(p)
        == f'{p}: no rows; the source is empty, add rows like {{"text": "...", "label": "..."}}'
    )


def test_csv_header_only(tmp_path):
    p = write(tmp_path / "e.csv", "input,target\n")
    assert raises(p, "generate") == (
        f'{p}: no rows; the source is empty, add rows like {{"input": "...", "target": "..."}}'
    )


def test_unsupported_file_type(tmp_path):
    p = write(tmp_path / "train.txt", "hello\n")
    assert raises(p) == (
        f"{p}: unsupported file type '.txt'; use .jsonl, .json, .csv or .tsv, or a datasets folder"
    )


def test_not_utf8(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "a"}\n')
    assert (
        raises(p)
        == f"{p}:2: not UTF-8 text (invalid continuation byte at byte 14 of the line); save the file as UTF-8"
    )


def test_split_does_not_apply_to_a_file(tmp_path):
    p = write(tmp_path / "train.jsonl", jsonl({"text": "x", "label": "a"}))
    assert raises(p, split="dev") == (
        f"{p} is a single file, so split='dev' does not apply; give the file of the split you "
        "want and leave split unset"
    )


def test_embedded_split_conflict_and_unknown_split():
    assert raises("rotten-tomatoes:dev", split="test") == (
        "rotten-tomatoes:dev: the spec asks for split 'dev' but split='test' was given; give the "
        "split once"
    )
    assert raises("rotten-tomatoes:valid2") == (
        "rotten-tomatoes:valid2: unknown split 'valid2'; expected one of train, dev, test"
    )


def test_unknown_task(tmp_path):
    with pytest.raises(
        SoftPromptError,
        match=r"^unknown task 'summarise'; expected one of \['classify', 'generate', 'chat', 'tag', "
        r"'extract'\]$",
    ):
        load_examples(tmp_path / "x.jsonl", "summarise")


def test_json_array_errors_are_fatal_with_line(tmp_path):
    p = write(
        tmp_path / "rows.json", '[\n  {"text": "a", "label": "x"},\n  {"text": "b" "label": "y"}\n]'
    )
    msg = f"{p}:3: not valid JSON (Expecting ',' delimiter at column 16); fix the file"
    assert raises(p) == msg
    assert raises(p, skip_bad=True, warn=lambda m: None) == msg
    p2 = write(
        tmp_path / "rows2.json", '[{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}]'
    )
    assert raises(p2) == f"{p2}:2: not valid JSON (expected ',' or ']' at column 1); fix the file"


def test_json_array_rows_are_checked(tmp_path):
    p = write(tmp_path / "rows.json", '[\n {"text": "a", "label": "x"},\n 3\n]')
    assert (
        raises(p)
        == f'{p}:3: row is a number (3), not an object; write each row as {{"text": ..., "label": ...}}, {SKIP}'
    )


def test_pretty_printed_single_object(tmp_path):
    p = write(tmp_path / "row.json", '{\n  "text": "a",\n  "label": "x"\n}\n')
    assert raises(p) == (
        f"{p}:1: the file is one JSON value spread over several lines; write a JSON array of row "
        "objects, or one object per line (JSON Lines)"
    )


def test_csv_missing_column_names_header_line(tmp_path):
    p = write(tmp_path / "train.csv", "text,lbl\nhello,pos\n")
    msg = (
        f"{p}:1: no column 'label' in the header (columns: 'text', 'lbl'); the first line must "
        "name the columns, including 'text', 'label'"
    )
    assert raises(p) == msg
    assert raises(p, skip_bad=True) == msg  # a header problem is not a row problem


def test_csv_bad_rows(tmp_path):
    p = write(tmp_path / "train.csv", "text,label\ngood,pos\nhello, world,pos\n,neg\n")
    assert raises(p) == (
        f"{p}:3: row has 3 values but the header names 2 columns; quote values that contain ',', {SKIP}"
    )
    warnings: list[str] = []
    got = load_examples(p, "classify", skip_bad=True, warn=warnings.append)
    assert [e.line for e in got] == [2]
    assert warnings == [
        f"{p}:3: row has 3 values but the header names 2 columns; quote values that contain ',', {SKIP}",
        f"{p}:4: field 'text' is empty; fill it in, {SKIP}",
        f"skipped 2 of 3 rows in {p}",
    ]


def test_csv_duplicate_column_and_bad_quoting(tmp_path):
    p = write(tmp_path / "d.csv", "text,label,text\na,b,c\n")
    assert raises(p) == f"{p}:1: column 'text' appears twice; rename one"
    p2 = write(tmp_path / "q.csv", 'text,label\nok,pos\n"unclosed,pos\n')
    assert (
        raises(p2) == f"{p2}:3: bad CSV (unexpected end of data); check the quoting of this record"
    )


# ------------------------------------------------------------------------------------------------
# skip_bad
# ------------------------------------------------------------------------------------------------


def test_skip_bad_warns_per_row_and_summary(tmp_path):
    p = write(
        tmp_path / "train.jsonl",
        jsonl(
            {"text": "a", "label": "x"},
            "not json",
            {"text": "", "label": "x"},
            {"text": "b", "label": "y"},
            {"label": "y"},
        ),
    )
    warnings: list[str] = []
    got = load_examples(p, "classify", skip_bad=True, warn=warnings.append)
    assert [(e.fields["text"], e.line) for e in got] == [("a", 1), ("b", 4)]
    assert warnings == [
        f"{p}:2: not valid JSON (Expecting value at column 1); write one JSON object per line, {SKIP}",
        f"{p}:3: field 'text' is empty; fill it in, {SKIP}",
        f"{p}:5: field 'text' is missing (row has: 'label'); add 'text' to every row, {SKIP}",
        f"skipped 3 of 5 rows in {p}",
    ]


def test_skip_bad_without_bad_rows_is_silent(tmp_path):
    p = write(tmp_path / "train.jsonl", jsonl({"text": "a", "label": "x"}))
    warnings: list[str] = []
    assert len(load_examples(p, "classify", skip_bad=True, warn=warnings.append)) == 1
    assert warnings == []


def test_skip_bad_all_rows_bad(tmp_path):
    p = write(tmp_path / "train.jsonl", jsonl({"text": ""}, [1]))
    warnings: list[str] = []
    assert raises(p, skip_bad=True, warn=warnings.append) == (
        f"{p}: all 2 rows are bad (see the warnings); fix the data"
    )
    assert len(warnings) == 3 and warnings[-1] == f"skipped 2 of 2 rows in {p}"


def test_skip_bad_default_warn_uses_warnings(tmp_path):
    p = write(tmp_path / "train.jsonl", jsonl({"text": "a", "label": "x"}, {"text": "b"}))
    with pytest.warns(UserWarning) as record:
        got = load_examples(p, "classify", skip_bad=True)
    assert len(got) == 1
    assert [str(w.message) for w in record] == [
        f"{p}:2: field 'label' is missing (row has: 'text'); add 'label' to every row, {SKIP}",
        f"skipped 1 of 2 rows in {p}",
    ]


# ------------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------------


def _examples(src: str, labels: list[str]) -> list[Example]:
    return [Example({"text": f"t{i}", "label": y}, src, i + 1) for i, y in enumerate(labels)]


def test_label_set_sorted_unique():
    assert label_set(_examples("a.jsonl", ["pos", "neg", "pos", "10", "2"])) == [
        "10",
        "2",
        "neg",
        "pos",
    ]


def test_check_eval_labels(tmp_path):
    dev = _examples("dev.jsonl", ["pos", "neutral", "neg", "meh"])
    with pytest.raises(DataError) as err:
        check_eval_labels(["pos", "neg"], dev)
    assert str(err.value) == (
        "dev.jsonl:2: field 'label' is 'neutral', which never appears in the training data (known "
        f"labels: 'neg', 'pos'); fix the label or add training rows with it, {SKIP}"
    )
    warnings: list[str] = []
    kept = check_eval_labels(["pos", "neg"], dev, skip_bad=True, warn=warnings.append)
    assert [e.line for e in kept] == [1, 3]
    assert warnings[1] == (
        "dev.jsonl:4: field 'label' is 'meh', which never appears in the training data (known "
        f"labels: 'neg', 'pos'); fix the label or add training rows with it, {SKIP}"
    )
    assert warnings[2] == "skipped 2 of 4 rows in dev.jsonl (labels not in the training data)"
    assert len(warnings) == 3
    assert check_eval_labels(["pos", "neg"], dev[:1]) == dev[:1]


def test_check_eval_labels_none_left():
    dev = _examples("dev.jsonl", ["x", "y"])
    with pytest.raises(DataError) as err:
        check_eval_labels(["pos"], dev, skip_bad=True, warn=lambda m: None)
    assert str(err.value) == (
        "dev.jsonl: no row has a label seen in training (known labels: 'pos'); evaluate on data "
        "with the same labels"
    )


# ------------------------------------------------------------------------------------------------
# Hugging Face datasets folders
# ------------------------------------------------------------------------------------------------


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    train = datasets.Dataset.from_dict(
        {"text": ["good", "bad"], "label": [1, 0]}, features=features
    )
    dev = datasets.Dataset.from_dict({"text": ["fine", ""], "label": [1, 1]}, features=features)
    folder = tmp_path / "ds"
    datasets.DatasetDict({"train": train, "validation": dev}).save_to_disk(str(folder))

    got = load_examples(folder, "classify")  # split defaults to train
    assert got == [
        Example({"text": "good", "label": "pos"}, f"{folder}[train]", 1),  # ClassLabel -> name
        Example({"text": "bad", "label": "neg"}, f"{folder}[train]", 2),
    ]
    assert raises(folder, split="validation") == (
        f"{folder}[validation]:2: field 'text' is empty; fill it in, {SKIP}"
    )
    assert raises(folder, split="dev") == (
        f"{folder}: no split 'dev' in the datasets folder (splits: train, validation); choose one "
        "of those with split"
    )
    assert raises(folder, "generate") == (
        f"{folder}[train]: no column 'input' (columns: 'text', 'label'); add it, or rename the "
        "column holding it"
    )

    single = tmp_path / "single"
    train.save_to_disk(str(single))
    assert [e.fields["label"] for e in load_examples(single, "classify")] == ["pos", "neg"]
    assert raises(single, split="train") == (
        f"{single} holds a single Dataset, not a DatasetDict, so split='train' does not apply; "
        "leave split unset or point at a folder with splits"
    )


def test_folder_that_is_not_a_dataset(tmp_path):
    pytest.importorskip("datasets")
    msg = raises(tmp_path)
    assert msg.startswith(f"{tmp_path}: cannot read the datasets folder (")
    assert msg.endswith("); point at a folder written by save_to_disk")


# ------------------------------------------------------------------------------------------------
# Hardening: duplicate keys, non-JSON numbers, unbalanced quotes
# ------------------------------------------------------------------------------------------------


def test_duplicate_keys_in_a_jsonl_row_are_refused(tmp_path):
    p = write(
        tmp_path / "t.jsonl",
        jsonl({"text": "a", "label": "x"}, '{"text": "b", "label": "y", "text": "c"}'),
    )
    assert raises(p) == f"{p}:2: field 'text' appears twice in the row; keep one, {SKIP}"
    warnings: list[str] = []
    got = load_examples(p, "classify", skip_bad=True, warn=warnings.append)
    assert [ex.line for ex in got] == [1] and warnings[0].startswith(f"{p}:2: field 'text'")


def test_duplicate_keys_in_a_json_array_name_the_line(tmp_path):
    p = write(
        tmp_path / "t.json", '[\n{"text": "a", "label": "x"},\n{"label": "y",\n "label": "z"}]'
    )
    assert raises(p).startswith(f"{p}:4: not valid JSON (key 'label' appears twice")


@pytest.mark.parametrize(
    "row, what",
    [
        ('{"text": NaN, "label": "x"}', "NaN is not a JSON value"),
        ('{"text": "a", "label": Infinity}', "Infinity is not a JSON value"),
        ('{"text": "a", "label": 1e999}', "number 1e999 is out of range"),
        ('{"text": "a", "label": ' + "9" * 5000 + "}", "Exceeds the limit"),
    ],
)
def test_non_json_numbers_are_bad_rows(tmp_path, row, what):
    p = write(tmp_path / "t.jsonl", jsonl({"text": "a", "label": "x"}, row))
    msg = raises(p)
    assert msg.startswith(f"{p}:2: not valid JSON (") and what in msg and msg.endswith(SKIP)


def test_tsv_with_an_unbalanced_quote_does_not_merge_rows(tmp_path):
    p = write(
        tmp_path / "t.tsv",
        'text\tlabel\n"great movie\tpositive\nbad"\tnegative\nfine\tpositive\n',
    )
    msg = raises(p)
    assert msg.startswith(f"{p}:2: a quoted value runs from line 2 to line 3") and SKIP in msg
    got = load_examples(p, "classify", skip_bad=True, warn=lambda m: None)
    assert [(ex.line, ex.fields["text"]) for ex in got] == [(4, "fine")]
    # a quoted value with a tab in it, on one line, is fine
    ok = write(tmp_path / "ok.tsv", 'text\tlabel\n"a\tb"\tpositive\n')
    assert load_examples(ok, "classify")[0].fields["text"] == "a\tb"


# ------------------------------------------------------------------------------------------------
# Chat rows
# ------------------------------------------------------------------------------------------------

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
}


def test_chat_rows_are_read_as_they_are(tmp_path):
    path = write(tmp_path / "c.jsonl", jsonl(CHAT, CHAT))
    rows = load_examples(path, "chat")
    assert [r.line for r in rows] == [1, 2] and rows[0].fields == CHAT
    prompt = {"messages": CHAT["messages"][:2]}
    path = write(tmp_path / "p.jsonl", jsonl(prompt))
    assert load_examples(path, "chat", chat_prompts=True)[0].fields == prompt


def _msgs(*pairs):
    return {"messages": [dict(p) for p in pairs]}


@pytest.mark.parametrize(
    "row, message",
    [
        ({"text": "x"}, "field 'messages' is missing (row has: 'text')"),
        ({"messages": []}, "field 'messages' is empty"),
        ({"messages": "hi"}, "field 'messages' is a str, expected a list"),
        ({"messages": ["hi"]}, "field 'messages[0]' is a str, expected an object"),
        (
            _msgs({"role": "user", "content": "a"}, {"role": "bot", "content": "b"}),
            "field 'messages[1].role' is 'bot', not one of system, user, assistant",
        ),
        (
            _msgs({"role": "user", "content": "a"}, {"role": "assistant"}),
            "field 'messages[1].content' is missing",
        ),
        (
            _msgs({"role": "user", "content": "a"}, {"role": "assistant", "content": " "}),
            "field 'messages[1].content' is empty",
        ),
        (
            _msgs({"role": "user", "content": "a"}, {"role": "assistant", "content": 3}),
            "field 'messages[1].content' is a number (3), expected a string",
        ),
        (
            _msgs({"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}),
            "field 'messages[1].role' is 'user', but a conversation ends with an assistant",
        ),
        (
            _msgs({"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}),
            "field 'messages[1]': the last assistant message must answer a user message",
        ),
    ],
)
def test_bad_chat_rows_name_file_line_and_field(tmp_path, row, message):
    path = write(tmp_path / "c.jsonl", jsonl(CHAT, row))
    err = raises(path, "chat")
    assert err.startswith(f"{path}:2: ") and message in err and SKIP in err


def test_bad_chat_rows_are_skipped_with_skip_bad(tmp_path):
    bad = _msgs({"role": "user", "content": "a"}, {"role": "robot", "content": "b"})
    path = write(tmp_path / "c.jsonl", jsonl(CHAT, bad, CHAT))
    seen = []
    rows = load_examples(path, "chat", skip_bad=True, warn=seen.append)
    assert [r.line for r in rows] == [1, 3]
    assert seen[0].startswith(f"{path}:2: field 'messages[1].role'") and "skipped 1 of 3" in seen[1]


def test_a_large_json_array_keeps_its_line_numbers(tmp_path):
    # each element on three lines after the "[" line: element i starts on line 2 + 3 * i
    body = ",\n".join(f'  {{\n    "text": "t{i}", "label": "{i % 2}"\n  }}' for i in range(20_000))
    p = write(tmp_path / "big.json", "[\n" + body + "\n]\n")
    got = load_examples(p, "classify")
    assert len(got) == 20_000
    assert [(got[i].fields["text"], got[i].line) for i in (0, 1, 9_999, 19_999)] == [
        ("t0", 2),
        ("t1", 5),
        ("t9999", 29_999),
        ("t19999", 59_999),
    ]


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_csv_values_longer_than_the_csv_modules_default_limit(tmp_path, suffix, sep):
    long = "word " * 30_000  # 150000 characters, over csv's default field_size_limit (131072)
    p = write(tmp_path / f"long{suffix}", f"text{sep}label\n{long}{sep}pos\nshort{sep}neg\n")
    got = load_examples(p, "classify")
    assert [(len(e.fields["text"]), e.fields["label"], e.line) for e in got] == [
        (150_000, "pos", 2),
        (5, "neg", 3),
    ]


@pytest.mark.parametrize(
    "value, what",
    [
        ("NaN", "NaN is not a JSON value"),
        ("-Infinity", "-Infinity is not a JSON value"),
        ("1e400", "number 1e400 is out of range"),
        (
            "9" * 5000,
            "Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits",
        ),
    ],
)
def test_non_json_numbers_are_located(tmp_path, value, what):
    # the same text in a string before it is not the offending token
    row = f'{{"text": "NaN 1e400 -Infinity", "label": "b", "x": {value}}}'
    p = write(tmp_path / "t.jsonl", jsonl({"text": "a", "label": "a"}, row))
    assert (
        raises(p)
        == f"{p}:2: not valid JSON ({what} at column 52); write one JSON object per line, {SKIP}"
    )
    q = write(
        tmp_path / "t.json",
        f'[\n {{"text": "a", "label": "a"}},\n {{"text": "b",\n  "x": {value}}}\n]\n',
    )
    assert raises(q) == f"{q}:4: not valid JSON ({what} at column 8); fix the file"


def test_datasets_folder_class_label_lists_and_missing_labels(tmp_path):
    datasets = pytest.importorskip("datasets")
    names = datasets.ClassLabel(names=["O", "B-PER", "I-PER"])
    tags = datasets.Features(
        {"tokens": datasets.Sequence(datasets.Value("string")), "tags": datasets.Sequence(names)}
    )
    folder = tmp_path / "tags"
    datasets.Dataset.from_dict(
        {"tokens": [["Ann", "Lee", "ran"]], "tags": [[1, 2, 0]]}, features=tags
    ).save_to_disk(str(folder))
    got = load_examples(folder, "tag")
    assert [ex.fields for ex in got] == [
        {"tokens": ["Ann", "Lee", "ran"], "tags": ["B-PER", "I-PER", "O"]}
    ]
    # ClassLabel -1 is datasets' "no label" (e.g. GLUE test splits): a bad row, not a class
    cls = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    folder = tmp_path / "cls"
    datasets.Dataset.from_dict(
        {"text": ["a", "b", "c"], "label": [0, -1, 1]}, features=cls
    ).save_to_disk(str(folder))
    message = (
        f"{folder}[train]:2: field 'label' is -1, the ClassLabel for 'no label' (a test split "
        f"without gold labels?); give rows with labels, {SKIP}"
    )
    assert raises(folder) == message
    warned = []
    got = load_examples(folder, "classify", skip_bad=True, warn=warned.append)
    assert [(ex.line, ex.fields["label"]) for ex in got] == [(1, "neg"), (3, "pos")]
    assert warned == [message, f"skipped 1 of 3 rows in {folder}[train]"]


def test_a_tsv_value_starting_with_a_quote_is_one_bad_row(tmp_path):
    p = write(tmp_path / "q.tsv", 'text\tlabel\nfine movie\tpos\n"Great" fun\tpos\nbad\tneg\n')
    message = (
        f"{p}:3: bad TSV ('\\t' expected after '\"'): a value that starts with '\"' is read as "
        f'quoted; quote the whole value and double the quotes in it ("""Great"" fun"), {SKIP}'
    )
    assert raises(p) == message
    warned = []
    got = load_examples(p, "classify", skip_bad=True, warn=warned.append)
    assert [(ex.line, ex.fields["text"]) for ex in got] == [(2, "fine movie"), (4, "bad")]
    assert warned == [message, f"skipped 1 of 3 rows in {p}"]
    # quoted whole, with its quotes doubled, the value reads as written
    ok = write(tmp_path / "ok.tsv", 'text\tlabel\n"""Great"" fun"\tpos\n')
    assert load_examples(ok, "classify")[0].fields["text"] == '"Great" fun'
