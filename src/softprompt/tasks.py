"""Tasks: how rows become model inputs, losses and predictions.

* ``classify`` on a language model: a verbalizer. Each label is a word (by default the label
  itself) that the LM scores after the prompt, multi-token words by full-sequence
  log-probability; the loss is cross-entropy over the labels' scores.
* ``classify`` on an encoder (BERT, MiniLM): a linear head on the first token's final hidden
  state, trained with the prompt (P-tuning v2).
* ``generate``: next-token loss on the target only; prediction by greedy decoding. Decoder-only
  LMs read prompt + target; encoder-decoders read the prompt and decode the target.
* ``chat``: rows ``{"messages": [...]}`` rendered by the tokenizer's chat template
  (:mod:`softprompt.chat`); the loss covers the assistant turns' content and end-of-turn tokens
  (all of them, or the last one: ``loss_turns``); prediction generates the last assistant turn,
  stopping at the end-of-turn token; metrics compare it with the row's last assistant message.
* ``classify`` with ``chat=True``: the row's text (through the template, without ``{label}``)
  is the user message, after an optional ``system`` message; the labels are scored as the
  assistant's answer right after the generation prompt (``<|im_start|>assistant\n``).
* ``tag`` and ``extract`` (encoders): a BIO tag per word and extractive QA, each with a head per
  adapter; ``Task(spec, ...)`` returns their classes from ``softprompt.encoder_tasks``.

With ``soft_tokens`` > 0 (an input-level method: the adapter's placement is ``"template"``),
the chat forms insert the virtual-token markers where ``placement`` says: ``"start"``,
``"user"`` or ``"answer"`` (see :mod:`softprompt.chat`).

A task is saved in the adapter's ``adapter_config.json`` (``"task"``), so an adapter file alone
says how to use it (the CLI's eval/generate and the server read it from there).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F

from ._hf import check_virtual_tokens
from .chat import CHAT_PLACEMENTS, LOSS_TURNS, ChatFormat
from .data import Example
from .errors import SoftPromptError
from .lm import answer_logprobs, lm_loss, pad_left, pad_prompts
from .metrics import classification_metrics, generation_metrics
from .model import SoftPromptModel
from .templates import Template

TASKS = ("classify", "generate", "chat")
ENCODER_TASKS = ("tag", "extract")  # token classification, extractive QA: softprompt.encoder_tasks
TASKS = TASKS + ENCODER_TASKS
CHAT_TEMPLATE = "{messages}"
"""The nominal template of a chat task (the tokenizer's chat template renders the rows)."""
DEFAULT_CHAT_PLACEMENT = "start"
"""Measured best of the three on Rotten Tomatoes in chat form (docs/benchmarks.md)."""


@dataclass
class TaskSpec:
    """What an adapter does; stored in its config.

    Attributes:
        kind: "classify" or "generate".
        template: the prompt template (``softprompt.templates``).
        labels: classify: the label set, in the order of the head / scores.
        verbalizer: classify on an LM: label -> the word the LM scores.
        head: classify on an encoder: True when a linear head reads the first token.
        max_length: prompt tokens kept (the main field is truncated to fit).
        max_new_tokens: generate: tokens to decode.
        placement: --task chat / --chat: where an input-level method's virtual tokens go in
            the rendered conversation: "start" (before it), "user" (at the start of the first
            user message) or "answer" (after the generation prompt); prefix methods ignore it.
        loss_turns: --task chat: supervise "all" assistant turns, or the "last" one only.
        soft_tokens: chat forms: virtual tokens inserted at ``placement`` (0: the method's
            prompt is inside attention, or none).
        chat: --task classify in chat form: the text (through the template) is the user
            message of the tokenizer's chat template, the labels are scored as the
            assistant's answer.
        system: with --chat: a system message before each text ("": none; \\n is a newline).
    """

    kind: str
    template: str
    labels: list[str] = field(default_factory=list)
    verbalizer: dict[str, str] = field(default_factory=dict)
    head: bool = False
    max_length: int = 256
    max_new_tokens: int = 64
    placement: str = DEFAULT_CHAT_PLACEMENT
    loss_turns: str = "all"
    soft_tokens: int = 0
    chat: bool = False
    system: str = ""

    def __post_init__(self) -> None:
        def fail(name: str, what: str) -> None:
            raise SoftPromptError(
                f"task field {name!r} must be {what}, got {getattr(self, name)!r:.80}"
            )

        if self.kind not in TASKS:
            fail("kind", f"one of {list(TASKS)}")
        if not isinstance(self.template, str):
            fail("template", "a string")
        if not isinstance(self.labels, list) or not all(isinstance(x, str) for x in self.labels):
            fail("labels", "a list of strings")
        if not isinstance(self.verbalizer, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.verbalizer.items()
        ):
            fail("verbalizer", "an object of label: word strings")
        blank = [k for k, v in self.verbalizer.items() if not v.strip()]
        if blank:
            raise SoftPromptError(
                f"task field 'verbalizer': the word of label {blank[0]!r} is empty; give every "
                "label a word (or leave the label out to score the label itself)"
            )
        if not isinstance(self.head, bool):
            fail("head", "true or false")
        for name in ("max_length", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "an integer >= 1")
        if self.placement not in CHAT_PLACEMENTS:
            fail("placement", f"one of {list(CHAT_PLACEMENTS)}")
        if self.loss_turns not in LOSS_TURNS:
            fail("loss_turns", f"one of {list(LOSS_TURNS)}")
        value = self.soft_tokens
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            fail("soft_tokens", "an integer >= 0")
        if not isinstance(self.chat, bool):
            fail("chat", "true or false")
        if not isinstance(self.system, str):
            fail("system", "a string")
        if self.chat and self.kind != "classify":
            fail("chat", "false unless kind is 'classify' (a chat task is kind 'chat')")

    @property
    def is_chat(self) -> bool:
        """True when the chat template renders the prompts (kind "chat", or classify in chat
        form)."""
        return self.kind == "chat" or self.chat

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TaskSpec:
        if not isinstance(data, dict):
            raise SoftPromptError(f"a task is a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SoftPromptError(f"a task has no field(s) {unknown}")
        missing = sorted({"kind", "template"} - set(data))
        if missing:
            raise SoftPromptError(f"a task needs the field(s) {missing}")
        return cls(**data)


class Task:
    """A task bound to a model and tokenizer (``tag`` / ``extract`` make the subclasses in
    ``softprompt.encoder_tasks``).

    Attributes:
        chat: the tokenizer's probed chat template (:class:`softprompt.chat.ChatFormat`) for the
            chat forms (kind "chat", or classify with ``chat``), else None.
    """

    def __new__(cls, spec: TaskSpec, *args, **kwargs):
        if cls is Task and getattr(spec, "kind", None) in ENCODER_TASKS:
            from .encoder_tasks import TASK_CLASSES

            cls = TASK_CLASSES[spec.kind]
        return super().__new__(cls)

    def __init__(self, spec: TaskSpec, model: SoftPromptModel, tokenizer) -> None:
        if spec.kind not in TASKS:
            raise SoftPromptError(f"unknown task {spec.kind!r}; expected one of {list(TASKS)}")
        self.spec = spec
        self.model = model
        self.tok = tokenizer
        self.template = Template.parse(spec.template)
        # a template's [soft:N] segments must fit the model before any row is encoded
        check_virtual_tokens(model.base_model, self.template.num_soft, "the template's [soft:N]")
        main = {"classify": "text", "generate": "input", "chat": "messages"}[spec.kind]
        self.chat = ChatFormat.of(tokenizer) if spec.is_chat else None
        if spec.is_chat:
            if self.template.num_soft:
                raise SoftPromptError(
                    f"template {spec.template!r} has [soft:N] segments, but in chat form the "
                    "virtual tokens go where --placement says; drop the [soft:N]"
                )
            if model.info.is_encoder_decoder or not model.info.is_causal_lm:
                raise SoftPromptError(
                    "chat tasks need a decoder-only language model with a chat template"
                )
            check_virtual_tokens(model.base_model, spec.soft_tokens, "the chat placement's")
        if main not in self.template.fields:
            raise SoftPromptError(
                f"template {spec.template!r} has no {{{main}}}: the model would never see the "
                f"input; put {{{main}}} in the template (e.g. 'Text: {{{main}}} ...')"
            )
        self.enc_dec = model.info.is_encoder_decoder
        self.encoder_only = not self.enc_dec and not model.info.is_causal_lm
        self.pad_id = pad_id(tokenizer)
        if spec.kind == "classify":
            if self.enc_dec:
                raise SoftPromptError(
                    "classify is supported on decoder-only LMs (verbalizer) and encoders (head); "
                    "for an encoder-decoder model use --task generate with the label as target"
                )
            if len(spec.labels) < 2:
                raise SoftPromptError(f"classify needs at least 2 labels, got {spec.labels}")
            if self.encoder_only != spec.head:
                raise SoftPromptError("a classification head is used exactly on encoder models")
            if not spec.head:
                # the word as written, without surrounding spaces: the template's answer_ids
                # adds the space that joins it to the prompt (a chat answer starts the turn)
                words = [spec.verbalizer.get(lab, lab).strip() for lab in spec.labels]
                self.answers = [
                    list(tokenizer.encode(w, add_special_tokens=False))
                    if spec.chat
                    else self.template.answer_ids(w, tokenizer, add_eos=False)
                    for w in words
                ]
                for lab, w, ids in zip(spec.labels, words, self.answers, strict=True):
                    if not ids:
                        raise SoftPromptError(
                            f"label {lab!r}: its word {w!r} tokenizes to no tokens, so it cannot "
                            "be scored; give it another word with --verbalizer"
                        )
                seen: dict[tuple[int, ...], int] = {}
                for i, ids in enumerate(self.answers):
                    j = seen.setdefault(tuple(ids), i)
                    if j != i:
                        a, b = spec.labels[j], spec.labels[i]
                        fix = (
                            "give them different words in --verbalizer"
                            if a in spec.verbalizer or b in spec.verbalizer
                            else "give a verbalizer with a different word for each"
                        )
                        raise SoftPromptError(
                            f"labels {a!r} (word {words[j]!r}) and {b!r} (word {words[i]!r}) "
                            f"tokenize to the same tokens, so they cannot be told apart; {fix}"
                        )
        elif self.encoder_only:
            raise SoftPromptError(
                "generate needs a language model (decoder-only or encoder-decoder)"
            )

    # ------------------------------------------------------------------ encoding
    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end generation: the chat template's end-of-turn token (and EOS when
        it differs) for the chat forms, else the tokenizer's EOS (if any)."""
        if self.chat is not None:
            return self.chat.stop_ids
        eos = getattr(self.tok, "eos_token_id", None)
        return [] if eos is None else [int(eos)]

    def chat_messages(self, row: dict) -> list[dict]:
        """The conversation a chat-form row asks to answer: its ``messages`` without a final
        assistant turn (the gold answer), or, for classify, the template's text as the user
        message after the spec's system message."""
        msgs = row.get("messages")
        if msgs is None and self.spec.kind == "classify":
            values = self.template._values(row)
            text = "".join(s for s in self.template._segments(values) if isinstance(s, str))
            msgs = [{"role": "user", "content": text}]
            if self.spec.system:
                msgs.insert(0, {"role": "system", "content": self.spec.system})
        if not isinstance(msgs, list) or not msgs:
            raise SoftPromptError("a chat row needs a non-empty list of messages")
        if isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        return list(msgs)

    def prompt_ids(self, row: dict, on_cut: Callable[[int], None] | None = None) -> list[int]:
        """Prompt ids of a row. Chat forms: ``row["messages"]`` (ending with a user turn; a
        final assistant turn is dropped) rendered with the generation prompt, the virtual-token
        markers inserted at the spec's placement. ``on_cut`` is called with the prompt's whole
        length when it was cut to ``max_length``."""
        if self.chat is not None:
            return self._chat_encode(self.chat_messages(row), "last", on_cut)[0]
        return self.template.encode(row, self.tok, max_length=self.spec.max_length, on_cut=on_cut)

    def _chat_encode(
        self, msgs: list[dict], loss_turns: str, on_cut: Callable[[int], None] | None = None
    ) -> tuple[list[int], list[int]]:
        return self.chat.encode(
            msgs,
            soft_tokens=self.spec.soft_tokens,
            placement=self.spec.placement,
            loss_turns=loss_turns,
            max_length=self.spec.max_length,
            on_cut=on_cut,
        )

    def encode(self, ex: Example) -> dict:
        """One training/eval row: prompt ids and the answer (label index or target ids); a
        prompt cut to ``max_length`` also has ``"cut_from"``, its whole length."""
        row = ex.fields
        cut: list[int] = []
        if self.spec.kind == "chat":
            msgs = row["messages"]
            prompt, labels = self._chat_encode(
                self.chat_messages(row), self.spec.loss_turns, cut.append
            )
            item = {
                "prompt": prompt,
                "prompt_labels": labels,
                "target": self.chat.answer_ids(msgs[-1]["content"]),
                "source": f"{ex.source}:{ex.line}",
            }
            if cut:
                item["cut_from"] = cut[0]
            return item
        item = {"prompt": self.prompt_ids(row, cut.append), "source": f"{ex.source}:{ex.line}"}
        if cut:
            item["cut_from"] = cut[0]
        if self.spec.kind == "classify":
            item["label"] = self.spec.labels.index(str(row["label"]))
        else:
            if self.enc_dec:
                item["target"] = self.tok(str(row["target"]))["input_ids"]
            else:
                item["target"] = self.template.answer_ids(
                    str(row["target"]), self.tok, add_eos=True
                )
        return item

    # ------------------------------------------------------------------ loss
    def encode_examples(
        self,
        examples: Sequence[Example],
        what: str = "training",
        skip_bad: bool = False,
        warn: Callable[[str], None] | None = None,
    ) -> tuple[list[dict], list[Example]]:
        """Encode rows for training or evaluation: ``(items, the examples kept)``.

        A row that cannot be encoded (a conversation too long for ``max_length`` even with its
        user messages emptied) is an error naming its file and line, or, with ``skip_bad``, is
        reported through ``warn`` and left out. Prompts cut to ``max_length`` are reported: the
        first few by file and line, then how many in all.

        Raises:
            SoftPromptError: a row that cannot be encoded (without ``skip_bad``), or no row left.
        """
        warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
        items, kept, cut = [], [], []
        for ex in examples:
            try:
                item = self.encode(ex)
            except SoftPromptError as e:
                if not skip_bad:
                    raise SoftPromptError(f"{ex.source}:{ex.line}: {e}") from None
                warn(f"{ex.source}:{ex.line}: {e}; skipped (--skip-bad)")
                continue
            items.append(item)
            kept.append(ex)
            if "cut_from" in item:
                cut.append(item)
        for item in cut[:3]:
            warn(
                f"{item['source']}: the prompt is {item['cut_from']} tokens, cut to "
                f"max_length={self.spec.max_length}"
            )
        if len(cut) > 3:
            warn(
                f"{len(cut)} of {len(items)} {what} rows were cut to max_length="
                f"{self.spec.max_length} (the longest was {max(i['cut_from'] for i in cut)} "
                "tokens); raise --max-length to keep them whole"
            )
        if examples and not items:
            raise SoftPromptError(f"no {what} row could be encoded (all were skipped)")
        return items, kept

    def loss_units(self, item: dict) -> int:
        """How many terms an encoded row adds to the mean that ``loss`` takes: 1 for classify,
        its supervised tokens for generate and chat. The trainer weights micro-batches and
        processes by it, so an accumulated or data-parallel step has the big batch's loss."""
        if self.spec.kind == "classify":
            return 1
        if self.enc_dec:
            return len(item["target"])
        return sum(x != -100 for x in item.get("prompt_labels", ())) + len(item["target"])

    def loss(self, batch: list[dict]) -> torch.Tensor:
        """Mean loss of a batch of encoded rows (differentiable w.r.t. the adapter): over rows
        (classify) or supervised tokens (``loss_units``)."""
        model = self.model
        if self.spec.kind == "classify":
            y = torch.tensor([b["label"] for b in batch], device=model.device)
            return F.cross_entropy(self.class_scores([b["prompt"] for b in batch]), y)
        if self.enc_dec:
            ids, mask = pad_prompts(model, [b["prompt"] for b in batch], self.pad_id)
            width = max(len(b["target"]) for b in batch)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for i, b in enumerate(batch):
                labels[i, : len(b["target"])] = torch.tensor(b["target"])
            return model(input_ids=ids, attention_mask=mask, labels=labels.to(model.device)).loss
        seqs = [b["prompt"] + b["target"] for b in batch]
        labs = [b.get("prompt_labels", [-100] * len(b["prompt"])) + b["target"] for b in batch]
        ids, mask = pad_left(seqs, self.pad_id, model.device)
        labels, _ = pad_left(labs, -100, model.device)
        return lm_loss(model, ids, mask, labels)

    def class_scores(
        self, prompts: Sequence[Sequence[int]], adapter_names: Sequence[str | None] | None = None
    ) -> torch.Tensor:
        """(B, C) class logits: label-word log-probabilities, or the head's logits."""
        model = self.model
        if self.spec.head:
            ids, mask = pad_left(prompts, self.pad_id, model.device)
            # encoders read right-padded text; position ids come from the mask either way
            hidden = model(input_ids=ids, attention_mask=mask, adapter_names=adapter_names)
            first = mask.argmax(1)  # first real token ([CLS]) of each left-padded row
            cls = hidden.last_hidden_state[torch.arange(len(prompts)), first]
            names = [model.active] * len(prompts) if adapter_names is None else adapter_names
            return torch.stack(
                [model.adapters[n].task_head(cls[b]) for b, n in enumerate(names)]
            )  # (B, C): each row through its own adapter's head
        return answer_logprobs(model, prompts, self.answers, adapter_names, self.pad_id)

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict(
        self, examples: Sequence[Example], batch_size: int = 16, progress=None, **gen
    ) -> list[dict]:
        """Predictions for rows: classify -> label + scores; generate -> text (``gen``: extra
        ``generate`` arguments)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise SoftPromptError(f"--batch-size must be >= 1, got {batch_size!r}")
        out: list[dict] = []
        items = [self.prompt_ids(ex.fields) for ex in examples]
        if self.model.active is None:  # the bare model (zero-shot): no virtual tokens
            items = [[t for t in ids if t >= 0] for ids in items]
        order = sorted(range(len(items)), key=lambda i: len(items[i]))  # length buckets
        results: dict[int, dict] = {}
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            prompts = [items[i] for i in idx]
            if self.spec.kind == "classify":
                probs = self.class_scores(prompts).float().softmax(-1).cpu()
                for i, p in zip(idx, probs, strict=True):
                    results[i] = {
                        "prediction": self.spec.labels[int(p.argmax())],
                        "scores": {
                            lab: round(float(s), 6)
                            for lab, s in zip(self.spec.labels, p, strict=True)
                        },
                    }
            else:
                for i, text in zip(idx, self.generate_ids(prompts, **gen), strict=True):
                    results[i] = {"prediction": text}
            if progress is not None:
                progress(len(idx))
        for i, ex in enumerate(examples):
            row = {k: v for k, v in ex.fields.items()}
            out.append({**row, **results[i]})
        return out

    def generate_ids(
        self, prompts: Sequence[Sequence[int]], adapter_names=None, **gen
    ) -> list[str]:
        model = self.model
        ids, mask = pad_prompts(model, prompts, self.pad_id)
        kwargs = dict(
            max_new_tokens=self.spec.max_new_tokens, do_sample=False, pad_token_id=self.pad_id
        )
        if self.stop_ids:
            kwargs["eos_token_id"] = self.stop_ids if self.chat is not None else self.stop_ids[0]
        kwargs.update(gen)
        seqs = model.generate(
            input_ids=ids, attention_mask=mask, adapter_names=adapter_names, **kwargs
        )
        new = seqs if self.enc_dec else seqs[:, ids.shape[1] :]
        return [t.strip() for t in self.tok.batch_decode(new, skip_special_tokens=True)]

    def metrics(self, examples: Sequence[Example], predictions: Sequence[dict]) -> dict:
        if self.spec.kind == "classify":
            gold = [str(ex.fields["label"]) for ex in examples]
            return classification_metrics(
                gold, [p["prediction"] for p in predictions], self.spec.labels
            )
        if self.spec.kind == "chat":
            refs = [str(ex.fields["messages"][-1]["content"]).strip() for ex in examples]
        else:
            refs = [str(ex.fields["target"]) for ex in examples]
        return generation_metrics([p["prediction"] for p in predictions], refs)


def pad_id(tokenizer) -> int:
    """The id to pad with: the pad token, else EOS, else UNK, else 0."""
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def headline(metrics: dict) -> tuple[str, float]:
    """The one number to select on and show: accuracy (classify), span F1 (tag), exact match
    (extract), -KL (context distillation, softprompt.cartridge; higher is better) or ROUGE-L
    (generate, chat)."""
    if "neg_kl" in metrics:
        return "neg_kl", float(metrics["neg_kl"])
    if "accuracy" in metrics:
        return "accuracy", float(metrics["accuracy"])
    if "span_f1" in metrics:
        return "span_f1", float(metrics["span_f1"])
    if "rougeL" not in metrics and "exact_match" in metrics:
        return "exact_match", float(metrics["exact_match"])
    return "rougeL", float(metrics["rougeL"])
