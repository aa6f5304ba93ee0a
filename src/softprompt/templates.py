"""Prompt templates with soft segments: ``"[soft:10] Review: {text} Sentiment: {label}"``.

Syntax:

* ``[soft:N]``: N trainable virtual tokens (N >= 1). Several segments are allowed; the k-th
  virtual token overall (0-based, counting across segments in order) is encoded as id ``-1 - k``,
  the marker :class:`softprompt.SoftPromptModel` replaces by the adapter's k-th prompt vector.
* ``{field}``: the row's value of ``field`` (letters, digits, ``_`` and ``-``). ``{{`` and ``}}``
  are literal braces.
* ``{label}`` (classification) or ``{target}`` (generation): the answer field. At most one, and
  only at the very end (whitespace may follow it). It marks where the answer goes; :meth:`encode`
  returns the prompt before it and :meth:`answer_ids` the answer.
* everything else is literal text.

Tokenization. Literal and field text between soft segments is joined into maximal runs and each
run is tokenized with ``add_special_tokens=False``. Spaces and tabs next to a marker are layout,
not content, following the convention of byte-level BPE and SentencePiece tokenizers that a space
belongs to the word after it:

* spaces/tabs right before a ``[soft:N]`` marker are dropped (the virtual tokens take the place of
  a word, which would carry that space itself);
* the prompt's first text never starts with spaces/tabs, so ``"[soft:4] {text}"`` encodes the
  text exactly as ``"{text}"`` would; text after a marker in the middle keeps its space
  (``"... [soft:1] B"`` -> ``ids(" B")``);
* spaces/tabs at the end of the prompt (before ``{label}``) are dropped; the answer gets the
  space instead (``"Sentiment: {label}"`` -> prompt ``"Sentiment:"``, answer ``" positive"``).
  Newlines are always kept.

Special tokens. The prompt gets the special tokens the tokenizer itself adds to a single sequence
with ``add_special_tokens=True``, found by comparing both encodings of a probe text: BERT-style
tokenizers get ``[CLS]`` first and ``[SEP]`` last (virtual tokens of a leading segment right after
``[CLS]``); Llama/GPT-style tokenizers get a BOS only when they add one by default
(``add_bos_token``); T5 gets its ``</s>`` last. SmolLM2 and GPT-2 add nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import SoftPromptError

__all__ = [
    "ANSWER_FIELDS",
    "FieldPart",
    "SoftPart",
    "Template",
    "TemplateError",
    "TextPart",
    "default_template",
    "special_tokens",
]

ANSWER_FIELDS = ("label", "target")
"""Field names that mark where the answer goes (classification, generation)."""

MAIN_FIELDS = ("text", "input")
"""Fields truncated first when a prompt is too long."""

_LAYOUT = " \t"  # whitespace next to markers that is layout, not content
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_SOFT_OPEN = re.compile(r"\[soft:", re.IGNORECASE)
_PROBE = "a"


class TemplateError(SoftPromptError):
    """A template that cannot be parsed, or cannot be filled from a row."""


@dataclass(frozen=True)
class TextPart:
    """Literal text."""

    text: str


@dataclass(frozen=True)
class FieldPart:
    """A ``{name}`` substitution."""

    name: str


@dataclass(frozen=True)
class SoftPart:
    """A ``[soft:length]`` segment of trainable virtual tokens."""

    length: int


Part = TextPart | FieldPart | SoftPart


def _col(source: str, pos: int) -> str:
    return f"column {pos + 1} of template {source!r}"


def _parse_parts(source: str) -> list[Part]:
    """Split a template into literal, field and soft parts (adjacent literals merged)."""
    parts: list[Part] = []
    literal: list[str] = []
    i, n = 0, len(source)

    def flush() -> None:
        if literal:
            parts.append(TextPart("".join(literal)))
            literal.clear()

    while i < n:
        ch = source[i]
        if source.startswith("{{", i) or source.startswith("}}", i):
            literal.append(ch)
            i += 2
        elif ch == "{":
            end = source.find("}", i + 1)
            nested = source.find("{", i + 1)
            if end < 0 or 0 <= nested < end:
                raise TemplateError(
                    f"unclosed '{{' at {_col(source, i)}; close the field with '}}' "
                    "or write '{{' for a literal brace"
                )
            name = source[i + 1 : end]
            if not _FIELD_NAME.match(name):
                raise TemplateError(
                    f"bad field name {{{name}}} at {_col(source, i)}; field names are letters, "
                    "digits, '_' and '-' (write '{{' and '}}' for literal braces)"
                )
            flush()
            parts.append(FieldPart(name))
            i = end + 1
        elif ch == "}":
            raise TemplateError(
                f"unmatched '}}' at {_col(source, i)}; write '}}}}' for a literal brace"
            )
        elif _SOFT_OPEN.match(source, i):
            end = source.find("]", i)
            if end < 0:
                raise TemplateError(
                    f"unclosed '[soft:' at {_col(source, i)}; write [soft:N] with N >= 1"
                )
            value = source[i + len("[soft:") : end].strip()
            if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
                raise TemplateError(
                    f"bad soft segment {source[i : end + 1]!r} at {_col(source, i)}; the length "
                    "must be a whole number >= 1, e.g. [soft:10]"
                )
            flush()
            parts.append(SoftPart(int(value)))
            i = end + 1
        else:
            literal.append(ch)
            i += 1
    flush()
    return parts


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """Return the special token ids a tokenizer adds before and after a single sequence.

    Found by encoding a probe text with and without ``add_special_tokens``: BERT gives
    ``([cls_id], [sep_id])``, a Llama tokenizer with ``add_bos_token`` gives ``([bos_id], [])``,
    T5 ``([], [eos_id])``, GPT-2 and SmolLM2 ``([], [])``.
    """
    plain = list(tokenizer.encode(_PROBE, add_special_tokens=False))
    full = list(tokenizer.encode(_PROBE, add_special_tokens=True))
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise TemplateError(
        f"cannot tell which special tokens {type(tokenizer).__name__} adds: encoding {_PROBE!r} "
        f"gives {full} with special tokens and {plain} without"
    )


@dataclass(frozen=True)
class Template:
    """A parsed prompt template (see the module docstring for the syntax and tokenization).

    Attributes:
        source: the template text as written.
        parts: literal, field and soft parts in order; the answer field, if any, is the last.
        fields: names of the row fields the prompt uses (the answer field excluded).
        answer_field: ``"label"``, ``"target"`` or None when the template has no answer field
            (the answer then goes right after the prompt).
        soft_segments: length of each soft segment, in order.
    """

    source: str
    parts: tuple[Part, ...]
    fields: frozenset[str]
    answer_field: str | None
    soft_segments: tuple[int, ...] = field(default=())

    @property
    def num_soft(self) -> int:
        """Total number of virtual tokens over all soft segments."""
        return sum(self.soft_segments)

    @classmethod
    def parse(cls, text: str) -> Template:
        """Parse a template; raises :class:`TemplateError` with the column of the problem."""
        if not isinstance(text, str) or not text.strip():
            raise TemplateError(
                f"template {text!r} is empty; write e.g. 'Text: {{text}}\\nLabel: {{label}}'"
            )
        if not is_text(text):
            raise TemplateError(
                f"template {text!r} holds a lone surrogate (such as \\ud800), which is not text"
            )
        parts = _parse_parts(text)
        answers = [
            i for i, p in enumerate(parts) if isinstance(p, FieldPart) and p.name in ANSWER_FIELDS
        ]
        if len(answers) > 1:
            names = ", ".join("{" + parts[i].name + "}" for i in answers)  # type: ignore[union-attr]
            raise TemplateError(
                f"template {text!r} has {len(answers)} answer fields ({names}); use one "
                "{label} or {target}, at the end"
            )
        answer_field = None
        if answers:
            idx = answers[0]
            rest = parts[idx + 1 :]
            if len(rest) > 1 or (
                rest and not (isinstance(rest[0], TextPart) and rest[0].text.isspace())
            ):
                name = parts[idx].name  # type: ignore[union-attr]
                raise TemplateError(
                    f"answer field {{{name}}} must be at the very end of template {text!r}; "
                    "move it there (only whitespace may follow it)"
                )
            answer_field = parts[idx].name  # type: ignore[union-attr]
            parts = parts[: idx + 1]
        fields = frozenset(
            p.name for p in parts if isinstance(p, FieldPart) and p.name not in ANSWER_FIELDS
        )
        soft = tuple(p.length for p in parts if isinstance(p, SoftPart))
        return cls(text, tuple(parts), fields, answer_field, soft)

    # ------------------------------------------------------------------------------------------
    # Encoding
    # ------------------------------------------------------------------------------------------

    @property
    def _prompt_parts(self) -> tuple[Part, ...]:
        return self.parts[:-1] if self.answer_field is not None else self.parts

    def _segments(self, values: Mapping[str, str]) -> list[str | int]:
        """The prompt as text runs (str) and soft segment lengths (int), layout rules applied."""
        out: list[str | int] = []
        run: list[str] = []
        seen_text = False

        def flush() -> None:  # the run ends at a soft segment or at the end of the prompt
            nonlocal seen_text
            text = "".join(run).rstrip(_LAYOUT)
            run.clear()
            if not seen_text:
                text = text.lstrip(_LAYOUT)
            if text:
                out.append(text)
                seen_text = True

        for part in self._prompt_parts:
            if isinstance(part, TextPart):
                run.append(part.text)
            elif isinstance(part, FieldPart):
                run.append(values[part.name])
            else:
                flush()
                out.append(part.length)
        flush()
        return out

    def _values(self, row: Mapping[str, Any]) -> dict[str, str]:
        values = {}
        for name in sorted(self.fields):
            if name not in row or row[name] is None:
                known = ", ".join(repr(k) for k in sorted(map(str, row))) or "none"
                raise TemplateError(
                    f"template field {{{name}}} is not in the row (row fields: {known}); use one "
                    f"of those fields in the template, or add {name!r} to the data"
                )
            values[name] = str(row[name])
            if not is_text(values[name]):
                raise TemplateError(
                    f"field {name!r} holds a lone surrogate (such as \\ud800), which is not text"
                )
        return values

    def _ids(self, values: Mapping[str, str], tokenizer, specials) -> list[int]:
        prefix, suffix = specials
        ids = list(prefix)
        k = 0
        for seg in self._segments(values):
            if isinstance(seg, int):
                ids.extend(range(-1 - k, -1 - k - seg, -1))
                k += seg
            else:
                ids.extend(tokenizer.encode(seg, add_special_tokens=False))
        ids.extend(suffix)
        return ids

    def encode(
        self,
        row: Mapping[str, Any],
        tokenizer,
        max_length: int | None = None,
        on_cut: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Token ids of the prompt (everything before the answer field).

        Args:
            row: the example's fields; every field of the template must be present.
            tokenizer: a Hugging Face tokenizer.
            max_length: if given, the main input field (``text`` or ``input``; else the field
                with the longest value) is cut from the end, at a token boundary, until the
                prompt fits. Literal text, soft and special tokens are never cut.
            on_cut: called with the prompt's whole length when it was cut.

        Returns:
            Ids with the tokenizer's special tokens (see the module docstring); virtual token k
            is ``-1 - k``.

        Raises:
            TemplateError: a template field missing from the row, or ``max_length`` too small
                even with the main field empty.
        """
        values = self._values(row)
        specials = special_tokens(tokenizer)
        ids = self._ids(values, tokenizer, specials)
        if max_length is None or len(ids) <= max_length:
            return ids
        cut = self._truncate(values, tokenizer, specials, max_length, len(ids))
        if on_cut is not None:
            on_cut(len(ids))
        return cut

    def _truncate(self, values, tokenizer, specials, max_length: int, full_len: int) -> list[int]:
        main = next((f for f in MAIN_FIELDS if f in self.fields), None)
        if main is None:
            if not self.fields:
                raise TemplateError(
                    f"the prompt of template {self.source!r} is {full_len} tokens, more than "
                    f"max_length={max_length}, and has no field to shorten; shorten the template "
                    "or raise max_length"
                )
            main = max(sorted(self.fields), key=lambda f: len(values[f]))
        text = values[main]
        cuts = _cut_points(text, tokenizer)  # increasing; cuts[0] == 0, text[:cut] are prefixes

        def attempt(i: int) -> list[int]:
            return self._ids({**values, main: text[: cuts[i]]}, tokenizer, specials)

        best = attempt(0)
        if len(best) > max_length:
            raise TemplateError(
                f"template {self.source!r} needs {len(best)} tokens even with field {{{main}}} "
                f"empty ({self.num_soft} soft, {sum(map(len, specials))} special), more than "
                f"max_length={max_length}; shorten the template or raise max_length"
            )
        lo, hi = 0, len(cuts) - 1  # cuts[lo] fits; cuts[hi] (the whole text) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ids = attempt(mid)
            if len(ids) <= max_length:
                lo, best = mid, ids
            else:
                hi = mid
        return best

    def answer_ids(self, answer: str, tokenizer, add_eos: bool | None = None) -> list[int]:
        """Token ids of the answer as it continues the prompt.

        The answer gets a leading space when the prompt's text ends without whitespace (after
        the layout rules: ``"Label: {label}"`` -> ``" positive"``, ``"Label:\\n{label}"`` ->
        ``"positive"``) or ends in a soft segment that follows text; it gets none when the prompt
        has no text at all. A prompt that ends with a field counts as ending without whitespace.
        Meant for decoder-only LMs and decoder targets, never with the prompt's suffix specials.

        Args:
            answer: the label or target text.
            tokenizer: a Hugging Face tokenizer.
            add_eos: append ``tokenizer.eos_token_id`` (when the tokenizer has one). Default:
                only for a ``{target}`` answer field (generation); pass it explicitly for a
                template without an answer field.
        """
        segments = self._segments({name: "x" for name in self.fields})
        has_text = any(isinstance(s, str) for s in segments)
        ends_space = bool(segments) and isinstance(segments[-1], str) and segments[-1][-1].isspace()
        text = " " + answer if has_text and not ends_space else answer
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if add_eos is None:
            add_eos = self.answer_field == "target"
        if add_eos and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return ids


