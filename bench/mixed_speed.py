"""Mixed-adapter batches: 8 rows from 4 or 8 different adapters in one call vs one adapter.

    python bench/mixed_speed.py [--quick] [--out bench/results/mixed_speed.json]

softprompt serves a batch whose rows use different adapters in one forward / one ``generate``
call (``adapter_names=[...]``, one name per row). PEFT ignores ``adapter_names`` for prompt
methods (forward) or rejects it (generate), so its best is one sub-batch per adapter with
``set_adapter`` (each sub-batch trimmed of its all-padding columns); that is what is timed for it.

Cases, each 8 left-padded Rotten Tomatoes prompts, no-grad forward (full logits) and greedy
``generate`` of 16 new tokens:

* single: all 8 rows use one adapter (the reference);
* mix4: rows use 4 adapters round-robin (2 rows each; forward only); mix8: 8 adapters, one row
  each;
* families: prefix tuning with MLP (8 adapters), prompt tuning (8 adapters), and "half/half":
  4 prompt-tuning + 4 prefix adapters in one batch (reference: the mean of the two families'
  single-adapter times). softprompt only: PEFT cannot hold both types in one model, and with one
  sub-batch per adapter its half/half batch is eight one-row calls, like its 8-adapter cases.

Throughput ratio = reference time / mixed time (1.0 = mixing is free), median of per-round
paired ratios. Takes about 5 minutes (--quick: about 1).

On this model softprompt runs prompt-tuning rows as a shared key/value prefix (see
``softprompt.model``), and keeps each adapter's prompt keys/values between no-grad calls until
the adapter changes, as a server does: the timed calls reuse them, in the single-adapter
reference as in the mixed batches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 0.95  # sp, 8 adapters
PEFT_ANCHOR_MIX4 = 0.76  # NOTES section 5
FAMILIES = {"prefix": "prefix_mlp", "prompt": "prompt"}


def names(family: str, k: int) -> list[str]:
    """Adapter names of 8 rows drawn round-robin from ``k`` adapters of a family."""
    if family == "half":
        pool = [f"prompt{i}" for i in range(k // 2)] + [f"prefix{i}" for i in range(k // 2)]
        pool = [n for pair in zip(pool[: k // 2], pool[k // 2 :], strict=True) for n in pair]
    else:
        pool = [f"{family}{i}" for i in range(k)]
    return [pool[i % k] for i in range(8)]


def trim(batch: dict, rows: list[int]) -> dict:
    """Rows of a left-padded batch, without columns that are padding in all of them."""
    mask = batch["attention_mask"][rows]
    start = int((mask.sum(0) > 0).nonzero()[0])
    return {k: v[rows][:, start:] for k, v in batch.items()}


class PeftServer:
    """PEFT's best for mixed batches: one sub-batch per adapter, ``set_adapter`` between them."""

    def __init__(self, models: dict[str, object]) -> None:
        self.models = models  # family -> PeftModel holding that family's adapters

    def _groups(self, rows: list[str]) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(rows):
            groups.setdefault(n, []).append(i)
        return groups

    def _model(self, name: str):
        model = self.models["prefix" if name.startswith("prefix") else "prompt"]
        model.set_adapter(name)
        return model

    def forward(self, batch: dict, rows: list[str]) -> torch.Tensor:
        out = [None] * len(rows)
        for name, idx in self._groups(rows).items():
            logits = self._model(name)(**trim(batch, idx)).logits[:, -1]  # (b, V) next token
            for j, i in enumerate(idx):
                out[i] = logits[j]
        return torch.stack(out)

    def generate(self, batch: dict, rows: list[str], **kw) -> list[torch.Tensor]:
        out = [None] * len(rows)
        for name, idx in self._groups(rows).items():
            seqs = self._model(name).generate(**trim(batch, idx), **kw)
            for j, i in enumerate(idx):
                out[i] = seqs[j, -kw["max_new_tokens"] :]
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    C.add_device_arg(ap)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    args = ap.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    args.out = args.out or C.default_out("mixed_speed", args.device)
    C.setup(quick=args.quick, device=args.device)
    machine = C.machine_info()
    tok = C.load_tokenizer()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [C.generation_prompts(tok, offset=8 * i) for i in range(3)]
    gen_kw = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False, "pad_token_id": pad}

    C.log("loading models: softprompt with 16 adapters, PEFT with 8 + 8")
    spm = C.make_sp("prefix_mlp", name="prefix0")
    peft_models = {}
    for family, method in FAMILIES.items():
        pm = C.make_peft(method, name=f"{family}0")
        for i in range(8):
            if i:
                torch.manual_seed(i)
                pm.add_adapter(f"{family}{i}", C.peft_config(method))
            if (family, i) != ("prefix", 0):
                spm.add_adapter(f"{family}{i}", C.sp_config(method, seed=i))
        peft_models[family] = pm.eval()
    spm.eval()
    peft = PeftServer(peft_models)

    cases = [
        ("prefix", 1),
        ("prefix", 4),
        ("prefix", 8),
        ("prompt", 1),
        ("prompt", 4),
        ("prompt", 8),
        ("half", 8),
    ]
    if args.quick:  # smoke run: skip the 4-adapter and half/half cases
        cases = [c for c in cases if c[1] != 4 and c[0] != "half"]
    fns = {}

    def p(r):
        return prompts[r % len(prompts)]

    for fam, k in cases:
        rows = names(fam, k)
        tag = f"{fam}_{k}"
        fns[f"sp_fwd_{tag}"] = lambda r, rows=rows: spm(**p(r), adapter_names=rows).logits
        if fam != "half":  # PEFT cannot hold both types in one model: one row per call, as mix8
            fns[f"peft_fwd_{tag}"] = lambda r, rows=rows: peft.forward(p(r), rows)
        if k == 4:  # generate only at 1 and 8 adapters (PEFT's sub-batch generates are slow)
            continue
        fns[f"sp_gen_{tag}"] = lambda r, rows=rows: spm.generate(
            **p(r), adapter_names=rows, **gen_kw
        )
        if fam != "half":
            fns[f"peft_gen_{tag}"] = lambda r, rows=rows: peft.generate(p(r), rows, **gen_kw)

    C.log(f"timing {len(fns)} variants")
    with torch.no_grad():
        t_all = C.interleaved(fns, repeats=args.repeats, warmup=args.warmup)
    t, dropped = C.clean(t_all)
    med = {k: C.median(v) for k, v in t.items()}

    def ref_times(lib: str, kind: str, fam: str) -> list[float]:
        if fam != "half":
            return t[f"{lib}_{kind}_{fam}_1"]
        a, b = t[f"{lib}_{kind}_prefix_1"], t[f"{lib}_{kind}_prompt_1"]
        return [(x + y) / 2 for x, y in zip(a, b, strict=True)]

    ratios, ranges = {}, {}
    table = []
    for fam, k in cases:
        if k == 1:
            continue
        row = [
            {
                "prefix": "prefix (MLP)",
                "prompt": "prompt tuning",
                "half": "half prompt / half prefix",
            }[fam],
            str(k),
        ]
        for kind in ("fwd", "gen"):
            for lib in ("sp", "peft"):
                key = f"{lib}_{kind}_{fam}_{k}"
                if key not in t:
                    row.append("-")
                    continue
                v = C.paired_ratio(ref_times(lib, kind, fam), t[key])
                ratios[key] = v
                ranges[key] = C.ratio_range(ref_times(lib, kind, fam), t[key])
                row.append(f"{C.fmt_x(v)} {C.fmt_range(*ranges[key])}")
        table.append(row)
    single = [
        [
            f"{fam} single adapter",
            f"{med[f'sp_fwd_{fam}_1']:.3f}",
            f"{med[f'peft_fwd_{fam}_1']:.3f}",
            f"{med[f'sp_gen_{fam}_1']:.3f}",
            f"{med[f'peft_gen_{fam}_1']:.3f}",
        ]
        for fam in FAMILIES
    ]

    targets = []
    for fam in dict.fromkeys(f for f, _ in cases):
        for kind, label in (("fwd", "forward"), ("gen", "generate")):
            v = ratios[f"sp_{kind}_{fam}_8"]
            pe = ratios.get(f"peft_{kind}_{fam}_8")
            why = ""
            if v < TARGET:
                why = (
                    "rows of prompt and prefix adapters in one batch: every row is padded to "
                    "the longest prompt (20 virtual tokens) and every attention call carries "
                    "the prefix columns (masked for prompt rows), so the batch does more work "
                    "than either single-family batch"
                    if fam == "half" and not spm.info.shares_prompt
                    else "see the discussion below"
                )
            targets.append(
                C.target(
                    f"8 adapters / 1 adapter, sp {label}, {fam}",
                    f">= {TARGET}x",
                    C.fmt_x(v),
                    v >= TARGET,
                    f"single rounds {C.fmt_range(*ranges[f'sp_{kind}_{fam}_8'])}"
                    + (f"; PEFT sub-batches: {C.fmt_x(pe)}" if pe else ""),
                    why,
                )
            )
    mix4 = [
        ratios[f"peft_{k}_{f}_4"]
        for k in ("fwd", "gen")
        for f in FAMILIES
        if f"peft_{k}_{f}_4" in ratios
    ]
    plotted = [
        (f"{f} x{k} {kind}", f"{kind}_{f}_{k}")
        for kind in ("fwd", "gen")
        for f, k in cases
        if k > 1 and f"sp_{kind}_{f}_{k}" in ratios
    ]
    plots = [
        {
            "file": "mixed_throughput.png",
            "title": "Throughput of a mixed-adapter batch of 8 relative to a single-adapter batch",
            "ylabel": "throughput ratio (1 = free)",
            "labels": [lab for lab, _ in plotted],
            "series": {
                "softprompt (one call)": [ratios[f"sp_{key}"] for _, key in plotted],
                "PEFT (sub-batch per adapter)": [
                    ratios.get(f"peft_{key}", float("nan")) for _, key in plotted
                ],
            },
            "ref": TARGET,
        }
    ]
    result = {
        "title": "Mixed-adapter batches",
        "order": 3,
        "machine": machine,
        "config": {"repeats": args.repeats, "warmup": args.warmup, "quick": args.quick},
        "intro": [
            "8 left-padded prompts; no-grad forward (logits) and greedy generate (16 new "
            f"tokens). {args.repeats} timed rounds after {args.warmup} warm-up round(s), all "
            f"{len(fns)} variants interleaved; {dropped} contended round(s) dropped. Ratio: "
            "single-adapter time / mixed time (median of per-round paired ratios; 1.0 means "
            "mixing adapters costs nothing). softprompt: one call with `adapter_names`; "
            "PEFT: one sub-batch per adapter with `set_adapter` (its best; NOTES measured "
            f"{PEFT_ANCHOR_MIX4}x at 4 adapters; here: "
            + ", ".join(C.fmt_x(v) for v in mix4)
            + " for fwd prefix/prompt, gen prefix/prompt).",
        ],
        "tables": [
            {
                "title": "Throughput ratio, mixed batch / single-adapter batch",
                "columns": ["adapters", "k", "sp fwd", "PEFT fwd", "sp generate", "PEFT generate"],
                "rows": table,
            },
            {
                "title": "Single-adapter reference times (s)",
                "columns": ["case", "sp fwd", "PEFT fwd", "sp generate", "PEFT generate"],
                "rows": single,
            },
        ],
        "targets": targets,
        "plots": plots,
        "raw": {
            "ranges": ranges,
            "times": t_all,
            "medians": med,
            "ratios": ratios,
            "rounds_dropped_contended": dropped,
            "rows": {f"{f}_{k}": names(f, k) for f, k in cases},
        },
    }
    C.write_result("mixed_speed", result, args.out)


if __name__ == "__main__":
    main()
