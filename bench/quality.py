"""Quality: test accuracy on Rotten Tomatoes per method, softprompt vs PEFT at the same budget,
vs zero-shot and full fine-tuning; plus two of the papers' small-scale claims.

    python bench/quality.py --out bench/results/quality.json [--quick] [--seeds 3]

Setup (SmolLM2-135M-Instruct, CPU): template "Review: {text}\\nSentiment: {label}", label words
" positive"/" negative", loss = cross-entropy over the two label words' log-probabilities at the
answer position (the same for every contender), batch 8, AdamW, the same seeded batches for every
contender, a fixed number of steps, no model selection (nothing sees the test rows), accuracy on
the first ``--test-rows`` rows of the test split. Learning rates: softprompt's per-method defaults
for both libraries (PEFT documents none for these methods); full fine-tuning 2e-5.

Generation (ACLSum, the "approach" summary of a paper's abstract): the same contenders for prompt
tuning and prefix (MLP), teacher-forced cross-entropy on the summary tokens, batch 4, greedy
decoding of at most 48 new tokens, ROUGE-1/2/L (rouge-score, stemmed) on the test split; one seed
(the split has 100 training and 100 test papers; CPU time is the limit).

Claims checked:
* Li & Liang Table 5: prefix (per-layer) >= input-only prompt tuning on a small model.
* Lester Fig. 3 / Li & Liang Fig. 5: text or class-label init > random init, with 50/200/1000
  training examples (prompt tuning).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TEMPLATE = "Review: {text}\nSentiment:"
LABELS = ["negative", "positive"]
SP_METHODS = {
    "prompt": "prompt",
    "prefix_mlp": "prefix",
    "prefix_flat": "deep",
    "ptuning_mlp": "ptuning",
}


def encode(tok, rows):
    prompts = [
        tok(TEMPLATE.format(text=r["text"]), add_special_tokens=False)["input_ids"][:96]
        for r in rows
    ]
    ys = [LABELS.index(r["label"]) for r in rows]
    return prompts, ys


def label_ids(tok):
    ids = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in LABELS]
    assert all(len(i) == 1 for i in ids), ids
    return torch.tensor([i[0] for i in ids])


def last_logits(model, prompts, lib: str, pad: int):
    """(B, V) next-token logits after each prompt (left-padded batch)."""
    from softprompt.lm import pad_left

    ids, mask = pad_left(prompts, pad)
    if lib == "softprompt":
        from softprompt import _hf

        hidden = model(input_ids=ids, attention_mask=mask, body_only=True, use_cache=False)
        head = _hf.lm_body_and_head(model.base_model)[1]
        return head(hidden.last_hidden_state[:, -1])
    return model(input_ids=ids, attention_mask=mask).logits[:, -1]


def contender(lib, method, tok, seed, lr=None, init=None):
    """A freshly loaded model set up for one contender; returns (model, trainable params, lr).

    lib: "softprompt", "peft", "full" (every weight trains) or anything else (zero-shot).
    Learning rates: softprompt's per-method defaults for both libraries, 2e-5 for full tuning.
    """
    from softprompt.trainer import default_lr

    torch.manual_seed(seed)
    base = C.load_base()
    if lib == "softprompt":
        import softprompt as sp

        cfg = C.sp_config(method, seed=seed)
        if init is not None:
            cfg.init = init
            if init in ("text", "labels"):
                cfg.init_text = (
                    "Is this movie review positive or negative?" if init == "text" else LABELS
                )
        model = sp.attach(base, cfg, name="a", tokenizer=tok)
        return model, model.parameters_to_train(), lr or default_lr(base, SP_METHODS[method])
    if lib == "peft":
        lr = lr or default_lr(base, SP_METHODS[method])
        model = C.make_peft(method, base)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, params, lr
    if lib == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        return base, list(base.parameters()), lr or 2e-5
    return base, [], None


def batch_order(n: int, count: int, seed: int) -> list[int]:
    """At least ``count`` row indices: seeded permutations of ``n`` rows, one after another."""
    g = torch.Generator().manual_seed(seed)
    order = []
    while len(order) < count:
        order += torch.randperm(n, generator=g).tolist()
    return order


def run(lib, method, prompts, ys, test, tok, steps, seed, lr=None, init=None):
    """Train one contender; returns (accuracy, trainable params, adapter bytes, seconds, lr)."""
    import tempfile

    lids = label_ids(tok)
    pad = tok.pad_token_id
    model, params, lr = contender(lib, method, tok, seed, lr, init)
    n_train = sum(p.numel() for p in params)
    t0 = time.perf_counter()
    if params and steps:
        opt = torch.optim.AdamW(params, lr=lr)
        order = batch_order(len(prompts), steps * 8, seed)
        model.train() if lib != "full" else model.eval()  # frozen parts keep dropout off
        for s in range(steps):
            idx = order[s * 8 : (s + 1) * 8]
            logits = last_logits(model, [prompts[i] for i in idx], lib, pad).float()
            scores = logits.log_softmax(-1)[:, lids]
            loss = F.cross_entropy(scores, torch.tensor([ys[i] for i in idx]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    tp, ty = test
    correct = 0
    with torch.no_grad():
        for i in range(0, len(tp), 32):
            logits = last_logits(model, tp[i : i + 32], lib, pad).float()
            correct += (logits[:, lids].argmax(-1) == torch.tensor(ty[i : i + 32])).sum().item()
    size = 0
    if lib in ("softprompt", "peft"):
        with tempfile.TemporaryDirectory() as d:
            if lib == "softprompt":
                model.save_adapter(d)
            else:
                model.save_pretrained(d)
            size = sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())
    return correct / len(ty), n_train, size, train_s, lr


GEN_TEMPLATE = "Abstract: {input}\nApproach in one sentence:"


def encode_gen(tok, rows, max_input: int = 256):
    """Prompt ids (abstract truncated to ``max_input`` tokens), target ids (+ EOS), references."""
    prompts, targets = [], []
    for r in rows:
        text = tok.decode(tok(r["input"], add_special_tokens=False)["input_ids"][:max_input])
        prompts.append(tok(GEN_TEMPLATE.format(input=text), add_special_tokens=False)["input_ids"])
        targets.append(tok(" " + r["target"], add_special_tokens=False)["input_ids"][:64])
    return prompts, targets, [r["target"] for r in rows]


def run_gen(lib, method, train, test, tok, steps, seed, batch=4, max_new=48):
    """Train one contender on ACLSum; returns (ROUGE dict, trainable params, seconds)."""
    from softprompt.lm import lm_loss, pad_left
    from softprompt.metrics import generation_metrics

    pad, eos = tok.pad_token_id, tok.eos_token_id
    model, params, lr = contender(lib, method, tok, seed)
    n_train = sum(p.numel() for p in params)
    t0 = time.perf_counter()
    if params and steps:
        opt = torch.optim.AdamW(params, lr=lr)
        order = batch_order(len(train[0]), steps * batch, seed)
        model.train()
        for s in range(steps):
            idx = order[s * batch : (s + 1) * batch]
            seqs = [train[0][i] + train[1][i] + [eos] for i in idx]
            labs = [[-100] * len(train[0][i]) + train[1][i] + [eos] for i in idx]
            ids, mask = pad_left(seqs, pad)
            labels, _ = pad_left(labs, -100)
            if lib == "softprompt":
                loss = lm_loss(model, ids, mask, labels)
            else:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(test[0]), 10):
            ids, mask = pad_left(test[0][i : i + 10], pad)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            preds += [
                tok.decode(o[ids.shape[1] :], skip_special_tokens=True).strip().split("\n")[0]
                for o in out
            ]
    scores = generation_metrics(preds, test[2])
    scores["example"] = preds[0]
    return scores, n_train, train_s


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=C.RESULTS / "quality.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--test-rows", type=int, default=400)
    ap.add_argument("--train-rows", type=int, default=1000)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--skip-init", action="store_true")
    ap.add_argument("--skip-gen", action="store_true", help="skip the ACLSum generation part")
    ap.add_argument("--gen-steps", type=int, default=50)
    ap.add_argument("--gen-test-rows", type=int, default=50)
    ap.add_argument(
        "--resume",
        type=Path,
        help="the JSON lines an interrupted run printed: runs found there are not run again "
        "(each run seeds itself, so the result is the uninterrupted run's)",
    )
    ap.add_argument(
        "--reuse-baselines",
        type=Path,
        help="an earlier result file: take its zero-shot and full fine-tuning runs (they use "
        "neither library) instead of running them again; the report says so",
    )
    ap.add_argument(
        "--reuse-aclsum",
        action="store_true",
        help="with --reuse-baselines: take the ACLSum runs from that file too (the report "
        "says they were not rerun)",
    )
    ap.add_argument(
        "--reuse-init",
        action="store_true",
        help="with --reuse-baselines: take the init-study runs from that file too (the report "
        "says they were not rerun)",
    )
    args = ap.parse_args()
    C.setup(quick=args.quick)
    if args.quick:
        args.seeds, args.steps, args.test_rows = 1, 4, 32
        args.gen_steps, args.gen_test_rows = 2, 10
    tok = C.load_tokenizer()
    from softprompt.assets import resolve_data

    def rows(split, n):
        with open(resolve_data("rotten-tomatoes", split)) as f:
            return [json.loads(x) for x in f][:n]

    train = encode(tok, rows("train", args.train_rows))
    test = encode(tok, rows("test", args.test_rows))
    seeds = list(range(args.seeds))
    raw: dict = {"runs": []}

    def record(**kw):
        raw["runs"].append(kw)
        print(json.dumps(kw), flush=True)

    prior: list[dict] = []
    if args.resume and args.resume.exists():
        lines = [x for x in args.resume.read_text().splitlines() if x.startswith("{")]
        prior += [{k: v for k, v in json.loads(x).items() if k != "reused"} for x in lines]
    reused: list[dict] = []
    if args.reuse_baselines:
        old = json.loads(args.reuse_baselines.read_text())
        reused = [
            r
            for r in old["raw"]["runs"]
            if r["lib"] in ("zero-shot", "full")
            or (args.reuse_aclsum and "task" in r)
            or (args.reuse_init and "init" in r)
        ]
        prior += reused
        raw["reused_baselines_from"] = old.get("machine", {}).get("date")

    def earlier(**key) -> dict | None:
        """A run with exactly these settings from --resume / --reuse-baselines, recorded again."""
        kind = ("init" in key, "task" in key)
        for r in prior:
            if ("init" in r, "task" in r) == kind and all(r.get(k) == v for k, v in key.items()):
                raw["runs"].append(r)
                print(json.dumps(r | {"reused": True}), flush=True)
                return r
        return None

    r0 = earlier(lib="zero-shot", method="-", seed=0)
    if r0:
        acc0 = r0["acc"]
    else:
        acc0, *_ = run("zero", None, *train, test, tok, 0, 0)
        record(lib="zero-shot", method="-", seed=0, acc=acc0, params=0, bytes=0, train_s=0)
    table = [["zero-shot", "-", "-", f"{acc0:.3f}", "0", "-", "-"]]
    results = {}
    for method, (sp_name, peft_name) in C.METHODS.items():
        for lib, label in (("softprompt", sp_name), ("peft", peft_name)):
            accs = []
            for seed in seeds:
                r = earlier(lib=lib, method=method, seed=seed)
                if r:
                    acc, n, size, secs, lr = (
                        r[k] for k in ("acc", "params", "bytes", "train_s", "lr")
                    )
                    accs.append(acc)
                    continue
                acc, n, size, secs, lr = run(lib, method, *train, test, tok, args.steps, seed)
                accs.append(acc)
                record(
                    lib=lib,
                    method=method,
                    seed=seed,
                    acc=acc,
                    params=n,
                    bytes=size,
                    train_s=secs,
                    lr=lr,
                )
            m, s = mean_std(accs)
            results[(lib, method)] = m
            table.append(
                [
                    lib,
                    label,
                    f"{lr:g}",
                    f"{m:.3f} ± {s:.3f}",
                    f"{n:,}",
                    f"{size / 1024:.0f} KB",
                    f"{secs:.0f} s",
                ]
            )
    if not args.skip_full:
        accs = []
        for seed in seeds[:1] if args.quick else seeds:
            r = earlier(lib="full", method="-", seed=seed)
            if r:
                acc, n, secs = r["acc"], r["params"], r["train_s"]
                accs.append(acc)
                continue
            acc, n, _, secs, _ = run("full", None, *train, test, tok, args.steps, seed)
            accs.append(acc)
            record(lib="full", method="-", seed=seed, acc=acc, params=n, bytes=0, train_s=secs)
        m, s = mean_std(accs)
        table.append(
            [
                "full fine-tuning",
                "all weights",
                "2e-05",
                f"{m:.3f} ± {s:.3f}",
                f"{n:,}",
                "-",
                f"{secs:.0f} s",
            ]
        )
    claims = []
    pre, pro = results[("softprompt", "prefix_mlp")], results[("softprompt", "prompt")]
    claims.append(
        {
            "name": "prefix >= prompt tuning (Li & Liang Table 5)",
            "target": "prefix >= prompt",
            "value": f"prefix {pre:.3f} vs prompt {pro:.3f}",
            "met": pre >= pro,
            "detail": f"{args.steps} steps, {len(seeds)} seed(s)",
            "why": "" if pre >= pro else "at this budget the input-level prompt learns faster",
        }
    )
    init_rows = []
    if not args.skip_init:
        sizes = [50, 200, 1000] if not args.quick else [50]
        for n_ex in sizes:
            sub = (train[0][:n_ex], train[1][:n_ex])
            steps = min(args.steps, max(4, 3 * n_ex // 8))
            accs = {}
            for init in ("random", "text", "labels"):
                r = earlier(
                    lib="softprompt", method="prompt", init=init, examples=n_ex, steps=steps
                )
                if r:
                    accs[init] = r["acc"]
                    continue
                acc, *_ = run("softprompt", "prompt", *sub, test, tok, steps, 0, init=init)
                accs[init] = acc
                record(
                    lib="softprompt",
                    method="prompt",
                    init=init,
                    examples=n_ex,
                    steps=steps,
                    acc=acc,
                )
            init_rows.append(
                [
                    n_ex,
                    steps,
                    f"{accs['random']:.3f}",
                    f"{accs['text']:.3f}",
                    f"{accs['labels']:.3f}",
                ]
            )
            best = max(accs["text"], accs["labels"])
            claims.append(
                {
                    "name": f"text/label init > random, {n_ex} examples",
                    "target": "> random",
                    "value": f"best {best:.3f} vs random {accs['random']:.3f}",
                    "met": best > accs["random"],
                    "detail": f"{steps} steps, seed 0",
                    "why": "" if best > accs["random"] else "one seed; the gap is within noise",
                }
            )
    gen_rows = []
    if not args.skip_gen:

        def gen_split(split, n=None):
            with open(resolve_data("aclsum", split)) as f:
                return encode_gen(tok, [json.loads(x) for x in f][:n])

        gtrain, gtest = gen_split("train"), gen_split("test", args.gen_test_rows)
        rouge = {}
        contenders = [("zero-shot", None)] + [
            (lib, m) for m in ("prompt", "prefix_mlp") for lib in ("softprompt", "peft")
        ]
        for lib, method in contenders:
            steps = 0 if method is None else args.gen_steps
            r = earlier(lib=lib, method=method or "-", task="aclsum", steps=steps)
            if r:
                sc = {k: r[k] for k in ("rouge1", "rouge2", "rougeL", "bleu")}
                n, secs = r["params"], r["train_s"]
            else:
                sc, n, secs = run_gen(lib, method, gtrain, gtest, tok, steps, 0)
                record(
                    lib=lib,
                    method=method or "-",
                    task="aclsum",
                    steps=steps,
                    params=n,
                    train_s=secs,
                    **sc,
                )
            rouge[(lib, method)] = sc["rougeL"]
            label = "-" if method is None else C.METHODS[method][0 if lib == "softprompt" else 1]
            gen_rows.append(
                [
                    lib,
                    label,
                    f"{sc['rouge1']:.1f}",
                    f"{sc['rouge2']:.1f}",
                    f"{sc['rougeL']:.1f}",
                    f"{sc['bleu']:.1f}",
                    f"{n:,}",
                    f"{secs:.0f} s",
                ]
            )
        for m in ("prompt", "prefix_mlp"):
            sp_r, pe_r = rouge[("softprompt", m)], rouge[("peft", m)]
            claims.append(
                {
                    "name": f"ACLSum ROUGE-L, {m}: tuned > zero-shot",
                    "target": "> zero-shot",
                    "value": f"{sp_r:.1f} vs {rouge[('zero-shot', None)]:.1f} "
                    f"(PEFT same method: {pe_r:.1f})",
                    "met": sp_r > rouge[("zero-shot", None)],
                    "detail": f"{args.gen_steps} steps of batch 4, seed 0",
                    "why": "" if sp_r > rouge[("zero-shot", None)] else "too few steps",
                }
            )
    tables = [
        {
            "title": f"Rotten Tomatoes test accuracy ({args.test_rows} rows), {args.steps} steps of batch 8 "
            f"from {args.train_rows} training rows, mean ± std over {len(seeds)} seed(s)",
            "columns": [
                "library",
                "method",
                "lr",
                "accuracy",
                "trainable params",
                "adapter on disk",
                "train time",
            ],
            "rows": table,
            "notes": [],
        }
    ]
    if init_rows:
        tables.append(
            {
                "title": "Prompt tuning (20 tokens): initialisation vs training-set size (seed 0)",
                "columns": ["examples", "steps", "random", "text", "labels"],
                "rows": init_rows,
                "notes": [],
            }
        )
    methods = list(C.METHODS)
    plots = [
        {
            "file": "quality_accuracy.png",
            "title": f"Rotten Tomatoes test accuracy, {args.steps} steps "
            f"(mean of {len(seeds)} seed(s)); dashed: zero-shot",
            "labels": methods,
            "series": {
                lib: [round(results[(lib, m)], 4) for m in methods]
                for lib in ("softprompt", "peft")
            },
            "ref": acc0,
            "ref_label": "zero-shot",
            "ylabel": "accuracy",
            "ylim": [0.5, 1.0],
        }
    ]
    if gen_rows:
        tables.append(
            {
                "title": f"ACLSum test ({args.gen_test_rows} papers): ROUGE F1 x100 and BLEU, "
                f"{args.gen_steps} steps of batch 4 from 100 training papers, seed 0",
                "columns": [
                    "library",
                    "method",
                    "ROUGE-1",
                    "ROUGE-2",
                    "ROUGE-L",
                    "BLEU",
                    "trainable params",
                    "train time",
                ],
                "rows": gen_rows,
                "notes": [],
            }
        )
    out = {
        "section": "quality",
        "title": "4. Quality on real data",
        "order": 4,
        "machine": C.machine_info() if hasattr(C, "machine_info") else {},
        "config": vars(args) | {"out": str(args.out)},
        "intro": [__doc__.split("\n\n")[1]],
        "tables": tables,
        "targets": claims,
        "plots": plots,
        "notes": [],
        "raw": raw,
    }
    if reused:
        out["notes"].append(
            f"The zero-shot and full fine-tuning rows are the runs of {raw['reused_baselines_from']} "
            "(`--reuse-baselines`): they use neither library, and their code path has not "
            "changed since."
        )
    if reused and args.reuse_init:
        out["notes"].append(
            f"The initialisation table is from the run of {raw['reused_baselines_from']} "
            "(`--reuse-init`), not rerun with the current defaults, for lack of CPU time: "
            "there prompt tuning trained at lr 3e-2 (now 1e-2)."
        )
    if reused and args.reuse_aclsum:
        out["notes"].append(
            f"The ACLSum table is from the run of {raw['reused_baselines_from']} "
            "(`--reuse-aclsum`), not rerun with the current defaults, for lack of CPU time: "
            "there softprompt's prompt tuning trained at lr 3e-2 and its prefix at 1e-4 from "
            "keys captured at positions 0..P-1 (PEFT at the same rates)."
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
