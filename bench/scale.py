"""Scale benchmark: softprompt vs PEFT on random-weight models of real shapes.

    python bench/scale.py                      # CPU: the cells that fit a few minutes (below)
    python bench/scale.py --device cuda        # GPU: bf16, batch 8, seq 128/512/2048, all shapes

No download: each model is built from a hand-written config of a real checkpoint's shape
(SmolLM2-360M, Qwen2.5-0.5B, Llama-3.2-1B) with random weights. Per (shape, dtype, sequence
length) and method, one process times, interleaved (the order rotates every round, same batch
for everyone):

* floor: the bare frozen model's forward plus the backward through its activations only (input
  embeddings require grad, no weight gradients): what any adapter's training step must cost;
* softprompt: ``sp.attach`` + adapter, forward + backward + AdamW step;
* peft: PEFT's ``get_peft_model`` with the matching config, the same step;
* softprompt_compiled (``--compile``): a second ``sp.attach`` of the same base with the same
  adapter and ``compile_body()`` (the frozen blocks through torch.compile; the warm-up rounds
  compile, so give ``--warmup 2`` or more).
* softprompt_ckpt (``--checkpointing``): another ``sp.attach`` with the same adapter under
  gradient checkpointing (``train --gradient-checkpointing``), switched on for its own steps
  only (the flag lives on the shared base's blocks): its peak memory against softprompt's.

All three compute the full causal-LM loss over every position (``model(..., labels=ids).loss``)
on unpadded batches of random token ids, so the attention runs without a padding mask (on a GPU:
SDPA's flash / efficient kernels; softprompt's prefix keys then enter through
``causal_lower_right``, see ``softprompt._hf._sdpa_mask_free``). Reported: median step time,
tokens/s (real tokens only), peak memory of a step (GPU: CUDA's peak allocation above what was
allocated before; CPU: peak RSS above RSS before, after a malloc_trim), step / floor, and
softprompt's tokens/s over PEFT's.

Writes bench/results/scale.json (scale_gpu.json with --device cuda) and prints the markdown
table that docs/benchmarks.md carries.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# Shapes of real checkpoints (their config.json values that set compute and memory).
SHAPES = {
    "smollm2-360m": (
        "llama",
        dict(
            hidden_size=960,
            intermediate_size=2560,
            num_hidden_layers=32,
            num_attention_heads=15,
            num_key_value_heads=5,
            vocab_size=49152,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
        ),
    ),
    "qwen2.5-0.5b": (
        "qwen2",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
        ),
    ),
    "llama-3.2-1b": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
        ),
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
METHODS = ("prompt", "prefix_flat")
TARGET_FLOOR = 1.3  # GPU, bf16, batch 8 x 512, 1B shape: step <= 1.3 x floor
TARGET_PEFT = 1.3  # ... and >= 1.3 x PEFT's tokens/s


def build(shape: str, dtype: torch.dtype, device: torch.device):
    """A random-weight causal LM of ``shape`` in ``dtype`` on ``device`` (eval mode, sdpa)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, fields = SHAPES[shape]
    cfg = AutoConfig.for_model(kind, **fields)
    cfg._name_or_path = f"random-{shape}"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _peak_start() -> float:
    gc.collect()
    if C.on_gpu():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    C.reset_peak_rss()
    return C.rss_mb()


def _peak_end(before: float) -> float:
    if C.on_gpu():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20 - before
    return C.peak_rss_mb() - before


class Pair:
    """softprompt and PEFT on one base model; one adapter per method, added on first use."""

    def __init__(self, base, compile_body: bool = False, checkpointing: bool = False) -> None:
        import softprompt as sp

        self.base = base
        self.sp = sp.attach(base)
        # the compiled blocks run compiled only inside the compiled wrapper's own forwards
        self.spc = sp.attach(base).compile_body() if compile_body else None
        self.spk = sp.attach(base) if checkpointing else None
        self.peft: dict = {}  # method -> PEFT model (PEFT keeps one prompt type per model)

    def use(self, method: str):
        import peft

        for model in (m for m in (self.sp, self.spc, self.spk) if m is not None):
            if method not in model.adapters:
                torch.manual_seed(0)
                model.add_adapter(method, C.sp_config(method))
            model.set_active(method)
            model.train()
        torch.manual_seed(0)
        if method not in self.peft:
            self.peft[method] = peft.get_peft_model(self.base, C.peft_config(method))
        self.peft[method].train()
        self.base.eval()
        return self.sp, self.peft[method]


