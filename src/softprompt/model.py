"""The wrapper: one frozen base model, a bank of soft-prompt adapters, one adapter per row.

``SoftPromptModel`` is called and generates like the base model. Per row it

* splices input-level virtual tokens (prompt tuning, P-tuning) into ``inputs_embeds`` right
  before the first real token (after any left padding), or after the last one, or where template
  markers (negative ids ``-1 .. -P``) put them, and strips them from the outputs again, so
  logits and hidden states have the base model's shapes;
* hands per-layer key/value prefixes (prefix tuning, deep prompts) to the attention seam in
  ``softprompt._hf`` through the ``softprompt_state`` keyword.

On causal LMs with rotary positions (``_hf.shares_prepended_prompt``), prepended virtual tokens
instead run once per adapter, at positions -P..-1, and reach every row as a key/value prefix: the
same attention scores as the splice, without P extra positions per row in the forward, the
backward or the KV cache.

Position ids: when the caller gives none, real and virtual tokens get ``cumsum(mask) - 1`` (as
``generate`` does), so left padding never shifts a row's positions; caller-given position ids are
kept, shifted past inserted virtual tokens. Rows whose adapter has a ``position_offset`` (imported
from a library that numbers the real tokens after the prefix) get their positions shifted by it.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from . import _hf
from ._hf import STATE_KWARG, ModelInfo
from .bank import AdapterBank, is_adapter_key, load_into  # noqa: F401  (is_adapter_key: re-exported)
from .errors import SoftPromptError
from .hf_compat import ModelCompat
from .layer_cache import LayerCache
from .methods.base import AdapterConfig
from .prefix_state import PrefixState
from .sharing import KeptTables, PromptSharing
from .splice import (
    embed_ids,
    mask_positions,
    offset_positions,
    splice_inputs,
    strip_outputs,
    widen_cached_mask,
)


def _refuse_packed(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None, names: list[str]
) -> None:
    """Refuse packed rows (``position_ids`` that restart inside a row between real tokens, as
    TRL's ``packing`` / ``padding_free`` make) for adapters whose virtual tokens go at the input:
    they would go once, before the row's first sequence, and the others would never see them
    (one host sync, only where a caller gives positions to such an adapter)."""
    if position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return
    back = position_ids[:, 1:] <= position_ids[:, :-1]  # (B, T-1): a position restarts
    if attention_mask is not None and attention_mask.dim() == 2:
        real = attention_mask.bool()
        back = back & real[:, 1:] & real[:, :-1]  # left padding's filler positions aside
    if bool(back.any()):
        raise SoftPromptError(
            f"packed sequences (position_ids restart inside a row, as TRL's packing=True or "
            f"padding_free=True make them): adapters {sorted(names)} put their "
            "virtual tokens once at the start of a row, so only its first sequence would see "
            "them. Train without packing: SFTConfig(packing=False, padding_free=False)"
        )


class SoftPromptModel(ModelCompat, AdapterBank, PromptSharing, nn.Module):
    """A frozen Hugging Face model plus named soft-prompt adapters.

    Use ``softprompt.attach`` to make one. Called and generating like the base model, with an
    extra ``adapter_names`` argument: one adapter name (or None for the bare model) per row.
    """

    def __init__(self, base_model: PreTrainedModel, info: ModelInfo, tokenizer=None) -> None:
        super().__init__()
        self.base_model = base_model
        self.info = info
        self.tokenizer = tokenizer
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self._checkpointing = False
        self._layer_cache: LayerCache | None = None
        self.prompt_sharing = "auto"
        self._kept = KeptTables()  # shared prompts and prefix tables kept between no-grad calls
        # where virtual tokens were spliced into a returned KV cache (continuing generation)
        self._cache_layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        params = inspect.signature(base_model.forward).parameters
        self._takes_position_ids = "position_ids" in params and not info.is_encoder_decoder
        self._takes_logits_to_keep = "logits_to_keep" in params
        self._bucket: int | str | None = None  # compile_body's bucket (see _bucket_length)
        self._compiled = False

    def train(self, mode: bool = True) -> SoftPromptModel:
        """Train/eval mode for the adapters only: the frozen base model stays in eval mode
        (its dropout off), as in Li & Liang's setup."""
        self.training = mode
        self.adapters.train(mode)
        self.base_model.eval()
        if self._checkpointing:
            _hf.enable_gradient_checkpointing(self.base_model)
        return self

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **_):
        """Recompute the frozen model's activations in backward instead of storing them.

        Takes the arguments ``transformers.Trainer`` passes; checkpointing stays non-reentrant
        (a reentrant checkpoint would cut the prefixes' gradients).
        """
        if (gradient_checkpointing_kwargs or {}).get("use_reentrant"):
            raise SoftPromptError(
                "use_reentrant=True checkpointing would cut the adapter's gradients (its prefixes "
                "enter inside attention, not as layer inputs); leave use_reentrant unset or False"
            )
        self._checkpointing = True
        _hf.enable_gradient_checkpointing(self.base_model)

    def cache_lower_layers(self, max_bytes: int = 1 << 30) -> LayerCache | None:
        """While training, keep what enters the lowest block the active adapter prompts and skip
        the frozen blocks below it once a sequence has been seen (``softprompt.layer_cache``).

        Returns the (new, empty) cache, or None where it does not apply: the active adapter
        changes block 0 (input-level virtual tokens, prefixes on every layer), or the model is
        not a decoder-only LM whose forward can start at a middle block. Only training-mode
        calls with ``use_cache=False`` and no caller ``position_ids`` use it; ``None`` turns it
        off (``max_bytes=0``).
        """
        self._layer_cache = None
        if not max_bytes or self.active is None:
            return None
        first = self.adapters[self.active].first_layer
        if first == 0 or not _hf.can_start_at_layer(self.base_model):
            return None
        self._layer_cache = LayerCache(first, max_bytes)
        return self._layer_cache

    def _layer_cache_for(self, rows, input_ids, caller_positions, kwargs) -> LayerCache | None:
        lc = self._layer_cache
        if lc is None or not self.training or input_ids is None or caller_positions:
            return None
        if kwargs.get("use_cache") is not False or kwargs.get("token_type_ids") is not None:
            return None
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            return None
        if any(self.adapters[n].first_layer < lc.layer for n in set(rows) - {None}):
            return None
        return lc

    def compile_body(self, bucket: int | str | None = None, **options) -> SoftPromptModel:
        """``torch.compile`` the frozen decoder blocks (not the adapter) for the forwards that
        train and score (``--compile``); ``generate`` and forwards with a KV cache run them
        eagerly (the cache grows every step: a recompile per step).

        Args:
            bucket: left-pad every row to a bucketed length first: ``"pow2"`` (the next power
                of two, at least 16), an integer (the next multiple of it), or None (no
                padding). Left padding changes no row's outputs (positions follow the mask).
                With torch's default ``dynamic=None`` the second shape a block sees makes its
                graph dynamic, so the graphs stay few without buckets (measured on tiny models:
                6 on Llama, 9 on Qwen3 over 16 batches of 3 batch sizes and lengths 3-120,
                trained and scored, none added after the 8th batch, buckets or not); buckets
                are for ``dynamic=False`` (static graphs, e.g. CUDA graphs), which compiles
                once per (batch size, bucket, kind of call).
            options: passed to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...).

        Decoder-only language models only.
        """
        if not (bucket is None or bucket == "pow2" or (isinstance(bucket, int) and bucket > 0)):
            raise SoftPromptError(f"bucket must be 'pow2', an integer >= 1 or None, got {bucket!r}")
        _hf.uncompile_decoder_layers(self.base_model)
        _hf.compile_decoder_layers(self.base_model, self.info, **options)
        self._bucket, self._compiled = bucket, True
        return self

    def _bucket_length(self, length: int) -> int:
        if self._bucket is None:
            return length
        if self._bucket == "pow2":
            return max(16, 1 << max(0, length - 1).bit_length())
        return -(-length // self._bucket) * self._bucket

    def _bucketed_forward(self, input_ids, attention_mask, labels, kwargs) -> ModelOutput | None:
        """A forward with its rows left-padded to a bucketed length inside
        ``_hf.compiled_calls``, its sequence outputs cut back to the caller's length; None where
        it does not apply (a cache, caller positions or embeddings, outputs per layer)."""
        if (
            input_ids is None
            or input_ids.dim() != 2
            or kwargs.get("past_key_values") is not None
            or kwargs.get("use_cache")
            or kwargs.get("output_attentions")
            or kwargs.get("output_hidden_states")
            or set(kwargs) - {"adapter_names", "body_only", "use_cache", "return_dict"}
        ):
            return None
        length = input_ids.shape[1]
        pad = self._bucket_length(length) - length
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if pad > 0:
            input_ids = torch.nn.functional.pad(input_ids, (pad, 0), value=0)
            attention_mask = torch.nn.functional.pad(attention_mask, (pad, 0), value=0)
            if labels is not None:
                labels = torch.nn.functional.pad(labels, (pad, 0), value=-100)
        kwargs = {**kwargs, "use_cache": False}
        with _hf.compiled_calls():
            out = self.forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                               softprompt_bucketed=True, **kwargs)  # fmt: skip
        for key in ("logits", "last_hidden_state"):
            if out.get(key) is not None:
                out[key] = out[key][:, pad:]
        return out

    # ------------------------------------------------------------------ adapters
    @property
    def config(self):
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return self.base_model.device

    # ------------------------------------------------------------------ pieces of a forward
    def _position_offsets(self, rows: list[str | None]) -> torch.Tensor | None:
        """(B,) where each row's real-token positions start (``Adapter.position_offset``), or
        None when every row starts at 0."""
        offsets = [0 if r is None else self.adapters[r].position_offset for r in rows]
        if not any(offsets):
            return None
        if not self._takes_position_ids:
            raise SoftPromptError(
                f"adapters {sorted({r for r, o in zip(rows, offsets, strict=True) if o})} shift "
                f"the real tokens' positions, but {type(self.base_model).__name__}'s forward "
                "takes no position_ids"
            )
        return torch.tensor(offsets, device=self.device)

    def _prefix_state(self, rows: list[str | None], shared=None) -> PrefixState | None:
        """Each row's key/value prefix; ``shared``: prompt adapters' virtual tokens as prefixes
        (from ``KeptTables.prompt_kvs``)."""
        kvs = dict(shared or {})
        gated = {}
        for name in set(rows) - {None} - set(kvs):  # rows may name a shared prefix directly
            kv = self.adapters[name].kv()
            if kv:
                kvs[name] = kv
            prompts = self.adapters[name].gated_prompts()
            if prompts:  # adaption prompts: projected here, outside any checkpointed layer
                gated[name] = _hf.adaption_kv(self.base_model, self.info, prompts)
        if not kvs and not gated:
            return None
        bank = self._kept.bank_for(rows, kvs, self.device) if kvs else None
        return PrefixState(self.info, rows, kvs, bank, gated)

    def _prompts(self, rows: list[str | None]) -> dict[str, torch.Tensor]:
        out = {}
        for name in set(rows) - {None}:
            p = self.adapters[name].input_prompt()
            if p is not None:
                out[name] = p
        return out

    def _embed(
        self, ids: torch.Tensor, rows, prompts: dict[str, torch.Tensor], need=None
    ) -> torch.Tensor:
        """Embed ids where negative ids ``-1 - k`` mean the row's virtual token k.  (B, T, d)
        (``need``: see ``splice.embed_ids``)"""
        return embed_ids(self.base_model.get_input_embeddings(), ids, rows, prompts, need)

    def _splice(self, *args):
        """``splice.splice_inputs`` for this model's adapters."""
        return splice_inputs(self, *args)

    # ------------------------------------------------------------------ forward / generate
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        adapter_names: Sequence[str | None] | str | None = None,
        past_key_values=None,
        body_only: bool = False,
        softprompt_fused_lm_head: bool = False,
        **kwargs,
    ) -> ModelOutput:
        """Run the base model with each row's adapter.

        Args:
            input_ids: (B, T); negative ids ``-1 - k`` place virtual token k (templates).
            adapter_names: one adapter name (or None) per row; default: the active adapter.
            body_only: decoder-only LMs: run the transformer body without the LM head and
                return its output (``last_hidden_state`` (B, T, d)), for losses that apply the
                head only where labels are (see ``softprompt.lm``).
            softprompt_fused_lm_head: TRL's fused LM head (``fused_lm_head=True``, mapped to this
                name): per-token log-probabilities of the labels, the head run only where labels
                are (``softprompt.integrations.fused_lm_output``).
            Other arguments: as the base model's forward.

        Returns:
            The base model's output, with virtual positions removed from sequence outputs.
        """
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise SoftPromptError("forward needs input_ids or inputs_embeds")
        if self._compiled and not kwargs.pop("softprompt_bucketed", False):
            if inputs_embeds is None and position_ids is None and token_type_ids is None:
                extra = dict(kwargs, adapter_names=adapter_names, body_only=body_only)
                if past_key_values is not None:
                    extra["past_key_values"] = past_key_values
                if not softprompt_fused_lm_head:
                    out = self._bucketed_forward(input_ids, attention_mask, labels, extra)
                    if out is not None:
                        return out
        if softprompt_fused_lm_head:
            from .integrations import fused_lm_output

            return fused_lm_output(
                self,
                input_ids,
                attention_mask,
                inputs_embeds,
                position_ids,
                labels,
                adapter_names,
                **kwargs,
            )
        rows = self._rows(adapter_names, ref.shape[0])
        prompts = self._prompts(rows)
        caller_positions = position_ids is not None
        cached = past_key_values is not None and past_key_values.get_seq_length() > 0
        lay = None
        shared = None
        # one host sync per call: do the ids hold template markers (negative ids)?
        markers = input_ids is not None and bool((input_ids < 0).any())
        if caller_positions and prompts and not markers and not cached:
            at_input = [
                n
                for n in prompts
                if getattr(self.adapters[n].config, "placement", "prepend") != "template"
            ]
            if at_input:
                _refuse_packed(position_ids, attention_mask, at_input)
        if self._shared_ok(prompts, markers, position_ids, past_key_values, kwargs, rows):
            shared = self._kept.prompt_kvs(self, prompts)
        elif cached or (not prompts and not markers):
            if cached:
                attention_mask, position_ids = widen_cached_mask(
                    self._cache_layouts.get(past_key_values), attention_mask, position_ids
                )
            if markers:
                inputs_embeds, input_ids = self._embed(input_ids, rows, prompts), None
        else:
            inputs_embeds, attention_mask, position_ids, token_type_ids, labels, lay = self._splice(
                rows,
                prompts,
                input_ids,
                inputs_embeds,
                attention_mask,
                position_ids,
                token_type_ids,
                labels,
                markers,
            )
            input_ids = None
        if position_ids is None and self._takes_position_ids and attention_mask is not None:
            if attention_mask.dim() == 2:
                # left padding must not shift a row's real positions (cumsum - 1); other
                # positions keep the model's own 0..T-1 (unpadded rows: exactly the base
                # model's). Computed for every 2-D mask rather than asking the device whether
                # the batch is left padded (a host sync per call).
                q = (input_ids if input_ids is not None else inputs_embeds).shape[1]
                own = torch.arange(attention_mask.shape[1], device=attention_mask.device)
                pos = torch.where(attention_mask != 0, mask_positions(attention_mask), own)
                position_ids = pos[:, -q:]
        offsets = self._position_offsets(rows)
        if offsets is not None:
            q = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = offset_positions(position_ids, offsets, attention_mask, q, past)
        state = self._prefix_state(rows, shared)
        call = dict(kwargs)
        if self._checkpointing and self.training:
            call.setdefault("use_cache", False)  # a cache would be filled again on recompute
        for key, val in (
            ("input_ids", input_ids),
            ("inputs_embeds", inputs_embeds),
            ("attention_mask", attention_mask),
            ("position_ids", position_ids),
            ("token_type_ids", token_type_ids),
            ("labels", labels),
            ("past_key_values", past_key_values),
            (STATE_KWARG, state),
        ):
            if val is not None:
                call[key] = val
        if body_only:
            parts = _hf.lm_body_and_head(self.base_model)
            if parts is None:
                raise SoftPromptError("body_only needs a decoder-only language model")
            call.pop("labels", None)
            run = parts[0]
        else:
            run = self.base_model
        lc = None
        if not prompts and past_key_values is None and inputs_embeds is None:
            lc = self._layer_cache_for(rows, input_ids, caller_positions, call)
        if lc is None:
            out = run(**call)
        else:
            below = lc.lookup(input_ids, attention_mask)
            if below is not None:
                call.pop("input_ids")
                call["inputs_embeds"] = below
                with _hf.start_at_layer(self.base_model, lc.layer):
                    out = run(**call)
            else:
                with _hf.layer_inputs(self.base_model, lc.layer) as got:
                    out = run(**call)
                lc.store(input_ids, attention_mask, got[0])
        if lay is not None:
            cache = out.get("past_key_values") if isinstance(out, ModelOutput) else None
            if cache is not None:
                self._cache_layouts[cache] = lay
            out = strip_outputs(out, lay, self.info.is_encoder_decoder)
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        adapter_names: Sequence[str | None] | str | None = None,
        **kwargs,
    ):
        """``generate`` with each row's adapter; returns what the base model's generate returns
        (for decoder-only models: the input ids followed by the new tokens)."""
        if input_ids is None:
            raise SoftPromptError("generate needs input_ids")
        rows = self._rows(adapter_names, input_ids.shape[0])
        prompts = self._prompts(rows)
        shared = None
        markers = bool((input_ids < 0).any())  # template markers; one host sync per call
        if self._shared_ok(prompts, markers, kwargs.get("position_ids"), None, kwargs):
            shared, prompts = self._kept.prompt_kvs(self, prompts), {}
        state = self._prefix_state(rows, shared)
        offsets = self._position_offsets(rows)
        if not prompts and not markers:
            if offsets is not None:
                kwargs["position_ids"] = offset_positions(
                    kwargs.get("position_ids"), offsets, attention_mask, input_ids.shape[1]
                )
            with _hf.generation_state(state):
                return self.base_model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, **kwargs
                )
        # caller position ids cover the real tokens: extend them over the spliced virtual ones
        # (as forward does); generate then continues them by one per new token
        positions = kwargs.pop("position_ids", None)
        emb, mask, positions, _, _, lay = self._splice(
            rows, prompts, input_ids, None, attention_mask, positions, None, None, markers
        )
        if positions is not None:
            kwargs["position_ids"] = positions
        if mask is None:
            mask = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
        if offsets is not None:
            kwargs["position_ids"] = offset_positions(None, offsets, mask, emb.shape[1])
        with _hf.generation_state(state):
            out = self.base_model.generate(inputs_embeds=emb, attention_mask=mask, **kwargs)
        if self.info.is_encoder_decoder:
            return out
        seqs = out if isinstance(out, torch.Tensor) else out.sequences
        if seqs.shape[0] != input_ids.shape[0]:
            prompt_ids = input_ids.repeat_interleave(seqs.shape[0] // input_ids.shape[0], dim=0)
        else:
            prompt_ids = input_ids
        full = torch.cat([prompt_ids, seqs], dim=1)
        if isinstance(out, torch.Tensor):
            return full
        out.sequences = full
        return out


def attach(
    base_model: PreTrainedModel,
    config: AdapterConfig | None = None,
    name: str = "default",
    tokenizer=None,
) -> SoftPromptModel:
    """Freeze ``base_model`` and wrap it; add adapter ``name`` from ``config`` if given.

    The base model is put in eval mode (dropout off: the frozen model is a fixed function) and
    every base parameter gets ``requires_grad=False``. Its attention implementation is switched to
    softprompt's wrapper of the same kind (sdpa or eager), which is exact when no adapter is on.

    Args:
        base_model: a transformers ``PreTrainedModel`` (decoder-only, encoder-decoder or encoder).
        config: the first adapter's config, or None to add adapters later.
        tokenizer: used for text/label initialisation.
    """
    if isinstance(base_model, SoftPromptModel):
        model = base_model
    else:
        if not isinstance(base_model, PreTrainedModel):
            raise SoftPromptError(
                f"attach needs a transformers PreTrainedModel, got {type(base_model).__name__}"
            )
        for p in base_model.parameters():
            p.requires_grad_(False)
        base_model.eval()
        info = _hf.inspect_model(base_model)
        model = SoftPromptModel(base_model, info, tokenizer)
    if config is not None:
        model.add_adapter(name, config, tokenizer)
    return model


def load_adapter(
    model, directory, name: str | None = None, *, trainable: bool | None = None
) -> SoftPromptModel:
    """Load an adapter directory (softprompt's, a run folder's ``adapter/``, or a PEFT
    prompt-learning folder) onto a base model or a ``SoftPromptModel``.

    Args:
        model: a transformers model (attached first) or a ``SoftPromptModel``.
        name: name to give it (default: the name it was saved under).
        trainable: restore the trainable form (needs ``trainable.safetensors``). Default: when
            present.

    Returns:
        The ``SoftPromptModel``, with the loaded adapter active.

    Raises:
        SoftPromptError: missing or corrupt files, or an adapter made for another base model.
    """
    model = model if isinstance(model, SoftPromptModel) else attach(model)
    return load_into(model, directory, name, trainable=trainable)
