"""Caching the frozen lower layers while prompts train on the top layers only.

When every adapter of a batch puts its prefixes on decoder blocks ``k`` and above (deep prompts
or prefix tuning with ``layers="top_half"`` or a list), blocks ``0..k-1`` see no prompt. The model
is frozen and in eval mode (no dropout), so what those blocks compute for a sequence is the same
at every epoch. The first time a sequence is seen, what enters block ``k`` is kept (per row, real
tokens only); once every row of a batch is known, the forward starts at block ``k``
(``_hf.start_at_layer``), and the lower blocks run neither forward nor backward.

Used through ``SoftPromptModel.cache_lower_layers``; the trainer turns it on by default where it
applies (``TrainArgs.cache_lower_layers``).
"""

from __future__ import annotations

import torch


class LayerCache:
    """What enters decoder block ``layer`` for each token sequence seen, up to ``max_bytes``.

    Keys are the real tokens of a row (the ones its attention mask keeps), which fix their
    positions too: rows must be contiguous (left or right padding, no holes), and calls with
    explicit ``position_ids`` bypass the cache.
    """

    def __init__(self, layer: int, max_bytes: int) -> None:
        self.layer, self.max_bytes = layer, max_bytes
        self.rows: dict[tuple[int, ...], torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0  # batches served from the cache
        self.misses = 0  # batches that ran the lower blocks
        self.full = False
        self._last: tuple | None = None  # (ids, mask, their versions, keep, keys): last lookup

    @staticmethod
    def _keep(input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, T) bool of real tokens, or None if a row's real tokens are not contiguous."""
        if mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        keep = mask.bool()
        n = keep.sum(1)
        idx = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        first = torch.where(keep, idx, keep.shape[1]).min(1).values
        last = torch.where(keep, idx, -1).max(1).values
        if bool(((last - first + 1 != n) & (n > 0)).any()):
            return None
        return keep

    def _keys(self, input_ids: torch.Tensor, keep: torch.Tensor) -> list[tuple[int, ...]]:
        return [tuple(row[k].tolist()) for row, k in zip(input_ids.cpu(), keep.cpu(), strict=True)]

    def _rows_of(self, input_ids, mask) -> tuple[torch.Tensor | None, list | None]:
        """(keep, keys) of a batch; the ``store`` after a missed ``lookup`` of the same tensors
        reuses the lookup's."""
        stamp = (input_ids._version, None if mask is None else mask._version)
        last = self._last
        if last is not None and last[0] is input_ids and last[1] is mask and last[2] == stamp:
            return last[3], last[4]  # same tensors, not written to since
        keep = self._keep(input_ids, mask)
        keys = None if keep is None else self._keys(input_ids, keep)
        self._last = (input_ids, mask, stamp, keep, keys)
        return keep, keys

    def lookup(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, T, d) inputs of block ``layer`` if every row is cached (padding: zeros), else
        None."""
        keep, keys = self._rows_of(input_ids, mask)
        if keep is None:
            return None
        found = [self.rows.get(k) for k in keys]
        if any(f is None for f in found):
            self.misses += 1
            return None
        self.hits += 1
        out = found[0].new_zeros(*input_ids.shape, found[0].shape[-1])
        for b, f in enumerate(found):
            out[b, keep[b]] = f
        return out

    def store(self, input_ids: torch.Tensor, mask: torch.Tensor | None, hidden: torch.Tensor):
        """Keep each row's real-token slice of ``hidden`` (B, T, d), while there is room."""
        keep, keys = self._rows_of(input_ids, mask)
        self._last = None
        if keep is None or self.full:
            return
        for b, key in enumerate(keys):
            if key in self.rows:
                continue
            h = hidden[b, keep[b]].detach().clone()
            size = h.numel() * h.element_size()
            if self.bytes + size > self.max_bytes:
                self.full = True
                return
            self.rows[key] = h
            self.bytes += size
