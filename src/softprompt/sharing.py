"""What a ``SoftPromptModel`` keeps between no-grad calls, and when it must forget it.

* the shared prompt prefix: each prompt adapter's virtual tokens as per-slot keys and values
  (``prompt_kvs``), kept per adapter until its parameters change;
* ``PromptSharing`` (a mixin of ``SoftPromptModel``): whether a call runs prepended virtual tokens
  once as a shared key/value prefix or splices them into every row;
* the stacked per-slot prefix tables of a set of adapters (``bank_for``), so a server's mixed
  batch costs one row gather per slot.

Both are keyed by ``softprompt._versions`` (tensor versions, optimizer steps, autocast state)
and dropped for an adapter that is added, replaced, deleted or baked (``forget``).
"""

from __future__ import annotations

from collections import Counter

import torch

from . import _hf
from ._versions import memo_stamp, tensor_versions
from .errors import SoftPromptError


class KeptTables:
    """The wrapper's kept no-grad tables (one per ``SoftPromptModel``)."""

    BANKS = 4  # stacked prefix tables kept for this many adapter sets

    def __init__(self) -> None:
        self.prompt_kv: dict[str, tuple] = {}  # adapter -> (key, per-slot (k, v))
        self.banks: dict[tuple, tuple] = {}  # adapter names -> (fingerprint, kvs, tables)

    def bank_for(self, rows, kvs, device: torch.device) -> dict | None:
        """Without autograd, rows of several adapters: the per-slot stacked prefix tables of this
        set of adapters, kept across calls until any of their prefixes changes (a server's
        mixed batches). Keyed by the identity and version of each adapter's prefix tensors; the
        entry holds those tensors, so their memory cannot be reused under the key."""
        if torch.is_grad_enabled() or len({r if r in kvs else None for r in rows}) < 2:
            return None  # autograd, or one prefix for every row (PrefixState.single)
        fingerprint = []
        for name in sorted(kvs):
            for slot, (k, v) in sorted(kvs[name].items()):
                for t in (k, v):
                    fingerprint.append(
                        (
                            name,
                            slot,
                            t.untyped_storage().data_ptr(),
                            t.storage_offset(),
                            t._version,
                            t.shape,
                            t.dtype,
                        )
                    )
        fingerprint = (memo_stamp({device.type}), tuple(fingerprint))  # see _versions
        names = tuple(sorted(kvs))
        banks = self.banks  # names -> (fingerprint, kvs, tables)
        hit = banks.pop(names, None)
        if hit is None or hit[0] != fingerprint:  # new set, or a prefix changed: start afresh
            hit = (fingerprint, kvs, {})
            while len(banks) >= self.BANKS:
                banks.pop(next(iter(banks)))
        banks[names] = hit  # most recent last
        return hit[2]

    def forget(self, name: str) -> None:
        """Drop what is kept for adapter ``name`` between no-grad calls (added, replaced,
        deleted or baked): its shared prompt and every stacked prefix table that holds it."""
        self.prompt_kv.pop(name, None)
        banks = self.banks
        for names in [k for k in banks if name in k]:
            del banks[names]

    def prompt_kvs(self, model, prompts: dict[str, torch.Tensor]) -> dict[str, dict[int, tuple]]:
        """Each prompt adapter's virtual tokens as a per-slot key/value prefix.

        Adapters with prompts of one length and dtype run as one batch. Without autograd the
        result is kept per adapter until its parameters change (manual decoding loops, serving).
        """
        out: dict[str, dict[int, tuple]] = {}
        memo = self.prompt_kv
        keys = {}
        groups: dict[tuple, list[str]] = {}
        for name, p in sorted(prompts.items()):
            ad = model.adapters[name]
            key = None
            if not torch.is_grad_enabled():
                tensors = [*ad.parameters(), *ad.buffers()]
                key = (p.shape, p.dtype, p.device, tensor_versions(tensors))
                hit = memo.get(name)
                if hit is not None and hit[0] == key:
                    out[name] = hit[1]
                    continue
            keys[name] = key
            groups.setdefault((p.shape, p.dtype), []).append(name)
        for names in groups.values():
            emb = torch.stack([prompts[n] for n in names])  # (n, P, d)
            kv = _hf.prompt_kv(model.base_model, model.info, emb)
            for i, n in enumerate(names):
                out[n] = {slot: (k[i], v[i]) for slot, (k, v) in kv.items()}
                if keys[n] is not None:
                    memo[n] = (keys[n], out[n])
        return out


class PromptSharing:
    """When prepended virtual tokens run once as a shared prefix (``SoftPromptModel`` mixin)."""

    @property
    def prompt_sharing(self) -> str:
        """How prepended virtual tokens (prompt tuning, P-tuning) run on models where that is
        exact (``info.shares_prompt``: rotary causal LMs):

        * ``"always"``: once per adapter and call, handed to the rows as a key/value prefix
          (the rows' attention reads it like a prefix-tuning prefix);
        * ``"never"``: spliced into every row, as PEFT does;
        * ``"auto"`` (default): shared, except under autograd on an accelerator, where the
          extra sequential pass over the virtual tokens costs more launches than the spliced
          tokens cost arithmetic at training batch sizes (bench/share_sweep.py measures both),
          and under autograd when no adapter has two rows in the batch (nothing to share; the
          extra pass made a 1-row step of the SmolLM2-360M shape 1.29x slower on the CPU).
          Without autograd the shared prefix is computed once and kept, so it is always shared.

        The two give the same outputs and gradients (tests/test_model.py).
        """
        return self._prompt_sharing

    @prompt_sharing.setter
    def prompt_sharing(self, value: str) -> None:
        if value not in ("auto", "always", "never"):
            raise SoftPromptError(
                f"prompt_sharing must be 'auto', 'always' or 'never', not {value!r}"
            )
        self._prompt_sharing = value

    def _shared_ok(
        self, prompts, markers, position_ids, past_key_values, kwargs, rows=None
    ) -> bool:
        """Can this call hand its prepended virtual tokens to the rows as a shared prefix?
        (see ``_hf.shares_prepended_prompt`` and ``prompt_sharing``; ``rows``: each row's
        adapter, when the caller has them)"""
        if not prompts or not self.info.shares_prompt or position_ids is not None:
            return False
        if self._prompt_sharing == "never":
            return False
        if self._prompt_sharing == "auto" and torch.is_grad_enabled():
            if self.device.type != "cpu":
                return False
            if rows is not None and max(Counter(r for r in rows if r in prompts).values()) < 2:
                return False  # one row per adapter: sharing saves nothing, costs a pass
        if kwargs.get("output_attentions") or markers:
            return False
        if past_key_values is not None and past_key_values in self._cache_layouts:
            return False  # the cache holds spliced virtual tokens
        return all(
            getattr(self.adapters[n].config, "placement", "prepend") == "prepend" for n in prompts
        )
