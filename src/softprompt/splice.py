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
from torch import nn
from transformers.modeling_outputs import ModelOutput

from .errors import SoftPromptError


@dataclass
class _Layout:
    """Where virtual tokens were spliced into a batch.

    Attributes:
        src: (B, T') long; >= 0 real position, -1 - k virtual token k, ``FILL`` padding filler.
        out_index: (B, T) position of each original token in the spliced sequence.
        counts: (B,) number of virtual tokens per row.
        starts: (B,) original index before which each row's virtual tokens went.
        length: T, the original length.
        shift: when every row's original tokens sit at ``shift .. shift + T - 1`` of the
            spliced sequence (unpadded rows, one prompt length: the common training batch),
            that offset, so outputs are stripped with a slice rather than a gather (whose
            backward is a scatter over the whole (B, T', V) logits); else None.
    """

    src: torch.Tensor
    out_index: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor
    length: int
    shift: int | None = None


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
    host = mask.tolist()  # the one host sync of a splice: each row's real positions
    left = fill_left and all(r[-1] != 0 for r in host)
    srcs, outs, starts = [], [], []
    for b in range(batch):
        real = [j for j, v in enumerate(host[b]) if v]
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
    # rows' indices rise by >= 1 a token: first and last tell whether each is one run
    heads = {o[0] for o in outs}
    runs = all(o[-1] - o[0] == length - 1 for o in outs)
    shift = next(iter(heads)) if length and len(heads) == 1 and runs else None
    return _Layout(
        src=torch.tensor(srcs, device=mask.device),
        out_index=torch.tensor(outs, device=mask.device),
        counts=torch.tensor(counts, device=mask.device),
        starts=torch.tensor(starts, device=mask.device),
        length=length,
        shift=shift,
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


def embed_ids(
    emb_layer: nn.Module,
    ids: torch.Tensor,
    rows,
    prompts: dict[str, torch.Tensor],
    need: list[int] | None = None,
) -> torch.Tensor:
    """Embed ids where negative ids ``-1 - k`` mean the row's virtual token k.  (B, T, d)

    ``need``: per row, 1 + the highest virtual index its ids hold (0: none), when the caller
    knows it on the host (a splice does); else it is read from ``ids`` with one host sync.
    """
    virtual = ids < 0
    emb = emb_layer(ids.clamp(min=0))
    k = (-1 - ids).clamp(min=0)  # (B, T) virtual index
    if need is None:
        need = (torch.where(virtual, k, -1).amax(dim=1) + 1).tolist() if ids.numel() else []
    if not any(need):
        return emb
    vals = []
    for b, name in enumerate(rows):
        need_b = need[b]
        if need_b == 0:
            vals.append(emb.new_zeros(ids.shape[1], emb.shape[-1]))
            continue
        table = prompts.get(name)
        if table is None or need_b > table.shape[0]:
            have = 0 if table is None else table.shape[0]
            raise SoftPromptError(
                f"row {b} asks for virtual token {need_b - 1} but adapter {name!r} has {have}"
            )
        table = table.to(emb.dtype)
        vals.append(table[k[b].clamp(max=table.shape[0] - 1)])  # (T, d)
    return torch.where(virtual[..., None], torch.stack(vals), emb)


def splice_inputs(
    model,
    rows: list[str | None],
    prompts: dict[str, torch.Tensor],
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    labels: torch.Tensor | None,
    markers: bool = False,
):
    """Insert each row's virtual tokens (``model``: the ``SoftPromptModel``); returns the new
    inputs and the layout (or None).

    ``markers``: ``input_ids`` holds template markers (negative ids), computed once per call.
    """
    ref = input_ids if input_ids is not None else inputs_embeds
    batch, length = ref.shape[:2]
    counts, placements = [], []
    for r in rows:
        ad = model.adapters[r] if r is not None else None
        place = getattr(ad.config, "placement", "prepend") if ad is not None else "prepend"
        n = prompts[r].shape[0] if r in prompts and place != "template" else 0
        counts.append(n)
        placements.append(place)
    if markers and input_ids is not None:
        # rows whose ids hold template markers already say where their virtual tokens go;
        # the other rows of the batch still get theirs placed (one host sync, marker batches
        # only)
        marked = (input_ids < 0).any(1).tolist()
        counts = [0 if m else n for m, n in zip(marked, counts, strict=True)]
    elif markers:
        counts = [0] * batch
    mask = (
        attention_mask
        if attention_mask is not None
        else torch.ones(batch, length, dtype=torch.long, device=ref.device)
    )
    if max(counts, default=0) == 0:
        emb = model._embed(input_ids, rows, prompts) if input_ids is not None else inputs_embeds
        return emb, attention_mask, position_ids, token_type_ids, labels, None
    lay = _splice_layout(mask, counts, placements, fill_left=model._takes_position_ids)
    src = lay.src
    real, virt = src >= 0, (src < 0) & (src != FILL)
    ridx = src.clamp(min=0)
    vidx = torch.where(virt, -1 - src, torch.zeros_like(src))
    if input_ids is not None:
        ids = torch.where(real, input_ids.gather(1, ridx), torch.where(virt, -1 - vidx, 0))
        # marked rows hold their own virtual indices, which counts do not know: read them
        emb = model._embed(ids, rows, prompts, None if markers else counts)
    else:
        emb = _gather_seq(inputs_embeds, ridx)
        marker = torch.where(virt, -1 - vidx, torch.zeros_like(vidx))
        emb = torch.where(virt[..., None], model._embed(marker, rows, prompts, counts), emb)
    ext_mask = torch.where(real, mask.gather(1, ridx), virt.to(mask.dtype))
    if position_ids is not None:
        pos = position_ids.gather(1, ridx)
        shift = torch.where(ridx >= lay.starts[:, None], lay.counts[:, None], 0)
        first = position_ids.gather(1, lay.starts.clamp(max=length - 1)[:, None])
        last = position_ids.gather(1, (lay.starts - 1).clamp(min=0)[:, None]) + 1
        vbase = torch.where(lay.starts[:, None] >= length, last, first)
        position_ids = torch.where(real, pos + shift, torch.where(virt, vbase + vidx, 0))
    if token_type_ids is not None:
        token_type_ids = torch.where(real, token_type_ids.gather(1, ridx), 0)
    if labels is not None and labels.dim() == 2 and labels.shape[1] == length:
        if not model.info.is_encoder_decoder:
            labels = torch.where(real, labels.gather(1, ridx), -100)
    return emb, ext_mask, position_ids, token_type_ids, labels, lay


def strip_outputs(out: ModelOutput, lay: _Layout, enc_dec: bool) -> ModelOutput:
    """Drop virtual-token positions from every sequence-shaped output."""
    t2 = lay.src.shape[1]

    def take(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        if lay.shift is not None:  # every row's tokens are one run: a slice, not a gather
            return x.narrow(dim, lay.shift, lay.length).contiguous()
        return _gather_seq(x, lay.out_index, dim)

    for key in list(out.keys()):
        if key in ("loss", "past_key_values"):
            continue
        if enc_dec and not key.startswith("encoder_"):
            continue
        val = out[key]
        if isinstance(val, torch.Tensor):
            if val.dim() >= 2 and val.shape[1] == t2:
                out[key] = take(val)
        elif isinstance(val, tuple) and val and isinstance(val[0], torch.Tensor):
            if val[0].dim() == 4 and val[0].shape[-1] == t2:  # attentions (B, H, T', T')
                out[key] = tuple(take(take(a, 2), 3) for a in val)
            elif val[0].shape[1] == t2:  # hidden states (B, T', d)
                out[key] = tuple(take(h) for h in val)
    return out


def widen_cached_mask(lay: _Layout | None, attention_mask, position_ids):
    """Incremental decoding: widen the caller's mask by the virtual tokens that ``lay`` put in
    the cache (None: the cache holds none)."""
    if lay is None or attention_mask is None:
        return attention_mask, position_ids
    head = attention_mask[:, : lay.length]
    ridx = lay.src.clamp(min=0)
    real, virt = lay.src >= 0, (lay.src < 0) & (lay.src != FILL)
    ext = torch.where(real, head.gather(1, ridx), virt.to(head.dtype))
    attention_mask = torch.cat([ext, attention_mask[:, lay.length :]], dim=1)
    if position_ids is not None:
        position_ids = position_ids + lay.counts[:, None]
    return attention_mask, position_ids
