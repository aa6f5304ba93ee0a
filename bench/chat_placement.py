"""Chat placement: where input-level virtual tokens go in a rendered conversation.

    nice -n 10 python bench/chat_placement.py --out bench/results/chat_placement.json \
        [--train-rows 400] [--test-rows 200] [--steps 60] [--seeds 0]

Rotten Tomatoes in chat form (SmolLM2-135M-Instruct, its ChatML template): a system message
("Is this movie review positive or negative? Answer with one word."), the review as the user
message, the label ("positive" / "negative") as the assistant's answer. ``softprompt train
--task chat --method prompt`` with each ``--placement`` (start, user, answer), the same rows,
seed, steps and learning rate (the method's default), no model selection (no dev set: the
adapter after the last step); then greedy generation on the first ``--test-rows`` rows of the
test split, stopping at ``<|im_end|>``: exact match of the generated answer with the label
(= accuracy). Zero-shot (the bare model, no virtual tokens) is the same for every placement and
is measured once.
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
    args = ap.parse_args()
    from softprompt.cli import main as cli

    tmp = Path(tempfile.mkdtemp(prefix="chat_placement_"))
    write(tmp / "train.jsonl", chat_rows("train", args.train_rows))
    write(tmp / "test.jsonl", chat_rows("test", args.test_rows))
    results: dict = {"setup": vars(args), "system": SYSTEM, "runs": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for placement in PLACEMENTS:
            out = tmp / f"{placement}-{seed}"
            t0 = time.time()
            argv = [
                "train", "--task", "chat", "--method", "prompt",
                "--placement", placement, "--num-virtual-tokens", str(args.tokens),
                "--train", str(tmp / "train.jsonl"), "--test", str(tmp / "test.jsonl"),
                "--output", str(out), "--max-steps", str(args.steps), "--batch-size", "8",
                "--eval-every", str(args.steps), "--max-new-tokens", "4",
                "--seed", str(seed), "--no-progress",
            ]  # fmt: skip
            if cli(argv) != 0:
                sys.exit(f"train failed for placement {placement}")
            summary = json.loads((out / "summary.json").read_text())
            run = {
                "placement": placement,
                "seed": seed,
                "exact_match": summary["test"]["exact_match"],
                "rougeL": summary["test"]["rougeL"],
                "zero_shot_exact_match": summary["zero_shot"]["exact_match"],
                "seconds": round(time.time() - t0, 1),
            }
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
