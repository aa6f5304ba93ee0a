"""Prompt tuning's virtual tokens shared as a key/value prefix vs spliced into every row, by batch
size: the measurement behind ``SoftPromptModel.prompt_sharing="auto"``.

    python bench/share_sweep.py [--quick] [--device cuda] [--out bench/results/share_sweep.json]

A shared prefix runs the 20 virtual tokens once per step (one extra, sequential pass of 20
positions through every block, forward and backward) instead of once per row (20 more positions
in each of B rows of the main pass). It saves arithmetic in proportion to B and costs one more
set of kernel launches. On the CPU, arithmetic dominates; on a GPU at small batches, launches do.
Training steps (forward, backward, AdamW; the trainer's loss) of one prompt-tuning adapter on
batches of B rows of about 40 tokens, the two settings interleaved round by round.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BATCHES = (8, 32, 128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    C.add_device_arg(ap)
    args = ap.parse_args()
    args.out = args.out or C.default_out("share_sweep", args.device)
    args.repeats = args.repeats or (1 if args.quick else 4)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    C.setup(quick=args.quick, device=args.device)
    machine = C.machine_info()
    tok = C.load_tokenizer()
    model = C.make_sp("prompt")
    model.train()
    sizes = BATCHES[:2] if args.quick else BATCHES
    batches = {b: C.train_batches(tok, n_batches=2, batch=b) for b in sizes}
    C.resolve_sp_loss(model, batches[sizes[0]][0])
    opt = torch.optim.AdamW(model.parameters_to_train(), lr=1e-3)
    auto = {b: C.auto_shares(model, batches[b][0]) for b in sizes}

    def step(b, mode):
        def f(r):
            with C.sharing(model, mode):
                C.train_step(model, opt, C.sp_loss, batches[b][r % 2])

        return f

    rows, raw = [], {}
    for b in sizes:
        C.log(f"batch {b}")
        t_all = C.interleaved(
            {"spliced": step(b, "never"), "shared": step(b, "always")},
            repeats=args.repeats,
            warmup=args.warmup,
        )
        t, dropped = C.clean(t_all)
        raw[b] = t_all
        speedup = C.paired_ratio(t["spliced"], t["shared"])
        real = sum(int(x["attention_mask"].sum()) for x in batches[b]) / 2
        rows.append(
            [
                str(b),
                f"{real:.0f}",
                f"{C.median(t['spliced']):.3f}",
                f"{C.median(t['shared']):.3f}",
                f"{C.fmt_x(speedup)} {C.fmt_range(*C.ratio_range(t['spliced'], t['shared']))}",
                "shared" if auto[b] else "spliced",
                f"{len(t['shared'])} ({dropped})",
            ]
        )
    result = {
        "title": "Shared prompt prefix vs splicing, by batch size",
        "order": 1.5,
        "machine": machine,
        "config": {"repeats": args.repeats, "warmup": args.warmup, "quick": args.quick},
        "intro": [
            "Prompt tuning (20 virtual tokens) training steps with the trainer's loss, "
            "`model.prompt_sharing = 'never'` (spliced into every row, as PEFT does) vs "
            "`'always'` (run once per step as a key/value prefix that every row's attention "
            "reads; exact on rotary causal LMs). Batches of B Rotten Tomatoes rows of 34-46 "
            f"tokens; {args.repeats} timed rounds after {args.warmup} warm-up round(s), the two "
            "interleaved. Speedup: spliced time / shared time (median of per-round ratios). "
            "'auto' is the default's choice for a training step on this device.",
        ],
        "tables": [
            {
                "title": "Training step time (s), spliced vs shared",
                "columns": [
                    "rows B",
                    "real tokens",
                    "spliced (s)",
                    "shared (s)",
                    "shared speedup",
                    "auto takes",
                    "rounds (dropped)",
                ],
                "rows": rows,
            }
        ],
        "targets": [],
        "raw": {"times": raw, "auto": auto},
    }
    C.write_result("share_sweep", result, args.out)


if __name__ == "__main__":
    main()
