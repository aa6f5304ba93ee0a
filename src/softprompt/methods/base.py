"""What every soft-prompt method shares: the config base class, the registry and the adapter base.

A method is a config dataclass (validated in ``__post_init__``) plus an ``Adapter`` module that
produces one or both of:

* ``input_prompt()``: (P, d) virtual-token embeddings that enter through ``inputs_embeds``;
* ``kv()``: per attention slot, a key and a value prefix of shape (P, kv_heads, head_dim) that
  enter inside attention (see ``softprompt._hf``).
* ``gated_prompts()``: per attention slot, (P, d) adapter tokens and a gate; the slot's own
  projections make their keys and values, attended apart and added gated (adaption prompts).

The wrapper, trainer and server only call these; they never branch on a method's name.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .._hf import ModelInfo, Slot
from ..errors import SoftPromptError

METHODS: dict[str, tuple[type[AdapterConfig], type[Adapter]]] = {}


def register_method(name: str, config_cls: type[AdapterConfig], adapter_cls: type[Adapter]) -> None:
    """Register a method under ``name`` (the ``method`` field of its config and adapter file)."""
    config_cls.method = name
    METHODS[name] = (config_cls, adapter_cls)


@dataclass
class AdapterConfig:
    """Fields every method has.

    Attributes:
        num_virtual_tokens: number of virtual tokens (prompt length / prefix length).
        init: how to initialise; each method lists the values it takes.
        init_text: text for ``init="text"`` (or the label words for ``init="labels"``).
        init_token_ids: token ids for text init, instead of ``init_text`` + tokenizer.
        seed: seed for random initialisation (None: torch's global generator).
    """

    method: ClassVar[str] = ""
    inits: ClassVar[tuple[str, ...]] = ()
    # What the trainer and the CLI need to know about a method, declared here so that they
    # never branch on its name (a new method is its own file plus register_method):
    level: ClassVar[str] = "attention"  # "input": virtual tokens in inputs_embeds; "attention":
    #   per-layer key/value prefixes
    default_lr: ClassVar[float] = 5e-3  # AdamW rate when no --lr is given ...
    lr_relative_to_embeddings: ClassVar[bool] = False  # ... times the embedding table's RMS
    cli_fields: ClassVar[dict[str, str]] = {}  # `softprompt train` flag (dest) -> config field

    num_virtual_tokens: int = 10  # the CLI's default too (Li & Liang's table-to-text length)
    init: str = "vocab"
    init_text: str | list[str] | None = None
    init_token_ids: list[int] | None = None
    seed: int | None = 0

    def __post_init__(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise SoftPromptError(
                f"{type(self).__name__}.num_virtual_tokens must be a positive integer, "
                f"got {self.num_virtual_tokens!r}"
            )
        if self.init not in self.inits:
            raise SoftPromptError(
                f"{type(self).__name__}.init must be one of {list(self.inits)}, got {self.init!r}"
            )
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise SoftPromptError(
                f"{type(self).__name__}.seed must be None or an integer in [0, 2**63), "
                f"got {self.seed!r}"
            )
        if self.init in ("text", "labels") and not (self.init_text or self.init_token_ids):
            raise SoftPromptError(
                f"{type(self).__name__}: init={self.init!r} needs init_text (with a tokenizer "
                "passed to attach/add_adapter) or init_token_ids"
            )

    @classmethod
    def lr_for(cls, base_model: nn.Module) -> float:
        """The learning rate this method trains ``base_model`` with when none is given.

        Input-level methods move virtual-token embeddings, so their rate is relative to the
        embedding table's RMS (SmolLM2's 0.136 gives prompt tuning 1e-2; T5's much larger
        embeddings get rates near Lester et al.'s 0.3); per-layer methods' rates are absolute.
        These rates train without collapsing at small budgets (docs/benchmarks.md, section 4).
        """
        if not cls.lr_relative_to_embeddings:
            return cls.default_lr
        table = base_model.get_input_embeddings().weight.detach()
        rms = table.float().pow(2).mean().sqrt().item()
        return float(f"{cls.default_lr * rms:.2g}")

    @classmethod
    def lr_help(cls) -> str:
        """The default rate in words, for ``--help``."""
        if cls.lr_relative_to_embeddings:
            return f"{cls.default_lr:g} x the embedding table's RMS"
        return f"{cls.default_lr:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> AdapterConfig:
        if not isinstance(data, dict):
            raise SoftPromptError(f"an adapter config is a JSON object, got {type(data).__name__}")
        data = dict(data)
        method = data.pop("method", None)
        if method not in METHODS:
            raise SoftPromptError(f"unknown method {method!r}; known: {sorted(METHODS)}")
        cls = METHODS[method][0]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SoftPromptError(f"{cls.__name__} has no field(s) {unknown}")
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if not _is_instance(value, hints[key]):
                raise SoftPromptError(
                    f"{cls.__name__}.{key} must be {_type_name(hints[key])}, got {value!r:.80}"
                )
        return cls(**data)


def _is_instance(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type hint (int, str, list[int], X | None, ...)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_is_instance(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


_NAMES = {
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}
_NAMES[bool] = ("true or false", "booleans")


def _type_name(hint: Any, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a, plural) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0], plural=True)}"
    if hint is type(None):
        return "null"
    names = _NAMES.get(hint, (f"a {getattr(hint, '__name__', hint)}",) * 2)
    return names[plural]


@dataclass
class InitContext:
    """What initialisation may use: the frozen model, its slots and, optionally, a tokenizer."""

    model: nn.Module
    info: ModelInfo
    tokenizer: Any = None
    generator: torch.Generator = field(default_factory=torch.Generator)


class Adapter(nn.Module):
    """Base class of a method's trainable module.

    Subclasses set ``config`` and implement ``input_prompt`` and/or ``kv``. ``baked`` tensors are
    the inference form (``bake()``); a baked adapter keeps only plain tensors.
    """

    config: AdapterConfig

    def __init__(self, config: AdapterConfig, info: ModelInfo) -> None:
        super().__init__()
        if getattr(config, "placement", None) == "append" and not info.is_encoder_decoder:
            if info.is_causal_lm:
                raise SoftPromptError(
                    f"{type(config).__name__}(placement='append') puts the virtual tokens after "
                    "the last real token, where a decoder-only LM's causal attention never reads "
                    "them (in training they would come after the answer, and change nothing): "
                    "use placement='prepend', or 'template' with [soft:N] where they should go "
                    "(e.g. 'Review: {text} [soft:10] Sentiment: {label}')"
                )
        self.config = config
        self.info = info
        # What the adapter is for (set by softprompt.tasks, saved in adapter_config.json), and an
        # optional task head (a linear classifier on encoders), trained and saved with it.
        self.task: dict | None = None
        self.task_head: nn.Module | None = None
        # Where the real tokens' positions start for rows of this adapter (0: as the base model
        # numbers them). Set by imports whose source library shifted them (PEFT's prefix tuning
        # puts the prefix at positions 0..P-1: softprompt.peft_compat); saved in the config.
        self.position_offset: int = 0
        # What an imported adapter came from ({"peft": its PEFT adapter_config.json}), kept so
        # that exporting it back writes the same config.
        self.source: dict | None = None

    def set_task_head(self, num_labels: int) -> nn.Linear:
        """Give the adapter a linear head (hidden -> num_labels), as P-tuning v2 does on [CLS]."""
        self.task_head = nn.Linear(self.info.hidden_size, num_labels)
        return self.task_head

    # -- what the model reads --------------------------------------------------------------
    def input_prompt(self) -> torch.Tensor | None:
        """(P, d) virtual-token embeddings, or None for methods that act inside attention."""
        return None

    def kv(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
        """slot index -> (key, value), each (P, kv_heads, head_dim); None if not a prefix method."""
        return None

    def gated_prompts(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
        """slot index -> ((P, d) prompt, (1,) gate): gated adapter tokens that the slot's own
        k_proj / v_proj project and whose separate softmax attention, times the gate, is added
        to the attention output (adaption prompts); None for other methods."""
        return None

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    @property
    def first_layer(self) -> int:
        """The lowest block this adapter changes: 0 for input-level virtual tokens, else the
        lowest layer given a prefix."""
        layout = getattr(self, "layout", None)
        if layout is None or not layout.slots:
            return 0
        return min(self.info.slots[s].layer for s in layout.slots)

    # -- files -----------------------------------------------------------------------------
    def baked_tensors(self) -> dict[str, torch.Tensor]:
        """The inference form: plain tensors, no reparameterisation."""
        raise NotImplementedError

    def load_baked(self, tensors: dict[str, torch.Tensor]) -> None:
        """Switch to the inference form given by ``baked_tensors()`` of a saved adapter."""
        raise NotImplementedError

    @property
    def is_baked(self) -> bool:
        return False

    def trains(self, param: str) -> bool:
        """Whether parameter ``param`` (a name in ``named_parameters()``) trains when the
        adapter is active: all of them unless baked (a method may keep some frozen)."""
        return not self.is_baked

    def bake(self) -> None:
        """Replace any reparameterisation by its output (idempotent)."""
        with torch.no_grad():
            self.load_baked({k: v.detach().clone() for k, v in self.baked_tensors().items()})


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------


def text_token_ids(config: AdapterConfig, ctx: InitContext) -> list[int]:
    """Token ids of ``init_text`` (or ``init_token_ids``), for text and label-word init."""
    if config.init_token_ids:
        vocab = ctx.model.get_input_embeddings().weight.shape[0]
        bad = [i for i in config.init_token_ids if not 0 <= i < vocab]
        if bad:
            raise SoftPromptError(
                f"init_token_ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})"
            )
        return list(config.init_token_ids)
    if ctx.tokenizer is None:
        raise SoftPromptError(
            f"init={config.init!r} with init_text needs a tokenizer: pass tokenizer=... to "
            "softprompt.attach / add_adapter, or give init_token_ids instead"
        )
    texts = config.init_text if isinstance(config.init_text, list) else [config.init_text]
    ids: list[int] = []
    for t in texts:
        ids += ctx.tokenizer(
            " " + t.strip() if config.init == "labels" else t, add_special_tokens=False
        )["input_ids"]
    if not ids:
        raise SoftPromptError(f"init_text {config.init_text!r} tokenizes to no tokens")
    return ids


_UNUSED = re.compile(r"^\[unused\d+\]$")


def _wordpiece_pool(tokenizer, lo: int, hi: int, vocab_size: int) -> list[int] | None:
    """The frequent-word ids of a BERT-style WordPiece vocabulary, or None for others.

    Its low ids are not frequent words: ``[unusedN]`` slots (never trained: their embeddings are
    about 0.4x the others' norm) and single characters of every script come before "the"
    (1996 in BERT's vocabulary). Those, and the special tokens, are skipped, and the pool takes
    as many ids after them as the window ``[lo, hi)`` holds.
    """
    if tokenizer is None or not hasattr(tokenizer, "convert_ids_to_tokens"):
        return None
    window = tokenizer.convert_ids_to_tokens(list(range(lo, hi)))
    if not any(t is not None and _UNUSED.match(t) for t in window):
        return None
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    pool, i, step = [], lo, 4096
    while len(pool) < hi - lo and i < vocab_size:
        toks = tokenizer.convert_ids_to_tokens(list(range(i, min(i + step, vocab_size))))
        for j, t in enumerate(toks, start=i):
            word = (t or "").removeprefix("##")
            if j not in special and not _UNUSED.match(t or "") and len(word) >= 2:
                pool.append(j)
        i += step
    return pool[: hi - lo] or None


def frequent_vocab_ids(n: int, vocab_size: int, gen: torch.Generator, tokenizer=None) -> list[int]:
    """``n`` ids sampled from the frequent part of the vocabulary.

    BPE vocabularies are built most-frequent-merge first, so low ids (after the first few
    special tokens) are frequent tokens: ids 100..4999. A BERT-style WordPiece vocabulary
    (recognised with ``tokenizer`` by its ``[unusedN]`` slots) puts unused slots and single
    characters first: there the 4900 first ids that are words of 2+ characters
    (``_wordpiece_pool``).
    """
    lo, hi = min(100, vocab_size // 10), min(5000, vocab_size)
    pool = _wordpiece_pool(tokenizer, lo, hi, vocab_size)
    if pool is not None:
        pick = torch.randint(0, len(pool), (n,), generator=gen).tolist()
        return [pool[k] for k in pick]
    return (torch.randint(lo, hi, (n,), generator=gen)).tolist()


def fill_ids(
    ids: list[int], n: int, vocab_size: int, gen: torch.Generator, tokenizer=None
) -> list[int]:
    """Fit a list of ids to length ``n``: truncate, or pad with sampled frequent vocabulary."""
    if len(ids) >= n:
        return ids[:n]
    return ids + frequent_vocab_ids(n - len(ids), vocab_size, gen, tokenizer)


def init_embeddings(config: AdapterConfig, ctx: InitContext) -> torch.Tensor:
    """(P, d) initial virtual-token embeddings for input-level methods.

    * ``random``: Gaussian with the embedding table's per-dimension mean and std (not N(0, 1));
    * ``vocab``: embeddings of frequent vocabulary tokens (Lester et al.'s "sampled vocab");
    * ``text``: embeddings of ``init_text``'s tokens, truncated or padded with sampled vocabulary;
    * ``labels``: embeddings of the class-label words, then sampled vocabulary.
    """
    table = ctx.model.get_input_embeddings().weight.detach().float()
    n, gen = config.num_virtual_tokens, ctx.generator
    if config.init == "random":
        mean, std = table.mean(0), table.std(0)
        return mean + std * torch.randn(n, table.shape[1], generator=gen)
    if config.init == "vocab":
        ids = frequent_vocab_ids(n, table.shape[0], gen, ctx.tokenizer)
    elif config.init == "labels" and not config.init_token_ids and ctx.tokenizer is not None:
        # Lester et al. 3.2: one virtual token per class, the mean of its label's token
        # embeddings where the label is several tokens; then sampled vocabulary
        labels = config.init_text if isinstance(config.init_text, list) else [config.init_text]
        rows = []
        for label in labels[:n]:
            lab_ids = ctx.tokenizer(" " + str(label).strip(), add_special_tokens=False)
            lab_ids = lab_ids["input_ids"]
            if not lab_ids:
                raise SoftPromptError(f"label {label!r} tokenizes to no tokens")
            rows.append(table[torch.tensor(lab_ids)].mean(0))
        rest = frequent_vocab_ids(n - len(rows), table.shape[0], gen, ctx.tokenizer)
        return torch.cat([torch.stack(rows), table[torch.tensor(rest, dtype=torch.long)]]).clone()
    else:
        ids = fill_ids(text_token_ids(config, ctx), n, table.shape[0], gen, ctx.tokenizer)
    return table[torch.tensor(ids)].clone()


def capture_kv(ctx: InitContext, ids: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The frozen model's own keys and values at every slot while it reads ``ids``.

    Returns:
        slot index -> (key, value), each (len(ids), kv_heads, head_dim).
    """
    from .._hf import capture_attention_kv  # local: keeps the seam the only transformers module

    return capture_attention_kv(ctx.model, ctx.info, ids)


def init_kv_targets(config: AdapterConfig, ctx: InitContext, slots: list[int]) -> torch.Tensor:
    """(P, sum of 2*kv_dim over ``slots``) initial flat prefix for per-layer methods.

    * ``vocab`` (default): the model's own K/V activations of sampled frequent tokens;
    * ``text`` / ``labels``: K/V activations of the given text (Li & Liang's low-data trick);
    * ``random``: Gaussian with each slot's activation std (not N(0, 1)).
    """
    n, gen = config.num_virtual_tokens, ctx.generator
    vocab = ctx.model.get_input_embeddings().weight.shape[0]
    if config.init in ("text", "labels"):
        ids = text_token_ids(config, ctx)
        ids = (ids * (n // len(ids) + 1))[:n]  # repeat a short text to fill the prefix
    else:
        ids = frequent_vocab_ids(n, vocab, gen, ctx.tokenizer)
    acts = capture_kv(ctx, ids)
    parts = []
    for s in slots:
        k, v = acts[s]
        if config.init == "random":
            k = torch.randn(k.shape, generator=gen) * k.std()
            v = torch.randn(v.shape, generator=gen) * v.std()
        parts += [k.reshape(n, -1), v.reshape(n, -1)]
    return torch.cat(parts, dim=1).float()


class FlatPrefix:
    """Splits a flat (P, sum of 2*kv_dim) prefix into per-slot (P, kv_heads, head_dim) views."""

    def __init__(self, info: ModelInfo, slots: list[int]) -> None:
        self.slots = slots
        self.geom: list[Slot] = [info.slots[s] for s in slots]
        self.width = sum(2 * g.kv_dim for g in self.geom)

    def split(self, flat: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        n = flat.shape[0]
        out, off = {}, 0
        for s, g in zip(self.slots, self.geom, strict=True):
            k = flat[:, off : off + g.kv_dim].view(n, g.kv_heads, g.head_dim)  # (P, kvh, hd)
            v = flat[:, off + g.kv_dim : off + 2 * g.kv_dim].view(n, g.kv_heads, g.head_dim)
            out[s] = (k, v)
            off += 2 * g.kv_dim
        return out
