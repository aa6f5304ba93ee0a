"""The one module that knows transformers' internals.

Everything softprompt needs from transformers' private structure lives here:

* per-layer prefixes (and adaption prompts' gated adapter tokens, ``gated_attention``) enter
  *inside* attention through a wrapped attention function registered with
  ``AttentionInterface`` (plus the matching mask function with ``AttentionMaskInterface``; without
  it transformers silently passes ``attention_mask=None``). The KV cache is never touched, so
  ``generate``, static caches, cache continuation and gradient checkpointing keep working;
* the map from attention-module objects to slots ``(kind, layer)``, found once per model by a probe
  forward (T5 and BART reuse one class for encoder, decoder and cross attention with overlapping
  ``layer_idx``: the module object tells them apart);
* the identity of a base model (architecture, sizes, vocabulary and embedding fingerprints).

The per-forward state travels as the keyword argument ``softprompt_state``: transformers 5 forwards
extra keyword arguments from the top-level model down to every attention call, including during
gradient-checkpoint recomputation and every ``generate`` step.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import re
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    eager_mask,
    flex_attention_mask,
    sdpa_mask,
)

from .errors import SoftPromptError  # noqa: F401  (also re-exported here for older imports)

STATE_KWARG = "softprompt_state"
_WRAPPED = {
    "sdpa": "softprompt_sdpa",
    "eager": "softprompt_eager",
    "flex_attention": "softprompt_flex_attention",
}
_BASE_OF = {v: k for k, v in _WRAPPED.items()}
SLOT_KINDS = ("self", "encoder", "decoder", "cross")
# generate() validates model kwargs against the forward signature and refuses unknown ones, so
# during generate the state is set here instead (generation runs no backward, so no checkpoint
# recomputation can outlive it).
_GENERATE_STATE: contextvars.ContextVar = contextvars.ContextVar("softprompt_state", default=None)


@contextlib.contextmanager
def generation_state(state) -> Iterator[None]:
    """Make ``state`` the injection state of every attention call inside the block."""
    token = _GENERATE_STATE.set(state)
    try:
        yield
    finally:
        _GENERATE_STATE.reset(token)


@dataclass(frozen=True)
class Slot:
    """One attention call site that can take a key/value prefix.

    Attributes:
        kind: "self" (decoder-only or encoder-only), "encoder", "decoder" or "cross".
        layer: the block index within its stack.
        kv_heads: number of key/value heads (grouped-query attention: fewer than query heads).
        head_dim: size of one head.
    """

    kind: str
    layer: int
    kv_heads: int
    head_dim: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def key(self) -> str:
        return f"{self.kind}.{self.layer}"


@dataclass
class ModelInfo:
    """What softprompt knows about an attached base model."""

    slots: list[Slot]
    module_slot: dict[int, int]  # id(attention module) -> index into slots
    hidden_size: int
    is_encoder_decoder: bool
    is_causal_lm: bool
    identity: dict
    shares_prompt: bool = False  # see ``shares_prepended_prompt``


# --------------------------------------------------------------------------------------------
# Attention: the prefix enters here.
# --------------------------------------------------------------------------------------------


def _eager_for(module: nn.Module) -> Callable:
    """The model family's own eager attention function (transformers keeps one per modeling file)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise SoftPromptError(
            f"{type(module).__name__} has no eager_attention_forward; use attn_implementation='sdpa'"
        )
    return fn


def _extend_mask(
    mask: torch.Tensor | None,
    valid: torch.Tensor,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    is_causal: bool | None,
) -> torch.Tensor:
    """Prepend prefix columns to an attention mask.

    Args:
        mask: (B|1, 1|H, q, k) bool (True = attend) or additive float mask, or None.
        valid: (B, P) bool, which prefix entries each row may attend to.
        key: (B, kvh, k, hd) the real keys (before the prefix is added).

    Returns:
        (B, 1|H, q, P + k) mask of the same kind (bool or float).
    """
    batch, plen = valid.shape
    q_len, k_len = query.shape[2], key.shape[2]
    if mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and q_len > 1:
            # bottom-right aligned causal pattern over the real keys (queries are the last q keys)
            qi = torch.arange(q_len, device=key.device)[:, None] + (k_len - q_len)
            mask = qi >= torch.arange(k_len, device=key.device)[None, :]
        else:
            mask = torch.ones(q_len, k_len, dtype=torch.bool, device=key.device)
        mask = mask.view(1, 1, q_len, k_len)
    mask = mask.expand(batch, -1, -1, -1) if mask.shape[0] == 1 and batch > 1 else mask
    heads = mask.shape[1]
    pre = valid[:, None, None, :].expand(batch, heads, mask.shape[2], plen)
    if mask.dtype == torch.bool:
        return torch.cat([pre, mask], dim=-1)
    zero = torch.zeros((), dtype=mask.dtype, device=mask.device)
    neg = torch.tensor(torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device)
    return torch.cat([torch.where(pre, zero, neg), mask], dim=-1)


def _extend_block_mask(
    block_mask,
    valid: torch.Tensor,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    is_causal: bool | None,
):
    """Flex attention: a ``BlockMask`` over [prefix; keys] from the model's own one (or None).

    Prefix column j is open to row b where ``valid[b, j]``; the other columns keep the model's
    mask function (its causal pattern, padding and offsets), shifted by the prefix length.

    Args:
        block_mask: the ``BlockMask`` transformers built for the real keys, or None.
        valid: (B, P) bool; key: (B, kvh, k, hd) the real keys.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    batch, plen = valid.shape
    q_len, k_len = query.shape[2], key.shape[2]
    if block_mask is not None:
        inner = block_mask.mask_mod
    else:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        shift = k_len - q_len  # bottom-right aligned: the queries are the last q keys

        def inner(b, h, q, kv):
            return (q + shift >= kv) if (causal and q_len > 1) else (kv >= 0)

    open_ = torch.cat([valid, valid.new_ones(batch, k_len)], dim=1)  # (B, P + k)

    def mask_mod(b, h, q, kv):
        is_pre = kv < plen
        real = (kv - plen) * (~is_pre)  # 0 on the prefix columns, where it is not read
        return open_[b, kv] & (is_pre | inner(b, h, q, real))

    return create_block_mask(mask_mod, batch, None, q_len, plen + k_len, device=query.device)


_DECODE_KWARGS = frozenset(
    {
        "dropout",
        "scaling",
        "is_causal",
        "sliding_window",
        "position_ids",
        "use_cache",
        "cache_position",
        "position_bias",
    }
)


def _decode_ok(module, query, key, attention_mask, kwargs) -> bool:
    """Can ``_decode_attention`` stand in for sdpa here? One query per row (a decoding step),
    no autograd, plain scaled softmax attention (no dropout, bias, softcap, window or sinks)."""
    return (
        query.shape[2] == 1
        and not torch.is_grad_enabled()
        and set(kwargs) <= _DECODE_KWARGS
        and not kwargs.get("dropout")
        and kwargs.get("sliding_window") is None
        and getattr(module, "sinks", None) is None
        and query.shape[1] % key.shape[1] == 0
        and (
            attention_mask is None
            or (attention_mask.dim() == 4 and attention_mask.shape[-1] == key.shape[2])
        )
        and _bias_ok(kwargs.get("position_bias"), query, key)
    )


def _bias_ok(bias, query, key) -> bool:
    """T5's relative position bias, if any, is one row of per-head scores over the cache."""
    return bias is None or (
        bias.dim() == 4
        and bias.shape[1:] == (query.shape[1], 1, key.shape[2])
        and bias.shape[0] in (1, query.shape[0])
    )


