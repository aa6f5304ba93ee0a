"""Serving under load: per-step scheduling (continuous batching) vs batch-at-a-time, one run.

    nice -n 10 python bench/serve_load.py --out bench/results/serve_load.json \
        [--requests 48] [--rate 3] [--max-batch 16]

SmolLM2-135M-Instruct (fp32, CPU threads as given) served by ``softprompt serve``'s app under
uvicorn on loopback, with three adapters of different methods (prompt tuning, prefix tuning,
deep prompt; freshly initialised: trained weights would not change the speed) and the bare
model. A fixed plan of ``--requests`` completions arrives at ``--rate`` requests per second
(open loop: a request is sent at its time whether or not earlier ones are answered): adapters
in turn, ``max_tokens`` cycling over 2, 8, 32, 128, prompts from Rotten Tomatoes reviews, greedy,
streamed (so time to first token is seen). ``ignore_eos`` does not exist in the API, so a
completion may end early at EOS: throughput counts the tokens actually generated (``usage``).

The same plan runs against ``--scheduling step`` and ``--scheduling batch`` (fresh server each,
same process, one after the other, the order alternated over ``--rounds``). Before the load, each
2-token request of the plan is run alone on the idle step server: its "solo" latency. Reported:
throughput (completion tokens / makespan), latency p50 / p99 per ``max_tokens``, time to first
token p50 / p99, and the 2-token requests' p50 latency over their solo p50. Targets (issue 12):
step >= 1.5x batch throughput; short requests' p50 <= 2x solo while long ones run.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

MAX_TOKENS = (2, 8, 32, 128)
ADAPTER_NAMES = ("prompt", "prefix", "deep", "base")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


class Live:
    """uvicorn on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def make_adapters(root: Path) -> dict[str, str]:
    import softprompt as sp
    from softprompt.loading import load_base

    base, tok = load_base("smollm2-135m-instruct")
    model = sp.attach(base, tokenizer=tok)
    configs = {
        "prompt": sp.PromptTuningConfig(num_virtual_tokens=20),
        "prefix": sp.PrefixTuningConfig(num_virtual_tokens=20),
        "deep": sp.DeepPromptConfig(num_virtual_tokens=20),
    }
    out = {}
    for name, config in configs.items():
        model.add_adapter(name, config)
        model.save_adapter(root / name, name)
        out[name] = str(root / name)
    return out


def prompts(n: int) -> list[str]:
    from softprompt.assets import resolve_data

    rows = [json.loads(line) for line in Path(resolve_data("rotten-tomatoes", "test")).open()]
    return [f"Review: {r['text']}\nWrite a short reply to this review:" for r in rows[:n]]


