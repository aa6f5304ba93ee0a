"""The per-forward injection state: each row's adapter, its per-slot key/value prefixes and
its gated adapter tokens (adaption prompts).

The attention seam (``softprompt._hf``) takes any object with the ``PrefixProvider`` shape as
the ``softprompt_state`` keyword; ``PrefixState`` is the one a ``SoftPromptModel`` forward
builds (the seam's own probes record or capture keys through the same protocol).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from ._hf import ModelInfo
from .errors import SoftPromptError


class PrefixProvider(Protocol):
    """What the attention seam asks of a ``softprompt_state``: per attention call, the key/value
    prefix to add for ``module`` (None: none), from the call's query and real keys/values.

    ``prefix_for`` returns ((B, kvh, P, hd) keys, (B, kvh, P, hd) values, (B, P) bool validity)
    or None. A provider may keep ``mask_memo``, a list the seam fills with the masks it has
    extended in this forward (one per kind of attention), or set it to None to keep none.
    """

    def prefix_for(
        self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None: ...


class GatedProvider(Protocol):
    """Optionally, a ``softprompt_state`` also has ``gated_for``: per attention call, gated
    adapter tokens whose own softmax attention the seam adds to the output (adaption prompts,
    ``_hf.gated_attention``): ((B|1, kvh, P, hd) keys, the same for values, (B|1,) gates,
    None or (B, P) bool validity), or None."""

    def gated_for(
        self, module: nn.Module, query: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None: ...


class PrefixState:
    """Per-forward injection state: each row's adapter and their per-slot key/value prefixes.

    The attention seam calls ``prefix_for`` once per attention call; results are memoised per
    slot and batch size, so a ``generate`` call builds each slot's prefix once.

    Gated adapter tokens (``gated``: adapter -> slot -> keys, values, gate, projected by the
    wrapper before the forward) are gathered per row the same way (``gated_for``); rows without
    them get gate 0, which adds exactly zero.

    Rows of several adapters read each slot's prefixes from one table (adapters stacked, padded
    to the longest); ``bank``, when given, keeps those tables across calls (no-grad serving:
    see ``sharing.KeptTables.bank_for``), so a mixed batch costs one row gather per slot.
    """

    def __init__(
        self,
        info: ModelInfo,
        rows: Sequence[str | None],
        kvs: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]],
        bank: dict | None = None,
        gated: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] | None = None,
    ) -> None:
        self.info = info
        # adaption prompts: adapter -> slot -> ((P, kvh, hd) keys, values, (1,) gate)
        self.gated = gated or {}
        gnames = sorted(self.gated)
        guid = {n: i + 1 for i, n in enumerate(gnames)}  # 0: no gated tokens
        self.gated_names = gnames
        self.gated_uid = [guid.get(r, 0) if r is not None else 0 for r in rows]
        self._gated_memo: dict[tuple[int, int], tuple | None] = {}
        self.kvs = kvs
        self.names = sorted(kvs)
        uid = {n: i + 1 for i, n in enumerate(self.names)}  # 0: no prefix
        self.row_uid = [uid.get(r, 0) if r is not None else 0 for r in rows]
        first = self.row_uid[0]
        self.single = (
            self.names[first - 1] if first and all(u == first for u in self.row_uid) else None
        )
        self._memo: dict[tuple[int, int], tuple | None] = {}
        self._valids: dict[tuple, torch.Tensor] = {}
        self._full: set[int] = set()  # ids of the validity masks that are all True
        self._indices: dict[tuple, torch.Tensor] = {}
        self._tables = bank if bank is not None else {}  # (slot, device) -> stacked table
        # the attention seam's extended masks of this forward: [(memo key, mask)], a few kinds
        self.mask_memo: list[tuple[tuple, object]] = []

    def _slot(self, module) -> int:
        slot = self.info.module_slot.get(id(module))
        if slot is None:
            raise SoftPromptError(
                f"attention module {type(module).__name__} was not seen when the adapter was "
                "attached; attach again after changing the model"
            )
        return slot

    def prefix_for(self, module, query, key, value):
        return self.prefix_for_batch(module, query.shape[0], key.device)

    def prefix_for_batch(self, module, batch: int, device: torch.device):
        """``prefix_for`` from the batch size and device alone (what it reads of the call):
        the compiled decoder blocks look their prefix up before they run."""
        if not self.kvs:
            return None
        slot = self._slot(module)
        memo_key = (slot, batch)
        if memo_key not in self._memo:
            self._memo[memo_key] = self._build(slot, batch, device)
        return self._memo[memo_key]

    def _build(self, slot: int, batch: int, device: torch.device):
        if self.single is not None:
            kv = self.kvs[self.single].get(slot)
            if kv is None:
                return None
            k, v = (t.permute(1, 0, 2)[None].to(device) for t in kv)  # (1, kvh, P, hd)
            k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
            return k, v, self._valid(batch, (k.shape[2],), device)
        key = (slot, device)
        if key not in self._tables:
            self._tables[key] = self._table(slot, device)
        table = self._tables[key]
        if table is None:
            return None
        ks, vs, lengths = table
        idx = self._row_index(batch, device)
        return ks[idx], vs[idx], self._valid(batch, lengths, device)

    def _table(self, slot: int, device: torch.device):
        """Every adapter's prefix at ``slot``, stacked: ((n+1, kvh, P, hd) keys, the same for
        values, per-uid lengths); uid 0 (rows without a prefix) is all padding."""
        entries = [self.kvs[n].get(slot) for n in self.names]
        plen = max((e[0].shape[0] for e in entries if e is not None), default=0)
        if plen == 0:
            return None
        g = self.info.slots[slot]
        ks, vs, lengths = [], [], []
        for e in [None, *entries]:
            n = 0 if e is None else e[0].shape[0]
            pad = torch.zeros(plen - n, g.kv_heads, g.head_dim, device=device)
            k = pad if e is None else torch.cat([e[0].to(device), pad.to(e[0].dtype)])
            v = pad if e is None else torch.cat([e[1].to(device), pad.to(e[1].dtype)])
            ks.append(k.permute(1, 0, 2))  # (kvh, P, hd)
            vs.append(v.permute(1, 0, 2))
            lengths.append(n)
        return torch.stack(ks), torch.stack(vs), tuple(lengths)

    def _row_index(self, batch: int, device: torch.device) -> torch.Tensor:
        key = (batch, device)
        if key in self._indices:
            return self._indices[key]
        idx = _expand_rows(self.row_uid, batch, device)
        self._indices[key] = idx
        return idx

    def is_full(self, valid: torch.Tensor) -> bool:
        """Whether ``valid`` (from this state) opens every prefix entry to every row: known on
        the host, so the attention seam can drop the mask without a device sync."""
        return id(valid) in self._full

    def _valid(self, batch: int, lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """(B, P) which prefix entries each row attends to; one object per (batch, lengths), so
        the attention seam can extend a forward's mask once for all layers that share it."""
        key = (batch, lengths)
        if key not in self._valids:
            if len(lengths) == 1:  # every row has the one adapter
                self._valids[key] = torch.ones(batch, lengths[0], dtype=torch.bool, device=device)
            else:  # lengths[u]: prefix length of adapter uid u (0: none)
                plen = max(lengths)
                table = (
                    torch.arange(plen, device=device)[None]
                    < torch.tensor(lengths, device=device)[:, None]
                )
                self._valids[key] = table[self._row_index(batch, device)]
            if len(lengths) == 1 or (
                min(self.row_uid) > 0 and len({lengths[u] for u in self.row_uid}) == 1
            ):
                self._full.add(id(self._valids[key]))
        return self._valids[key]

    def gated_for(self, module, query):
        """Gated adapter tokens for ``module``'s slot (see ``GatedProvider``), memoised per
        slot and batch size."""
        if not self.gated:
            return None
        slot, batch = self._slot(module), query.shape[0]
        memo_key = (slot, batch)
        if memo_key not in self._gated_memo:
            self._gated_memo[memo_key] = self._build_gated(slot, batch, query.device)
        return self._gated_memo[memo_key]

    def _build_gated(self, slot: int, batch: int, device: torch.device):
        entries = [self.gated[n].get(slot) for n in self.gated_names]
        if all(e is None for e in entries):
            return None
        uids = set(self.gated_uid)
        if len(uids) == 1 and 0 not in uids:  # every row has the one adaption prompt
            k, v, gate = entries[self.gated_uid[0] - 1]
            k = k.permute(1, 0, 2)[None].to(device)  # (1, kvh, P, hd)
            v = v.permute(1, 0, 2)[None].to(device)
            return k, v, gate.to(device), None  # (1,) gate, no mask
        plen = max(e[0].shape[0] for e in entries if e is not None)
        g = self.info.slots[slot]
        ks, vs, gates, lengths = [], [], [], []
        ref = next(e[0] for e in entries if e is not None)
        for e in [None, *entries]:  # uid 0 (and adapters without this slot): gate 0, all pad
            n = 0 if e is None else e[0].shape[0]
            pad = torch.zeros(plen - n, g.kv_heads, g.head_dim, device=device, dtype=ref.dtype)
            ks.append(pad if e is None else torch.cat([e[0].to(device), pad.to(e[0].dtype)]))
            vs.append(pad if e is None else torch.cat([e[1].to(device), pad.to(e[1].dtype)]))
            gates.append(torch.zeros(1, device=device) if e is None else e[2].to(device).float())
            lengths.append(n)
        k = torch.stack(ks).permute(0, 2, 1, 3)  # (n+1, kvh, P, hd)
        v = torch.stack(vs).permute(0, 2, 1, 3)
        idx = _expand_rows(self.gated_uid, batch, device)
        valid = (
            torch.arange(plen, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
        )
        return k[idx], v[idx], torch.cat(gates)[idx], valid[idx]


def _expand_rows(uids: list[int], batch: int, device: torch.device) -> torch.Tensor:
    """(batch,) per-row uids; beam search / num_return_sequences expand rows in place."""
    idx = torch.tensor(uids, device=device)
    rows = len(uids)
    if batch != rows:
        if batch % rows:
            raise SoftPromptError(f"batch of {batch} rows does not match {rows} adapter rows")
        idx = idx.repeat_interleave(batch // rows)
    return idx
