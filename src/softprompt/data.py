"""Task data: read examples from files, folders or embedded data sets, with errors a user can act on.

Sources accepted by :func:`load_examples`:

* ``.jsonl``: one JSON object per line (blank lines ignored);
* ``.json``: the same, or one JSON array of objects;
* ``.csv`` / ``.tsv``: a header line naming the columns, then one row per record (a value may
  be quoted with ``"``, doubling the quotes inside it; in a TSV a value that starts with ``"``
  but is not quoted whole, such as ``"Great" fun``, is a bad row that ``skip_bad`` skips, while
  a CSV quoting error ends the reading);
* a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` whose
  split is chosen with ``split``, default ``"train"``; needs the ``datasets`` package);
* an embedded data set: ``"rotten-tomatoes[:split]"`` or ``"aclsum[:split]"`` (split ``train``,
  ``dev`` or ``test``, default ``train``; see :mod:`softprompt.assets`).

Every problem is reported as ``<file>:<line>: <what is wrong>; <what to do>``. Lines are 1-based
and count every line of the file: blank JSONL lines count, a CSV/TSV header is line 1 and a
record is numbered by the line it starts on (quoted values may span lines). A JSON array element
is numbered by the line its ``{`` is on. For a ``datasets`` folder the "line" is the 1-based row
number within the split and the file is written ``<folder>[<split>]``; its ``ClassLabel`` and
``Sequence(ClassLabel)`` columns are read as the class names, and a ``ClassLabel`` of -1 (no
label) in a field the task needs makes a bad row.

Tasks and the fields each row needs (non-empty after stripping whitespace):

* ``"classify"``: ``text`` (a string) and ``label`` (a string, or an integer turned into its
  decimal string);
* ``"generate"``: ``input`` and ``target`` (strings);
* ``"chat"``: ``messages``, a non-empty list of ``{"role": "system" | "user" | "assistant",
  "content": "..."}`` objects (the OpenAI / TRL conversational form) ending with an assistant
  message that answers a user message (the target; with ``chat_prompts`` a row may end with the
  user message instead); an error names the message, e.g. ``field 'messages[2].role'``;
* ``"tag"``: ``tokens`` (a list of non-empty strings, the words) and ``tags`` (a list of as many
  BIO tags: ``"O"``, ``"B-TYPE"`` or ``"I-TYPE"``); JSON sources only (a CSV cell holds no list);
* ``"extract"``: ``question``, ``context`` and ``answer`` (strings, the answer a slice of the
  context), optional ``answer_start`` (an integer: where the answer starts in the context;
  default: its first occurrence, which is then stored in the row);
* plus ``required_fields`` (fields a template uses): present, scalar and non-empty.

TRL's prompt-completion rows are taken as they are: ``{"prompt": "...", "completion": "..."}``
as a generate row (``input``, ``target``), and the conversational ``{"prompt": [messages],
"completion": [messages]}`` as a chat row (``messages``: the prompt's, then the completion's).
TRL's other conversational form, ``{"messages": [...]}``, is the chat row itself.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _json, assets
from .chat import ROLES as _ROLES
from .errors import SoftPromptError
from .templates import is_text

__all__ = [
    "TASKS",
    "DataError",
    "Example",
    "check_eval_labels",
    "label_set",
    "load_examples",
    "parse_source",
]

TASKS: dict[str, tuple[str, ...]] = {
    "classify": ("text", "label"),
    "generate": ("input", "target"),
    "chat": ("messages",),
    "tag": ("tokens", "tags"),
    "extract": ("question", "context", "answer"),
}
"""The fields every row of a task needs."""


_SKIP_HINT = "or pass --skip-bad to skip bad rows"
_CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)  # the largest a C long takes on every platform
_EMBEDDED = ("rotten-tomatoes", "aclsum")


class DataError(SoftPromptError):
    """Bad task data; the message names the file, the line and the field, and what to do."""


@dataclass
class Example:
    """One row of task data.

    Attributes:
        fields: every field of the row (a classification ``label`` is always a string).
        source: the file it came from (as given, or the embedded data set's JSONL file).
        line: 1-based line of the row in that file (see the module docstring).
    """

    fields: dict[str, Any]
    source: str
    line: int


class _BadRow(Exception):
    """A row-level problem (skippable with ``skip_bad``); the message lacks the location."""


def _default_warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _from_prompt_completion(row: dict[str, Any], task: str) -> dict[str, Any]:
    """TRL's prompt-completion rows in softprompt's fields (the row keeps its own as well):
    ``{"prompt": str, "completion": str}`` is a generate row's ``input`` / ``target``;
    ``{"prompt": [messages], "completion": [messages]}`` is a chat row's ``messages`` (the
    prompt's messages, then the completion's)."""
    if "prompt" not in row or "completion" not in row:
        return row
    prompt, completion = row["prompt"], row["completion"]
    if task == "generate" and "input" not in row and "target" not in row:
        if isinstance(prompt, str) and isinstance(completion, str):
            row["input"], row["target"] = prompt, completion
    elif task == "chat" and "messages" not in row:
        if isinstance(prompt, list) and isinstance(completion, list):
            row["messages"] = [*prompt, *completion]
    return row


def _check_messages(row: dict[str, Any], chat_prompts: bool) -> None:
    """A chat row's ``messages`` (module docstring); raises ``_BadRow`` naming the message."""
    if "messages" not in row:
        have = ", ".join(repr(k) for k in row) or "none"
        raise _BadRow(
            f"field 'messages' is missing (row has: {have}); write each row as "
            f'{{"messages": [{{"role": "user", "content": ...}}, {{"role": "assistant", '
            f'"content": ...}}]}}, {_SKIP_HINT}'
        )
    msgs = row["messages"]
    if not isinstance(msgs, list):
        raise _BadRow(
            f"field 'messages' is {_describe(msgs)}, expected a list of "
            f'{{"role", "content"}} objects; fix the row, {_SKIP_HINT}'
        )
    if not msgs:
        raise _BadRow(f"field 'messages' is empty; give at least a user message, {_SKIP_HINT}")
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _BadRow(
                f"field {where!r} is {_describe(m)}, expected an object "
                f'{{"role": ..., "content": ...}}; fix the row, {_SKIP_HINT}'
            )
        for key in ("role", "content"):
            if key not in m:
                raise _BadRow(
                    f"field '{where}.{key}' is missing; give every message a role and a "
                    f"content, {_SKIP_HINT}"
                )
            if not isinstance(m[key], str):
                raise _BadRow(
                    f"field '{where}.{key}' is {_describe(m[key])}, expected a string; fix the "
                    f"row, {_SKIP_HINT}"
                )
        if m["role"] not in _ROLES:
            raise _BadRow(
                f"field '{where}.role' is {m['role']!r:.40}, not one of {', '.join(_ROLES)}; "
                f"fix the role, {_SKIP_HINT}"
            )
        if not m["content"].strip():
            raise _BadRow(f"field '{where}.content' is empty; fill it in, {_SKIP_HINT}")
        if not is_text(m["content"]):
            raise _BadRow(
                f"field '{where}.content' holds a lone surrogate (such as \\ud800), which is "
                f"not text; fix the row, {_SKIP_HINT}"
            )
    last = msgs[-1]["role"]
    ends = ("assistant", "user") if chat_prompts else ("assistant",)
    if last not in ends:
        what = "an assistant message (the answer to learn and score)"
        if chat_prompts:
            what = "a user message (to answer) or an assistant message"
        raise _BadRow(
            f"field 'messages[{len(msgs) - 1}].role' is {last!r}, but a conversation ends with "
            f"{what}; fix the row, {_SKIP_HINT}"
        )
    if last == "assistant" and (len(msgs) < 2 or msgs[-2]["role"] != "user"):
        raise _BadRow(
            f"field 'messages[{len(msgs) - 1}]': the last assistant message must answer a user "
            f"message right before it; fix the row, {_SKIP_HINT}"
        )


