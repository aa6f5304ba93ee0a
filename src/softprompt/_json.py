"""Strict JSON for files a user writes: duplicate keys, NaN/Infinity and out-of-range numbers are
errors, not silently the last value, a float NaN or an infinity.

``json.loads`` keeps the last of two equal keys (``{"text": "a", "text": "b"}`` is ``"b"``),
accepts ``NaN`` and ``Infinity`` (not JSON), turns ``1e400`` into ``inf`` and raises a plain
``ValueError`` for an integer of more than 4,300 digits. :func:`loads` and :func:`raw_decode`
raise :class:`JSONError` (a ``ValueError`` with ``msg`` and ``pos``, like
``json.JSONDecodeError``) for all of these.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any


class JSONError(ValueError):
    """Not strict JSON: ``msg`` says what, ``pos`` is the character offset (0 when unknown)."""

    def __init__(self, msg: str, pos: int = 0, key: str | None = None) -> None:
        super().__init__(msg)
        self.msg, self.pos, self.key = msg, pos, key  # key: set for a duplicate key


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


class _BadToken(Exception):
    """Raised by a parse hook, which is given no position: ``token`` is the text it refused."""

    def __init__(self, msg: str, token: str) -> None:
        self.msg, self.token = msg, token


def _constant(name: str) -> float:
    raise _BadToken(f"{name} is not a JSON value", name)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadToken(f"number {text[:30]} is out of range", text)
    return value


# the tokens outside strings that a hook or int() may refuse (strings matched to be skipped)
_TOKENS = re.compile(
    r'"(?:[^"\\]|\\.)*"'  # a string (skipped)
    r"|-?Infinity|NaN|-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"
)


def _token_pos(text: str, start: int, wanted) -> int:
    """Offset of the first token at or after ``start``, outside strings, for which
    ``wanted(token)`` holds (the hooks see values in document order), else ``start``."""
    for m in _TOKENS.finditer(text, start):
        token = m.group()
        if not token.startswith('"') and wanted(token):
            return m.start()
    return start


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float)


def _duplicate_pos(text: str, start: int, key: str) -> int:
    """Offset of the second ``"key":`` at or after ``start`` (where the duplicate is), else start."""
    pattern = re.compile(re.escape(json.dumps(key)) + r"\s*:")
    hits = [m.start() for m in pattern.finditer(text, start)]
    return hits[1] if len(hits) > 1 else start


def raw_decode(text: str, pos: int = 0) -> tuple[Any, int]:
    """``json.JSONDecoder().raw_decode`` with the strict rules; raises :class:`JSONError`."""
    try:
        return _DECODER.raw_decode(text, pos)
    except _Duplicate as e:
        where = _duplicate_pos(text, pos, e.key)
        raise JSONError(f"key {e.key!r} appears twice in one object", where, e.key) from None
    except _BadToken as e:  # NaN, Infinity, 1e400: the hooks know the token, not where it is
        token = e.token
        raise JSONError(e.msg, _token_pos(text, pos, lambda t: t == token)) from None
    except json.JSONDecodeError as e:
        raise JSONError(e.msg, e.pos) from None
    except RecursionError as e:
        raise JSONError(str(e).split(";")[0], pos) from None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits (int() refuses it)
        where = _token_pos(text, pos, lambda t: t.lstrip("-").isdigit() and len(t) > 4300)
        raise JSONError(str(e).split(";")[0], where) from None


def loads(text: str) -> Any:
    """Parse one JSON document (surrounding whitespace allowed); raises :class:`JSONError`."""
    start = len(text) - len(text.lstrip())
    value, end = raw_decode(text, start)
    if text[end:].strip():
        raise JSONError("extra data after the JSON value", end)
    return value


def line_col(text: str, pos: int) -> tuple[int, int]:
    """1-based (line, column) of offset ``pos`` in ``text``."""
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1