def _decode_attention(query, key, value, attention_mask, k_p, v_p, valid, scaling, bias=None):
    """One decoding step's attention over [prefix; cache] without joining them: the prefix's
    and the cache's scores are computed apart (query heads grouped by key/value head, as
    transformers' ``pack_gqa``), joined (B, kvh, g, P + T, a few KB), softmaxed in fp32, and
    applied to each part's values. Saves copying every layer's whole cache at every step.

    Args:
        query: (B, H, 1, hd); key, value: (B, kvh, T, hd); attention_mask: None or
            (B|1, 1|H, 1, T) bool (True = attend) or additive float; k_p, v_p: (B, kvh, P, hd);
            valid: (B, P) bool; bias: None or T5's relative position bias over the cache,
            (B|1, H, 1, T) (prefix keys get none).

    Returns:
        (B, 1, H, hd), as the attention functions return it.
    """
    batch, heads, _, hd = query.shape
    kvh, plen = key.shape[1], k_p.shape[2]
    g = heads // kvh
    q = query.reshape(batch, kvh, g, hd)  # (B, kvh, g, hd): head h = kv head h // g, as repeat_kv
    scale = scaling if scaling is not None else hd**-0.5
    s_p = torch.matmul(q, k_p.to(q.dtype).transpose(-1, -2))  # (B, kvh, g, P)
    s_c = torch.matmul(q, key.transpose(-1, -2))  # (B, kvh, g, T)
    scores = torch.cat([s_p, s_c], dim=-1).float() * scale
    neg = torch.finfo(torch.float32).min
    scores[..., :plen].masked_fill_(~valid[:, None, None, :], neg)
    if attention_mask is not None:
        m = attention_mask[..., 0, :]  # (B|1, 1|H, T)
        # (B|1, kvh, g, T) per head, or (B|1, 1, 1, T) shared by the heads
        m = m.reshape(m.shape[0], kvh, g, -1) if m.shape[1] == heads else m[:, :, None, :]
        if m.dtype == torch.bool:
            scores[..., plen:].masked_fill_(~m, neg)
        else:
            scores[..., plen:] += m.float()
    if bias is not None:
        scores[..., plen:] += bias[..., 0, :].reshape(bias.shape[0], kvh, g, -1).float()
    probs = scores.softmax(dim=-1).to(value.dtype)
    out = torch.matmul(probs[..., :plen], v_p.to(value.dtype))
    out = out + torch.matmul(probs[..., plen:], value)  # (B, kvh, g, hd)
    return out.reshape(batch, heads, 1, hd).transpose(1, 2).contiguous()  # (B, 1, H, hd)


MASK_FREE_DEVICES: tuple[str, ...] = ("cuda",)
"""Devices where SDPA runs without an explicit mask when it can (``_sdpa_mask_free``). The point
is kernel choice: on a GPU a mask-free (or ``causal_lower_right``) call can take the flash /
memory-efficient kernels, an explicit mask cannot. On the CPU there is nothing to gain and the
explicit-mask path keeps logits closest to the bare model's and PEFT's (measured on SmolLM2:
1.8e-4 vs 3e-5 max logit difference), so the CPU keeps it; tests add "cpu" to check the path."""


def _mask_free_ok(state, valid: torch.Tensor, kwargs: dict) -> bool:
    """Can the prefix join the keys without an explicit mask? Only where the model gave none
    (no padding: transformers leaves causality to SDPA), every row reads its whole prefix (the
    state knows that on the host: ``is_full``), and no position bias or paged cache is in play."""
    is_full = getattr(state, "is_full", None)
    return (
        is_full is not None
        and kwargs.get("position_bias") is None
        and kwargs.get("cache") is None
        and not kwargs.get("output_attentions")
        and is_full(valid)
    )


def _sdpa_mask_free(module, query, key, value, k_p, v_p, kwargs):
    """SDPA over [prefix; keys] with no materialised mask.

    Causal self-attention with q > 1 queries over P + k keys needs the causal pattern aligned to
    the bottom right (the queries are the last q keys; the prefix is open to all), which is what
    ``torch.nn.attention.bias.causal_lower_right`` says without a tensor: on a GPU SDPA then
    picks its flash or memory-efficient kernel (SDPA's own ``is_causal`` aligns top left, wrong
    here). Non-causal attention (encoders, a single query) needs no mask at all.

    Args:
        query: (B, H, q, hd); key, value: (B, kvh, k, hd); k_p, v_p: (B, kvh, P, hd).

    Returns:
        ((B, q, H, hd), None), as the attention functions return it.
    """
    key = torch.cat([k_p.to(key.dtype), key], dim=2)
    value = torch.cat([v_p.to(value.dtype), value], dim=2)
    is_causal = kwargs.get("is_causal")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, k_len = query.shape[2], key.shape[2]
    if not (causal and q_len > 1):
        kwargs["is_causal"] = False
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    from torch.nn.attention.bias import causal_lower_right
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1) or 1
    if groups > 1:  # the lower-right kernels take as many key heads as query heads
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=causal_lower_right(q_len, k_len),
        dropout_p=kwargs.get("dropout") or 0.0,
        scale=kwargs.get("scaling"),
    )
    return out.transpose(1, 2).contiguous(), None