def is_text(value: str) -> bool:
    """False for strings with lone surrogates (JSON "\\ud800"), which no tokenizer takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _cut_points(text: str, tokenizer) -> list[int]:
    """Character offsets where ``text`` may be cut: token ends (fast tokenizers) or word ends."""
    ends: list[int] = []
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ends = [end for _, end in enc["offset_mapping"] if end > 0]
    if not ends:
        ends = [m.end() for m in re.finditer(r"\S+", text)]
    return sorted({0, *ends, len(text)})


def default_template(
    task: str, method_uses_input_tokens: bool, num_virtual_tokens: int, encoder: bool
) -> str:
    """A sensible template for a task when the user gives none (no soft segment in it).

    Decoder-only LMs get a field cue and an answer cue, the answer following the prompt:
    ``"Text: {text}\\nLabel: {label}"`` and ``"Input: {input}\\nOutput: {target}"``. Encoders
    (classification head) and encoder-decoders (the target goes to the decoder) get the bare
    input field, ``"{text}"`` / ``"{input}"``.

    ``method_uses_input_tokens`` and ``num_virtual_tokens`` are accepted so that callers need not
    change when the choice comes to depend on them; today the text depends on ``task`` and
    ``encoder`` only (where virtual tokens go is decided by the caller).
    """
    if task not in ("classify", "generate"):
        raise SoftPromptError(f"unknown task {task!r}; expected 'classify' or 'generate'")
    if num_virtual_tokens < 0:
        raise SoftPromptError(f"num_virtual_tokens must be >= 0, got {num_virtual_tokens}")
    if encoder:
        return "{text}" if task == "classify" else "{input}"
    return (
        "Text: {text}\nLabel: {label}" if task == "classify" else "Input: {input}\nOutput: {target}"
    )
