"""Conversations rendered with a tokenizer's own chat template: ids, assistant-only loss labels
and where input-level virtual tokens go.

A conversation is the OpenAI / TRL conversational form, ``[{"role": "system" | "user" |
"assistant", "content": "..."}, ...]``. The template is rendered turn by turn (prefix
rendering): the text of turn ``i`` is ``render(messages[:i+1])`` minus ``render(messages[:i])``,
and an assistant turn starts with the generation prompt (``render(messages[:i],
add_generation_prompt=True)`` minus ``render(messages[:i])``). A template without
``{% generation %}`` markers (SmolLM2's ChatML) needs no more than that; one whose render of a
prefix is not a prefix of the whole (templates that rewrite earlier turns) is refused.

Token ids. The rendered text is cut at the start and end of every user and assistant content
(and at the virtual tokens' place) and each piece is tokenized with
``add_special_tokens=False``; on SmolLM2 this equals tokenizing the whole text (a test checks
it), and it gives the loss mask and the placement exactly, without offset mapping.

Loss. The supervised tokens of an assistant turn are its content tokens plus the template's
end-of-turn token (``<|im_end|>`` for ChatML): the first token the template writes after an
assistant's content. ``loss_turns="all"`` supervises every assistant turn, ``"last"`` only the
last one.

Placement of ``soft_tokens`` virtual tokens (markers ``-1 .. -P``, see
:mod:`softprompt.templates`):

* ``"start"``: before the whole conversation (after a BOS the template writes once, such as
  Llama 3's ``<|begin_of_text|>``; SmolLM2's BOS ``<|im_start|>`` opens every turn, so there it is
  position 0);
* ``"user"``: at the start of the first user message's content;
* ``"answer"``: right before the answer, after the generation prompt (``<|im_start|>assistant\\n``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import SoftPromptError

__all__ = ["CHAT_PLACEMENTS", "LOSS_TURNS", "ROLES", "ChatFormat", "ChatTemplateError"]

ROLES = ("system", "user", "assistant")
CHAT_PLACEMENTS = ("start", "user", "answer")
LOSS_TURNS = ("all", "last")
_IGNORE = -100


class ChatTemplateError(SoftPromptError):
    """A tokenizer without a usable chat template, or a conversation it cannot render."""


def _name(tok) -> str:
    return getattr(tok, "name_or_path", None) or type(tok).__name__


@dataclass
class ChatFormat:
    """A tokenizer's chat template, probed once: its end-of-turn token and BOS text.

    Attributes:
        tok: the tokenizer.
        eot_id: the end-of-turn token id (the first token after an assistant's content).
        bos_text: text the template writes once before the first turn ("" if none); "start"
            placement goes after it.
    """

    tok: object
    eot_id: int
    bos_text: str

    @classmethod
    def of(cls, tok) -> ChatFormat:
        """Probe ``tok``'s chat template; raises :class:`ChatTemplateError` when it has none."""
        if not getattr(tok, "chat_template", None) or not hasattr(tok, "apply_chat_template"):
            raise ChatTemplateError(
                f"the tokenizer of {_name(tok)} has no chat template, which --task chat and "
                "--chat need to render conversations; use a chat (instruct) model, set "
                "tokenizer.chat_template, or train with --task generate on input/target rows"
            )
        probe = [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "y"},
            {"role": "user", "content": "z"},
        ]
        fmt = cls(tok, -1, "")
        texts = fmt._prefix_texts(probe)
        answer = texts[2][len(texts[1]) :]
        gen = fmt._gen_prompt(probe[:1], texts[1])
        k = answer.find("y", len(gen))
        if not answer.startswith(gen) or k < 0:
            raise ChatTemplateError(
                f"the chat template of {_name(tok)} does not write an assistant turn as its "
                "generation prompt followed by the content; softprompt cannot find the answer"
            )
        tail = [int(t) for t in tok.encode(answer[k + 1 :], add_special_tokens=False)]
        if not tail:
            raise ChatTemplateError(
                f"the chat template of {_name(tok)} writes nothing after an assistant's answer, "
                "so there is no end-of-turn token to learn and to stop at"
            )
        fmt.eot_id = tail[0]
        bos = getattr(tok, "bos_token", None) or ""
        second = texts[2][len(texts[1]) :]
        if bos and texts[1].startswith(bos) and not second.startswith(bos):
            fmt.bos_text = bos
        fmt._check_pieces()
        return fmt

    def _check_pieces(self) -> None:
        """Warn once per tokenizer when encoding a conversation in pieces (cut at message
        contents, as ``encode`` does to place labels and virtual tokens) gives other ids than
        encoding its rendered text whole (e.g. SentencePiece tokenizers that add a leading
        space to every piece): softprompt stays consistent with itself (training, eval,
        generate and serve encode alike), but engines that tokenize the whole text see other
        ids than the adapter was trained on."""
        probe = [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Is water wet? Say yes or no."},
            {"role": "assistant", "content": "Yes, it is."},
            {"role": "user", "content": "And ice?"},
        ]
        ids, _ = self.encode(probe, loss_turns="all")
        rendered = self._prefix_texts(probe)[-1]
        whole = list(
            self.tok.encode(rendered + self._gen_prompt(probe, rendered), add_special_tokens=False)
        )
        if ids != whole:
            at = next((i for i, (a, b) in enumerate(zip(ids, whole, strict=False)) if a != b), None)
            at = min(len(ids), len(whole)) if at is None else at
            warnings.warn(
                f"the tokenizer of {_name(self.tok)} encodes a conversation cut at its message "
                f"contents differently from the whole rendered text (first difference at token "
                f"{at}); softprompt's chat rows use the piecewise ids everywhere (train, eval, "
                "serve), but an engine that tokenizes the whole text will see other ids",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ rendering
    def _render(self, messages, add_generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        try:
            return self.tok.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # noqa: BLE001 - jinja raises several kinds
            raise ChatTemplateError(
                f"the chat template of {_name(self.tok)} cannot render the conversation: {e}"
            ) from None

    def _prefix_texts(self, messages) -> list[str]:
        """``render(messages[:i])`` for i = 0..n, each a prefix of the next (checked)."""
        texts = [self._render(messages[:i]) for i in range(len(messages) + 1)]
        for i in range(len(messages)):
            if not texts[i + 1].startswith(texts[i]):
                raise ChatTemplateError(
                    f"the chat template of {_name(self.tok)} does not render conversations turn "
                    f"by turn (the first {i} messages do not render as a prefix of the first "
                    f"{i + 1}); softprompt cannot tell the turns apart"
                )
        return texts

    def _gen_prompt(self, messages, rendered: str) -> str:
        full = self._render(messages, add_generation_prompt=True)
        if not full.startswith(rendered):
            raise ChatTemplateError(
                f"the chat template of {_name(self.tok)} changes earlier turns when it adds the "
                "generation prompt"
            )
        return full[len(rendered) :]

    def _user_header(self, before, rendered: str) -> str:
        """What the template writes before a user message's content, after ``before``: the
        turn rendered with a sentinel content, up to the sentinel."""
        sentinel = "\u2063softprompt\u2063"
        turn = self._render([*before, {"role": "user", "content": sentinel}])[len(rendered) :]
        k = turn.find(sentinel)
        return turn[:k] if k >= 0 else ""

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generated answer: the end-of-turn token, and EOS when it differs."""
        eos = getattr(self.tok, "eos_token_id", None)
        return [self.eot_id] + ([int(eos)] if eos is not None and eos != self.eot_id else [])

    def encode(
        self,
        messages: Sequence[dict],
        *,
        soft_tokens: int = 0,
        placement: str = "user",
        loss_turns: str = "all",
        max_length: int | None = None,
        on_cut: Callable[[int], None] | None = None,
    ) -> tuple[list[int], list[int]]:
        """The prompt of a conversation that ends with a user turn, with the generation prompt.

        Args:
            messages: the conversation; the last message is a user's.
            soft_tokens: virtual tokens to insert (markers ``-1 .. -soft_tokens``).
            placement: "start", "user" or "answer" (module docstring).
            loss_turns: "all": the labels supervise the earlier assistant turns too; "last": no
                token of the prompt is supervised (the answer is the caller's target).
            max_length: if given, the longest user content is cut (at token boundaries, from
                its end) until the prompt fits.
            on_cut: called with the prompt's whole length when it was cut.

        Returns:
            ``(ids, labels)`` of equal length: labels are ``-100`` except on earlier assistant
            turns' content and end-of-turn tokens (``loss_turns="all"``).
        """
        if placement not in CHAT_PLACEMENTS:
            raise ChatTemplateError(
                f"chat placement must be one of {list(CHAT_PLACEMENTS)}, got {placement!r}"
            )
        if loss_turns not in LOSS_TURNS:
            raise ChatTemplateError(
                f"loss_turns must be one of {list(LOSS_TURNS)}, got {loss_turns!r}"
            )
        if not messages or messages[-1].get("role") != "user":
            raise ChatTemplateError(
                "a chat prompt is a conversation that ends with a user message; the answer is "
                "what the model writes next"
            )
        texts = self._prefix_texts(messages)
        full = texts[-1] + self._gen_prompt(messages, texts[-1])
        # pieces: (text, kind, message index); kind "plain", "user" or "assistant"
        pieces: list[tuple[str, str, int]] = []
        pos = 0
        for i, m in enumerate(messages):
            role, content = m["role"], str(m["content"]).strip()
            if role == "system" or not content:
                continue
            a = len(texts[i])
            turn = full[a : len(texts[i + 1])]
            if role == "user":  # after the turn's header: content may occur in it or in
                # the end-of-turn marker ("end" in "<|im_end|>", "user" in "<|im_start|>user")
                head = self._user_header(messages[:i], texts[i])
                k = turn.find(content, len(head)) if turn.startswith(head) else turn.rfind(content)
            else:
                gen = self._gen_prompt(messages[:i], texts[i])
                k = turn.find(content, len(gen)) if turn.startswith(gen) else -1
            if k < 0:
                raise ChatTemplateError(
                    f"the chat template of {_name(self.tok)} does not write message {i} "
                    f"({role}) verbatim; softprompt cannot find its content"
                )
            pieces.append((full[pos : a + k], "plain", -1))
            pieces.append((content, role, i))
            pos = a + k + len(content)
        pieces.append((full[pos:], "plain", -1))
        ids_of = [
            list(self.tok.encode(t, add_special_tokens=False)) if t else [] for t, _, _ in pieces
        ]
        if max_length is not None:
            whole = self._truncate(pieces, ids_of, soft_tokens, max_length)
            if whole is not None and on_cut is not None:
                on_cut(whole)
        # virtual tokens: a marker piece at the chosen place
        soft = list(range(-1, -1 - soft_tokens, -1))
        ids: list[int] = []
        labels: list[int] = []
        after_answer = False
        first_user = next((j for j, p in enumerate(pieces) if p[1] == "user"), None)
        for j, ((text, kind, _i), part) in enumerate(zip(pieces, ids_of, strict=True)):
            if soft and placement == "user" and j == first_user:
                ids += soft
                labels += [_IGNORE] * len(soft)
            if soft and placement == "start" and j == 0:
                bos = self.bos_text if text.startswith(self.bos_text) else ""
                head = list(self.tok.encode(bos, add_special_tokens=False)) if bos else []
                if part[: len(head)] == head:
                    ids += head
                    labels += [_IGNORE] * len(head)
                    part = part[len(head) :]
                ids += soft
                labels += [_IGNORE] * len(soft)
            supervised = kind == "assistant" and loss_turns == "all"
            lab = list(part) if supervised else [_IGNORE] * len(part)
            if after_answer and kind == "plain":  # the end-of-turn token after an answer
                if self.eot_id in part:
                    k = part.index(self.eot_id)
                    lab[: k + 1] = part[: k + 1]
                after_answer = False
            if kind == "assistant":
                after_answer = supervised
            ids += part
            labels += lab
        if soft and placement == "answer":
            ids += soft
            labels += [_IGNORE] * len(soft)
        return ids, labels

    def answer_ids(self, content: str) -> list[int]:
        """Target ids of an assistant answer: its content tokens, then the end-of-turn token."""
        return list(self.tok.encode(str(content).strip(), add_special_tokens=False)) + [self.eot_id]

    def _truncate(self, pieces, ids_of, soft_tokens: int, max_length: int) -> int | None:
        """Cut the longest user contents until the prompt fits; the whole length if it was cut."""
        total = whole = sum(map(len, ids_of)) + soft_tokens
        users = [j for j, p in enumerate(pieces) if p[1] == "user"]
        while total > max_length and users:
            j = max(users, key=lambda u: len(ids_of[u]))
            cut = min(total - max_length, len(ids_of[j]))
            if cut == 0:
                break
            ids_of[j] = ids_of[j][: len(ids_of[j]) - cut]
            total -= cut
        if total > max_length:
            raise ChatTemplateError(
                f"the conversation needs {total} tokens even with its user messages emptied, "
                f"more than max_length={max_length}; raise --max-length"
            )
        return whole if whole > max_length else None
