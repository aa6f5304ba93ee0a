"""Where spliced virtual tokens go, and the position ids around them (tensor functions).

``SoftPromptModel`` splices input-level virtual tokens into ``inputs_embeds`` with these plans
and strips them from the outputs again: ``_splice_layout`` plans, per row, where its tokens go
(after left padding, after the last token, or nowhere for template markers), ``_gather_seq``
moves sequence positions by the plan, ``mask_positions`` and ``offset_positions`` make the
position ids the base model would make.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Layout:
    """Where virtual tokens were spliced into a batch.

    Attributes:
        src: (B, T') long; >= 0 real position, -1 - k virtual token k, ``FILL`` padding filler.
        out_index: (B, T) position of each original token in the spliced sequence.
        counts: (B,) number of virtual tokens per row.
        starts: (B,) original index before which each row's virtual tokens went.
        length: T, the original length.
    """

    src: torch.Tensor
    out_index: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor
    length: int


FILL = -(10**9)


def _splice_layout(
    mask: torch.Tensor, counts: list[int], placements: list[str], fill_left: bool
) -> _Layout:
    """Plan where each row's virtual tokens go.

    Virtual tokens go right before the row's first real token ("prepend") or right after its last
    ("append"). Rows with fewer virtual tokens than the longest get filler positions (mask 0) on the
    left (``fill_left``: the model takes position ids, so they do not shift the real tokens) unless
    the batch is right-padded, so rows end with their last real token, as generation needs.
    """
    batch, length = mask.shape
    pmax = max(counts)
    left = fill_left and not bool((mask[:, -1] == 0).any())
    srcs, outs, starts = [], [], []
    for b in range(batch):
        real = torch.nonzero(mask[b]).flatten().tolist()
        if placements[b] == "append":
            start = real[-1] + 1 if real else length
        else:
            start = real[0] if real else 0
        n = counts[b]
        fill = [FILL] * (pmax - n)
        seq = list(range(start)) + [-1 - k for k in range(n)] + list(range(start, length))
        seq = fill + seq if left else seq + fill
        srcs.append(seq)
        offset = len(fill) if left else 0
        outs.append([offset + j + (n if j >= start else 0) for j in range(length)])
        starts.append(start)
    return _Layout(
        src=torch.tensor(srcs, device=mask.device),
        out_index=torch.tensor(outs, device=mask.device),
        counts=torch.tensor(counts, device=mask.device),
        starts=torch.tensor(starts, device=mask.device),
        length=length,
    )


def _gather_seq(x: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Gather along a sequence dimension with a (B, T') index (broadcast over trailing dims)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape
    view = idx.view(shape).expand(
        *[x.shape[i] if i not in (0, dim) else -1 for i in range(x.dim())]
    )
    return x.gather(dim, view)


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a 2-D attention mask, as ``generate`` computes them: cumsum - 1, pads 0."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def offset_positions(
    position_ids: torch.Tensor | None,
    offsets: torch.Tensor,
    mask: torch.Tensor | None,
    q_len: int,
    past: int = 0,
) -> torch.Tensor:
    """Position ids shifted per row by ``offsets`` (B,) (``Adapter.position_offset``).

    Without ``position_ids`` they are first made as the base model would: from a 2-D mask
    (``mask_positions``, the last ``q_len`` columns), else ``past .. past + q_len - 1``.
    Returns (B, q_len).
    """
    if position_ids is None:
        if mask is not None and mask.dim() == 2:
            position_ids = mask_positions(mask)[:, -q_len:]
        else:
            position_ids = torch.arange(past, past + q_len, device=offsets.device)[None]
    return position_ids + offsets[:, None].to(position_ids.device)
