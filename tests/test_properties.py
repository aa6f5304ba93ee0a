"""Property-based tests (hypothesis): whatever a careless or hostile user writes into a data file,
a template, a --config file or an adapter folder, the outcome is a correct result or a
``SoftPromptError`` that names the file or the field, never another exception.

Each property runs 50-200 examples (``deadline=None``: the first examples pay for imports)."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import perturb, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import softprompt as sp
from softprompt.cli import _apply_config, _train_args, build_parser
from softprompt.data import TASKS, load_examples
from softprompt.methods import METHODS
from softprompt.templates import ANSWER_FIELDS, FieldPart, SoftPart, Template, TextPart

SETTINGS = dict(
    deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# JSON-ish values: wrong types, huge and non-finite numbers, unicode (lone surrogates included)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**30, max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", " ", "\ud800", "a\udcffb", "\u2028", "positive", "0", "1e999"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = st.sampled_from(["text", "label", "input", "target", "id", "title"])


@pytest.fixture(scope="module")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="props-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------ data loaders


def _check_data_outcome(path: Path, task: str, **kw) -> None:
    try:
        rows = load_examples(path, task, warn=lambda m: None, **kw)
    except sp.SoftPromptError as e:
        assert str(e).startswith(str(path)), str(e)  # names the file (and line)
        return
    assert rows
    for ex in rows:
        assert ex.source == str(path) and ex.line >= 1
        for name in TASKS[task]:
            value = ex.fields[name]
            assert isinstance(value, str) and value.strip()
            value.encode("utf-8")  # text a tokenizer takes


def _row_text(row) -> str:
    try:
        return json.dumps(row, ensure_ascii=False)
    except (ValueError, UnicodeEncodeError):
        return json.dumps(row)


@settings(max_examples=150, **SETTINGS)
@given(
    rows=st.lists(
        st.one_of(st.dictionaries(FIELDS, VALUES, max_size=4), VALUES), min_size=0, max_size=4
    ),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv"]),
    cut=st.integers(min_value=0, max_value=400) | st.none(),
    task=st.sampled_from(sorted(TASKS)),
    skip_bad=st.booleans(),
)
def test_data_files_are_read_or_refused_with_file_and_line(
    workdir, rows, suffix, cut, task, skip_bad
):
    if suffix in (".jsonl", ".json"):
        lines = [_row_text(r) for r in rows]
        text = "\n".join(lines) if suffix == ".jsonl" else "[" + ",\n".join(lines) + "]"
    else:
        sep = "," if suffix == ".csv" else "\t"
        cols = sorted({k for r in rows if isinstance(r, dict) for k in r}) or ["text", "label"]
        lines = [sep.join(cols)] + [
            sep.join(str(r.get(c, "")) if isinstance(r, dict) else str(r) for c in cols)
            for r in rows
        ]
        text = "\n".join(lines)
    data = text.encode("utf-8", "surrogatepass")
    if cut is not None:
        data = data[:cut]  # a truncated file
    path = workdir / f"d{suffix}"
    path.write_bytes(data)
    _check_data_outcome(path, task, skip_bad=skip_bad)


RAW_VALUES = st.one_of(
    SCALARS.map(lambda v: json.dumps(v)),  # NaN / Infinity for non-finite floats
    st.sampled_from(['"\\ud800"', '"ok \\udc00"', "9" * 5000, "-1e999", "[]", "{}", '"x" "y"']),
)


@settings(max_examples=150, **SETTINGS)
@given(
    rows=st.lists(
        st.lists(st.tuples(FIELDS, RAW_VALUES), min_size=1, max_size=4), min_size=1, max_size=3
    ),
    task=st.sampled_from(sorted(TASKS)),
    skip_bad=st.booleans(),
)
def test_raw_json_rows_are_read_or_refused(workdir, rows, task, skip_bad):
    """Rows written by hand: duplicate keys, NaN, 1e999, 5,000-digit numbers, lone surrogates."""
    lines = ["{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in row) + "}" for row in rows]
    path = workdir / "raw.jsonl"
    path.write_text("\n".join(lines))
    _check_data_outcome(path, task, skip_bad=skip_bad)
    try:
        kept = load_examples(path, task, skip_bad=True, warn=lambda m: None)
    except sp.SoftPromptError:
        kept = []
    for ex in kept:  # a row with a repeated key is never taken
        keys = [k for k, _ in json.loads(lines[ex.line - 1], object_pairs_hook=list)]
        assert len(set(keys)) == len(keys)


@settings(max_examples=100, **SETTINGS)
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv"]))
def test_random_bytes_are_read_or_refused(workdir, data, suffix):
    path = workdir / f"b{suffix}"
    path.write_bytes(data)
    _check_data_outcome(path, "classify")


# ------------------------------------------------------------------------------ templates

TEMPLATE_PIECES = st.sampled_from(
    ["[soft:", "[SOFT:", "]", "{", "}", "{{", "}}", "text", "label", "target", "input", " ", "\n",
     "\t", ":", "0", "3", "12", "99999999", "-", "x", "é", "\ud800", "{text}", "{label}",
     "[soft:2]", "{target}", "{a-b}"]
)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import _tokenizer

    return _tokenizer()


@settings(max_examples=200, **SETTINGS)
@given(
    text=st.one_of(st.text(max_size=40), st.lists(TEMPLATE_PIECES, max_size=12).map("".join)),
    value=st.text(max_size=30),
)
def test_templates_parse_and_encode_or_say_where(tokenizer, text, value):
    try:
        tpl = Template.parse(text)
    except sp.SoftPromptError as e:
        assert "template" in str(e)
        return
    assert tpl.num_soft == sum(p.length for p in tpl.parts if isinstance(p, SoftPart))
    assert all(n >= 1 for n in tpl.soft_segments)
    assert tpl.answer_field in (None, *ANSWER_FIELDS)
    if tpl.answer_field is not None:
        assert tpl.parts[-1] == FieldPart(tpl.answer_field)
    assert all(isinstance(p, TextPart | FieldPart | SoftPart) for p in tpl.parts)
    if tpl.num_soft > 1000:
        return  # the model's context check refuses these before anything is encoded
    row = dict.fromkeys(tpl.fields, value)
    try:
        ids = tpl.encode(row, tokenizer, max_length=64)
    except sp.SoftPromptError as e:
        assert "template" in str(e) or "field" in str(e)
        return
    assert len(ids) <= 64
    markers = sorted(-i - 1 for i in ids if i < 0)
    assert markers == list(range(tpl.num_soft))
    assert all(0 <= i < len(tokenizer) for i in ids if i >= 0)


# ------------------------------------------------------------------------------ --config files

_TRAIN = build_parser()._subparsers._group_actions[0].choices["train"]  # noqa: SLF001
TRAIN_FLAGS = sorted(a.dest for a in _TRAIN._actions if a.dest != "help")  # noqa: SLF001
YAML_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["prompt", "prefix", "deep", "bogus", "1e-3", "nan", "-1", "0", "top_half"]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@settings(max_examples=200, **SETTINGS)
@given(
    config=st.dictionaries(
        st.one_of(st.sampled_from(TRAIN_FLAGS), st.text(max_size=8)), YAML_VALUES, max_size=6
    )
)
def test_config_files_give_valid_flags_or_name_the_key(workdir, config):
    path = workdir / "c.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    try:
        args = _apply_config(build_parser(), ["--config", str(path), "train"])
    except sp.SoftPromptError as e:
        assert str(e).startswith(f"--config {path}"), str(e)
        return
    # every value is what the command line would have given for that flag
    assert args.method in METHODS and args.task in ("classify", "generate")
    for name in ("batch_size", "num_virtual_tokens", "grad_accum", "eval_every", "max_length"):
        value = getattr(args, name)
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 1
    for name in ("lr", "epochs", "warmup_ratio"):
        value = getattr(args, name)
        assert value is None or (isinstance(value, float) and math.isfinite(value))
    for name in ("resume", "skip_bad", "no_progress", "group_by_length"):
        assert isinstance(getattr(args, name), bool)
    for name in ("train", "template", "layers", "output", "name"):
        assert getattr(args, name) is None or isinstance(getattr(args, name), str)
    if args.output:
        _train_args(args)  # the loop's own checks agree with the flags'


# ------------------------------------------------------------------------------ adapter loader


@pytest.fixture(scope="module")
def adapters(workdir):
    """Saved adapters (baked prompt; prefix checkpoint with its MLP) and a model to load on."""
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("p", sp.PromptTuningConfig(num_virtual_tokens=3))
    model.add_adapter("q", sp.PrefixTuningConfig(num_virtual_tokens=2, encoder_hidden_size=8))
    perturb(model)
    model.save_adapter(workdir / "prompt", "p")
    model.save_adapter(workdir / "prefix", "q", trainable=True)
    return {"prompt": workdir / "prompt", "prefix": workdir / "prefix"}, sp.attach(
        tiny_model("llama")
    )


def _load_outcome(model, folder: Path) -> None:
    try:
        loaded = sp.load_adapter(model, folder, name="x")
    except sp.SoftPromptError as e:
        msg = str(e)
        assert str(folder) in msg or "adapter_config.json" in msg or ".safetensors" in msg, msg
        assert list(model.adapters) == []  # a failed load leaves the model as it was
        return
    ad = loaded.adapters["x"]
    with torch.no_grad():
        tensors = [*ad.parameters(), *ad.baked_tensors().values()]
    assert all(torch.isfinite(t).all() for t in tensors)
    loaded.delete_adapter("x")


def _mutate_json(value, path: list, new):
    if not path:
        return new
    key = path[0]
    if isinstance(value, dict) and value:
        k = sorted(value)[key % len(value)]
        return {**value, k: _mutate_json(value[k], path[1:], new)}
    if isinstance(value, list) and value:
        i = key % len(value)
        return [*value[:i], _mutate_json(value[i], path[1:], new), *value[i + 1 :]]
    return new


@settings(max_examples=120, **SETTINGS)
@given(
    which=st.sampled_from(["prompt", "prefix"]),
    where=st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=3),
    new=VALUES,
    drop=st.booleans(),
)
def test_mutated_adapter_configs_load_or_name_the_field(workdir, adapters, which, where, new, drop):
    folders, model = adapters
    target = workdir / "mutated"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folders[which], target)
    meta = json.loads((target / "adapter_config.json").read_text())
    meta = _mutate_json(meta, where, new)
    if drop and isinstance(meta, dict) and meta:
        meta.pop(sorted(meta)[where[0] % len(meta)])
    text = json.dumps(meta, allow_nan=True)
    (target / "adapter_config.json").write_text(text)
    _load_outcome(model, target)


@settings(max_examples=120, **SETTINGS)
@given(
    which=st.sampled_from(["prompt", "prefix"]),
    file=st.sampled_from(["adapter_config.json", "adapter.safetensors", "trainable.safetensors"]),
    how=st.sampled_from(["truncate", "flip", "random", "empty"]),
    pos=st.integers(min_value=0, max_value=10**6),
    junk=st.binary(min_size=1, max_size=64),
)
def test_damaged_adapter_files_load_or_name_the_file(
    workdir, adapters, which, file, how, pos, junk
):
    folders, model = adapters
    target = workdir / "damaged"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folders[which], target)
    f = target / file
    data = f.read_bytes() if f.exists() else b""
    if how == "truncate":
        data = data[: pos % (len(data) + 1)]
    elif how == "flip" and data:
        i = pos % len(data)
        data = data[:i] + bytes([data[i] ^ junk[0]]) + data[i + 1 :]
    elif how == "random":
        data = junk
    else:
        data = b""
    f.write_bytes(data)
    _load_outcome(model, target)


# ------------------------------------------------------------------------------ command-line flags

NUMERIC_FLAGS = [
    a
    for a in _TRAIN._actions
    if a.type is not None and a.option_strings  # noqa: SLF001
]


@settings(max_examples=150, **SETTINGS)
@given(
    action=st.sampled_from(NUMERIC_FLAGS),
    value=st.one_of(
        st.text(max_size=10),
        st.integers().map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.sampled_from(["nan", "inf", "-inf", "1e999", "0", "-1", "1_000", " 3 ", "0x10"]),
    ),
)
def test_numeric_flags_parse_to_valid_values_or_exit_2(capsys, action, value):
    flag = action.option_strings[-1]
    try:
        args = build_parser().parse_args(["train", f"{flag}={value}"])
    except SystemExit as e:
        assert e.code == 2 and f"argument {flag}" in capsys.readouterr().err
        return
    got = getattr(args, action.dest)
    assert isinstance(got, int | float) and not isinstance(got, bool) and math.isfinite(got)
    assert got >= 0
    loop_fields = {"epochs", "lr", "batch_size", "grad_accum", "warmup_ratio", "eval_every"}
    if action.dest in loop_fields:
        args.output = "x"
        _train_args(args)  # the library agrees with the flag's check
