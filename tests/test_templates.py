"""Tests for softprompt.templates: parsing, soft markers, special tokens, answers, truncation.

Expected ids come from the real tokenizers (SmolLM2: byte-level BPE, adds no specials; MiniLM:
BERT WordPiece, [CLS] ... [SEP]) encoding the equivalent plain text directly.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from softprompt import SoftPromptError
from softprompt.assets import resolve_model
from softprompt.templates import (
    FieldPart,
    SoftPart,
    Template,
    TemplateError,
    TextPart,
    default_template,
    special_tokens,
)


@pytest.fixture(scope="module")
def smol():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def bert():
    return AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2"))


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------


def test_parse_parts_and_attributes():
    t = Template.parse("[soft:10] Review: {text} ({source}) [soft:3]Sentiment: {label}\n")
    assert t.source == "[soft:10] Review: {text} ({source}) [soft:3]Sentiment: {label}\n"
    assert t.parts == (
        SoftPart(10),
        TextPart(" Review: "),
        FieldPart("text"),
        TextPart(" ("),
        FieldPart("source"),
        TextPart(") "),
        SoftPart(3),
        TextPart("Sentiment: "),
        FieldPart("label"),
    )
    assert t.fields == {"text", "source"}
    assert t.answer_field == "label"
    assert t.soft_segments == (10, 3)
    assert t.num_soft == 13


def test_parse_without_soft_or_answer():
    t = Template.parse("Input: {input}\nOutput:")
    assert t.parts == (TextPart("Input: "), FieldPart("input"), TextPart("\nOutput:"))
    assert t.fields == {"input"}
    assert t.answer_field is None
    assert t.soft_segments == () and t.num_soft == 0


def test_parse_target_answer_and_literal_braces_and_brackets():
    t = Template.parse("{{json}} [note] {input} -> {target}")
    assert t.parts == (
        TextPart("{json} [note] "),
        FieldPart("input"),
        TextPart(" -> "),
        FieldPart("target"),
    )
    assert t.answer_field == "target"
    assert t.fields == {"input"}


def test_soft_marker_is_case_insensitive_and_allows_spaces():
    assert Template.parse("[SOFT: 4]{text}").soft_segments == (4,)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "Review: {text",
            "unclosed '{' at column 9 of template 'Review: {text'; close the field with '}' or "
            "write '{{' for a literal brace",
        ),
        (
            "A {text B {label}",
            "unclosed '{' at column 3 of template 'A {text B {label}'; close the field with '}' "
            "or write '{{' for a literal brace",
        ),
        (
            "A } {text}",
            "unmatched '}' at column 3 of template 'A } {text}'; write '}}' for a literal brace",
        ),
        (
            "[soft:0] {text}",
            "bad soft segment '[soft:0]' at column 1 of template '[soft:0] {text}'; the length "
            "must be a whole number >= 1, e.g. [soft:10]",
        ),
        (
            "{text} [soft:x]",
            "bad soft segment '[soft:x]' at column 8 of template '{text} [soft:x]'; the length "
            "must be a whole number >= 1, e.g. [soft:10]",
        ),
        (
            "{text} [soft:-2]",
            "bad soft segment '[soft:-2]' at column 8 of template '{text} [soft:-2]'; the length "
            "must be a whole number >= 1, e.g. [soft:10]",
        ),
        (  # str.isdigit() holds for a superscript two, which int() refuses
            "{text} [soft:\u00b2]",
            "bad soft segment '[soft:\u00b2]' at column 8 of template '{text} [soft:\u00b2]'; the "
            "length must be a whole number >= 1, e.g. [soft:10]",
        ),
        (  # an Arabic-Indic three: int() reads it as 3, but it is no length a user would write
            "{text} [soft:\u0663]",
            "bad soft segment '[soft:\u0663]' at column 8 of template '{text} [soft:\u0663]'; the "
            "length must be a whole number >= 1, e.g. [soft:10]",
        ),
        (
            "{text} [soft:3",
            "unclosed '[soft:' at column 8 of template '{text} [soft:3'; write [soft:N] with N >= 1",
        ),
        (
            "{text} {the text}",
            "bad field name {the text} at column 8 of template '{text} {the text}'; field names "
            "are letters, digits, '_' and '-' (write '{{' and '}}' for literal braces)",
        ),
        (
            "{label} is the label of {text}",
            "answer field {label} must be at the very end of template '{label} is the label of "
            "{text}'; move it there (only whitespace may follow it)",
        ),
        (
            "{text} {label} [soft:2]",
            "answer field {label} must be at the very end of template '{text} {label} [soft:2]'; "
            "move it there (only whitespace may follow it)",
        ),
        (
            "{text} {label} {label}",
            "template '{text} {label} {label}' has 2 answer fields ({label}, {label}); use one "
            "{label} or {target}, at the end",
        ),
        ("  ", "template '  ' is empty; write e.g. 'Text: {text}\\nLabel: {label}'"),
    ],
)
def test_syntax_errors(template, message):
    with pytest.raises(TemplateError) as err:
        Template.parse(template)
    assert str(err.value) == message
    assert isinstance(err.value, SoftPromptError) and isinstance(err.value, ValueError)


# ------------------------------------------------------------------------------------------------
# Encoding with a byte-level BPE tokenizer (SmolLM2: no special tokens added)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_negative_markers_number_across_segments(smol):
    t = Template.parse("[soft:2] A {text} [soft:1] B")
    got = t.encode({"text": "great movie"}, smol)
    assert got == [-1, -2, *ids(smol, "A great movie"), -3, *ids(smol, " B")]
    # Spelled out, so that a tokenizer change shows up here: "A", "Ġgreat", "Ġmovie", "ĠB".
    assert smol.convert_ids_to_tokens(got[2:5]) == ["A", "Ġgreat", "Ġmovie"]
    assert smol.convert_ids_to_tokens(got[6:]) == ["ĠB"]


@pytest.mark.slow
def test_soft_prefix_leaves_text_ids_unchanged(smol):
    row = {"text": "a fine film", "label": "positive"}
    plain = Template.parse("Review: {text} Sentiment: {label}")
    soft = Template.parse("[soft:4] Review: {text} Sentiment: {label}")
    assert soft.encode(row, smol) == [-1, -2, -3, -4, *plain.encode(row, smol)]
    # the space before {label} belongs to the answer, not the prompt
    assert plain.encode(row, smol) == ids(smol, "Review: a fine film Sentiment:")


@pytest.mark.slow
def test_no_bos_unless_tokenizer_adds_one(smol):
    assert special_tokens(smol) == ([], [])
    t = Template.parse("[soft:1] {text}")
    assert t.encode({"text": "hi"}, smol) == [-1, *ids(smol, "hi")]
    with_bos = AutoTokenizer.from_pretrained(
        resolve_model("smollm2-135m-instruct"), add_bos_token=True
    )
    assert special_tokens(with_bos) == ([with_bos.bos_token_id], [])
    assert t.encode({"text": "hi"}, with_bos) == [with_bos.bos_token_id, -1, *ids(smol, "hi")]


@pytest.mark.slow
def test_newlines_are_content_and_fields_are_stringified(smol):
    t = Template.parse("Text: {text}\n[soft:2]\nScore: {score}\n{label}")
    got = t.encode({"text": "ok", "score": 3, "label": "x"}, smol)
    assert got == [*ids(smol, "Text: ok\n"), -1, -2, *ids(smol, "\nScore: 3\n")]


@pytest.mark.slow
def test_unknown_field_names_row_fields(smol):
    t = Template.parse("{text} by {author}")
    with pytest.raises(TemplateError) as err:
        t.encode({"text": "t", "label": "l"}, smol)
    assert str(err.value) == (
        "template field {author} is not in the row (row fields: 'label', 'text'); use one of "
        "those fields in the template, or add 'author' to the data"
    )


# ------------------------------------------------------------------------------------------------
# Answers
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_answer_ids_leading_space(smol):
    # prompt ends in ":" (trailing space moved to the answer) -> " positive"
    t = Template.parse("Review: {text} Sentiment: {label}")
    assert t.answer_ids("positive", smol) == ids(smol, " positive")
    assert smol.convert_ids_to_tokens(t.answer_ids("positive", smol)) == ["Ġpositive"]
    # prompt without answer field, ending in ":" -> same
    assert Template.parse("Text: {text}\nLabel:").answer_ids("positive", smol) == ids(
        smol, " positive"
    )
    # prompt ends in a newline -> no space
    assert Template.parse("Text: {text}\nLabel:\n{label}").answer_ids("positive", smol) == ids(
        smol, "positive"
    )
    # prompt ends with a field -> space; after a soft segment that follows text -> space
    assert Template.parse("{text}{label}").answer_ids("no", smol) == ids(smol, " no")
    assert Template.parse("{text} [soft:2] {label}").answer_ids("no", smol) == ids(smol, " no")
    # only soft tokens before the answer -> no space (the answer is the first text)
    assert Template.parse("[soft:2] {label}").answer_ids("no", smol) == ids(smol, "no")
    # classification answers get no EOS
    assert smol.eos_token_id not in t.answer_ids("positive", smol)


@pytest.mark.slow
def test_generation_answer_appends_eos(smol):
    t = Template.parse("Input: {input}\nOutput: {target}")
    assert smol.eos_token_id == 2
    assert t.answer_ids("a short summary", smol) == [*ids(smol, " a short summary"), 2]
    bare = Template.parse("Input: {input}\nOutput:")
    assert bare.answer_ids("x", smol) == ids(smol, " x")
    assert bare.answer_ids("x", smol, add_eos=True) == [*ids(smol, " x"), 2]
    assert t.answer_ids("x", smol, add_eos=False) == ids(smol, " x")


# ------------------------------------------------------------------------------------------------
# BERT-style special tokens
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bert_cls_first_soft_next_sep_last(bert):
    cls, sep = bert.cls_token_id, bert.sep_token_id
    assert (cls, sep) == (101, 102)
    assert special_tokens(bert) == ([101], [102])
    t = Template.parse("[soft:3] Review: {text} [soft:1] Sentiment: {label}")
    got = t.encode({"text": "Great fun", "label": "positive"}, bert)
    assert got == [
        101,
        -1,
        -2,
        -3,
        *ids(bert, "Review: Great fun"),
        -4,
        *ids(bert, "Sentiment:"),
        102,
    ]
    assert bert.convert_ids_to_tokens(got[4:8]) == ["review", ":", "great", "fun"]
    assert bert.convert_ids_to_tokens(got[9:-1]) == ["sentiment", ":"]
    # The same text without soft tokens is exactly what the tokenizer makes of it.
    plain = Template.parse("Review: {text} Sentiment:")
    assert plain.encode({"text": "Great fun"}, bert) == bert.encode("Review: Great fun Sentiment:")


# ------------------------------------------------------------------------------------------------
# Truncation
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_truncation_cuts_main_field_from_the_end(smol):
    t = Template.parse("[soft:2] Review: {text} Sentiment: {label}")
    text = "one two three four five six seven eight"
    row = {"text": text, "label": "positive"}
    full = t.encode(row, smol)
    # 2 soft + "Review", ":" + 8 words + "ĠSent", "iment", ":" = 15
    assert len(full) == 15
    assert t.encode(row, smol, max_length=15) == full
    assert t.encode(row, smol, max_length=100) == full
    cut = t.encode(row, smol, max_length=12)
    assert cut == [-1, -2, *ids(smol, "Review: one two three four five Sentiment:")]
    assert len(cut) == 12
    # fields other than the main one are never cut
    t2 = Template.parse("{title}: {text}\nLabel:")
    row2 = {"title": "Alpha beta gamma", "text": text}
    # "Alpha", "Ġbeta", "Ġgamma", ":", "Ċ", "Label", ":" are kept: 7 tokens + 2 words
    assert t2.encode(row2, smol, max_length=9) == ids(smol, "Alpha beta gamma: one two\nLabel:")


@pytest.mark.slow
def test_truncation_without_main_field_cuts_longest(smol):
    t = Template.parse("{a} | {b}")
    row = {"a": "x y", "b": "one two three four"}
    assert t.encode(row, smol, max_length=5) == ids(smol, "x y | one two")


@pytest.mark.slow
def test_truncation_counts_bert_specials(bert):
    t = Template.parse("[soft:2] {text}")
    row = {"text": "one two three four five"}
    assert t.encode(row, bert, max_length=6) == [101, -1, -2, *ids(bert, "one two"), 102]


@pytest.mark.slow
def test_truncation_impossible(smol):
    t = Template.parse("[soft:5] Review: {text} Sentiment:")
    # 5 soft + "Review", ":", "Ġ", "ĠSent", "iment", ":" (the empty field leaves two spaces)
    assert t.encode({"text": ""}, smol) == [-1, -2, -3, -4, -5, *ids(smol, "Review:  Sentiment:")]
    fine = t.encode({"text": "fine film"}, smol, max_length=11)
    assert fine == [-1, -2, -3, -4, -5, *ids(smol, "Review: fine Sentiment:")]
    with pytest.raises(TemplateError) as err:
        t.encode({"text": "fine"}, smol, max_length=8)
    assert str(err.value) == (
        "template '[soft:5] Review: {text} Sentiment:' needs 11 tokens even with field {text} "
        "empty (5 soft, 0 special), more than max_length=8; shorten the template or raise "
        "max_length"
    )


# ------------------------------------------------------------------------------------------------
# Defaults
# ------------------------------------------------------------------------------------------------


def test_default_templates():
    assert default_template("classify", True, 20, encoder=False) == "Text: {text}\nLabel: {label}"
    assert (
        default_template("generate", False, 10, encoder=False) == "Input: {input}\nOutput: {target}"
    )
    assert default_template("classify", True, 20, encoder=True) == "{text}"
    assert default_template("generate", True, 20, encoder=True) == "{input}"
    lm = Template.parse(default_template("classify", True, 20, encoder=False))
    assert (lm.fields, lm.answer_field, lm.num_soft) == ({"text"}, "label", 0)
    gen = Template.parse(default_template("generate", True, 20, encoder=False))
    assert (gen.fields, gen.answer_field) == ({"input"}, "target")
    with pytest.raises(
        SoftPromptError, match="unknown task 'summarize'; expected 'classify' or 'generate'"
    ):
        default_template("summarize", True, 20, encoder=False)