def run_cell(pair: Pair, method: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    """Time floor / softprompt / PEFT steps on one (model, method, batch x seq)."""
    base = pair.base
    dev = C.DEVICE
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, base.config.vocab_size, (batch, seq), generator=g).to(dev)
    sp_model, pm = pair.use(method)
    sp_params = [p for p in sp_model.parameters() if p.requires_grad]
    sp_opt = torch.optim.AdamW(sp_params, lr=1e-3)
    peft_params = [p for p in pm.parameters() if p.requires_grad]
    peft_opt = torch.optim.AdamW(peft_params, lr=1e-3)
    emb = base.get_input_embeddings()

    def floor():
        x = emb(ids).detach().requires_grad_(True)
        base(inputs_embeds=x, labels=ids, use_cache=False).loss.backward()

    def step(model, opt):
        def f():
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            opt.step()

        return f

    fns = {"floor": floor, "softprompt": step(sp_model, sp_opt), "peft": step(pm, peft_opt)}
    if pair.spc is not None:
        spc_params = [p for p in pair.spc.parameters() if p.requires_grad]
        fns["softprompt_compiled"] = step(pair.spc, torch.optim.AdamW(spc_params, lr=1e-3))
    if pair.spk is not None:
        spk_params = [p for p in pair.spk.parameters() if p.requires_grad]
        spk_step = step(pair.spk, torch.optim.AdamW(spk_params, lr=1e-3))

        def checkpointed():
            pair.spk.gradient_checkpointing_enable()
            try:
                spk_step()
            finally:  # the flag is the shared base's: off again for the other variants
                pair.spk._checkpointing = False
                base.gradient_checkpointing_disable()
                base.eval()

        fns["softprompt_ckpt"] = checkpointed
    times: dict[str, list[float]] = {k: [] for k in fns}
    mem: dict[str, float] = {}
    for name, fn in fns.items():  # warm up; first measured run gives the peak memory
        for _ in range(warmup):
            fn()
        before = _peak_start()
        fn()
        mem[name] = _peak_end(before)
    order = list(fns)
    for r in range(steps):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            C.sync()
            t0 = time.perf_counter()
            fns[name]()
            C.sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = batch * seq
    row = {
        "method": method,
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "step_s": med,
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "peak_mb": mem,
        "sp_over_floor": med["softprompt"] / med["floor"],
        "peft_over_floor": med["peft"] / med["floor"],
        "sp_tokens_over_peft": med["peft"] / med["softprompt"],
        "compiled_over_sp": (
            med["softprompt_compiled"] / med["softprompt"] if "softprompt_compiled" in med else None
        ),
        "ckpt_over_sp": (
            med["softprompt_ckpt"] / med["softprompt"] if "softprompt_ckpt" in med else None
        ),
        "times": times,
    }
    del peft_opt, sp_opt
    gc.collect()
    return row


