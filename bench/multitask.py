"""Several tasks in one run, prompt transfer, multitask prompt tuning, adaption prompts and
prompt ensembles on SmolLM2-135M-Instruct (CPU, 2 threads).

    nice -n 10 python bench/multitask.py [--sections multitask,transfer,mpt,adaption,ensemble]
        [--seeds 0,1,2] [--out bench/results/multitask.json]   # sections add to the file

1. multitask: three prompt-tuning tasks built from the embedded data (Rotten Tomatoes
   sentiment; review length long/short; text source movie review vs paper abstract, aclsum)
   trained one after another (three Trainer runs, batch 8) vs in one --tasks run (batch 24 of
   mixed rows: about 8 rows of each task per step, so each adapter sees the same number of rows
   and updates). The model is loaded once for both; dev accuracy of each adapter after.
2. transfer (SPoT): the target 'opinion' (sentiment, another template, label words good/bad) at
   50 and 200 training rows, prompt from the trained sentiment adapter vs the vocabulary init;
   dev accuracy at step 0 and after --transfer-steps, per seed.
3. mpt: stage 1 on the three source tasks in one run (one tied shared prompt), stage 2 on
   'opinion' from the shared prompt vs prompt tuning from the vocabulary.
4. adaption: adaption prompt (top 8 layers) vs prompt tuning on sentiment, per seed.
5. ensemble: 3 seeds of prompt tuning on sentiment; each alone, mean probability and majority
   vote on test rows.
6. ensemble_gen (not in the default sections): 3 seeds of prompt tuning on ACLSum summaries;
   ROUGE-L of each alone, of mean-probability decoding and of the majority vote.
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
TRANSFER_STEPS = 12


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


def add(model, name, d, seed=0, config=None):
    config = config or sp.PromptTuningConfig(num_virtual_tokens=TOKENS, seed=seed)
    ad = model.add_adapter(name, config, model.tokenizer)
    ad.task = spec_of(d).to_dict()
    return Task(spec_of(d), model, model.tokenizer)


def dev_acc(model, name, task, dev) -> float:
    with model.using(name):
        preds = task.predict(rows(dev, "dev"), 32)
    return headline(task.metrics(rows(dev, "dev"), preds))[1]


def train_one(model, name, task, train, steps, seed, out, batch=None, lr=None) -> float:
    batch = batch or BATCH
    model.set_active(name)
    args = TrainArgs(
        output_dir=str(out / name),
        max_steps=steps,
        lr=lr or LR,
        batch_size=batch,
        eval_every=10**6,
        seed=seed,
        progress=False,
        log_every=10,
    )
    t = time.time()
    Trainer(model, task, rows(train, name), None, args, log=lambda _: None).train()
    return time.time() - t


def train_multi(model, tasks, out) -> tuple[dict, float]:
    """One MultiTaskTrainer run of the tasks, STEPS steps of 3 x BATCH mixed rows: (its
    summary, its wall time in seconds)."""
    args = TrainArgs(
        output_dir=str(out),
        max_steps=STEPS,
        lr=LR,
        batch_size=3 * BATCH,
        eval_every=STEPS,
        progress=False,
    )
    t = time.time()
    info = MultiTaskTrainer(model, tasks, args, log=lambda _: None).train()
    return info, time.time() - t


def multitask_section(model, data, names, tmp, result) -> None:
    """1. the three tasks one after another vs one MultiTaskTrainer run, same steps."""
    seq_time, seq_acc = {}, {}
    for n in names:
        task = add(model, f"seq_{n}", data[n])
        seq_time[n] = train_one(model, f"seq_{n}", task, data[n]["train"], STEPS, 0, tmp)
        seq_acc[n] = dev_acc(model, f"seq_{n}", task, data[n]["dev"])
        print(f"sequential {n}: {seq_time[n]:.1f}s dev {seq_acc[n]:.3f}", flush=True)
    tasks = {n: (add(model, n, data[n]), rows(data[n]["train"], n), []) for n in names}
    # includes one save per task, as the sequential runs do
    info, multi_time = train_multi(model, tasks, tmp / "multi")
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


def mean(xs) -> float:
    return round(sum(xs) / len(xs), 4)


def target_runs(model, data, tmp, seeds, starts: dict) -> tuple[list[dict], dict]:
    """The target 'opinion' at 50 / 200 training rows from each start in ``starts`` (its name ->
    ``make(adapter_name, seed) -> Task``, which adds the adapter), per seed: dev accuracy at
    step 0 (the start alone) and after TRANSFER_STEPS. Returns (runs, per-(rows, start) means)."""
    runs = []
    for n_rows in (50, 200):
        for start, make in starts.items():
            for seed in seeds:
                name = f"{start}_{n_rows}_{seed}"
                task = make(name, seed)
                at0 = dev_acc(model, name, task, data["opinion"]["dev"])
                train = data["opinion"]["train"][:n_rows]
                train_one(model, name, task, train, TRANSFER_STEPS, seed, tmp)
                acc = dev_acc(model, name, task, data["opinion"]["dev"])
                runs.append(dict(rows=n_rows, init=start, seed=seed, dev_step0=at0, dev=acc))
                print(f"{name}: dev {at0:.3f} -> {acc:.3f}", flush=True)

    def of(n, start):
        return [r for r in runs if (r["rows"], r["init"]) == (n, start)]

    summary = {
        f"{n}_{start}": dict(
            dev_mean=mean([r["dev"] for r in of(n, start)]),
            dev_step0_mean=mean([r["dev_step0"] for r in of(n, start)]),
        )
        for n in (50, 200)
        for start in starts
    }
    return runs, summary


def transfer_section(model, data, names, tmp, result, seeds) -> None:
    """2. SPoT: the target 'opinion' at 50 / 200 rows from the trained 'sent' prompt vs the
    vocabulary init; dev accuracy at step 0 (the init alone) and after TRANSFER_STEPS."""
    src_dir = tmp / "seq_sent" / "adapter"

    def vocab(name, seed):
        return add(model, name, data["opinion"], seed=seed)

    def transfer(name, seed):
        task = add(model, name, data["opinion"], seed=seed)
        init_from(model, name, src_dir)
        return task

    runs, summary = target_runs(model, data, tmp, seeds, {"vocab": vocab, "transfer": transfer})
    result["transfer"] = dict(steps=TRANSFER_STEPS, seeds=seeds, runs=runs, summary=summary)
    mine = prompt_rows(model.adapters[f"vocab_50_{seeds[0]}"])
    sources = [n for n in (f"seq_{m}" for m in names) if n in model.adapters]
    result["similar"] = {n: similarity(mine, prompt_rows(model.adapters[n])) for n in sources}


def mpt_section(model, data, names, tmp, result, seeds) -> None:
    """3. MPT: stage 1 on the three source tasks in one run (one tied shared prompt, rank-1
    factors per task), stage 2 on 'opinion' at 50 / 200 rows from the shared prompt (factors
    and shared prompt train) vs prompt tuning from the vocabulary (the same steps and lr)."""
    cfg = dict(num_virtual_tokens=TOKENS, num_ranks=1)
    tasks = {
        f"mpt_{n}": (
            add(model, f"mpt_{n}", data[n], config=sp.MultitaskPromptConfig(**cfg)),
            rows(data[n]["train"], n),
            [],
        )
        for n in names
    }
    info, stage1_s = train_multi(model, tasks, tmp / "mpt1")
    stage1_dev = {
        n: dev_acc(model, f"mpt_{n}", tasks[f"mpt_{n}"][0], data[n]["dev"]) for n in names
    }
    print(f"mpt stage 1: {stage1_s:.1f}s dev {stage1_dev}", flush=True)
    shared = info["shared_prompt"]

    def prompt_vocab(name, seed):
        config = sp.PromptTuningConfig(num_virtual_tokens=TOKENS, seed=seed)
        return add(model, name, data["opinion"], config=config)

    def mpt_shared(name, seed):
        config = sp.MultitaskPromptConfig(**cfg, shared_init_from=shared, seed=seed)
        return add(model, name, data["opinion"], config=config)

    runs, summary = target_runs(
        model, data, tmp, seeds, {"prompt_vocab": prompt_vocab, "mpt_shared": mpt_shared}
    )
    result["mpt"] = dict(
        stage1_s=stage1_s,
        stage1_dev=stage1_dev,
        stage1_steps=STEPS,
        steps=TRANSFER_STEPS,
        seeds=seeds,
        runs=runs,
        summary=summary,
    )


def adaption_section(model, data, tmp, result, seeds) -> None:
    """4. adaption prompt (LLaMA-Adapter: 10 tokens in the top 8 layers, zero-init gates, its
    paper's lr 9e-3) vs prompt tuning (10 tokens, lr LR) on 'sent': dev accuracy after STEPS
    steps of BATCH rows, per seed, and the step time of each."""
    out = {"prompt": [], "adaption_prompt": []}
    times = {"prompt": [], "adaption_prompt": []}
    for seed in seeds:
        for kind in ("prompt", "adaption_prompt"):
            name = f"a_{kind}_{seed}"
            if kind == "prompt":
                config, lr = sp.PromptTuningConfig(num_virtual_tokens=TOKENS, seed=seed), LR
            else:
                config = sp.AdaptionPromptConfig(
                    num_virtual_tokens=TOKENS, adapter_layers=8, seed=seed
                )
                lr = 9e-3
            task = add(model, name, data["sent"], config=config)
            secs = train_one(model, name, task, data["sent"]["train"], STEPS, seed, tmp, lr=lr)
            out[kind].append(dev_acc(model, name, task, data["sent"]["dev"]))
            times[kind].append(secs / STEPS)
            print(f"{name}: dev {out[kind][-1]:.3f} ({secs / STEPS:.2f} s/step)", flush=True)
    zero = add(
        model,
        "a_zero",
        data["sent"],
        config=sp.AdaptionPromptConfig(num_virtual_tokens=TOKENS, adapter_layers=8),
    )
    result["adaption"] = dict(
        seeds=seeds,
        steps=STEPS,
        dev=out,
        dev_mean={k: mean(v) for k, v in out.items()},
        s_per_step_mean={k: mean(v) for k, v in times.items()},
        zero_gate_dev=dev_acc(model, "a_zero", zero, data["sent"]["dev"]),
    )


def ensemble_section(model, data, tmp, result) -> None:
    """5. ensembles: 3 seeds on sentiment, test rows; each alone, mean and vote."""
    test = [e.fields for e in load_examples("rotten-tomatoes:test", "classify")][:200]
    members = ["seq_sent"]
    for seed in (1, 2):
        task = add(model, f"ens{seed}", data["sent"], seed=seed)
        train_one(model, f"ens{seed}", task, data["sent"]["train"], STEPS, seed, tmp)
        members.append(f"ens{seed}")
    task = Task(spec_of(data["sent"]), model, model.tokenizer)
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


def ensemble_gen_section(model, tmp, result, seeds, steps=40, test_rows=40) -> None:
    """6. generation ensembles: prompt tuning on ACLSum (abstract -> approach summary), one
    adapter per seed; ROUGE-L of each alone, of the mean-probability decoding and of the
    majority vote on the first ``test_rows`` test rows (greedy, 32 new tokens)."""
    spec = TaskSpec(
        kind="generate",
        template="Abstract: {input}\nApproach: {target}",
        max_length=256,
        max_new_tokens=32,
    )
    train = [e.fields for e in load_examples("aclsum:train", "generate")]
    test = load_examples("aclsum:test", "generate")[:test_rows]
    task = Task(spec, model, model.tokenizer)
    names, secs = [], {}
    for seed in seeds:
        name = f"gen{seed}"
        model.add_adapter(
            name, sp.PromptTuningConfig(num_virtual_tokens=TOKENS, seed=seed), model.tokenizer
        ).task = spec.to_dict()
        secs[name] = train_one(model, name, task, train, steps, seed, tmp, batch=4)
        names.append(name)
    out = {}
    for combine in ("mean", "vote"):
        t = time.time()
        preds = ensemble_predict(model, [task] * len(names), names, test, 8, combine)
        out[combine] = dict(
            rougeL=round(headline(task.metrics(test, preds))[1], 2),
            seconds=round(time.time() - t, 1),
        )
        single = {
            n: round(
                headline(task.metrics(test, [{"prediction": p["members"][j]} for p in preds]))[1],
                2,
            )
            for j, n in enumerate(names)
        }
        print(f"gen ensemble {combine}: {out[combine]} members {single}", flush=True)
    result["ensemble_gen"] = dict(
        seeds=seeds,
        steps=steps,
        test_rows=len(test),
        train_s=secs,
        single=single,
        best_single=max(single.values()),
        **out,
    )


def main() -> None:
    global STEPS, MAXLEN, DEV, BATCH, TRANSFER_STEPS
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="multitask,transfer,mpt,adaption,ensemble")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--transfer-steps", type=int, default=TRANSFER_STEPS)
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the transfer/mpt/adaption runs")
    ap.add_argument("--batch", type=int, default=BATCH, help="rows per task per step")
    ap.add_argument("--max-length", type=int, default=MAXLEN)
    ap.add_argument("--dev", type=int, default=DEV)
    ap.add_argument("--out", type=Path, default=OUT)
    opt = ap.parse_args()
    out = opt.out
    STEPS, BATCH, MAXLEN, DEV = opt.steps, opt.batch, opt.max_length, opt.dev
    TRANSFER_STEPS = opt.transfer_steps
    seeds = [int(x) for x in opt.seeds.split(",")]
    sections = opt.sections.split(",")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    base, tok = load_base("smollm2-135m-instruct")
    model = sp.attach(base, tokenizer=tok)
    data = build_tasks()
    tmp = Path(tempfile.mkdtemp(prefix="bench-multi-"))
    config = dict(
        batch=BATCH,
        tokens=TOKENS,
        lr=LR,
        steps=STEPS,
        transfer_steps=TRANSFER_STEPS,
        max_length=MAXLEN,
        dev_rows=DEV,
        threads=2,
    )
    result: dict = {}
    if out.is_file():  # sections run separately add to the same file
        result = json.loads(out.read_text())
    result.setdefault("config", {})
    result["config"].update(config)
    result["config"]["sections"] = sorted(set(sections) | set(result["config"].get("sections", [])))

    def save():
        out.write_text(json.dumps(result, indent=2))

    names = ["sent", "length", "domain"]
    if "multitask" in sections:
        multitask_section(model, data, names, tmp, result)
        save()
    elif sections != ["ensemble_gen"]:  # the transfer source / first ensemble member
        task = add(model, "seq_sent", data["sent"])
        train_one(model, "seq_sent", task, data["sent"]["train"], STEPS, 0, tmp)
    if "transfer" in sections:
        transfer_section(model, data, names, tmp, result, seeds)
        save()
    if "mpt" in sections:
        mpt_section(model, data, names, tmp, result, seeds)
        save()
    if "adaption" in sections:
        adaption_section(model, data, tmp, result, seeds)
        save()
    if "ensemble" in sections:
        ensemble_section(model, data, tmp, result)
        save()
    if "ensemble_gen" in sections:
        ensemble_gen_section(model, tmp, result, seeds)
        save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
