"""Training-step speed and memory: softprompt vs PEFT, four method pairs.

    python bench/train_speed.py [--quick] [--out bench/results/train_speed.json]

SmolLM2-135M-Instruct fp32 on CPU, torch.set_num_threads(2), batch 8 x ~40 tokens of Rotten
Tomatoes reviews ("Review: {text}\\nSentiment: {label}", loss on the answer token only), 20
virtual tokens, AdamW. For each method pair, in one process, these are timed interleaved (the
order rotates every round), each round on the same batch for everyone:

* sp_step: softprompt training step (forward + backward + AdamW step) with the trainer's loss
  (``softprompt.lm.lm_loss`` when it exists, else ``model(**batch).loss``; the JSON says which);
* sp_step_full: the same with ``model(**batch).loss`` (LM head over every position), i.e. the
  same loss PEFT computes: separates library overhead from the cheaper loss;
* peft_step: PEFT training step, ``peft_model(**batch).loss``;
* sp_fwd / peft_fwd: the same prompted model's no-grad forward computing the same loss as its
  training step;
* bare_fwd: the untouched base model's no-grad forward with labels (NOTES section 5's anchor).

Peak memory: each (library, method) runs in a fresh subprocess (``--memory-child``) that loads
the model, builds the optimiser, runs one no-grad forward (pages the memory-mapped weights in),
releases freed heap (malloc_trim), resets the kernel's peak-RSS
mark (/proc/self/clear_refs) and then runs training steps; it reports VmHWM - VmRSS-before, i.e.
the extra resident memory training needs on top of the loaded model (activations, gradients,
optimiser state, allocator slack). Takes about 8 minutes (--quick: about 1.5).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# NOTES.md section 5: PEFT train step / bare no-grad forward, measured earlier on this setup.
PEFT_ANCHOR = {"prompt": 3.16, "prefix_mlp": 2.42, "prefix_flat": 2.28, "ptuning_mlp": 3.63}
TARGET_THROUGHPUT = 1.3
INPUT_LEVEL = ("prompt", "ptuning_mlp")  # virtual tokens lengthen the sequence
TARGET_STEP_OVER_FWD = 2.2


def gpu_throughput_why(same_loss: str) -> str:
    return (
        f"host-bound: at 8 x ~40 tokens a step is ~0.1 s of kernel launches and Python for both "
        f"libraries, the arithmetic well under 1 ms; softprompt's CPU gains (LM head only on "
        f"answer tokens, prompt run once per batch) remove arithmetic, not launches. With "
        f"PEFT's full-head loss: {same_loss}. Fewer launches (CUDA graphs, torch.compile of the "
        f"frozen body) or larger batches would move it; not tried"
    )


def gpu_step_why(peft: str) -> str:
    return (
        f"PEFT: {peft}. Host-bound: backward launches about twice the kernels of a forward, "
        "so on a launch-bound GPU the ratio follows kernel counts, not arithmetic"
    )


def memory_child(lib: str, method: str, steps: int, device: str = "cpu") -> dict:
    """Runs in a fresh process: extra resident memory (on a GPU: extra peak CUDA allocation) of
    ``steps`` training steps."""
    C.setup(device=device)
    tok = C.load_tokenizer()
    batches = C.train_batches(tok, n_batches=max(steps, 1))
    if lib.startswith("sp"):
        model = C.make_sp(method)
        model.train()
        params = model.parameters_to_train()
        if lib == "sp":
            C.resolve_sp_loss(model, batches[0])
            loss_fn = C.sp_loss
        else:
            loss_fn = C.full_loss
    else:
        model = C.make_peft(method)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        loss_fn = C.full_loss
    opt = torch.optim.AdamW(params, lr=1e-3)
    # One no-grad forward first: safetensors weights are memory-mapped and become resident only
    # when first read; without this a library whose setup ran no forward would be charged for
    # paging in the 538 MB model.
    with torch.no_grad():
        model(**batches[0])
    if C.on_gpu():
        C.sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(C.DEVICE)
        reset_ok = True
        before = torch.cuda.memory_allocated(C.DEVICE) / 2**20
    else:
        reset_ok = C.reset_peak_rss()
        before = C.rss_mb()
    for i in range(steps):
        C.train_step(model, opt, loss_fn, batches[i % len(batches)])
    if C.on_gpu():
        C.sync()
        peak = torch.cuda.max_memory_allocated(C.DEVICE) / 2**20
    else:
        peak = C.peak_rss_mb()
    return {
        "lib": lib,
        "method": method,
        "steps": steps,
        "rss_before_mb": round(before, 1),
        "peak_mb": round(peak, 1),
        "delta_mb": round(peak - before, 1),
        "peak_reset": reset_ok,
        "loss": C.SP_LOSS_NAME if lib == "sp" else "model(**batch).loss",
        "trainable_params": sum(p.numel() for p in params),
    }


def run_memory(methods: list[str], steps: int, libs=("sp", "sp_full", "peft")) -> list[dict]:
    out = []
    for method in methods:
        for lib in libs:
            C.log(f"memory: {lib} {method}")
            cmd = [sys.executable, __file__, "--memory-child", lib, method, "--steps", str(steps)]
            cmd += ["--device", C.DEVICE.type]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                out.append({"lib": lib, "method": method, "error": proc.stderr[-2000:]})
                C.log(f"memory child failed: {proc.stderr[-500:]}")
                continue
            out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def time_method(method: str, bare, batches: list[dict], repeats: int, warmup: int) -> dict:
    """Interleaved step and forward timings of one method pair; returns the row (with raw)."""
    real_tokens = [int(b["attention_mask"].sum()) for b in batches]
    spm = C.make_sp(method)
    spm.train()
    pm = C.make_peft(method)
    pm.train()
    loss_name = C.resolve_sp_loss(spm, batches[0])
    sp_params = spm.parameters_to_train()
    peft_params = [p for p in pm.parameters() if p.requires_grad]
    sp_opt = torch.optim.AdamW(sp_params, lr=1e-3)
    peft_opt = torch.optim.AdamW(peft_params, lr=1e-3)

    def batch(r):
        return batches[r % len(batches)]

    def step(model, opt, loss_fn):
        return lambda r: C.train_step(model, opt, loss_fn, batch(r))

    def nograd(model, loss_fn, mode=None):
        def f(r):
            with C.sharing(model, mode), torch.no_grad():
                loss_fn(model, batch(r))

        return f

    # the no-grad forward runs the virtual tokens the way the training step does ("auto" may
    # share them without autograd but splice them under it, e.g. on a GPU)
    step_shares = C.auto_shares(spm, batches[0])
    fwd_sharing = ("always" if step_shares else "never") if spm.info.shares_prompt else None
    fns = {
        "sp_step": step(spm, sp_opt, C.sp_loss),
        "peft_step": step(pm, peft_opt, C.full_loss),
        "sp_fwd": nograd(spm, C.sp_loss, fwd_sharing),
        "peft_fwd": nograd(pm, C.full_loss),
        "bare_fwd": nograd(bare, C.full_loss),
    }
    lm = loss_name == "softprompt.lm.lm_loss"
    if lm:
        fns["sp_step_full"] = step(spm, sp_opt, C.full_loss)
    shared = method in INPUT_LEVEL and spm.info.shares_prompt
    if shared:  # ablation: virtual tokens spliced into every row vs a shared prefix

        def sharing_step(mode):
            def f(r):
                with C.sharing(spm, mode):
                    return C.train_step(spm, sp_opt, C.sp_loss, batch(r))

            return f

        fns["sp_step_splice"] = sharing_step("never")
        fns["sp_step_shared"] = sharing_step("always")
    t_all = C.interleaved(fns, repeats=repeats, warmup=warmup)
    t, dropped = C.clean(t_all)
    rounds = [warmup + i for i, o in enumerate(t_all["_others"]) if not dropped or o <= C.BUSY]
    tok_per_step = [real_tokens[r % len(batches)] for r in rounds]
    med = {k: C.median(v) for k, v in t.items()}
    row = {
        "method": method,
        "sp_label": C.METHODS[method][0],
        "peft_label": C.METHODS[method][1],
        "sp_loss": loss_name,
        "trainable_sp": sum(p.numel() for p in sp_params),
        "trainable_peft": sum(p.numel() for p in peft_params),
        **{f"{k}_s": v for k, v in med.items()},
        "sp_tokens_per_s": C.median(
            [n / s for n, s in zip(tok_per_step, t["sp_step"], strict=True)]
        ),
        "peft_tokens_per_s": C.median(
            [n / s for n, s in zip(tok_per_step, t["peft_step"], strict=True)]
        ),
        # throughput ratio sp / PEFT = PEFT time / sp time, paired per round
        "throughput_ratio": C.paired_ratio(t["peft_step"], t["sp_step"]),
        "throughput_ratio_range": C.ratio_range(t["peft_step"], t["sp_step"]),
        "sp_step_over_own_fwd_range": C.ratio_range(t["sp_step"], t["sp_fwd"]),
        "sp_step_over_bare_fwd": C.paired_ratio(t["sp_step"], t["bare_fwd"]),
        "peft_step_over_bare_fwd": C.paired_ratio(t["peft_step"], t["bare_fwd"]),
        "sp_step_over_own_fwd": C.paired_ratio(t["sp_step"], t["sp_fwd"]),
        "peft_step_over_own_fwd": C.paired_ratio(t["peft_step"], t["peft_fwd"]),
        "sp_fwd_over_bare_fwd": C.paired_ratio(t["sp_fwd"], t["bare_fwd"]),
        "peft_fwd_over_bare_fwd": C.paired_ratio(t["peft_fwd"], t["bare_fwd"]),
        "spread": {k: round(C.spread(v), 3) for k, v in t.items()},
        "rounds_used": len(t["sp_step"]),
        "rounds_dropped_contended": dropped,
        "others_cores_max": max(t_all["_others"]),
        "times": t_all,
    }
    if shared:
        row["shared_prompt_speedup"] = C.paired_ratio(t["sp_step_splice"], t["sp_step_shared"])
        row["shared_prompt_speedup_range"] = C.ratio_range(t["sp_step_splice"], t["sp_step_shared"])
        row["throughput_ratio_splice"] = C.paired_ratio(t["peft_step"], t["sp_step_splice"])
        row["throughput_ratio_shared"] = C.paired_ratio(t["peft_step"], t["sp_step_shared"])
        row["auto_shares"] = step_shares  # which of the two the default takes in training
    if lm:
        row["throughput_ratio_full_loss"] = C.paired_ratio(t["peft_step"], t["sp_step_full"])
        row["throughput_ratio_full_loss_range"] = C.ratio_range(t["peft_step"], t["sp_step_full"])
        row["sp_full_step_over_bare_fwd"] = C.paired_ratio(t["sp_step_full"], t["bare_fwd"])
    return row


def bucketing(repeats: int, warmup: int, rows: int = 64, batch: int = 8) -> dict:
    """Length-bucketed vs random batches of the same training rows (the trainer's
    ``--group-by-length``): padding share over an epoch of 2,048 rows, and the time of one pass
    over ``rows`` rows (prompt tuning, the trainer's loss), both orders timed interleaved."""
    from softprompt.trainer import length_grouped_batches

    tok = C.load_tokenizer()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ex = C.review_examples(tok, 2048)
    lengths = [len(p) + len(a) for p, a in ex]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(ex), generator=g).tolist()
    plain = [order[i : i + batch] for i in range(0, len(order), batch)]
    grouped = length_grouped_batches(order, lengths, batch, g)

    def share(batches):
        slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return 1 - sum(lengths) / slots

    sub = order[:rows]  # one pool's worth of rows, batched both ways
    sets = {
        "random": [
            C.pack_batch([ex[i] for i in sub[k : k + batch]], pad) for k in range(0, rows, batch)
        ],
        "grouped": [
            C.pack_batch([ex[i] for i in b], pad)
            for b in length_grouped_batches(sub, lengths, batch, torch.Generator().manual_seed(1))
        ],
    }
    model = C.make_sp("prompt")
    model.train()
    C.resolve_sp_loss(model, sets["random"][0])
    opt = torch.optim.AdamW(model.parameters_to_train(), lr=1e-3)

    def epoch(name):
        return lambda r: [C.train_step(model, opt, C.sp_loss, b) for b in sets[name]]

    t_all = C.interleaved({k: epoch(k) for k in sets}, repeats=repeats, warmup=warmup)
    t, dropped = C.clean(t_all)
    return {
        "padding_random": share(plain),
        "padding_grouped": share(grouped),
        "slots": {k: int(sum(b["input_ids"].numel() for b in v)) for k, v in sets.items()},
        "real_tokens": int(sum(lengths[i] for i in sub)),
        "random_s": C.median(t["random"]),
        "grouped_s": C.median(t["grouped"]),
        "speedup": C.paired_ratio(t["random"], t["grouped"]),
        "speedup_range": C.ratio_range(t["random"], t["grouped"]),
        "rounds_used": len(t["random"]),
        "rounds_dropped_contended": dropped,
        "times": t_all,
    }