def _softprompt_attention(base: str) -> Callable:
    def prefixed(state, module, query, key, value, attention_mask, **kwargs):
        """The attention over [key/value prefix; keys] (or plain when the state gives none)."""
        if base == "flex_attention":
            from transformers.integrations.flex_attention import flex_attention_forward as fn
        else:
            fn = sdpa_attention_forward if base == "sdpa" else _eager_for(module)
        if state is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        prefix = state.prefix_for(module, query, key, value)
        if prefix is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        k_p, v_p, valid = prefix  # (B, kvh, P, hd), (B, kvh, P, hd), (B, P)
        if base == "sdpa" and _decode_ok(module, query, key, attention_mask, kwargs):
            out = _decode_attention(
                query,
                key,
                value,
                attention_mask,
                k_p,
                v_p,
                valid,
                kwargs.get("scaling"),
                kwargs.get("position_bias"),
            )
            return out, None
        if (
            base == "sdpa"
            and attention_mask is None
            and query.device.type in MASK_FREE_DEVICES
            and _mask_free_ok(state, valid, kwargs)
        ):
            return _sdpa_mask_free(module, query, key, value, k_p, v_p, kwargs)
        # Every layer of one forward gets the same mask object: extend it once, not per layer.
        is_causal = kwargs.get("is_causal")
        memo_key = (
            attention_mask,
            valid,
            query.shape[2],
            key.shape[2],
            is_causal,
            getattr(module, "is_causal", True),
        )
        # a few entries: encoder-decoder layers alternate self- and cross-attention masks (a
        # state that keeps no memo, ``mask_memo`` None, extends the mask at every call)
        memo = getattr(state, "mask_memo", None)
        memo = [] if memo is None else memo
        hit = next(
            (
                m
                for k, m in memo
                if all(
                    a is b if isinstance(a, torch.Tensor | type(None)) else a == b
                    for a, b in zip(k, memo_key, strict=True)
                )
            ),
            None,
        )
        if hit is not None:
            attention_mask = hit
        else:
            if base == "flex_attention" and not isinstance(attention_mask, torch.Tensor):
                extend = _extend_block_mask  # None or a BlockMask; tensors go through score_mod
            else:
                extend = _extend_mask
            attention_mask = extend(attention_mask, valid, module, query, key, is_causal)
            if base not in ("sdpa", "flex_attention") and attention_mask.dtype == torch.bool:
                # the family's eager function adds the mask to the scores (T5, BART: when the
                # model passed none, the bool mask built here would add 1 and 0, masking
                # nothing): additive in the query's dtype
                neg = torch.finfo(query.dtype).min
                attention_mask = torch.zeros(
                    attention_mask.shape, dtype=query.dtype, device=query.device
                ).masked_fill(~attention_mask, neg)
            memo.append((memo_key, attention_mask))
            del memo[:-4]
        kwargs["is_causal"] = False
        bias = kwargs.get("position_bias")
        if bias is not None:  # T5: relative position bias (B|1, H, q, k); prefix keys get none
            pad = bias.new_zeros(bias.shape[0], bias.shape[1], bias.shape[2], k_p.shape[2])
            kwargs["position_bias"] = torch.cat([pad, bias], dim=-1)
        key = torch.cat([k_p.to(key.dtype), key], dim=2)
        value = torch.cat([v_p.to(value.dtype), value], dim=2)
        return fn(module, query, key, value, attention_mask, **kwargs)

    def attention(module, query, key, value, attention_mask, **kwargs):
        state = kwargs.pop(STATE_KWARG, None) or _GENERATE_STATE.get()
        out = prefixed(state, module, query, key, value, attention_mask, **kwargs)
        # gated adapter tokens (adaption prompts): their own softmax, added to the output
        gated_for = getattr(state, "gated_for", None)
        gated = gated_for(module, query) if gated_for is not None else None
        if gated is None:
            return out
        return (out[0] + gated_attention(query, *gated).to(out[0].dtype), *out[1:])

    return attention


