"""Profile one training step (or generate call) of softprompt and PEFT side by side.

    python bench/profile_step.py --method prompt [--loss full|sp] [--what step|generate|fwd]
                                 [--rows 25] [--steps 3] [--libs sp peft bare]

Not part of run_all: a tool for finding where time goes when softprompt loses. Prints, for each
library, torch.profiler's top operators by self CPU time (summed over ``--steps`` profiled steps
after one warm-up) and the total, so the difference can be attributed to operators. Compare
call counts (stable) rather than times (profiled runs are sequential, not interleaved).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="prompt", choices=list(C.METHODS))
    ap.add_argument(
        "--loss",
        default="full",
        choices=["full", "sp"],
        help="softprompt's loss: full-head model(**batch).loss or the trainer's",
    )
    ap.add_argument("--what", default="step", choices=["step", "generate", "fwd"])
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--libs", nargs="*", default=["sp", "peft"], help="sp, peft, bare (the untouched model)"
    )
    ap.add_argument("--sort", default="self_cpu_time_total")
    args = ap.parse_args()
    C.setup()
    tok = C.load_tokenizer()
    batches = C.train_batches(tok, n_batches=args.steps + 1)
    prompts = C.generation_prompts(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for lib in args.libs:
        if lib == "bare":
            model = C.load_base()
            params = [p for p in model.parameters() if p.requires_grad]
            loss_fn = C.full_loss
        elif lib == "sp":
            model = C.make_sp(args.method)
            params = model.parameters_to_train()
            if args.loss == "sp":
                C.resolve_sp_loss(model, batches[0])
                loss_fn = C.sp_loss
            else:
                loss_fn = C.full_loss
        else:
            model = C.make_peft(args.method)
            params = [p for p in model.parameters() if p.requires_grad]
            loss_fn = C.full_loss
        opt = torch.optim.AdamW(params, lr=1e-3)
        if args.what == "generate":
            model.eval()
            kw = {
                "max_new_tokens": 16,
                "min_new_tokens": 16,
                "do_sample": False,
                "pad_token_id": pad,
            }

            def run(i, model=model, kw=kw):
                with torch.no_grad():
                    model.generate(**prompts, **kw)
        elif args.what == "fwd":
            model.train()

            def run(i, model=model, loss_fn=loss_fn):
                with torch.no_grad():
                    loss_fn(model, batches[i])
        else:
            model.train()

            def run(i, model=model, opt=opt, loss_fn=loss_fn):
                C.train_step(model, opt, loss_fn, batches[i])

        run(0)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for i in range(1, args.steps + 1):
                run(i)
        name = f"{lib} ({C.SP_LOSS_NAME if lib == 'sp' and args.loss == 'sp' else 'full loss'})"
        print(f"\n===== {name}, {args.method}, {args.what}, {args.steps} runs")
        print(prof.key_averages().table(sort_by=args.sort, row_limit=args.rows))
        del model, opt


if __name__ == "__main__":
    main()
