"""Chat rendering on the real SmolLM2 tokenizer (ChatML): ids, assistant-only labels,
virtual-token placement; a chat Task on a tiny LM trains and generates to the end of turn."""

from __future__ import annotations

import pytest
import torch
from conftest import _tokenizer

import softprompt as sp
from softprompt.chat import ChatFormat, ChatTemplateError
from softprompt.data import Example
from softprompt.tasks import CHAT_TEMPLATE, Task, TaskSpec

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Review: a joy to watch"},
    {"role": "assistant", "content": "positive"},
]


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def fmt(tok):
    return ChatFormat.of(tok)


def ids_of(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_the_end_of_turn_token_is_im_end(tok, fmt):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert fmt.eot_id == im_end and fmt.stop_ids == [im_end]
    assert fmt.bos_text == ""  # <|im_start|> opens every turn: not a once-only BOS


def test_prompt_ids_are_the_template_rendering_with_the_generation_prompt(tok, fmt):
    ids, labels = fmt.encode(CONV[:4], loss_turns="last")
    text = tok.apply_chat_template(CONV[:4], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert ids == ids_of(tok, text)  # piecewise tokenization == tokenizing the whole text
    assert labels == [-100] * len(ids)
    # a conversation without a system message gets SmolLM2's default one, as the template says
    ids, _ = fmt.encode(CONV[1:2])
    text = tok.apply_chat_template(CONV[1:2], tokenize=False, add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in text and ids == ids_of(tok, text)


def test_loss_covers_exactly_the_assistant_content_and_end_of_turn(tok, fmt):
    ids, labels = fmt.encode(CONV[:4], loss_turns="all")
    sup = [i for i, lab in enumerate(labels) if lab != -100]
    assert [ids[i] for i in sup] == [labels[i] for i in sup]
    assert [ids[i] for i in sup] == ids_of(tok, "Hello!") + [fmt.eot_id]
    assert tok.decode([ids[i] for i in sup]) == "Hello!<|im_end|>"
    # the supervised tokens are contiguous and sit right after "<|im_start|>assistant\n"
    head = ids_of(tok, "<|im_start|>assistant\n")
    assert sup == list(range(sup[0], sup[0] + len(sup)))
    assert ids[sup[0] - len(head) : sup[0]] == head
    # the answer to train on: content + end of turn, nothing of the system/user turns
    assert fmt.answer_ids("positive") == ids_of(tok, "positive") + [fmt.eot_id]


@pytest.mark.parametrize("placement", ["start", "user", "answer"])
def test_virtual_tokens_go_where_the_placement_says(tok, fmt, placement):
    plain, plain_labels = fmt.encode(CONV[:4], loss_turns="all")
    ids, labels = fmt.encode(CONV[:4], soft_tokens=3, placement=placement, loss_turns="all")
    where = [i for i, t in enumerate(ids) if t < 0]
    assert [ids[i] for i in where] == [-1, -2, -3] and where == list(range(where[0], where[0] + 3))
    at = where[0]
    assert ids[:at] + ids[at + 3 :] == plain  # nothing else moves
    assert labels[:at] + labels[at + 3 :] == plain_labels and {labels[i] for i in where} == {-100}
    if placement == "start":
        assert at == 0
    elif placement == "user":  # the first user message's content: after "<|im_start|>user\n"
        header = ids_of(tok, "<|im_start|>user\n")
        assert ids[at - len(header) : at] == header
        assert ids[at + 3 : at + 3 + len(ids_of(tok, "Hi there"))] == ids_of(tok, "Hi there")
    else:  # right before the answer, after the generation prompt
        header = ids_of(tok, "<|im_start|>assistant\n")
        assert at == len(ids) - 3 and ids[at - len(header) : at] == header


@pytest.mark.parametrize("user", ["end", "d", "im", ">", "end|>", "user", "im_start", "|"])
def test_a_user_message_found_in_the_templates_own_markers_is_placed_at_its_content(tok, fmt, user):
    """A user content that also occurs in the turn's header or end-of-turn marker ("end" in
    ``<|im_end|>``) is found after the header: the ids are the rendered text's (the marker stays
    one special token), the answer's labels and the virtual tokens stay where they belong."""
    conv = [{"role": "user", "content": user}, {"role": "assistant", "content": "ok"}]
    conv = [*conv, {"role": "user", "content": user}]
    ids, labels = fmt.encode(conv, loss_turns="all")
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert ids == ids_of(tok, text)
    assert [i for i, lab in zip(ids, labels, strict=True) if lab != -100] == fmt.answer_ids("ok")
    soft, _ = fmt.encode(conv, soft_tokens=2, placement="user")
    at = soft.index(-1)
    header = ids_of(tok, "<|im_start|>user\n")
    assert soft[at - len(header) : at] == header
    assert soft[at + 2 : at + 2 + len(ids_of(tok, user))] == ids_of(tok, user)


def test_a_long_user_message_is_cut_to_max_length(fmt):
    long = [{"role": "user", "content": "word " * 300}]
    ids, _ = fmt.encode(long, soft_tokens=2, max_length=40)
    assert len(ids) == 40 and ids[-3:] == fmt.encode(long, soft_tokens=2)[0][-3:]
    with pytest.raises(ChatTemplateError, match="raise --max-length"):
        fmt.encode(long, max_length=5)


def test_a_tokenizer_without_a_chat_template_is_a_clear_error(tok):
    plain = _tokenizer()
    plain.chat_template = None
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        ChatFormat.of(plain)


@pytest.mark.slow
def test_prompt_tuning_in_chat_form_lowers_the_answer_loss_on_smollm2():
    from softprompt.loading import load_base

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        losses = _train_smollm2(load_base)
    finally:
        torch.set_num_threads(before)
    # measured: 6.52, 5.57, 4.89, 4.38, 3.91, 3.52
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.7 * losses[0], losses


def _train_smollm2(load_base) -> list[float]:
    base, tok = load_base("smollm2-135m-instruct")
    model = sp.attach(base, tokenizer=tok)
    cfg = sp.PromptTuningConfig(num_virtual_tokens=4, placement="template")
    model.add_adapter("p", cfg, tok)
    task = Task(TaskSpec(kind="chat", template=CHAT_TEMPLATE, soft_tokens=4), model, tok)
    item = task.encode(Example({"messages": CONV}, "mem", 1))
    opt = torch.optim.Adam(model.parameters_to_train(), lr=0.01)
    losses = []
    for _ in range(6):
        loss = task.loss([item])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_a_template_whose_pieces_tokenize_differently_is_named(tok):
    """A template that writes "role content" (a space before the content): byte-level BPE
    encodes " Is" whole but "Is" alone, so piecewise ids differ from the rendered text's; the
    probe says so once (a warning naming the first differing token); ChatML does not warn."""
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ChatFormat.of(tok)  # ChatML: pieces equal the whole
    spaced = copy.deepcopy(tok)
    spaced.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )
    with pytest.warns(UserWarning, match=r"differently from the whole rendered text \(first"):
        ChatFormat.of(spaced)
