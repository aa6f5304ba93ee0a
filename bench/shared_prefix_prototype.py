"""Prototype (evidence for a suggested change, not part of run_all): prompt tuning computed as a
shared per-layer prefix.

    python bench/shared_prefix_prototype.py [--repeats 8]

In a decoder-only model, prepended virtual tokens never attend to real tokens, and softprompt
gives them positions 0..P-1 in every row. Their keys and values at every layer are therefore the
same for all rows: run the P virtual tokens through the frozen body once (batch 1), capture each
layer's K/V (with grad), and hand them to the B rows' real tokens as a per-layer prefix through
softprompt's existing attention seam, with the real tokens' positions shifted by P. The loss and
the prompt's gradient match the usual splice-into-inputs_embeds path; the transformer processes
B*T + P positions instead of B*(T+P).

Prints the loss and gradient differences and the interleaved step times of both paths. Uses
softprompt internals (PrefixState, the state keyword), so it may need updating when they change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    from softprompt._hf import STATE_KWARG
    from softprompt.model import PrefixState, mask_positions

    C.setup()
    tok = C.load_tokenizer()
    batches = C.train_batches(tok, 4)
    spm = C.make_sp("prompt")
    spm.train()
    C.resolve_sp_loss(spm, batches[0])
    base = spm.base_model
    body, head = base.model, base.lm_head
    info = spm.info
    prompt = spm.adapters["a"].embedding  # (P, d)
    n_virtual = prompt.shape[0]

    class Capture:
        """Keeps each slot's keys/values of the virtual tokens (with grad); adds nothing."""

        def __init__(self) -> None:
            self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def prefix_for(self, module, query, key, value):
            # (1, kvh, P, hd) -> (P, kvh, hd)
            slot = info.module_slot[id(module)]
            self.kv[slot] = (key[0].transpose(0, 1), value[0].transpose(0, 1))
            return None

    def shared_prefix_loss(model, batch) -> torch.Tensor:
        cap = Capture()
        positions = torch.arange(n_virtual)[None]  # (1, P)
        body(
            inputs_embeds=prompt[None],
            position_ids=positions,
            use_cache=False,
            **{STATE_KWARG: cap},
        )
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        state = PrefixState(info, ["shared"] * ids.shape[0], {"shared": cap.kv})
        hidden = body(
            input_ids=ids,
            attention_mask=mask,
            position_ids=mask_positions(mask) + n_virtual,
            use_cache=False,
            **{STATE_KWARG: state},
        ).last_hidden_state  # (B, T, d)
        target = labels[:, 1:]
        sel = target != -100
        return F.cross_entropy(head(hidden[:, :-1][sel]).float(), target[sel])

    b = batches[0]
    with torch.no_grad():
        a, s = C.sp_loss(spm, b), shared_prefix_loss(spm, b)
    spm.zero_grad()
    C.sp_loss(spm, b).backward()
    g1 = prompt.grad.clone()
    spm.zero_grad()
    shared_prefix_loss(spm, b).backward()
    g2 = prompt.grad.clone()
    print(f"loss: splice {a.item():.7f}  shared prefix {s.item():.7f}")
    print(
        f"prompt grad: max |diff| {(g1 - g2).abs().max().item():.2e} (max |grad| "
        f"{g1.abs().max().item():.2e})"
    )

    opt = torch.optim.AdamW([prompt], lr=1e-3)
    fns = {
        "splice (softprompt today)": lambda r: C.train_step(spm, opt, C.sp_loss, batches[r % 4]),
        "shared prefix": lambda r: C.train_step(spm, opt, shared_prefix_loss, batches[r % 4]),
    }
    t = C.interleaved(fns, repeats=args.repeats, warmup=1)
    t, _ = C.clean(t)
    for k, v in t.items():
        print(f"{k}: median {C.median(v):.3f} s  rounds {[round(x, 2) for x in v]}")
    print(
        f"speed-up (median of paired ratios): "
        f"{C.paired_ratio(t['splice (softprompt today)'], t['shared prefix']):.2f}x"
    )


if __name__ == "__main__":
    main()