def _check_row(
    row: Any, task: str, required: Sequence[str], chat_prompts: bool = False
) -> dict[str, Any]:
    """Validate one row and return its fields (label normalised to str); raises ``_BadRow``."""
    if task in _ENCODER_CHECKS and isinstance(row, dict):
        return _ENCODER_CHECKS[task](dict(row))
    if not isinstance(row, dict):
        example = ", ".join(f'"{f}": ...' for f in TASKS[task])
        raise _BadRow(
            f"row is {_describe(row)}, not an object; write each row as {{{example}}}, {_SKIP_HINT}"
        )
    row = _from_prompt_completion(dict(row), task)
    if task == "chat":
        _check_messages(row, chat_prompts)
        return row
    main, answer = TASKS[task]
    for name in (main, answer, *required):
        if name not in row:
            have = ", ".join(repr(k) for k in row) or "none"
            raise _BadRow(
                f"field {name!r} is missing (row has: {have}); add {name!r} to every row, "
                f"{_SKIP_HINT}"
            )
        value = row[name]
        if name == "label" and task == "classify" and isinstance(value, int):
            if isinstance(value, bool):
                raise _BadRow(
                    f"field 'label' is {_describe(value)}, expected a string or an integer; "
                    f"write labels as strings, {_SKIP_HINT}"
                )
            value = row[name] = str(value)
        if name in (main, answer) and not isinstance(value, str):
            expected = "a string or an integer" if name == "label" else "a string"
            raise _BadRow(
                f"field {name!r} is {_describe(value)}, expected {expected}; fix the row, "
                f"{_SKIP_HINT}"
            )
        if not isinstance(value, str | int | float | bool):
            raise _BadRow(
                f"field {name!r} is {_describe(value)}, expected text; fix the row, {_SKIP_HINT}"
            )
        if isinstance(value, str) and not value.strip():
            raise _BadRow(f"field {name!r} is empty; fill it in, {_SKIP_HINT}")
        if isinstance(value, str) and not is_text(value):
            raise _BadRow(
                f"field {name!r} holds a lone surrogate (such as \\ud800), which is not text; "
                f"fix the row, {_SKIP_HINT}"
            )
        if name == "label" and task == "classify":
            row[name] = value.strip()  # "pos " and " pos" (a CSV's ", pos") are the class "pos"
    return row