def plan(n: int) -> list[dict]:
    texts = prompts(n)
    return [
        {
            "model": ADAPTER_NAMES[i % len(ADAPTER_NAMES)],
            "prompt": texts[i],
            "max_tokens": MAX_TOKENS[(i // len(ADAPTER_NAMES) + i) % len(MAX_TOKENS)],
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for i in range(n)
    ]


def one(url: str, body: dict, t_send: float) -> dict:
    """Send one streamed completion; times from ``t_send``."""
    first = None
    text, usage = [], None
    with httpx.Client(base_url=url, timeout=600) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk.get("choices", []):
                    if c.get("text") and first is None:
                        first = time.monotonic()
                    text.append(c.get("text", ""))
    end = time.monotonic()
    return {
        "max_tokens": body["max_tokens"],
        "model": body["model"],
        "latency": end - t_send,
        "ttft": (first or end) - t_send,
        "tokens": usage["completion_tokens"] if usage else None,
        "text": "".join(text),
    }


def run_load(url: str, requests: list[dict], rate: float) -> tuple[list[dict], float]:
    results: list[dict | None] = [None] * len(requests)
    start = time.monotonic() + 0.2
    threads = []

    def fire(i: int) -> None:
        t = start + i / rate
        time.sleep(max(0.0, t - time.monotonic()))
        results[i] = one(url, requests[i], t)

    for i in range(len(requests)):
        th = threading.Thread(target=fire, args=(i,))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    makespan = max(start + i / rate + r["latency"] for i, r in enumerate(results)) - start
    return results, makespan


def summary(results: list[dict], makespan: float, solo_p50: float) -> dict:
    tokens = sum(r["tokens"] or 0 for r in results)
    out = {
        "completion_tokens": tokens,
        "makespan_s": round(makespan, 2),
        "tokens_per_s": round(tokens / makespan, 2),
        "latency_p50_s": round(pct([r["latency"] for r in results], 50), 3),
        "latency_p99_s": round(pct([r["latency"] for r in results], 99), 3),
        "ttft_p50_s": round(pct([r["ttft"] for r in results], 50), 3),
        "ttft_p99_s": round(pct([r["ttft"] for r in results], 99), 3),
        "by_max_tokens": {},
    }
    for m in MAX_TOKENS:
        lat = [r["latency"] for r in results if r["max_tokens"] == m]
        out["by_max_tokens"][str(m)] = {
            "n": len(lat),
            "p50_s": round(pct(lat, 50), 3),
            "p99_s": round(pct(lat, 99), 3),
        }
    out["short_p50_over_solo"] = round(out["by_max_tokens"]["2"]["p50_s"] / solo_p50, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/serve_load.json")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rate", type=float, default=3.0, help="requests per second")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1, help="step/batch pairs (order alternated)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from softprompt.loading import load_base
    from softprompt.server import ServeSettings, create_app

    requests = plan(args.requests)
    raw: dict = {"step": [], "batch": []}
    solo: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp))
        for rnd in range(args.rounds):
            order = ("step", "batch") if rnd % 2 == 0 else ("batch", "step")
            for mode in order:
                base, tok = load_base("smollm2-135m-instruct")
                settings = ServeSettings(
                    scheduling=mode, max_batch=args.max_batch, max_queue=4096, max_wait_ms=10
                )
                live = Live(create_app(base, tok, adapters, settings))
                try:
                    if mode == "step" and not solo:  # 2-token requests alone, idle server
                        for body in requests:
                            if body["max_tokens"] == 2:
                                solo.append(one(live.url, body, time.monotonic())["latency"])
                    t0 = time.time()
                    results, makespan = run_load(live.url, requests, args.rate)
                    print(f"{mode}: {makespan:.1f} s ({time.time() - t0:.1f} s wall)", flush=True)
                    raw[mode].append({"results": results, "makespan": makespan})
                finally:
                    live.stop()
    solo_p50 = statistics.median(solo)
    report = {
        "setup": {
            "model": "smollm2-135m-instruct",
            "requests": args.requests,
            "rate_per_s": args.rate,
            "max_batch": args.max_batch,
            "rounds": args.rounds,
            "threads": args.threads,
            "max_tokens": list(MAX_TOKENS),
            "adapters": list(ADAPTER_NAMES),
        },
        "solo_short_p50_s": round(solo_p50, 3),
        "modes": {},
    }
    for mode, runs in raw.items():
        report["modes"][mode] = [summary(r["results"], r["makespan"], solo_p50) for r in runs]
    # the same answers either way (greedy): a correctness check of the scheduler under load
    same = all(
        a["text"] == b["text"]
        for s, b_ in zip(raw["step"], raw["batch"], strict=True)
        for a, b in zip(s["results"], b_["results"], strict=True)
    )
    step, batch = report["modes"]["step"], report["modes"]["batch"]
    ratio = statistics.median(
        s["tokens_per_s"] / b["tokens_per_s"] for s, b in zip(step, batch, strict=True)
    )
    report["step_over_batch_tokens_per_s"] = round(ratio, 2)
    report["same_texts_step_and_batch"] = same
    report["targets"] = {
        "throughput >= 1.5x batch": ratio >= 1.5,
        "short p50 <= 2x solo (step)": statistics.median(s["short_p50_over_solo"] for s in step)
        <= 2.0,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "modes"}, indent=2))
    for mode in ("step", "batch"):
        print(mode, json.dumps(report["modes"][mode][0]))


if __name__ == "__main__":
    main()