def gated_attention(
    query: torch.Tensor,
    k_a: torch.Tensor,
    v_a: torch.Tensor,
    gate: torch.Tensor,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """LLaMA-Adapter's zero-init attention over adapter tokens, apart from the real keys:
    ``gate * softmax(q k_a^T / sqrt(hd)) v_a`` (Zhang et al. 2023, eq. 8-9), in the numerics of
    PEFT's ``AdaptedAttention`` (scores in the query's dtype, softmax in float32, the gate
    applied to the probabilities). Added to the attention output before ``o_proj``.

    Args:
        query: (B, H, q, hd) as it enters attention (rotary applied).
        k_a, v_a: (B|1, kvh, P, hd) adapter keys/values (the layer's k_proj/v_proj of the
            prompt, no rotary); kv head j serves query heads j*g..j*g+g-1, as ``repeat_kv``.
        gate: (B|1,) per-row gate (0 for rows without an adaption prompt at this layer).
        valid: None, or (B, P) bool: which adapter tokens each row reads (adapters of
            different lengths in one batch).

    Returns:
        (B, q, H, hd), as the attention functions return their output.
    """
    heads, hd = query.shape[1], query.shape[3]
    groups = heads // k_a.shape[1]
    k = k_a.repeat_interleave(groups, dim=1).to(query.dtype)  # (B|1, H, P, hd)
    v = v_a.repeat_interleave(groups, dim=1).to(query.dtype)
    scores = torch.matmul(query, k.transpose(2, 3)) / hd**0.5  # (B, H, q, P)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = gate.to(query.dtype).view(-1, 1, 1, 1) * probs
    return torch.matmul(probs, v).transpose(1, 2)  # (B, q, H, hd)


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    AttentionInterface.register(_WRAPPED["sdpa"], _softprompt_attention("sdpa"))
    AttentionInterface.register(_WRAPPED["eager"], _softprompt_attention("eager"))
    AttentionMaskInterface.register(_WRAPPED["sdpa"], sdpa_mask)
    AttentionMaskInterface.register(_WRAPPED["eager"], eager_mask)
    AttentionInterface.register(_WRAPPED["flex_attention"], _softprompt_attention("flex_attention"))
    AttentionMaskInterface.register(_WRAPPED["flex_attention"], flex_attention_mask)
    _registered = True


def base_attn_implementation(model: PreTrainedModel) -> str:
    impl = model.config._attn_implementation or "eager"
    return _BASE_OF.get(impl, impl)


def set_attn_implementation(model: PreTrainedModel, impl: str) -> None:
    """Switch a (possibly attached) model between 'sdpa' and 'eager', keeping the prefix seam."""
    if impl not in _WRAPPED:
        raise SoftPromptError(
            f"attention implementation {impl!r} is not supported with soft prompts; "
            f"use one of {sorted(_WRAPPED)}"
        )
    _register()
    model.set_attn_implementation(_WRAPPED[impl])


# --------------------------------------------------------------------------------------------
# Slots: which attention modules exist, found by a probe forward.
# --------------------------------------------------------------------------------------------


class _Recorder:
    """A state that records (module, key shape) for each attention call and adds nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[nn.Module, tuple[int, ...]]] = []

    def prefix_for(self, module, query, key, value):
        self.calls.append((module, tuple(key.shape)))
        return None


class _Capture:
    """A state that keeps each slot's real keys and values (row 0) and adds nothing."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def prefix_for(self, module, query, key, value):
        slot = self.info.module_slot[id(module)]
        # (1, kvh, T, hd) -> (T, kvh, hd)
        self.kv[slot] = (key[0].transpose(0, 1).clone(), value[0].transpose(0, 1).clone())
        return None


def capture_attention_kv(
    model: PreTrainedModel, info: ModelInfo, ids: list[int]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The frozen model's keys and values at every slot while it reads ``ids``.

    For encoder-decoder models the text is read by the encoder and by the decoder, so encoder,
    decoder and cross-attention slots all get activations of the same text. Where prefixes
    combine with rotary positions only (``info.shares_prompt``), the text is read at positions
    -P..-1, as if it preceded the input: a prefix initialised this way gives exactly what the
    same text prepended to every row gives, instead of keys rotated for positions 0..P-1 that
    overlap the real tokens'.

    Returns:
        slot index -> (key, value), each (len(ids), kv_heads, head_dim) in float32 on the CPU.
    """
    t = torch.tensor([ids], device=model.device)
    inputs = {"input_ids": t}
    if info.is_encoder_decoder:
        inputs["decoder_input_ids"] = t
    if info.shares_prompt:
        inputs["position_ids"] = torch.arange(-len(ids), 0, device=model.device)[None]
    cap = _Capture(info)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(**inputs, use_cache=False, **{STATE_KWARG: cap})
    model.train(was_training)
    return {s: (k.float().cpu(), v.float().cpu()) for s, (k, v) in cap.kv.items()}


_CROSS = re.compile(r"(encdec|encoder_attn|cross)", re.IGNORECASE)


def _slot_kind(path: str, is_encoder_decoder: bool) -> str:
    if _CROSS.search(path):
        return "cross"
    if not is_encoder_decoder:
        return "self"
    parts = path.split(".")
    return "encoder" if "encoder" in parts else "decoder"


def _layer_index(path: str) -> int:
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    raise SoftPromptError(f"cannot tell the layer index of attention module {path!r}")


def probe_inputs(model: PreTrainedModel) -> dict:
    ids = torch.tensor([[1, 2]], device=model.device)
    inputs = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids[:, :1]
    return inputs


def inspect_model(model: PreTrainedModel) -> ModelInfo:
    """Attach the seam to a model and map its attention modules to slots.

    Raises:
        SoftPromptError: if the model's attention does not go through transformers' registry.
    """
    impl = base_attn_implementation(model)
    if impl not in _WRAPPED:
        warnings.warn(
            f"softprompt: attention implementation {impl!r} cannot take per-row key/value "
            f"prefixes; {type(model).__name__} now runs 'sdpa' (others: {sorted(_WRAPPED)})",
            stacklevel=3,
        )
        impl = "sdpa"
    set_attn_implementation(model, impl)
    recorder = _Recorder()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(**probe_inputs(model), use_cache=False, **{STATE_KWARG: recorder})
    model.train(was_training)
    if not recorder.calls:
        raise SoftPromptError(
            f"{type(model).__name__} does not route attention through transformers' attention "
            "registry, so soft prompts cannot be injected; supported families include gpt2, "
            "llama, qwen2/3, mistral, t5, bart and bert"
        )
    names = {id(m): p for p, m in model.named_modules()}
    found: dict[int, Slot] = {}
    for module, shape in recorder.calls:
        path = names[id(module)]
        found[id(module)] = Slot(
            kind=_slot_kind(path, model.config.is_encoder_decoder),
            layer=_layer_index(path),
            kv_heads=shape[1],
            head_dim=shape[3],
        )
    order = sorted(set(found.values()), key=lambda s: (SLOT_KINDS.index(s.kind), s.layer))
    index = {s: i for i, s in enumerate(order)}
    emb = model.get_input_embeddings()
    return ModelInfo(
        slots=order,
        module_slot={mid: index[s] for mid, s in found.items()},
        hidden_size=emb.weight.shape[1],
        is_encoder_decoder=bool(model.config.is_encoder_decoder),
        is_causal_lm=not model.config.is_encoder_decoder and lm_body_and_head(model) is not None,
        identity=model_identity(model, order),
        shares_prompt=shares_prepended_prompt(model),
    )


# --------------------------------------------------------------------------------------------
# Adaption prompts: gated adapter tokens projected by a layer's own k_proj / v_proj.
# --------------------------------------------------------------------------------------------

_SLOT_MODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ADAPTION_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> slots


def slot_modules(model: PreTrainedModel, info: ModelInfo) -> dict[int, nn.Module]:
    """slot index -> its attention module (found once per model, checked against ``info``)."""
    found = _SLOT_MODULES.get(model)
    if found is None or {id(m) for m in found.values()} != set(info.module_slot):
        found = {info.module_slot[id(m)]: m for m in model.modules() if id(m) in info.module_slot}
        _SLOT_MODULES[model] = found
    return found


def check_adaption(model: PreTrainedModel, info: ModelInfo, slots: list[int]) -> None:
    """Refuse a model whose attention at ``slots`` an adaption prompt cannot serve.

    Served: decoder-only self-attention with separate ``k_proj`` / ``v_proj`` linear layers and
    nothing between them and attention but rotary (Llama, Mistral, Qwen2, SmolLM, ...): the
    adapter keys are then exactly what the layer's keys would be for the prompt, less rotary.

    Raises:
        SoftPromptError: encoder or encoder-decoder models, fused projections (GPT-2's
            ``c_attn``), per-head query/key norms (Qwen3, OLMo2, Gemma3).
    """
    name = type(model).__name__
    if info.is_encoder_decoder or not info.is_causal_lm:
        raise SoftPromptError(
            f"adaption prompts (LLaMA-Adapter) are for decoder-only causal LMs; {name} is not "
            "one: use prefix or deep prompts (--method prefix / deep)"
        )
    modules = slot_modules(model, info)
    for s in slots:
        m = modules[s]
        where = f"{name} layer {info.slots[s].layer} ({type(m).__name__})"
        if not all(isinstance(getattr(m, p, None), nn.Linear) for p in ("k_proj", "v_proj")):
            raise SoftPromptError(
                f"adaption prompts need separate k_proj and v_proj linear layers on the attention "
                f"module; {where} has none (fused projections such as GPT-2's c_attn are not "
                "supported): use --method prefix or deep"
            )
        norms = [p for p in ("q_norm", "k_norm", "q_layernorm", "k_layernorm") if hasattr(m, p)]
        if norms:
            raise SoftPromptError(
                f"{where} normalises queries/keys per head ({', '.join(norms)}); adaption prompts "
                "project the prompt with k_proj alone (as PEFT, which supports llama and "
                "mistral), so their keys would not match the queries' scale: use --method "
                "prefix or deep"
            )


def biased_output_layers(model: PreTrainedModel, info: ModelInfo, slots: list[int]) -> list[int]:
    """Layers among ``slots`` whose attention output projection (``o_proj``) has a bias: there
    PEFT's adaption prompt (``o_proj(attn) + o_proj(adapter)``) adds the bias twice, so it is
    not the seam's ``o_proj(attn + adapter)``."""
    modules = slot_modules(model, info)
    return [
        info.slots[s].layer
        for s in slots
        if getattr(getattr(modules[s], "o_proj", None), "bias", None) is not None
    ]


def adaption_kv(
    model: PreTrainedModel, info: ModelInfo, prompts: dict[int, tuple[torch.Tensor, torch.Tensor]]
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Adapter keys and values: each slot's frozen ``k_proj`` / ``v_proj`` of its prompt (no
    rotary: adapter tokens have no position), differentiable with respect to the prompt.

    Args:
        prompts: slot -> ((P, d) prompt, (1,) gate).

    Returns:
        slot -> ((P, kvh, hd) keys, (P, kvh, hd) values, (1,) gate).
    """
    checked = _ADAPTION_CHECKED.setdefault(model, set())
    if not checked >= prompts.keys():  # an adapter loaded from a file was not checked at init
        check_adaption(model, info, sorted(prompts))
        checked.update(prompts)
    modules = slot_modules(model, info)
    out = {}
    for s, (prompt, gate) in prompts.items():
        m, g = modules[s], info.slots[s]
        x = prompt.to(m.k_proj.weight.dtype)  # (P, d)
        n = x.shape[0]
        k = m.k_proj(x).view(n, g.kv_heads, g.head_dim)  # (P, kvh, hd)
        v = m.v_proj(x).view(n, g.kv_heads, g.head_dim)
        out[s] = (k, v, gate)
    return out


# --------------------------------------------------------------------------------------------
# Prepended virtual tokens as a shared key/value prefix.
# --------------------------------------------------------------------------------------------

_RELATIVE_ROPE = {"default", "linear", "llama3", "yarn"}


def _rope_types(cfg) -> list[str]:
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(rp, dict):
        return ["unknown"]
    groups = list(rp.values()) if rp and all(isinstance(v, dict) for v in rp.values()) else [rp]
    return [g.get("rope_type", g.get("type", "default")) for g in groups]


def shares_prepended_prompt(model: PreTrainedModel) -> bool:
    """Whether prepended virtual tokens can run once per adapter instead of once per row.

    In a causal LM, virtual tokens placed before a row's first real token never see the row: their
    keys and values at every layer are the same for all rows. When the model encodes positions
    only through rotary embeddings that depend on relative positions (no learned absolute table,
    no sliding window, no length-dependent rope scaling), running them once at positions -P..-1
    and handing their keys/values to every row as a layer prefix, with the real tokens at
    0..T-1, gives the same attention scores as splicing them into each row at 0..P-1 with the real
    tokens at P..P+T-1: the transformer then processes B*T + P positions instead of B*(T+P),
    and the KV cache holds only real tokens.
    """
    cfg = model.config
    parts = lm_body_and_head(model)
    if cfg.is_encoder_decoder or parts is None:
        return False
    body = parts[0]
    if not isinstance(getattr(body, "rotary_emb", None), nn.Module):
        return False
    for name, _ in body.named_modules():
        if name.split(".")[-1] in ("embed_positions", "wpe", "position_embeddings"):
            return False
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True):
        return False
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        return False
    return all(t in _RELATIVE_ROPE for t in _rope_types(cfg))


def position_encoding(model: PreTrainedModel) -> str:
    """How a decoder-only LM encodes positions, for moving a key/value prefix between libraries
    that give the real tokens different positions (``softprompt.peft_compat``):

    * ``"rotary"``: only through relative rotary embeddings (``shares_prepended_prompt``), so a
      position shift of the real tokens equals a rotation of the prefix keys (``rotate_keys``);
    * ``"absolute"``: a learned position table read with the ``position_ids`` the forward takes;
    * ``"other"``: anything else (encoder-decoder, ALiBi, relative bias, ...).
    """
    if shares_prepended_prompt(model):
        return "rotary"
    parts = lm_body_and_head(model)
    if parts is None or "position_ids" not in inspect.signature(model.forward).parameters:
        return "other"
    names = {name.split(".")[-1] for name, _ in parts[0].named_modules()}
    if names & {"wpe", "embed_positions", "position_embeddings"} and not isinstance(
        getattr(parts[0], "rotary_emb", None), nn.Module
    ):
        return "absolute"
    return "other"


@torch.no_grad()
def rotate_keys(model: PreTrainedModel, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Rotate keys by ``shift`` positions with the model's own rotary embedding: with q_p the
    query at position p, ``q_{p+s} . rotate_keys(k, s) == q_p . k`` (rotary scores depend on
    relative positions only). The rotation is pure: the rotary module's ``attention_scaling``
    (YaRN) is divided out, since it scales queries and keys at every position alike. With
    partial rotary (Phi, Persimmon, GPT-NeoX: the rotary embedding covers the first
    ``rotary_ndims < head_dim`` dims) only those dims rotate; the rest pass through, as in the
    models' own attention.

    Args:
        keys: (P, kv_heads, head_dim) keys as they enter attention (after rotary of their own).
        shift: positions to rotate by.

    Returns:
        (P, kv_heads, head_dim), in the dtype of ``keys``.
    """
    if position_encoding(model) != "rotary":
        raise SoftPromptError(f"{type(model).__name__} has no relative rotary position embedding")
    body = lm_body_and_head(model)[0]
    rotary = body.rotary_emb
    apply = getattr(sys.modules[type(rotary).__module__], "apply_rotary_pos_emb", None)
    if apply is None:
        raise SoftPromptError(f"{type(rotary).__module__} has no apply_rotary_pos_emb")
    n = keys.shape[0]
    k = keys.permute(1, 0, 2)[None].double()  # (1, kvh, P, hd)
    pos = torch.full((1, n), shift, device=keys.device)
    cos, sin = rotary(k, pos)  # (1, P, rd) each, rd <= hd rotary dims
    scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    cos, sin = cos.double() / scale, sin.double() / scale
    rot, rest = k[..., : cos.shape[-1]], k[..., cos.shape[-1] :]  # (1, kvh, P, rd), the rest
    _, rot = apply(rot, rot, cos, sin)  # (1, kvh, P, rd)
    out = torch.cat([rot, rest], dim=-1)  # (1, kvh, P, hd)
    return out[0].permute(1, 0, 2).to(keys.dtype).contiguous()  # (P, kvh, hd)


class _CaptureRows:
    """A state that keeps every slot's keys and values for all rows (with autograd) and adds
    nothing."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def prefix_for(self, module, query, key, value):
        # (n, kvh, P, hd) -> (n, P, kvh, hd)
        self.kv[self.info.module_slot[id(module)]] = (key.transpose(1, 2), value.transpose(1, 2))
        return None


def prompt_kv(
    model: PreTrainedModel, info: ModelInfo, embeds: torch.Tensor
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of virtual tokens read alone at positions -P..-1 (see
    ``shares_prepended_prompt``); differentiable with respect to ``embeds``.

    Args:
        embeds: (n, P, d) the virtual-token embeddings of n adapters.

    Returns:
        slot index -> (key, value), each (n, P, kv_heads, head_dim).
    """
    n, plen = embeds.shape[:2]
    embeds = embeds.to(model.get_input_embeddings().weight.dtype)  # fp32 prompt, fp16/bf16 model
    body = lm_body_and_head(model)[0]
    pos = torch.arange(-plen, 0, device=embeds.device).expand(n, -1)
    cap = _CaptureRows(info)
    body(inputs_embeds=embeds, position_ids=pos, use_cache=False, **{STATE_KWARG: cap})
    return cap.kv


# --------------------------------------------------------------------------------------------
# Identity of a base model.
# --------------------------------------------------------------------------------------------


def embedding_sample(weight: torch.Tensor) -> list[float]:
    """64 values of the input-embedding table (8 spread rows x first 8 dims), for identity checks.

    Compared with a tolerance, so the same checkpoint in fp32, fp16 or bf16 still matches.
    """
    w = weight.detach().float().cpu()
    rows = torch.linspace(0, w.shape[0] - 1, steps=8).long()
    return [round(float(x), 5) for x in w[rows, :8].flatten()]


def model_identity(model: PreTrainedModel, slots: list[Slot]) -> dict:
    """What an adapter records about its base model, and checks when loaded."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    return {
        "name_or_path": getattr(cfg, "_name_or_path", "") or "",
        "architecture": (cfg.architectures or [type(model).__name__])[0]
        if getattr(cfg, "architectures", None)
        else type(model).__name__,
        "model_type": cfg.model_type,
        "vocab_size": int(emb.shape[0]),
        "hidden_size": int(emb.shape[1]),
        "slots": sorted({f"{s.kind}:{sum(t.kind == s.kind for t in slots)}" for s in slots}),
        "kv_dims": sorted({s.kv_dim for s in slots}),
        "embedding_sample": embedding_sample(emb),
    }


# config attributes that hold a model's context length (positions it can read), by family:
# most (Llama, Qwen, BERT, BART, ...), GPT-2 / GPT-J, BLOOM-style, ChatGLM-style
_CONTEXT_ATTRS = (
    "max_position_embeddings",
    "n_positions",
    "n_ctx",
    "max_sequence_length",
    "seq_length",
)
# the bound when a config names no context (relative positions, as in T5): far above any prompt
UNKNOWN_CONTEXT = 65_536


def context_length(model: PreTrainedModel) -> int | None:
    """How many positions ``model`` can read (its config's context length), or None when the
    config names none (T5's relative positions have no hard limit)."""
    cfg = model.config
    for sub in (cfg, getattr(cfg, "text_config", None)):
        for attr in _CONTEXT_ATTRS:
            value = getattr(sub, attr, None) if sub is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_virtual_tokens(model: PreTrainedModel, n: int, what: str = "num_virtual_tokens") -> None:
    """Refuse a prompt of ``n`` virtual tokens that cannot fit ``model``'s context (checked
    before anything of that size is allocated).

    Raises:
        SoftPromptError: ``n`` >= the context length (no room left for a real token), or, for a
            model whose config names no context length, ``n`` > ``UNKNOWN_CONTEXT``.
    """
    ctx = context_length(model)
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    if ctx is not None and n >= ctx:
        raise SoftPromptError(
            f"{what}={n:,} does not fit the context of {name} ({ctx:,} positions, "
            "virtual tokens included); use fewer virtual tokens (typically 10-100)"
        )
    if ctx is None and n > UNKNOWN_CONTEXT:
        raise SoftPromptError(
            f"{what}={n:,} is more than {UNKNOWN_CONTEXT:,} virtual tokens ({name} names no "
            "context length); use fewer virtual tokens (typically 10-100)"
        )


def identity_mismatches(expected: dict, actual: dict) -> list[str]:
    """Human-readable differences between two identities (empty when compatible)."""
    out = []
    for field in ("model_type", "vocab_size", "hidden_size", "slots", "kv_dims"):
        if expected.get(field) != actual.get(field):
            out.append(
                f"{field}: adapter has {expected.get(field)!r}, model has {actual.get(field)!r}"
            )
    a, b = expected.get("embedding_sample"), actual.get("embedding_sample")
    if not out and a and b:
        ta, tb = torch.tensor(a), torch.tensor(b)
        if ta.shape != tb.shape or (ta - tb).abs().max() > 0.01 * tb.abs().max() + 1e-3:
            out.append(
                "embedding weights differ: same architecture and sizes, but a different "
                "checkpoint (or a fine-tuned copy) of it"
            )
    return out


def lm_body_and_head(model: PreTrainedModel) -> tuple[nn.Module, nn.Module] | None:
    """(decoder body, LM head) of a decoder-only causal LM, or None for other kinds.

    Lets the trainer run the LM head only on supervised positions.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, model.base_model_prefix, None)
    if head is None or body is None or model.config.is_encoder_decoder:
        return None
    return body, head


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Gradient checkpointing on a frozen model whose modules stay in eval mode.

    transformers checkpoints a layer only when the layer module is in training mode; we flip just
    the layer modules' own flag (their children, where dropout lives, stay in eval) and zero the
    few dropout rates a layer applies itself (BART's layers do).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer):
            m.training = True
            for attr in ("dropout", "activation_dropout"):
                if isinstance(getattr(m, attr, None), float):
                    setattr(m, attr, 0.0)


class _StopForward(Exception):
    pass


class _FirstKeys:
    """A state that keeps the keys of one slot, then aborts the forward (nothing else is needed)."""

    def __init__(self, info: ModelInfo, slot: int) -> None:
        self.info, self.slot, self.keys = info, slot, None

    def prefix_for(self, module, query, key, value):
        if self.info.module_slot[id(module)] == self.slot:
            self.keys = key[:, :, -1].reshape(key.shape[0], -1)  # (B, kvh * hd) of the last token
            raise _StopForward
        return None


@torch.no_grad()
def token_keys(
    model: PreTrainedModel, info: ModelInfo, ids: torch.Tensor, slot: int = 0, chunk: int = 4096
) -> torch.Tensor:
    """Keys that ``slot`` computes for each token id read alone (position 0).

    Used to read a key/value prefix in vocabulary terms: the tokens whose keys are nearest to a
    prefix entry. Only the layers up to ``slot`` run.  Returns (N, kv_heads * head_dim).
    """
    out = []
    for i in range(0, len(ids), chunk):
        part = ids[i : i + chunk, None].to(model.device)  # (n, 1)
        inputs = {"input_ids": part}
        if info.is_encoder_decoder:
            inputs["decoder_input_ids"] = part
        st = _FirstKeys(info, slot)
        try:
            model(**inputs, use_cache=False, **{STATE_KWARG: st})
        except _StopForward:
            pass
        if st.keys is None:
            raise SoftPromptError(f"slot {slot} was not reached")
        out.append(st.keys.float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Running a decoder-only LM from a middle layer (caching frozen lower layers).
# --------------------------------------------------------------------------------------------


class _PassThrough(nn.Module):
    """Stands in for a frozen lower layer whose output is already known."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList | None:
    """The decoder blocks of a decoder-only LM (``body.layers``), or None."""
    parts = lm_body_and_head(model)
    layers = getattr(parts[0], "layers", None) if parts else None
    return layers if isinstance(layers, nn.ModuleList) else None


@contextlib.contextmanager
def layer_inputs(model: PreTrainedModel, layer: int) -> Iterator[list[torch.Tensor]]:
    """Record (detached) the hidden states that enter decoder block ``layer`` during the
    forwards run inside the block; yields the list they are appended to."""
    got: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        got.append((args[0] if args else kwargs["hidden_states"]).detach())

    handle = decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield got
    finally:
        handle.remove()


@contextlib.contextmanager
def start_at_layer(model: PreTrainedModel, layer: int) -> Iterator[None]:
    """Run the decoder from block ``layer`` on: blocks 0..layer-1 pass their input through, so
    ``inputs_embeds`` given to the forwards inside must be what enters block ``layer``. The
    model object is changed while the block runs: do not share it with another thread."""
    layers = decoder_layers(model)
    saved = [layers[i] for i in range(layer)]
    for i in range(layer):
        layers[i] = _PassThrough()
    try:
        yield
    finally:
        for i, m in enumerate(saved):
            layers[i] = m


@torch.no_grad()
def can_start_at_layer(model: PreTrainedModel) -> bool:
    """Whether ``start_at_layer`` reproduces a full forward on this model: checked by a probe,
    since some bodies change ``inputs_embeds`` before the first block (scaling, position
    tables)."""
    layers = decoder_layers(model)
    if layers is None or len(layers) < 2:
        return False
    body = lm_body_and_head(model)[0]
    ids = torch.tensor([[3, 4, 5, 6]], device=model.device)
    was_training = model.training
    model.eval()
    try:
        with layer_inputs(model, 1) as got:
            ref = body(input_ids=ids, use_cache=False).last_hidden_state
        with start_at_layer(model, 1):
            out = body(inputs_embeds=got[0], use_cache=False).last_hidden_state
    finally:
        model.train(was_training)
    return bool(torch.allclose(out.float(), ref.float(), atol=1e-4, rtol=1e-4))


def loss_type(model: PreTrainedModel) -> str | None:
    """The name (in transformers' ``LOSS_MAPPING``) of the loss ``model``'s forward computes.

    ``model.loss_type`` comes from the class name and is None where the name has no loss in it
    (``GPT2LMHeadModel``), although the forward then uses the causal LM loss; ``Trainer`` reads
    it to count a causal LM's labels shifted when it averages the loss over tokens.
    """
    from transformers.loss.loss_utils import LOSS_MAPPING

    given = getattr(model, "loss_type", None)
    fn = getattr(model, "loss_function", None)
    if fn is None or LOSS_MAPPING.get(given) is fn:
        return given
    return next((name for name, f in LOSS_MAPPING.items() if f is fn), given)


# ------------------------------------------------------------------ KV cache rows (per-step batching)
def new_cache(model: PreTrainedModel):
    """An empty KV cache of the kind ``generate`` makes for ``model``."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def steppable_cache(model: PreTrainedModel) -> str | None:
    """Why ``model``'s cache cannot be regrouped row by row (None: it can): every layer must be
    a plain ``DynamicLayer`` ((B, kvh, T, hd) keys and values, nothing else)."""
    from transformers.cache_utils import DynamicLayer

    kinds = {type(layer).__name__ for layer in new_cache(model).layers}
    if kinds != {DynamicLayer.__name__}:
        return (
            f"{type(model).__name__}'s cache has {sorted(kinds)} layers; per-step batching "
            "regroups only plain DynamicLayer caches"
        )
    return None


def cache_select(cache, idx: torch.Tensor) -> None:
    """Keep only the rows ``idx`` (B',) of ``cache``, in place."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[idx], layer.values[idx]


def cache_drop_left(cache, n: int) -> None:
    """Drop the first ``n`` columns (positions no row attends to) of ``cache``, in place."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, n:], layer.values[:, :, n:]


def cache_concat(a, mask_a: torch.Tensor, b, mask_b: torch.Tensor):
    """Rows of cache ``b`` appended to cache ``a``, the shorter left-padded (zeros, masked).

    Args:
        mask_a, mask_b: (B_a, T_a) and (B_b, T_b) which cache columns each row attends to.

    Returns:
        (cache, mask): ``a`` extended in place and the (B_a + B_b, max(T_a, T_b)) mask.
    """
    width = max(mask_a.shape[1], mask_b.shape[1])

    def left(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - t.shape[dim]
        if not missing:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    for la, lb in zip(a.layers, b.layers, strict=True):
        la.keys = torch.cat([left(la.keys, 2), left(lb.keys, 2)])
        la.values = torch.cat([left(la.values, 2), left(lb.values, 2)])
    return a, torch.cat([left(mask_a, 1), left(mask_b, 1)])


# --------------------------------------------------------------------------------------------
# torch.compile of the frozen decoder blocks (``SoftPromptModel.compile_body``).
# --------------------------------------------------------------------------------------------

_COMPILED_CALLS: contextvars.ContextVar = contextvars.ContextVar(
    "softprompt_compiled_calls", default=False
)


@contextlib.contextmanager
def compiled_calls() -> Iterator[None]:
    """Let the compiled decoder blocks run inside the block (elsewhere they run eagerly: the
    model only enters it for forwards whose lengths it has bucketed, so that a decoding loop,
    whose cache grows by one at every step, never recompiles)."""
    token = _COMPILED_CALLS.set(True)
    try:
        yield
    finally:
        _COMPILED_CALLS.reset(token)


RECOMPILE_LIMIT = 32
"""The least ``torch._dynamo.config.recompile_limit`` while decoder blocks are compiled."""


class _LayerPrefix:
    """One block's key/value prefix, looked up before its compiled forward: inside the compiled
    region the attention seam then reads tensors only (``PrefixState.prefix_for`` keys its
    lookups by module ids and batch sizes, which the compiler would guard on, once per block)."""

    mask_memo = None  # each call extends its own mask (inside the compiled graph)

    def __init__(self, prefix, full: bool) -> None:
        self.prefix, self.full = prefix, full

    def prefix_for(self, module, query, key, value):
        return self.prefix

    def is_full(self, valid: torch.Tensor) -> bool:
        return self.full


def compile_decoder_layers(model: PreTrainedModel, info: ModelInfo, **options) -> int:
    """``torch.compile`` each decoder block's forward (one compiled function per block class,
    shared by the blocks: their weights are graph inputs, not constants). The adapter is not
    compiled: its prefix reaches the blocks as tensors, its prompt through ``inputs_embeds``.

    A compiled block runs only inside ``compiled_calls``; there it takes the block's prefix from
    the forward's state (``prefix_for_batch``), or runs eagerly for a state that has none and
    under gradient checkpointing. ``options`` go to ``torch.compile``. Returns the number of
    blocks. ``uncompile_decoder_layers`` undoes it.

    A block's graphs differ by grad mode, whether its input needs a gradient (not the first
    block's), whether the model gave a mask (no padding: none) and static / dynamic shapes: up to
    12 kinds, more than torch's default of 8 per function (beyond which it runs eagerly), so
    ``torch._dynamo.config.recompile_limit`` is raised to at least ``RECOMPILE_LIMIT``.
    """
    layers = decoder_layers(model)
    if layers is None or info.is_encoder_decoder:
        raise SoftPromptError(
            f"compile: {type(model).__name__} is not a decoder-only language model with a "
            "list of decoder blocks (body.layers); run it without --compile"
        )
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    fns: dict[type, Callable] = {}
    for i, layer in enumerate(layers):
        attn = [m for m in layer.modules() if id(m) in info.module_slot]
        if len(attn) != 1:
            raise SoftPromptError(
                f"compile: decoder block {i} has {len(attn)} attention modules, not one; run "
                "it without --compile"
            )
        cls = type(layer)
        if cls not in fns:  # the block's own forward, not transformers' checkpointing wrapper
            fns[cls] = torch.compile(getattr(cls.forward, "__wrapped__", cls.forward), **options)
        layer.__dict__.pop("forward", None)
        layer.forward = _compiled_forward(layer, attn[0], fns[cls], layer.forward)
    return len(layers)


def uncompile_decoder_layers(model: PreTrainedModel) -> None:
    for layer in decoder_layers(model) or ():
        layer.__dict__.pop("forward", None)


def _compiled_forward(layer: nn.Module, attn: nn.Module, fn: Callable, eager: Callable):
    def forward(hidden_states, *args, **kwargs):
        if not _COMPILED_CALLS.get() or (layer.gradient_checkpointing and layer.training):
            return eager(hidden_states, *args, **kwargs)
        state = kwargs.get(STATE_KWARG) or _GENERATE_STATE.get()
        prefix, full = None, False
        if state is not None:
            lookup = getattr(state, "prefix_for_batch", None)
            if lookup is None:  # another provider (a probe): the eager block asks it per call
                return eager(hidden_states, *args, **kwargs)
            if getattr(state, "gated", None):  # adaption prompts: added per call (gated_for)
                return eager(hidden_states, *args, **kwargs)
            prefix = lookup(attn, hidden_states.shape[0], hidden_states.device)
            full = prefix is not None and bool(state.is_full(prefix[2]))
        kwargs[STATE_KWARG] = _LayerPrefix(prefix, full)
        return fn(layer, hidden_states, *args, **kwargs)

    forward.softprompt_compiled = True
    return forward