def markdown(result: dict) -> str:
    cols = (
        "| shape | dtype | method | batch x seq | floor s | softprompt s | PEFT s | "
        "sp / floor | PEFT / floor | sp tok/s | PEFT tok/s | sp / PEFT tok/s | "
        "peak MB floor / sp / PEFT |"
    )
    lines = [cols, "|" + "---|" * 13]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(
                f"| {r['shape']} | {r['dtype']} | {r.get('method', '')} | "
                f"{r['batch']} x {r['seq']} | {r['skipped']} |" + " |" * 8
            )
            continue
        s, t, m = r["step_s"], r["tokens_per_s"], r["peak_mb"]
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['method']} | {r['batch']} x {r['seq']} | "
            f"{s['floor']:.3f} | {s['softprompt']:.3f} | {s['peft']:.3f} | "
            f"{r['sp_over_floor']:.2f} | {r['peft_over_floor']:.2f} | "
            f"{t['softprompt']:.0f} | {t['peft']:.0f} | {r['sp_tokens_over_peft']:.2f} | "
            f"{m['floor']:.0f} / {m['softprompt']:.0f} / {m['peft']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_device_arg(ap)
    ap.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES))
    ap.add_argument("--seqs", nargs="+", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    ap.add_argument("--steps", type=int, default=None, help="timed rounds per cell")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=C.THREADS)
    ap.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="skip (and mark) cells with more than this many tokens x billions of parameters "
        "(CPU default 300: batch 1 x 128 on every shape; GPU: no limit)",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time softprompt with compile_body() (torch.compile of the frozen blocks)",
    )
    ap.add_argument(
        "--checkpointing",
        action="store_true",
        help="also time softprompt under gradient checkpointing (its peak memory beside)",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    C.setup(threads=args.threads, quick=True, device=args.device)
    shapes = args.shapes or list(SHAPES)
    dtypes = args.dtypes or (["bfloat16"] if gpu else ["float32", "bfloat16"])
    seqs = args.seqs or [128, 512, 2048]
    batch = args.batch or (8 if gpu else 1)
    methods = args.methods or (list(METHODS) if gpu else ["prompt"])
    steps = args.steps or (10 if gpu else 2)
    budget = args.max_tokens if args.max_tokens is not None else (None if gpu else 300)
    rows = []
    for shape in shapes:
        for dname in dtypes:
            base = pair = None
            for seq in seqs:
                for method in methods:
                    cell = {"shape": shape, "dtype": dname, "batch": batch, "seq": seq}
                    if base is None:
                        base = build(shape, DTYPES[dname], C.DEVICE)
                        pair = Pair(
                            base, compile_body=args.compile, checkpointing=args.checkpointing
                        )
                    billions = sum(p.numel() for p in base.parameters()) / 1e9
                    if budget is not None and batch * seq * billions > budget:
                        rows.append({**cell, "method": method, "skipped": "not run (CPU time)"})
                        continue
                    t0 = time.perf_counter()
                    row = run_cell(pair, method, batch, seq, steps, args.warmup)
                    row.update(cell, params_b=round(billions, 3))
                    rows.append(row)
                    print(
                        f"{shape} {dname} {method} {batch}x{seq}: floor "
                        f"{row['step_s']['floor']:.3f}s sp {row['step_s']['softprompt']:.3f}s "
                        f"peft {row['step_s']['peft']:.3f}s"
                        + (
                            f" compiled {row['step_s']['softprompt_compiled']:.3f}s"
                            if args.compile
                            else ""
                        )
                        + (
                            f" ckpt {row['step_s']['softprompt_ckpt']:.3f}s "
                            f"({row['peak_mb']['softprompt_ckpt']:.0f} vs "
                            f"{row['peak_mb']['softprompt']:.0f} MB)"
                            if args.checkpointing
                            else ""
                        )
                        + f" (cell {time.perf_counter() - t0:.0f}s)",
                        flush=True,
                    )
            del base, pair
            gc.collect()
    result = {
        "section": "scale_gpu" if gpu else "scale",
        "machine": C.machine_info(),
        "device": C.device_label(),
        "config": vars(args) | {"out": str(args.out), "batch": batch, "steps": steps},
        "rows": rows,
    }
    target = next(
        (
            r
            for r in rows
            if gpu
            and "skipped" not in r
            and r["shape"] == "llama-3.2-1b"
            and r["batch"] == 8
            and r["seq"] == 512
            and r["dtype"] == "bfloat16"
        ),
        None,
    )
    if target is not None:
        result["targets"] = {
            "step_over_floor": [target["sp_over_floor"], TARGET_FLOOR],
            "tokens_over_peft": [target["sp_tokens_over_peft"], TARGET_PEFT],
        }
    out = args.out or C.default_out("scale", args.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(markdown(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
