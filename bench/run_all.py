"""Run every benchmark section, each in a fresh process, then render docs/benchmarks.md.

    python bench/run_all.py            # full run on 2 CPU cores: speed ~22 min, quality ~75 min
    python bench/run_all.py --quick    # smoke run, about 7 minutes; numbers not trustworthy
    python bench/run_all.py --only train_speed generate_speed --out docs/benchmarks.md

On a machine with a GPU the same command also runs the speed sections there (``--device auto``,
the default), written as ``<section>_gpu``; ``--device cpu`` / ``--device cuda`` pick one.

Each section script writes ``bench/results/<section>.json``; ``bench/report.py`` renders every
result file present (a new section only has to write its JSON and be listed in ``SECTIONS``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SECTIONS = ["train_speed", "share_sweep", "generate_speed", "mixed_speed", "quality"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--only", nargs="*", default=None, help="sections to run (default: all)")
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    ap.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto (default): every section on the CPU, then the speed sections again on the GPU "
        "when torch sees one; cpu: the CPU only; cuda: the GPU speed sections only. GPU results "
        "are written as <section>_gpu beside the CPU ones (quality is not device-bound)",
    )
    args = ap.parse_args()
    sections = args.only or SECTIONS
    runs = []  # (section, device)
    if args.device in ("auto", "cpu"):
        runs += [(name, "cpu") for name in sections]
    if args.device == "cuda" or (args.device == "auto" and _cuda()):
        runs += [(name, "cuda") for name in sections if name != "quality"]
    failed = []
    t_start = time.perf_counter()
    for name, device in runs:
        script = BENCH / f"{name}.py"
        out = args.results / (f"{name}_gpu.json" if device == "cuda" else f"{name}.json")
        cmd = [sys.executable, str(script), "--out", str(out)]
        if device == "cuda":
            cmd += ["--device", "cuda"]
        if args.quick:
            cmd.append("--quick")
        name = f"{name}_gpu" if device == "cuda" else name
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
        print(f"== {name}: exit {rc}, {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    rc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "report.py"),
            "--results",
            str(args.results),
            "--out",
            str(args.out),
        ],
        cwd=ROOT,
        check=False,
    ).returncode
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    if failed or rc:
        sys.exit(f"failed: {failed + (['report'] if rc else [])}")


if __name__ == "__main__":
    main()
