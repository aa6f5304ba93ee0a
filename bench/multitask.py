"""Several tasks in one run, prompt transfer and prompt ensembles on SmolLM2-135M (CPU).

    nice -n 10 python bench/multitask.py      # ~10 minutes on 2 busy CPU threads; writes
                                              # bench/results/multitask.json

1. Wall time: three prompt-tuning tasks built from the embedded data (Rotten Tomatoes
   sentiment; review length long/short; text source movie review vs paper abstract, aclsum)
   trained one after another (three Trainer runs, batch 8) vs in one --tasks run (batch 24 of
   mixed rows: about 8 rows of each task per step, so each adapter sees the same number of rows
   and updates). The model is loaded once for both; dev accuracy of each adapter after.
2. Transfer (SPoT): target tasks at 50 and 200 training rows, prompt initialised from a source
   adapter vs from random vocabulary embeddings (the default); same steps, dev accuracy.
3. Ensembles: 3 seeds of prompt tuning on sentiment; each alone, mean probability and majority
   vote on test rows.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import softprompt as sp  # noqa: E402
from softprompt.data import Example, load_examples  # noqa: E402
from softprompt.ensemble import ensemble_predict  # noqa: E402
from softprompt.loading import load_base  # noqa: E402
from softprompt.multitask import MultiTaskTrainer  # noqa: E402
from softprompt.tasks import Task, TaskSpec, headline  # noqa: E402
from softprompt.trainer import TrainArgs, Trainer  # noqa: E402
from softprompt.transfer import init_from, prompt_rows, similarity  # noqa: E402

OUT = ROOT / "bench" / "results" / "multitask.json"
TOKENS, LR, STEPS, MAXLEN, DEV, BATCH = 10, 1e-2, 15, 48, 100, 8


def rows(fields: list[dict], tag: str) -> list[Example]:
    return [Example(f, tag, i + 1) for i, f in enumerate(fields)]


def build_tasks() -> dict[str, dict]:
    rt_train = [e.fields for e in load_examples("rotten-tomatoes:train", "classify")]
    rt_dev = [e.fields for e in load_examples("rotten-tomatoes:dev", "classify")]
    acl_train = [e.fields for e in load_examples("aclsum:train", "generate")]
    acl_dev = [e.fields for e in load_examples("aclsum:dev", "generate")]
    acl_dev += [e.fields for e in load_examples("aclsum:test", "generate")]
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(rt_train), generator=g).tolist()
    rt = [rt_train[i] for i in perm[:2000]]
    median = sorted(len(r["text"].split()) for r in rt)[len(rt) // 2]

    def length(r):
        return {"text": r["text"], "label": "long" if len(r["text"].split()) > median else "short"}

    def source(txt, lab):
        return {"text": " ".join(txt.split()[:40]), "label": lab}

    dom_train = [source(r["text"], "movie") for r in rt[1000:1100]]
    dom_train += [source(r["input"], "paper") for r in acl_train]
    dom_dev = [source(r["text"], "movie") for r in rt_dev[-75:]]
    dom_dev += [source(r["input"], "paper") for r in acl_dev[:75]]
    return {
        "sent": dict(
            template="Review: {text}\nSentiment: {label}",
            train=rt[:240],
            dev=rt_dev[:DEV],
            pool=rt[240:1000],
        ),
        "length": dict(
            template="Text: {text}\nLength: {label}",
            train=[length(r) for r in rt[1000:1240]],
            dev=[length(r) for r in rt_dev[DEV : 2 * DEV]],
        ),
        "domain": dict(template="Text: {text}\nSource: {label}", train=dom_train, dev=dom_dev),
        # a related target for transfer: sentiment in another format and other label words
        "opinion": dict(
            template="Text: {text}\nOpinion: {label}",
            train=[
                {"text": r["text"], "label": {"positive": "good", "negative": "bad"}[r["label"]]}
                for r in rt[1240:1440]
            ],
            dev=[
                {"text": r["text"], "label": {"positive": "good", "negative": "bad"}[r["label"]]}
                for r in rt_dev[2 * DEV : 3 * DEV]
            ],
        ),
    }


def spec_of(d: dict) -> TaskSpec:
    labels = sorted({r["label"] for r in d["train"]})
    return TaskSpec(kind="classify", template=d["template"], labels=labels, max_length=MAXLEN)


def add(model, name, d, seed=0):
    ad = model.add_adapter(name, sp.PromptTuningConfig(num_virtual_tokens=TOKENS, seed=seed))
    ad.task = spec_of(d).to_dict()
    return Task(spec_of(d), model, model.tokenizer)


def dev_acc(model, name, task, dev) -> float:
    with model.using(name):
        preds = task.predict(rows(dev, "dev"), 32)
    return headline(task.metrics(rows(dev, "dev"), preds))[1]


def train_one(model, name, task, train, steps, seed, out, batch=None) -> float:
    batch = batch or BATCH
    model.set_active(name)
    args = TrainArgs(
        output_dir=str(out / name),
        max_steps=steps,
        lr=LR,
        batch_size=batch,
        eval_every=10**6,
        seed=seed,
        progress=False,
        log_every=10,
    )
    t = time.time()
    Trainer(model, task, rows(train, name), None, args, log=lambda _: None).train()
    return time.time() - t


def main() -> None:
    global STEPS, MAXLEN, DEV, BATCH
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="multitask,transfer,ensemble")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--batch", type=int, default=BATCH, help="rows per task per step")
    ap.add_argument("--max-length", type=int, default=MAXLEN)
    ap.add_argument("--dev", type=int, default=DEV)
    opt = ap.parse_args()
    STEPS, BATCH, MAXLEN, DEV = opt.steps, opt.batch, opt.max_length, opt.dev
    sections = opt.sections.split(",")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    base, tok = load_base("smollm2-135m-instruct")
    model = sp.attach(base, tokenizer=tok)
    data = build_tasks()
    tmp = Path(tempfile.mkdtemp(prefix="bench-multi-"))
    result: dict = {
        "config": dict(
            batch=BATCH,
            sections=sections,
            tokens=TOKENS,
            lr=LR,
            steps=STEPS,
            max_length=MAXLEN,
            dev_rows=DEV,
            method="prompt",
            threads=2,
        )
    }

    # 1. sequential vs one --tasks run
    names = ["sent", "length", "domain"]
    seq_time, seq_acc = {}, {}
    for n in names:
        task = add(model, f"seq_{n}", data[n])
        seq_time[n] = train_one(model, f"seq_{n}", task, data[n]["train"], STEPS, 0, tmp)
        seq_acc[n] = dev_acc(model, f"seq_{n}", task, data[n]["dev"])
        print(f"sequential {n}: {seq_time[n]:.1f}s dev {seq_acc[n]:.3f}", flush=True)
    tasks = {n: (add(model, n, data[n]), rows(data[n]["train"], n), []) for n in names}
    args = TrainArgs(
        output_dir=str(tmp / "multi"),
        max_steps=STEPS,
        lr=LR,
        batch_size=3 * BATCH,
        eval_every=STEPS,
        progress=False,
    )
    t = time.time()
    mt = MultiTaskTrainer(model, tasks, args, log=lambda _: None)
    info = mt.train()
    multi_time = time.time() - t  # includes one save per task, as the sequential runs do
    multi_acc = {n: dev_acc(model, n, tasks[n][0], data[n]["dev"]) for n in names}
    print(f"multi: {multi_time:.1f}s dev {multi_acc}", flush=True)
    result["multitask"] = dict(
        sequential_s=seq_time,
        sequential_total_s=sum(seq_time.values()),
        multi_s=multi_time,
        speedup=sum(seq_time.values()) / multi_time,
        sequential_dev=seq_acc,
        multi_dev=multi_acc,
        multi_rows_seen={n: v["rows_seen"] for n, v in info["tasks"].items()},
        multi_updates={n: v["updates"] for n, v in info["tasks"].items()},
    )
    OUT.write_text(json.dumps(result, indent=2))

    if "transfer" in sections:
        # 2. transfer: source = sequential sentiment adapter; targets at 50 / 200 rows
        src_dir = tmp / "seq_sent" / "adapter"
        transfer = []
        for target in ("opinion",):
            for n_rows in (50, 200):
                for init in ("vocab", "transfer"):
                    name = f"t_{target}_{n_rows}_{init}"
                    task = add(model, name, data[target], seed=1)
                    if init == "transfer":
                        init_from(model, name, src_dir)
                    train_one(model, name, task, data[target]["train"][:n_rows], 12, 1, tmp)
                    acc = dev_acc(model, name, task, data[target]["dev"])
                    transfer.append(dict(target=target, rows=n_rows, init=init, dev=acc))
                    print(f"transfer {name}: dev {acc:.3f}", flush=True)
        result["transfer"] = transfer
        OUT.write_text(json.dumps(result, indent=2))
        # retrieval: the 50-row vocab-init opinion prompt against the three source prompts
        mine = prompt_rows(model.adapters["t_opinion_50_vocab"])
        result["similar"] = {n: similarity(mine, prompt_rows(model.adapters[n])) for n in names}

    if "ensemble" in sections:
        # 3. ensembles: 3 seeds on sentiment, test rows
        test = [e.fields for e in load_examples("rotten-tomatoes:test", "classify")][:200]
        members = ["seq_sent"]
        for seed in (1, 2):
            task = add(model, f"ens{seed}", data["sent"], seed=seed)
            train_one(model, f"ens{seed}", task, data["sent"]["train"], STEPS, seed, tmp)
            members.append(f"ens{seed}")
        task = Task(spec_of(data["sent"]), model, tok)
        single = {m: dev_acc(model, m, task, test) for m in members}
        ens = {}
        for combine in ("mean", "vote"):
            t = time.time()
            preds = ensemble_predict(model, [task] * 3, members, rows(test, "test"), 32, combine)
            ens[combine] = dict(
                acc=headline(task.metrics(rows(test, "test"), preds))[1], seconds=time.time() - t
            )
        result["ensemble"] = dict(single=single, best_single=max(single.values()), **ens)
        print(json.dumps(result["ensemble"]), flush=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
