"""Cartridge vs context on a real text: KL to the full-context teacher, KV memory, latency.

The corpus is the Python standard library's LICENSE.txt (the interpreter's own, a real long text
of the CPython history and licences; its sha256 is recorded). SmolLM2-135M-Instruct, CPU.

    nice -n 10 python bench/cartridge.py [--tokens 448] [--steps 40] [--out bench/results/cartridge]

Measured on held-out self-study questions, per answer token, full-vocabulary KL(teacher ||
student), where the teacher reads the whole corpus (system message) + the conversation:
* bare: the conversation alone;  * truncated: the corpus's first P tokens in context (the
  cartridge's memory);  * cartridge: P trained key/value tokens, no text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import softprompt as sp
from softprompt import cartridge as C
from softprompt.loading import load_base
from softprompt.methods.cartridge import CartridgeConfig


def kl_full(student_logits, teacher_logits):
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1)  # (A,)


@torch.no_grad()
def dev_kls(model, tok, rows, names):
    """Mean per-answer-token full-vocabulary KL(teacher || student) on ``rows``; the teacher is
    adapter "full" (the whole text's own K/V: exactly the text in context, see
    tests/test_cartridge.py::test_init_from_prefill_equals_text_in_context)."""
    sums = dict.fromkeys(names, 0.0)
    n = 0
    for r in rows:
        s = C.split_row(tok, r["messages"])
        conv, (a, b) = s["conv"], s["answer"]
        ids = torch.tensor([conv])
        teacher = model(input_ids=ids, adapter_names=["full"]).logits[0, a - 1 : b - 1]
        for label, adapter in names.items():
            got = model(input_ids=ids, adapter_names=[adapter]).logits[0, a - 1 : b - 1]
            sums[label] += kl_full(got, teacher).sum().item()
        n += b - a
    return {k: v / n for k, v in sums.items()}, n


@torch.no_grad()
def latency(model, tok, adapter, question, new=16):
    """Seconds to generate ``new`` tokens for a question with ``adapter``'s prefix."""
    head = C.render(
        tok, [{"role": "system", "content": "x"}, {"role": "user", "content": question}], True
    )
    ids = head[len(C.render(tok, [{"role": "system", "content": "x"}])) :]
    t0 = time.perf_counter()
    model.generate(
        input_ids=torch.tensor([ids]),
        adapter_names=[adapter],
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    return round(time.perf_counter() - t0, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[0], help="0: 1/8 of the text")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--conversations", type=int, default=6)
    ap.add_argument("--dev", type=int, default=3)
    ap.add_argument("--out", default="bench/results/cartridge")
    ap.add_argument("--chunk-tokens", type=int, default=192)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    text = C.read_corpus(path)
    base, tok = load_base("smollm2-135m-instruct")
    model = sp.attach(base, tokenizer=tok)
    corpus_ctx = C.context_ids(tok, text)
    out = Path(args.out)
    report = {
        "corpus": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "corpus_tokens": len(corpus_ctx),
        "runs": [],
    }
    info = model.info
    per_token = sum(2 * s.kv_dim for s in info.slots) * 4  # float32 bytes
    t0 = time.time()
    model.add_adapter(
        "full",
        CartridgeConfig(
            num_virtual_tokens=len(corpus_ctx), init_token_ids=corpus_ctx, num_frozen=0
        ),
    )
    report["full_text_prefill_s"] = round(time.time() - t0, 1)
    print("full prefill", report["full_text_prefill_s"], flush=True)
    for p in args.tokens:
        p = p or len(corpus_ctx) // 8
        t0 = time.time()
        model.add_adapter(
            f"trunc{p}",
            CartridgeConfig(num_virtual_tokens=p, init_token_ids=corpus_ctx, num_frozen=0),
        )
        res = C.train_cartridge(
            model,
            tok,
            text,
            out,
            tokens=p,
            steps=args.steps,
            conversations=args.conversations,
            dev=args.dev,
            chunk_tokens=args.chunk_tokens,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            eval_every=max(1, args.steps // 3),
            progress=False,
            name=f"cart{p}",
            log=lambda s: print(s, flush=True),
        )
        # the best adapter on the held-out rows, as the command leaves it
        sp.load_adapter(model, out / "adapter", name=f"best{p}")
        rows = C.read_rows(out / C.DEV_NAME)
        kls, n = dev_kls(
            model, tok, rows, {"bare": None, "truncated": f"trunc{p}", "cartridge": f"best{p}"}
        )
        gap = kls["bare"]
        q = "Who holds the copyright of Python?"
        run = {
            "P": p,
            "fraction_of_text": round(p / len(corpus_ctx), 4),
            "dev_tokens": n,
            "kl": kls,
            "gap_closed": round(1 - kls["cartridge"] / gap, 3) if gap else None,
            "beats_truncated": kls["cartridge"] < kls["truncated"],
            "kv_bytes": {"cartridge": p * per_token, "full_text": len(corpus_ctx) * per_token},
            "train": {k: res[k] for k in ("steps", "best", "lr", "dev_kl_bare", "dev_kl_init")},
            "latency_s_16_tokens": {
                "cartridge": latency(model, tok, f"best{p}", q),
                "full_text_cached": latency(model, tok, "full", q),
            },
            "wall_s": round(time.time() - t0, 1),
        }
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
        for nm in (f"trunc{p}", f"cart{p}", f"best{p}"):
            model.delete_adapter(nm)


if __name__ == "__main__":
    main()