def _check_text(row: dict[str, Any], name: str) -> str:
    if name not in row:
        have = ", ".join(repr(k) for k in row) or "none"
        raise _BadRow(
            f"field {name!r} is missing (row has: {have}); add {name!r} to every row, {_SKIP_HINT}"
        )
    value = row[name]
    if not isinstance(value, str):
        raise _BadRow(
            f"field {name!r} is {_describe(value)}, expected a string; fix the row, {_SKIP_HINT}"
        )
    if not value.strip():
        raise _BadRow(f"field {name!r} is empty; fill it in, {_SKIP_HINT}")
    if not is_text(value):
        raise _BadRow(
            f"field {name!r} holds a lone surrogate (such as \\ud800), which is not text; "
            f"fix the row, {_SKIP_HINT}"
        )
    return value


def _check_list(row: dict[str, Any], name: str) -> list[str]:
    if name not in row:
        have = ", ".join(repr(k) for k in row) or "none"
        raise _BadRow(
            f"field {name!r} is missing (row has: {have}); add {name!r} to every row, {_SKIP_HINT}"
        )
    value = row[name]
    if not isinstance(value, list):
        hint = (
            " (CSV/TSV cells hold no lists: write the data as JSONL)"
            if isinstance(value, str)
            else ""
        )
        raise _BadRow(
            f"field {name!r} is {_describe(value)}, expected a list of strings{hint}; fix the "
            f"row, {_SKIP_HINT}"
        )
    if not value:
        raise _BadRow(f"field {name!r} is an empty list; give at least one word, {_SKIP_HINT}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip() or not is_text(item):
            what = "empty" if isinstance(item, str) else _describe(item)
            raise _BadRow(
                f"field {name!r}: item {i} is {what}, expected a non-empty string; fix the row, "
                f"{_SKIP_HINT}"
            )
    return value


_BIO = re.compile(r"^(O|[BI]-\S+)$")


def _check_tag_row(row: dict[str, Any]) -> dict[str, Any]:
    """A ``tag`` row: words and one BIO tag per word."""
    tokens, tags = _check_list(row, "tokens"), _check_list(row, "tags")
    if len(tokens) != len(tags):
        raise _BadRow(
            f"{len(tokens)} tokens but {len(tags)} tags; give one tag per token, {_SKIP_HINT}"
        )
    bad = next((t for t in tags if not _BIO.match(t)), None)
    if bad is not None:
        raise _BadRow(
            f"field 'tags' holds {bad!r}, not a BIO tag; write 'O', 'B-TYPE' or 'I-TYPE', "
            f"{_SKIP_HINT}"
        )
    return row


def _check_extract_row(row: dict[str, Any]) -> dict[str, Any]:
    """An ``extract`` row: question, context, answer (a slice of it), answer_start (filled in)."""
    _check_text(row, "question")
    context, answer = _check_text(row, "context"), _check_text(row, "answer")
    start = row.get("answer_start")
    if start is None:
        start = context.find(answer)
        if start < 0:
            raise _BadRow(
                f"the answer {answer!r:.60} does not occur in the context; an extractive answer "
                f"is a slice of the context (copy it exactly), {_SKIP_HINT}"
            )
        row["answer_start"] = start
    elif not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise _BadRow(
            f"field 'answer_start' is {_describe(start)}, expected an integer >= 0; fix the row, "
            f"{_SKIP_HINT}"
        )
    elif context[start : start + len(answer)] != answer:
        raise _BadRow(
            f"the context at answer_start {start} reads {context[start : start + len(answer)]!r:.60}"
            f", not the answer {answer!r:.60}; fix answer_start (or drop it), {_SKIP_HINT}"
        )
    return row


_ENCODER_CHECKS = {"tag": _check_tag_row, "extract": _check_extract_row}


# --------------------------------------------------------------------------------------------
# Readers: yield (line, row) where row is a parsed object, or (line, _BadRow) for a bad record
# --------------------------------------------------------------------------------------------


def _read_text(path: Path, name: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        byte = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{name}:{line}: not UTF-8 text ({err.reason} at byte {byte} of the line); "
            "save the file as UTF-8"
        ) from None


def _jsonl_rows(text: str) -> Iterator[tuple[int, Any]]:
    # split on "\n" only: str.splitlines would also split inside strings at U+2028 and friends
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield line_no, _json.loads(line)
        except _json.JSONError as err:
            if err.key is not None:
                yield (
                    line_no,
                    _BadRow(f"field {err.key!r} appears twice in the row; keep one, {_SKIP_HINT}"),
                )
                continue
            yield (
                line_no,
                _BadRow(
                    f"not valid JSON ({err.msg} at column {err.pos + 1}); write one JSON object "
                    f"per line, {_SKIP_HINT}"
                ),
            )


def _json_array_rows(text: str, name: str) -> Iterator[tuple[int, Any]]:
    """Elements of a JSON array with the line each starts on (a syntax error is fatal)."""
    ws = re.compile(r"\s*")

    def fail(pos: int, msg: str) -> DataError:
        line, col = _json.line_col(text, pos)
        return DataError(f"{name}:{line}: not valid JSON ({msg} at column {col}); fix the file")

    pos = ws.match(text, 0).end()
    if not text.startswith("[", pos):
        raise fail(pos, "expected '['")
    pos = ws.match(text, pos + 1).end()
    line, counted = 1, 0  # newlines in text[:counted] (a running count: linear in the file)
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                value, end = _json.raw_decode(text, pos)
            except _json.JSONError as err:
                raise fail(err.pos, err.msg) from None
            line += text.count("\n", counted, pos)
            counted = pos
            yield line, value
            pos = ws.match(text, end).end()
            if text.startswith(",", pos):
                pos = ws.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise fail(pos, "expected ',' or ']'")
    pos = ws.match(text, pos).end()
    if pos != len(text):
        raise fail(pos, "extra data after the array")


def _json_rows(text: str, name: str) -> Iterator[tuple[int, Any]]:
    if text.lstrip().startswith("["):
        yield from _json_array_rows(text, name)
        return
    first = next((line for line in text.split("\n") if line.strip()), "")
    try:
        _json.loads(first)
    except _json.JSONError:
        try:
            _json.loads(text)
        except _json.JSONError:
            pass
        else:  # a pretty-printed single JSON value
            raise DataError(
                f"{name}:1: the file is one JSON value spread over several lines; write a JSON "
                "array of row objects, or one object per line (JSON Lines)"
            ) from None
    yield from _jsonl_rows(text)


def _csv_rows(text: str, name: str, delimiter: str, needed: Sequence[str]) -> Iterator:
    # the csv module refuses values over 131072 characters by default (as a quoting error)
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    kind = "TSV" if delimiter == "\t" else "CSV"

    def records() -> Iterator[tuple[int, list[str] | _BadRow]]:
        start = 1
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                if delimiter != "\t" or "field larger than" in str(err):
                    # unrecoverable: in a CSV a quote may open a value lines long, so where
                    # the record ends (and the next begins) is unknown
                    raise DataError(
                        f"{name}:{start}: bad {kind} ({err}); check the quoting of this record"
                    ) from None
                # a TSV value that starts with '"' but is not one quoted value (`"Great" fun`):
                # the reader drops the rest of the line and goes on with the next one
                detail = str(err).replace("\t", "\\t")  # "'\t' expected after '\"'"
                yield (
                    start,
                    _BadRow(
                        f"bad TSV ({detail}): a value that starts with '\"' is read as quoted; quote "
                        f'the whole value and double the quotes in it ("""Great"" fun"), '
                        f"{_SKIP_HINT}"
                    ),
                )
                start = reader.line_num + 1
                continue
            end = reader.line_num
            if delimiter == "\t" and any("\n" in c and "\t" in c for c in record):
                # a quote that opens a value and closes lines later took in line breaks and
                # tabs: the rows in between merged into one value (TSV text rarely holds both)
                yield (
                    start,
                    _BadRow(
                        f"a quoted value runs from line {start} to line {end}, taking in tabs and "
                        f"line breaks (an unbalanced '\"'?); remove the stray quote or double it "
                        f'(""), {_SKIP_HINT}'
                    ),
                )
            else:
                yield start, record
            start = end + 1

    rows = records()
    header: list[str] | None = None
    for line_no, record in rows:
        if isinstance(record, _BadRow):
            raise DataError(f"{name}:{line_no}: the header: {record}")
        if any(cell.strip() for cell in record):
            header = [cell.strip() for cell in record]
            header_line = line_no
            break
    if header is None:
        return
    missing = [f for f in needed if f not in header]
    if missing:
        cols = ", ".join(repr(c) for c in header)
        raise DataError(
            f"{name}:{header_line}: no column {missing[0]!r} in the header (columns: {cols}); "
            f"the first line must name the columns, including {', '.join(map(repr, needed))}"
        )
    duplicate = next((c for c in header if header.count(c) > 1), None)
    if duplicate is not None:
        raise DataError(f"{name}:{header_line}: column {duplicate!r} appears twice; rename one")
    for line_no, record in rows:
        if isinstance(record, _BadRow):
            yield line_no, record
            continue
        if not record or not any(cell.strip() for cell in record):
            continue  # blank line
        if len(record) != len(header):
            sep = "a tab" if delimiter == "\t" else "','"
            yield (
                line_no,
                _BadRow(
                    f"row has {len(record)} values but the header names {len(header)} columns; "
                    f"quote values that contain {sep}, {_SKIP_HINT}"
                ),
            )
            continue
        yield line_no, dict(zip(header, record, strict=True))


def _hf_rows(
    folder: Path, split: str | None, name: str, needed: Sequence[str]
) -> tuple[str, Iterator]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name} is a datasets folder; reading it needs the datasets package: "
            "pip install 'softprompt[data]'"
        ) from None
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as err:  # noqa: BLE001 - datasets raises several kinds
        raise DataError(
            f"{name}: cannot read the datasets folder ({err}); point at a folder written by "
            "save_to_disk"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        split = split or "train"
        if split not in loaded:
            have = ", ".join(loaded) or "none"
            raise DataError(
                f"{name}: no split {split!r} in the datasets folder (splits: {have}); "
                "choose one of those with split"
            )
        table = loaded[split]
    else:
        if split is not None:
            raise DataError(
                f"{name} holds a single Dataset, not a DatasetDict, so split={split!r} does not "
                "apply; leave split unset or point at a folder with splits"
            )
        split, table = "train", loaded
    missing = [f for f in needed if f not in table.column_names]
    if missing:
        cols = ", ".join(repr(c) for c in table.column_names)
        raise DataError(
            f"{name}[{split}]: no column {missing[0]!r} (columns: {cols}); add it, or rename "
            "the column holding it"
        )
    class_labels: dict[str, list[str]] = {}  # ClassLabel columns: id -> name
    class_lists: dict[str, list[str]] = {}  # Sequence(ClassLabel) columns (BIO tags)
    for col, feat in table.features.items():
        if isinstance(feat, datasets.ClassLabel):
            class_labels[col] = feat.names
        else:  # Sequence(ClassLabel) (datasets 4+: List), or a plain [ClassLabel]
            inner = feat[0] if isinstance(feat, list) and len(feat) == 1 else None
            inner = getattr(feat, "feature", inner)
            if isinstance(inner, datasets.ClassLabel):
                class_lists[col] = inner.names

    def name_of(names: list[str], value: Any) -> Any:
        ok = isinstance(value, int) and 0 <= value < len(names)
        return names[value] if ok else value

    def rows() -> Iterator[tuple[int, Any]]:
        for i, row in enumerate(table, start=1):
            unlabelled = None
            for col, names in class_labels.items():
                if row.get(col) == -1 and col in needed:
                    unlabelled = col
                row[col] = name_of(names, row.get(col))
            for col, names in class_lists.items():
                if isinstance(row.get(col), list):
                    row[col] = [name_of(names, v) for v in row[col]]
            if unlabelled is not None:  # datasets' ClassLabel -1: the row has no label
                yield (
                    i,
                    _BadRow(
                        f"field {unlabelled!r} is -1, the ClassLabel for 'no label' (a test "
                        f"split without gold labels?); give rows with labels, {_SKIP_HINT}"
                    ),
                )
                continue
            yield i, row

    return f"{name}[{split}]", rows()


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def parse_source(spec: str | Path) -> tuple[str, str | None] | None:
    """Return ``(data set, split or None)`` if ``spec`` names an embedded data set, else None.

    ``"rotten-tomatoes:dev"`` -> ``("rotten-tomatoes", "dev")``; aliases such as ``"rt"`` and
    ``"acl-sum"`` work too. A :class:`~pathlib.Path` is always a file or folder.
    """
    if not isinstance(spec, str):
        return None
    name, _, split = spec.partition(":")
    key = name.strip().lower()
    for entry in assets.ASSETS.values():
        names = {entry.name.lower(), *(alias.lower() for alias in entry.aliases)}
        if entry.kind == "dataset" and key in names:
            return entry.name, (split or None)
    return None


def load_examples(
    path: str | Path,
    task: str,
    *,
    split: str | None = None,
    skip_bad: bool = False,
    required_fields: Iterable[str] = (),
    warn: Callable[[str], None] | None = None,
    chat_prompts: bool = False,
) -> list[Example]:
    """Read and validate the rows of one data source.

    Args:
        path: a ``.jsonl``/``.json``/``.csv``/``.tsv`` file, a ``datasets`` folder, or an
            embedded data set ``"rotten-tomatoes[:split]"`` / ``"aclsum[:split]"``.
        task: ``"classify"`` (rows need ``text`` and ``label``), ``"generate"`` (``input`` and
            ``target``), ``"chat"`` (``messages``), ``"tag"`` or ``"extract"`` (see the module
            docstring).
        split: the split of a ``datasets`` DatasetDict or embedded data set (default ``train``).
            Not accepted for a plain file, which is a single split.
        skip_bad: skip bad rows instead of raising on the first one.
        required_fields: further fields every row needs (the ``{field}`` names of a template).
        warn: with ``skip_bad``, called once per skipped row (the message the error would have
            had) and once with a summary; defaults to ``warnings.warn``.
        chat_prompts: chat: also accept conversations that end with a user message (prompts
            to answer, as ``softprompt generate`` reads them).

    Returns:
        The good rows in file order.

    Raises:
        DataError: missing or unreadable source, no rows, a bad row (unless ``skip_bad``), or no
            good row left (with ``skip_bad``).
    """
    if task not in TASKS:
        raise SoftPromptError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    warn = warn or _default_warn
    required = [f for f in dict.fromkeys(required_fields) if f not in TASKS[task]]

    embedded = parse_source(path)
    if embedded is not None:
        dataset, spec_split = embedded
        if spec_split and split and spec_split != split:
            raise DataError(
                f"{path}: the spec asks for split {spec_split!r} but split={split!r} was given; "
                "give the split once"
            )
        try:
            file = assets.resolve_data(dataset, spec_split or split or "train")
        except assets.AssetError as err:
            raise DataError(f"{path}: {err}") from None
        path, split = file, None

    name = str(path)
    file = Path(path)
    if not file.exists():
        raise DataError(
            f"{name}: no such file or folder; check the path, or use an embedded data set: "
            + ", ".join(f"{d}[:train|dev|test]" for d in _EMBEDDED)
        )
    if file.is_dir():
        name, rows = _hf_rows(file, split, name, [*TASKS[task], *required])
    else:
        if split is not None:
            raise DataError(
                f"{name} is a single file, so split={split!r} does not apply; give the file of "
                "the split you want and leave split unset"
            )
        suffix = file.suffix.lower()
        if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
            raise DataError(
                f"{name}: unsupported file type {suffix or '(none)'!r}; use .jsonl, .json, .csv "
                "or .tsv, or a datasets folder"
            )
        text = _read_text(file, name)
        if suffix == ".jsonl":
            rows = _jsonl_rows(text)
        elif suffix == ".json":
            rows = _json_rows(text, name)
        else:
            needed = [*TASKS[task], *required]
            rows = _csv_rows(text, name, "\t" if suffix == ".tsv" else ",", needed)

    examples: list[Example] = []
    bad = total = 0
    for line, row in rows:
        total += 1
        try:
            if isinstance(row, _BadRow):
                raise row
            examples.append(Example(_check_row(row, task, required, chat_prompts), name, line))
        except _BadRow as err:
            message = f"{name}:{line}: {err}"
            if not skip_bad:
                raise DataError(message) from None
            bad += 1
            warn(message)
    if total == 0:
        example = json.dumps(dict.fromkeys(TASKS[task], "..."))
        if task == "chat":
            example = '{"messages": [{"role": "user", "content": ...}, ...]}'
        raise DataError(f"{name}: no rows; the source is empty, add rows like {example}")
    if bad:
        warn(f"skipped {bad} of {total} rows in {name}")
        if not examples:
            raise DataError(f"{name}: all {total} rows are bad (see the warnings); fix the data")
    return examples


def label_set(examples: Iterable[Example]) -> list[str]:
    """Sorted unique labels of classification examples."""
    return sorted({str(ex.fields["label"]) for ex in examples})


def check_eval_labels(
    train_labels: Sequence[str],
    examples: list[Example],
    skip_bad: bool = False,
    warn: Callable[[str], None] | None = None,
) -> list[Example]:
    """Check that every evaluation label was seen in training.

    Args:
        train_labels: the labels of the training data (e.g. :func:`label_set` of it).
        examples: evaluation examples.
        skip_bad: skip examples with an unseen label instead of raising.
        warn: with ``skip_bad``, called once per skipped example and once with a summary per
            source; defaults to ``warnings.warn``.

    Returns:
        The examples whose label is known.

    Raises:
        DataError: an unseen label (unless ``skip_bad``), or none left (with ``skip_bad``).
    """
    warn = warn or _default_warn
    known = set(map(str, train_labels))
    known_text = ", ".join(repr(label) for label in sorted(known))
    kept: list[Example] = []
    skipped: dict[str, list[int]] = {}  # source -> [bad, total]
    for ex in examples:
        counts = skipped.setdefault(ex.source, [0, 0])
        counts[1] += 1
        label = str(ex.fields["label"])
        if label in known:
            kept.append(ex)
            continue
        message = (
            f"{ex.source}:{ex.line}: field 'label' is {label!r}, which never appears in the "
            f"training data (known labels: {known_text}); fix the label or add training rows "
            f"with it, {_SKIP_HINT}"
        )
        if not skip_bad:
            raise DataError(message)
        counts[0] += 1
        warn(message)
    for source, (bad, total) in skipped.items():
        if bad:
            warn(f"skipped {bad} of {total} rows in {source} (labels not in the training data)")
    if examples and not kept:
        raise DataError(
            f"{examples[0].source}: no row has a label seen in training (known labels: "
            f"{known_text}); evaluate on data with the same labels"
        )
    return kept
