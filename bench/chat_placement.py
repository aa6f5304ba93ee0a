"""Chat placement: where input-level virtual tokens go in a rendered conversation.

    nice -n 10 python bench/chat_placement.py --out bench/results/chat_placement.json \
        [--train-rows 400] [--test-rows 200] [--steps 60] [--seeds 0] [--placements start,user]

Rotten Tomatoes in chat form (SmolLM2-135M-Instruct, its ChatML template): a system message
("Is this movie review positive or negative? Answer with one word."), the review as the user
message, the label ("positive" / "negative") as the assistant's answer. ``softprompt train
--task chat --method prompt`` with each ``--placement`` (start, user, answer), the same rows,
seed, steps and learning rate (the method's default), no model selection (no dev set: the
adapter after the last step); then greedy generation on the first ``--test-rows`` rows of the
test split (``softprompt eval``), stopping at ``<|im_end|>``: exact match of the generated
answer with the label (= accuracy). Zero-shot (the bare model, no virtual tokens) is the same for
every placement and is measured once, with the first run (``train --test``). Results are added
to ``--out`` (runs of the same placement and seed replaced), so placements can be run apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

SYSTEM = "Is this movie review positive or negative? Answer with one word."
PLACEMENTS = ("start", "user", "answer")


def chat_rows(split: str, n: int) -> list[dict]:
    from softprompt.data import load_examples

    rows = load_examples(f"rotten-tomatoes:{split}", "classify")[:n]
    return [
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": r.fields["text"]},
                {"role": "assistant", "content": r.fields["label"]},
            ]
        }
        for r in rows
    ]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/chat_placement.json")
    ap.add_argument("--train-rows", type=int, default=400)
    ap.add_argument("--test-rows", type=int, default=200)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=10)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--placements", default=",".join(PLACEMENTS))
    args = ap.parse_args()
    from softprompt.cli import build_parser, cmd_eval
    from softprompt.cli import main as cli

    tmp = Path(tempfile.mkdtemp(prefix="chat_placement_"))
    write(tmp / "train.jsonl", chat_rows("train", args.train_rows))
    write(tmp / "test.jsonl", chat_rows("test", args.test_rows))
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "seeds", "placements")}
    results: dict = {"setup": setup, "system": SYSTEM, "runs": []}
    if Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        if old.get("setup") == setup:
            results = old
    first = "zero_shot" not in results
    for seed in [int(s) for s in args.seeds.split(",")]:
        for placement in args.placements.split(","):
            out = tmp / f"{placement}-{seed}"
            t0 = time.time()
            argv = [
                "train", "--task", "chat", "--method", "prompt",
                "--placement", placement, "--num-virtual-tokens", str(args.tokens),
                "--train", str(tmp / "train.jsonl"),
                "--output", str(out), "--max-steps", str(args.steps), "--batch-size", "8",
                "--eval-every", str(args.steps), "--max-new-tokens", "4",
                "--seed", str(seed), "--no-progress",
            ]  # fmt: skip
            if first:
                argv += ["--test", str(tmp / "test.jsonl")]
            if cli(argv) != 0:
                sys.exit(f"train failed for placement {placement}")
            summary = json.loads((out / "summary.json").read_text())
            if first:
                results["zero_shot"] = summary["zero_shot"]
                first = False
            log = out / "metrics.jsonl"
            test = cmd_eval(
                build_parser().parse_args(
                    ["eval", "--adapter", str(out), "--data", str(tmp / "test.jsonl")]
                )
            )
            run = {
                "placement": placement,
                "seed": seed,
                "exact_match": test["exact_match"],
                "rougeL": test["rougeL"],
                "final_train_loss": round(
                    [r for r in map(json.loads, log.read_text().splitlines()) if "loss" in r][-1][
                        "loss"
                    ],
                    4,
                ),
                "seconds": round(time.time() - t0, 1),
            }
            results["runs"] = [
                r for r in results["runs"] if (r["placement"], r["seed"]) != (placement, seed)
            ] + [run]
            print(json.dumps(run), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