def deep_layers(batches: list[dict], repeats: int, warmup: int) -> dict:
    """Deep prompts on all 30 layers vs on the top 15 (``layers="top_half"``): backward stops
    at the lowest prompted layer, because nothing below it depends on the adapter."""
    import softprompt as sp

    model = sp.attach(C.load_base())
    opts = {}
    for name, layers in (("all", None), ("top_half", "top_half")):
        model.add_adapter(
            name, sp.DeepPromptConfig(num_virtual_tokens=C.NUM_VIRTUAL, layers=layers)
        )
        opts[name] = torch.optim.AdamW(model.adapters[name].parameters(), lr=1e-3)
    model.train()
    C.resolve_sp_loss(model, batches[0])
    # the top-half adapter with the frozen lower blocks cached (the trainer's default after the
    # first epoch): fill the cache with every batch once, as the first epoch does
    model.set_active("top_half")
    lc = model.cache_lower_layers()
    with torch.no_grad():
        for b in batches:
            C.sp_loss(model, b)
    model._layer_cache = None
    opts["top_half_cached"] = opts["top_half"]

    def step(name):
        def f(r):
            model.set_active(name.replace("_cached", ""))
            model._layer_cache = lc if name.endswith("_cached") else None
            C.train_step(model, opts[name], C.sp_loss, batches[r % len(batches)])

        return f

    def fwd(name):
        def f(r):
            model.set_active(name.replace("_cached", ""))
            model._layer_cache = lc if name.endswith("_cached") else None
            with torch.no_grad():
                C.sp_loss(model, batches[r % len(batches)])

        return f

    fns = {f"{k}_{n}": f(n) for n in opts for k, f in (("step", step), ("fwd", fwd))}
    t_all = C.interleaved(fns, repeats=repeats, warmup=warmup)
    t, dropped = C.clean(t_all)
    return {
        **{f"{k}_s": C.median(v) for k, v in t.items()},
        "speedup": C.paired_ratio(t["step_all"], t["step_top_half"]),
        "speedup_range": C.ratio_range(t["step_all"], t["step_top_half"]),
        "step_over_fwd_all": C.paired_ratio(t["step_all"], t["fwd_all"]),
        "step_over_fwd_top_half": C.paired_ratio(t["step_top_half"], t["fwd_top_half"]),
        "cached_speedup": C.paired_ratio(t["step_all"], t["step_top_half_cached"]),
        "cached_speedup_range": C.ratio_range(t["step_all"], t["step_top_half_cached"]),
        "cached_over_uncached": C.paired_ratio(t["step_top_half"], t["step_top_half_cached"]),
        "step_cached_over_fwd_all": C.paired_ratio(t["step_top_half_cached"], t["fwd_all"]),
        "step_over_fwd_top_half_cached": C.paired_ratio(
            t["step_top_half_cached"], t["fwd_top_half_cached"]
        ),
        "cache_mb": lc.bytes / 2**20,
        "cache_hits": lc.hits,
        "batches": len(batches),
        "rounds_used": len(t["step_all"]),
        "rounds_dropped_contended": dropped,
        "times": t_all,
    }


