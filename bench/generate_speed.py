"""Generation overhead of an adapter: softprompt vs PEFT, prompt tuning and prefix tuning.

    python bench/generate_speed.py [--quick] [--out bench/results/generate_speed.json]

8 left-padded Rotten Tomatoes prompts ("Review: {text}\\nSentiment:"), 16 new tokens, greedy
(min_new_tokens=16, so every variant does the same number of decoding steps). Timed interleaved
per round (rotating order, same prompts for all):

* bare: the untouched base model's ``generate``;
* bare +20 tokens: the same with 20 extra real tokens in front of every prompt: what 20 virtual
  tokens cost in compute alone, whatever the library (a control for prompt tuning);
* sp no adapter: softprompt's wrapper with ``adapter_names=[None] * 8`` (the seam's own cost);
* sp / PEFT prompt: prompt tuning, 20 virtual tokens (softprompt: run once per adapter as a
  shared key/value prefix, its default on this model; "spliced": the same adapter with the
  virtual tokens spliced into every row, the ablation);
* sp / PEFT prefix: prefix tuning with an MLP (h=512) reparameterisation, 20 tokens, eval mode.

Overhead % = time with adapter / bare time - 1, median of per-round paired ratios.
Takes about 2 minutes (--quick: about 30 s).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET_OVERHEAD = 5.0  # percent
PEFT_ANCHOR = {"prompt": 28.0, "prefix_mlp": 28.0}  # NOTES section 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    C.add_device_arg(ap)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    args = ap.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 6)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    args.out = args.out or C.default_out("generate_speed", args.device)
    C.setup(quick=args.quick, device=args.device)
    machine = C.machine_info()
    tok = C.load_tokenizer()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [C.generation_prompts(tok, offset=8 * i) for i in range(3)]
    longer = [C.generation_prompts(tok, offset=8 * i, extra=C.NUM_VIRTUAL) for i in range(3)]
    gen_kw = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False, "pad_token_id": pad}

    C.log("loading models")
    bare = C.load_base()
    spm = C.make_sp("prompt", name="prompt")
    spm.add_adapter("prefix_mlp", C.sp_config("prefix_mlp"))
    spm.eval()
    peft_models = {m: C.make_peft(m).eval() for m in ("prompt", "prefix_mlp")}

    # the seam must be exact with no adapter: same tokens as the untouched model
    with torch.no_grad():
        same = torch.equal(
            bare.generate(**prompts[0], **gen_kw),
            spm.generate(**prompts[0], adapter_names=[None] * 8, **gen_kw),
        )

    def p(r):
        return prompts[r % len(prompts)]

    def sp_gen(name):
        return lambda r: spm.generate(**p(r), adapter_names=[name] * 8, **gen_kw)

    def peft_gen(method):
        return lambda r: peft_models[method].generate(**p(r), **gen_kw)

    def sp_spliced(r):
        with C.sharing(spm, "never"):
            return spm.generate(**p(r), adapter_names=["prompt"] * 8, **gen_kw)

    shared = spm.info.shares_prompt
    fns = {
        "bare": lambda r: bare.generate(**p(r), **gen_kw),
        "bare_plus20": lambda r: bare.generate(**longer[r % len(longer)], **gen_kw),
        "sp_none": sp_gen(None),
        "sp_prompt": sp_gen("prompt"),
        **({"sp_prompt_spliced": sp_spliced} if shared else {}),
        "sp_prefix_mlp": sp_gen("prefix_mlp"),
        "peft_prompt": peft_gen("prompt"),
        "peft_prefix_mlp": peft_gen("prefix_mlp"),
    }
    C.log("timing")
    with torch.no_grad():
        t_all = C.interleaved(fns, repeats=args.repeats, warmup=args.warmup)
    t, dropped = C.clean(t_all)
    med = {k: C.median(v) for k, v in t.items()}
    over = {k: (C.paired_ratio(v, t["bare"]) - 1) * 100 for k, v in t.items() if k != "bare"}
    over_range = {k: C.ratio_range(v, t["bare"]) for k, v in t.items() if k != "bare"}
    new_tokens = 8 * 16

    def rng(k):
        lo, hi = over_range[k]
        return C.fmt_range(lo - 1, hi - 1, 100, "{:+.0f}%")

    def pct(v):
        return f"{v:+.1f}%"

    labels = {
        "bare": "bare model",
        "bare_plus20": "bare model, +20 real tokens per prompt (control)",
        "sp_none": "softprompt, no adapter (adapter_names=None)",
        "sp_prompt": "softprompt PromptTuning" + (" (shared prefix)" if shared else ""),
        "sp_prompt_spliced": "softprompt PromptTuning, spliced into every row (ablation)",
        "sp_prefix_mlp": "softprompt PrefixTuning (MLP 512)",
        "peft_prompt": "PEFT PromptTuning",
        "peft_prefix_mlp": "PEFT PrefixTuning (projection, h=512)",
    }
    rows = [
        [
            labels[k],
            f"{med[k]:.3f}",
            f"{new_tokens / med[k]:.1f}",
            "-" if k == "bare" else f"{pct(over[k])} {rng(k)}",
        ]
        for k in fns
    ]
    targets = []
    for m in ("prompt", "prefix_mlp"):
        v = over[f"sp_{m}"]
        why = ""
        if v > TARGET_OVERHEAD:
            ctrl = over["bare_plus20"]
            why = (
                f"the bare model given {C.NUM_VIRTUAL} extra real tokens is {pct(ctrl)} "
                "slower: the prefill computes 20 more positions per row whatever the library "
                "does; see the discussion for a fix (cache the virtual tokens' K/V)"
                if m == "prompt" and not shared
                else f"the virtual tokens run once as a shared prefix (spliced into every row: "
                f"{pct(over['sp_prompt_spliced'])}; the bare model given {C.NUM_VIRTUAL} extra "
                f"real tokens: {pct(ctrl)}); what remains is what prefix tuning pays: "
                "20 more keys in every attention call and re-joining the prefix to the cached "
                "keys/values at every decoding step (see the discussion)"
                if m == "prompt"
                else f"softprompt with no adapter: {pct(over['sp_none'])} (seam, frozen weights, noise); the "
                "rest is 20 more keys in every attention call and, in softprompt, re-joining "
                "the prefix to the cached keys/values at every decoding step (see the "
                "discussion)"
            )
        targets.append(
            C.target(
                f"generate overhead, sp {m}",
                f"<= {TARGET_OVERHEAD:.0f}%",
                pct(v),
                v <= TARGET_OVERHEAD,
                f"single rounds {rng(f'sp_{m}')}; PEFT in the same run: "
                f"{pct(over[f'peft_{m}'])} (NOTES: +{PEFT_ANCHOR[m]:.0f}%)",
                why,
            )
        )
    result = {
        "title": "Generation overhead",
        "order": 2,
        "machine": machine,
        "config": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "quick": args.quick,
            "rows": 8,
            "new_tokens": 16,
            "prompt_tokens": [int(x["attention_mask"].sum()) for x in prompts],
        },
        "intro": [
            "8 left-padded prompts, 16 new tokens each, greedy (`min_new_tokens=16`). "
            f"{args.repeats} timed rounds after {args.warmup} warm-up round(s), variants "
            f"interleaved; {dropped} contended round(s) dropped. Overhead: median of per-round "
            "paired ratios to the bare model, minus 1.",
            f"softprompt with no adapter generates exactly the bare model's tokens: **{same}**.",
            *(
                [
                    "softprompt's prompt tuning runs here as a shared key/value prefix: the "
                    "virtual tokens' keys and values are computed once per adapter and kept "
                    "between no-grad calls until the adapter changes (as a server reuses them), "
                    "so the timed calls do not recompute them. The spliced row is the same "
                    f"adapter with the {C.NUM_VIRTUAL} virtual tokens spliced into every row."
                ]
                if shared
                else []
            ),
        ],
        "tables": [
            {
                "title": "Generate time, 8 rows x 16 new tokens",
                "columns": ["variant", "time (s)", "new tokens/s", "overhead vs bare"],
                "rows": rows,
            }
        ],
        "targets": targets,
        "plots": [
            {
                "file": "generate_overhead.png",
                "title": "Generation overhead vs the bare model (8 rows x 16 tokens)",
                "ylabel": "overhead (%)",
                "labels": ["prompt tuning", "prefix (MLP)"],
                "series": {
                    "softprompt": [over["sp_prompt"], over["sp_prefix_mlp"]],
                    "PEFT": [over["peft_prompt"], over["peft_prefix_mlp"]],
                    "bare +20 tokens (control)": [over["bare_plus20"], over["bare_plus20"]],
                },
                "ref": TARGET_OVERHEAD,
            }
        ],
        "raw": {
            "overhead_range": over_range,
            "times": t_all,
            "medians": med,
            "overhead_pct": over,
            "identical_tokens": same,
            "rounds_dropped_contended": dropped,
        },
    }
    C.write_result("generate_speed", result, args.out)


if __name__ == "__main__":
    main()