def run_speed(methods: list[str], repeats: int, warmup: int) -> tuple[list[dict], dict]:
    tok = C.load_tokenizer()
    batches = C.train_batches(tok, n_batches=4)
    bare = C.load_base()
    rows = []
    for method in methods:
        C.log(f"speed: {method}")
        rows.append(time_method(method, bare, batches, repeats, warmup))
    raw = {r["method"]: r.pop("times") for r in rows}
    seq = int(sum(b["input_ids"].shape[1] for b in batches) / len(batches))
    info = {
        "real_tokens_per_batch": [int(b["attention_mask"].sum()) for b in batches],
        "sp_loss": rows[0]["sp_loss"],
        "lm_head_fraction": {
            "plain": C.lm_head_fraction(bare.config, seq),
            "with_20_virtual": C.lm_head_fraction(bare.config, seq + C.NUM_VIRTUAL),
        },
        "batch_shapes": [list(b["input_ids"].shape) for b in batches],
    }
    return rows, {"times": raw, **info}


def build_result(rows, mem, info, args, machine, buckets=None, deep=None) -> dict:
    x = C.fmt_x
    lm = info["sp_loss"] == "softprompt.lm.lm_loss"
    speed_cols = ["method (softprompt / PEFT)", "sp step (s)"]
    if lm:
        speed_cols.append("sp step, full-head loss (s)")
    speed_cols += ["PEFT step (s)", "sp tokens/s", "PEFT tokens/s", "throughput sp/PEFT"]
    if lm:
        speed_cols.append("sp/PEFT, same loss")
    speed_cols.append("rounds (dropped)")
    speed_rows = []
    for r in rows:
        line = [f"{r['sp_label']} / {r['peft_label']}", f"{r['sp_step_s']:.3f}"]
        if lm:
            line.append(f"{r['sp_step_full_s']:.3f}")
        line += [
            f"{r['peft_step_s']:.3f}",
            f"{r['sp_tokens_per_s']:.0f}",
            f"{r['peft_tokens_per_s']:.0f}",
            x(r["throughput_ratio"]) + " " + C.fmt_range(*r["throughput_ratio_range"]),
        ]
        if lm:
            line.append(
                x(r["throughput_ratio_full_loss"])
                + " "
                + C.fmt_range(*r["throughput_ratio_full_loss_range"])
            )
        line.append(f"{r['rounds_used']} ({r['rounds_dropped_contended']})")
        speed_rows.append(line)

    ratio_cols = [
        "method",
        "sp step / bare fwd",
        "PEFT step / bare fwd",
        "PEFT anchor (NOTES)",
        "sp step / own fwd",
        "PEFT step / own fwd",
        "sp fwd / bare fwd",
        "PEFT fwd / bare fwd",
    ]
    ratio_rows = [
        [
            r["method"],
            x(r["sp_step_over_bare_fwd"]),
            x(r["peft_step_over_bare_fwd"]),
            x(PEFT_ANCHOR[r["method"]]),
            x(r["sp_step_over_own_fwd"]),
            x(r["peft_step_over_own_fwd"]),
            x(r["sp_fwd_over_bare_fwd"]),
            x(r["peft_fwd_over_bare_fwd"]),
        ]
        for r in rows
    ]

    mem_by = {(m["lib"], m["method"]): m for m in mem}
    mem_rows = []
    for method in dict.fromkeys(m["method"] for m in mem):
        cells = [method]
        for lib in ("sp", "sp_full", "peft"):
            m = mem_by.get((lib, method), {})
            cells.append(
                f"{m['delta_mb']:.0f}" if "delta_mb" in m else ("error" if m else "not run")
            )
        sp_m, pe_m = mem_by.get(("sp", method), {}), mem_by.get(("peft", method), {})
        if "delta_mb" in sp_m and "delta_mb" in pe_m:
            cells.append(f"{sp_m['delta_mb'] / pe_m['delta_mb']:.2f}")
        else:
            cells.append("-")
        mem_rows.append(cells)

    shared_rows = [
        [
            r["method"],
            f"{r['sp_step_splice_s']:.3f}",
            f"{r['sp_step_shared_s']:.3f}",
            x(r["shared_prompt_speedup"]) + " " + C.fmt_range(*r["shared_prompt_speedup_range"]),
            x(r["throughput_ratio_splice"]),
            x(r["throughput_ratio_shared"]),
            "shared" if r.get("auto_shares") else "spliced",
        ]
        for r in rows
        if "shared_prompt_speedup" in r
    ]
    bucket_tables = []
    if buckets:
        bucket_tables.append(
            {
                "title": "Length-bucketed batches (`softprompt train --group-by-length`) vs random "
                "batches, prompt tuning",
                "columns": [
                    "order",
                    "padding share (epoch of 2,048 rows)",
                    f"padded slots ({buckets['real_tokens']} real tokens)",
                    "time for the same rows (s)",
                    "speedup",
                ],
                "rows": [
                    [
                        "random",
                        f"{buckets['padding_random']:.0%}",
                        f"{buckets['slots']['random']}",
                        f"{buckets['random_s']:.2f}",
                        "-",
                    ],
                    [
                        "grouped by length",
                        f"{buckets['padding_grouped']:.0%}",
                        f"{buckets['slots']['grouped']}",
                        f"{buckets['grouped_s']:.2f}",
                        x(buckets["speedup"]) + " " + C.fmt_range(*buckets["speedup_range"]),
                    ],
                ],
                "notes": "The same 64 training reviews (all lengths, as the trainer sees them) "
                "batched 8 at a time in random order or grouped by length, one training step per "
                f"batch, both timed interleaved over {buckets['rounds_used']} rounds. Off by "
                "default (as in transformers' Trainer): batches of similar rows change the "
                "gradient noise a little.",
            }
        )
    if deep:
        bucket_tables.append(
            {
                "title": "Deep prompts on the top half of the layers vs on all layers",
                "columns": ["layers", "step (s)", "no-grad fwd (s)", "step / fwd", "speedup"],
                "rows": [
                    [
                        "all 30",
                        f"{deep['step_all_s']:.3f}",
                        f"{deep['fwd_all_s']:.3f}",
                        x(deep["step_over_fwd_all"]),
                        "-",
                    ],
                    [
                        'top 15 (`layers="top_half"`)',
                        f"{deep['step_top_half_s']:.3f}",
                        f"{deep['fwd_top_half_s']:.3f}",
                        x(deep["step_over_fwd_top_half"]),
                        x(deep["speedup"]) + " " + C.fmt_range(*deep["speedup_range"]),
                    ],
                    [
                        "top 15, lower 15 cached (epochs 2+)",
                        f"{deep['step_top_half_cached_s']:.3f}",
                        f"{deep['fwd_top_half_cached_s']:.3f}",
                        x(deep["step_over_fwd_top_half_cached"]),
                        x(deep["cached_speedup"])
                        + " "
                        + C.fmt_range(*deep["cached_speedup_range"]),
                    ],
                ],
                "notes": "Same model and batches, interleaved; speedup against all 30 layers. "
                "Nothing below the lowest prompted layer depends on the adapter, so autograd "
                "records nothing there and backward stops at layer 15 by itself. With the cache "
                "(`softprompt.layer_cache`, on by default in the trainer) what enters layer 15 is "
                "kept per sequence during the first epoch, and later steps start the forward "
                "there: the lower 15 layers run once per training row instead of once per epoch "
                f"({x(deep['cached_over_uncached'])} over the uncached top-half step; the cache "
                f"holds {deep['cache_mb']:.1f} MB for the {deep['batches']} batches of 8 rows).",
            }
        )
    targets = []
    for r in rows:
        tr = r["throughput_ratio"]
        why = ""
        if tr < TARGET_THROUGHPUT:
            hf = info["lm_head_fraction"]["with_20_virtual"]
            same = x(r.get("throughput_ratio_full_loss", tr))
            if C.on_gpu():
                why = gpu_throughput_why(same)
            elif r["method"] in INPUT_LEVEL and "shared_prompt_speedup" in r:
                why = (
                    f"with PEFT's full-head loss softprompt is {same} PEFT. Two gains stack: the "
                    f"LM head only on answer tokens ({hf:.0%} of a forward's multiply-adds) and "
                    f"the virtual tokens run once per batch instead of once per row "
                    f"({x(r['shared_prompt_speedup'])} in this run)"
                )
            elif r["method"] in INPUT_LEVEL:
                why = (
                    f"with PEFT's full-head loss softprompt is {same} PEFT: both run the same "
                    f"transformer on the same {C.NUM_VIRTUAL}+T positions. The gain comes from "
                    f"the LM head, {hf:.0%} of a forward's multiply-adds here, run only on "
                    f"answer tokens: at most about {x(1 / (1 - hf))} from the loss alone"
                )
            else:
                why = (
                    f"with PEFT's full-head loss softprompt is {same} PEFT; both run the "
                    "transformer on T positions with 20 extra keys per attention call, so the "
                    f"head ({hf:.0%} of a forward) and PEFT's per-row prefix handling are all "
                    "there is to gain"
                )
        lo, hi = r["throughput_ratio_range"]
        detail = (
            f"{(tr / TARGET_THROUGHPUT - 1) * 100:+.0f}% vs target; single rounds "
            f"{C.fmt_range(lo, hi)}"
        )
        targets.append(
            C.target(
                f"throughput sp/PEFT, {r['method']}",
                f">= {TARGET_THROUGHPUT}x",
                x(tr),
                tr >= TARGET_THROUGHPUT,
                detail,
                why,
            )
        )
    for r in rows:
        v = r["sp_step_over_own_fwd"]
        why = ""
        if v > TARGET_STEP_OVER_FWD and C.on_gpu():
            why = gpu_step_why(x(r["peft_step_over_own_fwd"]))
        elif v > TARGET_STEP_OVER_FWD:
            why = (
                f"PEFT: {x(r['peft_step_over_own_fwd'])}. Backward through a frozen model "
                "costs about one forward in matmuls, but attention and elementwise backward "
                "kernels cost more than their forward, and the no-grad forward saves no "
                "activations"
            )
        targets.append(
            C.target(
                f"sp step / own no-grad fwd, {r['method']}",
                f"<= {TARGET_STEP_OVER_FWD}x",
                x(v),
                v <= TARGET_STEP_OVER_FWD,
                f"{(v / TARGET_STEP_OVER_FWD - 1) * 100:+.0f}% vs target; single rounds "
                + C.fmt_range(*r["sp_step_over_own_fwd_range"]),
                why,
            )
        )
    for cells in mem_rows:
        method = cells[0]
        sp_m, pe_m = mem_by.get(("sp", method), {}), mem_by.get(("peft", method), {})
        if "delta_mb" not in sp_m or "delta_mb" not in pe_m:
            continue
        a, b = sp_m["delta_mb"], pe_m["delta_mb"]
        targets.append(
            C.target(
                f"training memory sp <= PEFT, {method}",
                "<= PEFT",
                f"{a:.0f} vs {b:.0f} MB",
                a <= b,
                f"{(a / b - 1) * 100:+.0f}%",
                "",
            )
        )

    labels = [r["method"] for r in rows]
    plots = [
        {
            "file": "train_step_time.png",
            "title": "Training step time (median), batch 8 x ~40 tokens, "
            + (C.device_label() if C.on_gpu() else f"{machine['torch_threads']} threads"),
            "ylabel": "seconds per step",
            "labels": labels,
            "series": {
                "softprompt": [r["sp_step_s"] for r in rows],
                **(
                    {"softprompt, full-head loss": [r["sp_step_full_s"] for r in rows]}
                    if lm
                    else {}
                ),
                "PEFT": [r["peft_step_s"] for r in rows],
                "bare model no-grad fwd": [r["bare_fwd_s"] for r in rows],
            },
        }
    ]
    if mem_rows:
        plots.append(
            {
                "file": "train_memory.png",
                "title": "Extra peak CUDA memory of training steps"
                if C.on_gpu()
                else "Extra resident memory of training steps (VmHWM - RSS before)",
                "ylabel": "MB",
                "labels": [c[0] for c in mem_rows],
                "series": {
                    lib: [mem_by.get((lib, c[0]), {}).get("delta_mb", 0) for c in mem_rows]
                    for lib in ("sp", "sp_full", "peft")
                },
            }
        )
    intro = [
        "SmolLM2-135M-Instruct fp32, "
        + (
            f"{C.device_label()} (TF32 off, the host clock read after a device synchronise)"
            if C.on_gpu()
            else f"CPU, {machine['torch_threads']} threads"
        )
        + "; batch 8 rows of "
        f"Rotten Tomatoes reviews, {min(info['real_tokens_per_batch'])}-"
        f"{max(info['real_tokens_per_batch'])} real tokens per batch (shapes "
        f"{info['batch_shapes']}), loss on the answer token only; {C.NUM_VIRTUAL} virtual "
        f"tokens; AdamW. {args.repeats} timed rounds after {args.warmup} warm-up rounds; in each "
        "round every variant runs once on the same batch, in rotating order. Times are medians; "
        "ratios are medians of per-round paired ratios. Rounds during which other processes used "
        f"more than {C.BUSY} cores are dropped when at least 3 clean rounds remain.",
        f"softprompt's training loss in this run: `{info['sp_loss']}`. PEFT's: "
        "`peft_model(**batch).loss` (LM head over all positions). The column 'same loss' runs "
        "softprompt with PEFT's full-head loss, to separate the library from the loss.",
    ]
    return {
        "title": "Training speed and memory",
        "order": 1,
        "machine": machine,
        "config": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "quick": args.quick,
            "mem_steps": args.mem_steps,
        },
        "intro": intro,
        "tables": [
            {"title": "Step time and throughput", "columns": speed_cols, "rows": speed_rows},
            *(
                [
                    {
                        "title": "Input-level methods: virtual tokens spliced into every row vs "
                        "run once as a shared key/value prefix (`model.prompt_sharing`; rotary "
                        "causal LMs only)",
                        "columns": [
                            "method",
                            "sp step, spliced (s)",
                            "sp step, shared (s)",
                            "speedup",
                            "sp/PEFT spliced",
                            "sp/PEFT shared",
                            "default (auto) takes",
                        ],
                        "rows": shared_rows,
                        "notes": "Same model, optimiser and batches, interleaved in the same "
                        "rounds; only `model.prompt_sharing` ('never' / 'always') differs. The two give the same "
                        "loss and gradients (tests/test_model.py::test_shared_prompt_equals_"
                        "splicing).",
                    }
                ]
                if shared_rows
                else []
            ),
            {
                "title": "Step time relative to forward passes",
                "columns": ratio_cols,
                "rows": ratio_rows,
                "notes": "bare fwd: the untouched model's no-grad forward with labels (full LM head). "
                "own fwd: the same prompted model's no-grad forward computing the same loss "
                "as its training step. The floor for a frozen model's step is about 2x a "
                "forward (forward + backward through activations).",
            },
            *bucket_tables,
            {
                "title": "Peak training memory (MB above the loaded model)",
                "columns": ["method", "sp", "sp, full-head loss", "PEFT", "sp / PEFT"],
                "rows": mem_rows,
                "notes": f"Each cell is a fresh process running {args.mem_steps} training step(s): "
                + (
                    "`torch.cuda.max_memory_allocated` after the steps minus "
                    "`memory_allocated` before them (peak reset after loading and one no-grad "
                    "forward). Includes activations, gradients and AdamW state; excludes the "
                    "538 MB model and the caching allocator's reserve."
                    if C.on_gpu()
                    else "VmHWM (kernel peak RSS, reset via /proc/self/clear_refs after loading "
                    "and malloc_trim) minus RSS before the first step. Includes activations, "
                    "gradients, AdamW state and allocator slack; excludes the 538 MB model."
                ),
            },
        ],
        "targets": targets,
        "plots": plots,
        "raw": {"rows": rows, "memory": mem, "bucketing": buckets, "deep_layers": deep, **info},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repeats, one method for memory")
    ap.add_argument("--out", type=Path, default=None)
    C.add_device_arg(ap)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--mem-steps", type=int, default=None)
    ap.add_argument(
        "--methods",
        nargs="*",
        default=None,
        help="default: all four (--quick: prompt and prefix_mlp)",
    )
    ap.add_argument("--memory-child", nargs=2, metavar=("LIB", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument(
        "--only-deep",
        action="store_true",
        help="rerun only the deep-prompt ablation and update the existing result file",
    )
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child, args.steps, args.device)))
        return
    args.out = args.out or C.default_out("train_speed", args.device)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    args.mem_steps = args.mem_steps or (1 if args.quick else 2)
    args.methods = args.methods or (["prompt", "prefix_mlp"] if args.quick else list(C.METHODS))
    C.setup(quick=args.quick, device=args.device)
    machine = C.machine_info()
    if args.only_deep:  # rerun one ablation; everything else from the result file as it is
        old = json.loads(args.out.read_text())
        raw = old["raw"]
        info = {k: v for k, v in raw.items() if k not in ("rows", "memory", "bucketing")}
        info.pop("deep_layers")
        C.log("speed: deep prompts on the top half")
        batches = C.train_batches(C.load_tokenizer(), n_batches=4)
        deep = deep_layers(batches, args.repeats, args.warmup)
        result = build_result(
            raw["rows"], raw["memory"], info, args, old["machine"], raw["bucketing"], deep
        )
        result.setdefault("notes", []).append(
            f"The deep-prompt ablation was rerun alone on {machine.get('date', 'a later date')} "
            "(`--only-deep`); the other tables are from the full run."
        )
        C.write_result("train_speed", result, args.out)
        return
    rows, info = run_speed(args.methods, args.repeats, args.warmup)
    C.log("speed: length bucketing")
    buckets = bucketing(max(2, args.repeats - 2), args.warmup)
    C.log("speed: deep prompts on the top half")
    deep = deep_layers(C.train_batches(C.load_tokenizer(), n_batches=4), args.repeats, args.warmup)
    mem_methods = args.methods[:1] if args.quick else args.methods
    mem = []
    for i, method in enumerate(mem_methods):  # the full-loss variant for one method suffices
        libs = ("sp", "sp_full", "peft") if i == 0 and not args.quick else ("sp", "peft")
        mem += run_memory([method], args.mem_steps, libs)
    C.write_result(
        "train_speed", build_result(rows, mem, info, args, machine, buckets, deep), args.out
    )


if __name__ == "__main__":
    main()
