"""Several tasks in one run: one adapter per task, trained together over mixed batches.

``softprompt train --tasks sent=rotten-tomatoes:train,topic=topic.jsonl`` loads the frozen model
once and adds one adapter per task. Every step draws ``batch_size`` rows from the shuffled union
of the tasks still training; the whole mixed batch runs as **one** forward pass, each row routed
to its own task's adapter (``adapter_names``, one per row), and each task's loss is computed on
its own rows with its own ``Task`` (template, label set / verbalizer, or generation target)::

    loss = sum_t mean_{rows r of task t} loss_t(r)

Adapter ``t``'s parameters only touch the rows routed to it, so its gradient is the gradient of
its own rows' mean loss: exactly what a one-task run would get from those rows. Each task has
its own AdamW, schedule (warm-up then linear decay over the run's steps) and gradient clipping,
so one task's large gradient never scales another's update.

Per task: dev evaluation every ``eval_every`` steps (``--tasks-eval``), the best adapter kept in
``OUTPUT/<name>/adapter``, and early stopping after ``patience`` evaluations without improvement:
a stopped task's rows leave the pool (its adapter gets no more rows or updates) while the others
go on. Logs: ``OUTPUT/<name>/metrics.jsonl`` (the task's loss and dev metrics), a training
curve per task, ``OUTPUT/metrics.jsonl`` (the summed loss) and ``OUTPUT/summary.json``.

MPT stage 1 (``--method mpt``, ``tie_shared``): the tasks' MPT adapters hold ONE shared prompt
(``tie_shared_prompts``), trained by its own AdamW with the gradient of the summed losses, each
task's rank-r factors by the task's optimiser; saved after the run as ``OUTPUT/shared/adapter``.

Limits (each refused with a clear error): decoder-only LMs only (the mixed forward scores the
answers with the LM head), one process, no ``--resume`` / ``--grad-accum`` / ``--fsdp`` /
``--report-to`` / ``--test`` with ``--tasks``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import Example
from .errors import SoftPromptError
from .lm import _head, pad_left
from .model import SoftPromptModel
from .tasks import Task, headline
from .trainer import TrainArgs, _atomic_dir, default_lr, plot_curves

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def parse_tasks(value: str | None, flag: str = "--tasks") -> dict[str, str]:
    """``name=data[,name=data...]`` -> {name: data}, in order. Names are folder names under
    ``--output`` and adapter names: letters, digits, ``_`` and ``-``; two names that differ
    only in case are refused (they would share a folder on a case-insensitive file system)."""
    if not value or not str(value).strip():
        raise SoftPromptError(f"{flag} needs name=data[,name=data...], got {value!r}")
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for part in str(value).split(","):
        name, eq, data = part.strip().partition("=")
        name, data = name.strip(), data.strip()
        if not eq or not name or not data:
            raise SoftPromptError(f"{flag}: {part.strip()!r} is not name=data")
        if not _NAME.match(name):
            raise SoftPromptError(
                f"{flag}: task name {name!r} may only hold letters, digits, '_' and '-' "
                "(it names a folder under --output and the adapter)"
            )
        if name.lower() in seen:
            raise SoftPromptError(
                f"{flag}: the task name {name!r} clashes with {seen[name.lower()]!r} (names must "
                "differ in more than case: each one is a folder under --output)"
            )
        seen[name.lower()] = name
        out[name] = data
    return out


def parse_templates(values: Sequence[str] | None, names: Sequence[str]) -> dict[str, str]:
    """``--task-template name=TEMPLATE ...`` -> {name: template} for tasks of ``--tasks``."""
    out: dict[str, str] = {}
    for v in values or ():
        name, eq, text = str(v).partition("=")
        if not eq or name.strip() not in names:
            raise SoftPromptError(
                f"--task-template {v!r}: give NAME=TEMPLATE with NAME one of --tasks {list(names)}"
            )
        if name.strip() in out:
            raise SoftPromptError(f"--task-template: {name.strip()!r} is given twice")
        out[name.strip()] = text
    return out


@dataclass
class TaskRun:
    """One task's part of a multi-task run: its data, optimiser and selection state."""

    name: str
    task: Task
    items: list[dict]
    eval_examples: list[Example]
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    out: Path
    best: float | None = None
    bad_evals: int = 0
    done: bool = False
    stopped_at: int | None = None
    updates: int = 0
    rows_seen: int = 0
    adapter_step: int | None = None
    selected_step: int | None = None  # the step of the last selection (evaluation or save)
    recent: list[float] = field(default_factory=list)


def tie_shared_prompts(model: SoftPromptModel, names: Sequence[str]) -> torch.nn.Parameter:
    """MPT stage 1 (Wang et al. 2023): the adapters ``names`` (MPT, one per source task) hold
    ONE shared prompt from now on, the first one's; each keeps its own rank-r factors.

    Raises:
        SoftPromptError: an adapter that is not MPT, keeps its shared prompt frozen, or has
            another prompt shape than the first.
    """
    first = None
    for name in names:
        ad = model.adapters[name]
        if ad.config.method != "mpt" or ad.is_baked:
            raise SoftPromptError(
                f"tying the shared prompt needs trainable MPT adapters (--method mpt); task "
                f"{name!r} has {ad.config.method!r}"
            )
        if not ad.config.train_shared:
            raise SoftPromptError(
                f"task {name!r}: a tied shared prompt trains (stage 1); drop --freeze-shared "
                "or use --no-tie-shared"
            )
        if first is None:
            first = ad.shared
        elif ad.shared.shape != first.shape:
            raise SoftPromptError(
                f"task {name!r}: shared prompt {tuple(ad.shared.shape)} vs {tuple(first.shape)}"
            )
        else:
            ad.shared = first
    return first


def mixed_losses(
    model: SoftPromptModel, tasks: dict[str, Task], batch: Sequence[tuple[str, dict]]
) -> dict[str, torch.Tensor]:
    """Each task's mean loss over its rows of a mixed batch, from one forward pass.

    Args:
        tasks: task name (= adapter name) -> its ``Task``.
        batch: (task name, encoded row) pairs, rows of any of the tasks in any order.

    Returns:
        task name -> scalar loss, the same value ``tasks[name].loss`` gives for those rows alone
        (classification: cross-entropy over the label words' log-probabilities; generation:
        next-token cross-entropy averaged over the target tokens).
    """
    if not model.info.is_causal_lm or model.info.is_encoder_decoder:
        raise SoftPromptError("--tasks trains decoder-only language models only")
    seqs: list[list[int]] = []
    labs: list[list[int]] = []
    names: list[str] = []
    plan: list[tuple[str, str, int, int]] = []  # (task, kind, first sequence, how many)
    for name, item in batch:
        task = tasks[name]
        prompt = list(item["prompt"])
        first = len(seqs)
        if task.spec.kind == "classify":
            single = all(len(a) == 1 for a in task.answers)
            # single-token labels: one sequence whose last prompt position is scored over the
            # label words (the appended token only marks that position); else one per label
            answers = [task.answers[0]] if single else task.answers
            for a in answers:
                seqs.append(prompt + list(a))
                labs.append([-100] * len(prompt) + list(a))
                names.append(name)
            plan.append((name, "single" if single else "multi", first, len(answers)))
        else:
            seqs.append(prompt + list(item["target"]))
            # a chat row's earlier assistant turns are supervised too (loss_turns "all"), as in
            # Task.loss
            labs.append(
                list(item.get("prompt_labels", [-100] * len(prompt))) + list(item["target"])
            )
            names.append(name)
            plan.append((name, "generate", first, 1))
    ids, mask = pad_left(seqs, tasks[batch[0][0]].pad_id, model.device)
    lab, _ = pad_left(labs, -100, model.device)
    hidden = model(
        input_ids=ids, attention_mask=mask, adapter_names=names, body_only=True, use_cache=False
    ).last_hidden_state  # (S, T, d)
    target = lab[:, 1:]  # (S, T-1)
    sel = target != -100
    logp = F.log_softmax(_head(model)(hidden[:, :-1][sel]).float(), dim=-1)  # (N, V)
    counts = sel.sum(1).tolist()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    gold = target[sel]  # (N,)

    def seq_logp(s: int) -> torch.Tensor:  # summed log-probability of sequence s's labels
        rows = torch.arange(starts[s], starts[s + 1], device=logp.device)
        return logp[rows, gold[rows]].sum()

    per_task: dict[str, list[torch.Tensor]] = {}
    tokens: dict[str, int] = {}
    for (name, kind, first, n), (_, item) in zip(plan, batch, strict=True):
        task = tasks[name]
        if kind == "single":
            answer_ids = torch.tensor([a[0] for a in task.answers], device=logp.device)
            scores = logp[starts[first], answer_ids]  # (C,)
        elif kind == "multi":
            scores = torch.stack([seq_logp(first + c) for c in range(n)])  # (C,)
        if kind == "generate":
            per_task.setdefault(name, []).append(-seq_logp(first))
            tokens[name] = tokens.get(name, 0) + counts[first]
        else:
            y = torch.tensor(item["label"], device=logp.device)
            per_task.setdefault(name, []).append(F.cross_entropy(scores[None], y[None]))
            tokens[name] = tokens.get(name, 0) + 1
    return {name: torch.stack(v).sum() / tokens[name] for name, v in per_task.items()}


class MultiTaskTrainer:
    """Trains one adapter per task of ``tasks`` over mixed batches (see the module docstring).

    Args:
        model: holds one adapter per task, named as the task.
        tasks: name -> (Task, training rows, dev rows).
        args: the loop's settings (``output_dir`` is the run folder; each task writes into
            ``output_dir/<name>``).
    """

    def __init__(
        self,
        model: SoftPromptModel,
        tasks: dict[str, tuple[Task, Sequence[Example], Sequence[Example]]],
        args: TrainArgs,
        log: Callable[[str], None] = print,
        tie_shared: bool | None = None,
    ) -> None:
        if args.grad_accum != 1:
            raise SoftPromptError("--tasks trains with --grad-accum 1")
        if args.resume:
            raise SoftPromptError("--tasks runs cannot --resume yet; train into a new --output")
        if args.fsdp or args.report_to != "none":
            raise SoftPromptError("--tasks runs support neither --fsdp nor --report-to")
        if not tasks:
            raise SoftPromptError("--tasks needs at least one task")
        self.model, self.args, self.log = model, args, log
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.out = Path(args.output_dir)
        n_rows = sum(len(rows) for _, rows, _ in tasks.values())
        self.steps_per_epoch = max(1, math.ceil(n_rows / args.batch_size))
        self.total = args.max_steps or max(1, round(args.epochs * self.steps_per_epoch))
        warm = int(args.warmup_ratio * self.total)

        def schedule(s: int) -> float:
            return (
                (s + 1) / (warm + 1)
                if s < warm
                else max(0.0, (self.total - s) / max(1, self.total - warm))
            )

        for name in tasks:
            if name not in model.adapters:
                raise SoftPromptError(f"the model has no adapter {name!r} for task {name!r}")
        if tie_shared is None:  # MPT stage 1: every task an MPT adapter training a new prompt
            tie_shared = len(tasks) > 1 and all(
                model.adapters[n].config.method == "mpt"
                and model.adapters[n].config.train_shared
                and not model.adapters[n].config.shared_init_from
                for n in tasks
            )
        self.shared: torch.nn.Parameter | None = None
        self.shared_opt = self.shared_sched = None
        if tie_shared:
            self.shared = tie_shared_prompts(model, list(tasks))
            lr = args.lr if args.lr is not None else default_lr(model.base_model, "mpt")
            self.shared_opt = torch.optim.AdamW(
                [self.shared], lr=lr, weight_decay=args.weight_decay
            )
            self.shared_sched = torch.optim.lr_scheduler.LambdaLR(self.shared_opt, schedule)
        self.runs: dict[str, TaskRun] = {}
        for name, (task, train_rows, eval_rows) in tasks.items():
            if not train_rows:
                raise SoftPromptError(f"task {name!r} has no training rows")
            ad = model.adapters[name]
            params = [
                p
                for key, p in ad.named_parameters()
                if ad.trains(key) and p is not self.shared  # a tied prompt: its own optimiser
            ]
            if not params:
                raise SoftPromptError(f"adapter {name!r} has nothing to train (is it baked?)")
            lr = args.lr if args.lr is not None else default_lr(model.base_model, ad.config.method)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
            self.runs[name] = TaskRun(
                name=name,
                task=task,
                items=task.encode_examples(
                    train_rows, f"{name} training", args.skip_bad, lambda m: log(f"warning: {m}")
                )[0],
                eval_examples=list(eval_rows or [])[: args.eval_limit],
                params=params,
                opt=opt,
                sched=torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                out=self.out / name,
            )
        self.step = 0
        self._queue: list[tuple[str, int]] = []
        self._epoch = 0

    # ------------------------------------------------------------------ data order
    def _refill(self) -> None:
        """The next epoch: every row of the tasks still training, shuffled together."""
        pool = [(n, i) for n, r in self.runs.items() if not r.done for i in range(len(r.items))]
        g = torch.Generator().manual_seed(self.args.seed * 100_003 + self._epoch)
        self._queue = [pool[k] for k in torch.randperm(len(pool), generator=g).tolist()]
        self._epoch += 1

    def next_batch(self) -> list[tuple[str, int]]:
        """``batch_size`` (task, row) pairs of the tasks still training (a stopped task's rows
        are dropped from the rest of the epoch)."""
        self._queue = [(n, i) for n, i in self._queue if not self.runs[n].done]
        if not self._queue:
            self._refill()
        batch, self._queue = (
            self._queue[: self.args.batch_size],
            self._queue[self.args.batch_size :],
        )
        return batch

    # ------------------------------------------------------------------ loop
    def active(self) -> list[str]:
        return [n for n, r in self.runs.items() if not r.done]

    def train_step(self) -> dict[str, float]:
        """One optimizer step over a mixed batch; returns each task's loss on its rows."""
        batch = self.next_batch()
        self.model.set_trainable(self.active())
        for run in self.runs.values():
            run.opt.zero_grad(set_to_none=True)
        if self.shared_opt is not None:
            self.shared_opt.zero_grad(set_to_none=True)
        rows = [(n, self.runs[n].items[i]) for n, i in batch]
        tasks = {n: self.runs[n].task for n in {n for n, _ in batch}}
        losses = mixed_losses(self.model, tasks, rows)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise SoftPromptError(
                f"training stopped at step {self.step + 1}: the loss is not finite "
                f"({ {n: float(v) for n, v in losses.items()} }); lower --lr"
            )
        total.backward()
        for name, loss in losses.items():
            run = self.runs[name]
            if self.args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(run.params, self.args.max_grad_norm)
            run.opt.step()
            run.updates += 1
            run.rows_seen += sum(1 for n, _ in batch if n == name)
            run.recent.append(loss.item())
            if not all(bool(torch.isfinite(p).all()) for p in run.params):
                raise SoftPromptError(
                    f"training stopped at step {self.step + 1}: task {name!r}'s adapter is not "
                    "finite after the update; lower --lr"
                )
        if self.shared_opt is not None:  # the tied prompt: the summed losses' gradient
            if self.args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([self.shared], self.args.max_grad_norm)
            self.shared_opt.step()
            self.shared_sched.step()
            if not bool(torch.isfinite(self.shared).all()):
                raise SoftPromptError(
                    f"training stopped at step {self.step + 1}: the shared prompt is not "
                    "finite after the update; lower --lr"
                )
        for name in self.active():
            self.runs[name].sched.step()
        self.step += 1
        return {n: v.item() for n, v in losses.items()}

    def evaluate(self, name: str) -> dict:
        """Task ``name``'s metrics on its dev rows, with its own adapter."""
        run = self.runs[name]
        self.model.eval()
        with self.model.using(name):
            preds = run.task.predict(run.eval_examples, self.args.eval_batch_size)
        self.model.train()
        return run.task.metrics(run.eval_examples, preds)

    def _save_best(self, run: TaskRun) -> None:
        from .io import save_adapter

        _atomic_dir(run.out / "adapter", lambda tmp: save_adapter(self.model, tmp, run.name))
        run.adapter_step = self.step

    def _save_shared(self) -> str:
        """The tied shared prompt after the run, as a prompt-tuning folder
        ``OUTPUT/shared/adapter`` (what stage 2's ``--shared-from`` reads), and each task's
        adapter untied (its own copy: its file already holds the product at its best step)."""
        import softprompt as sp

        from .io import save_adapter

        tmp = "__shared_prompt__"
        while tmp in self.model.adapters:
            tmp += "_"
        ad = self.model.add_adapter(
            tmp, sp.PromptTuningConfig(num_virtual_tokens=self.shared.shape[0], init="random")
        )
        (param,) = list(ad.parameters())
        with torch.no_grad():
            param.copy_(self.shared)
        target = self.out / "shared" / "adapter"
        try:
            _atomic_dir(target, lambda d: save_adapter(self.model, d, tmp))
        finally:
            self.model.delete_adapter(tmp)
        for name in self.runs:
            ad = self.model.adapters[name]
            ad.shared = torch.nn.Parameter(self.shared.detach().clone(), requires_grad=False)
        self.log(f"shared prompt: {target}")
        return str(target)

    def _write(self, path: Path, record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _select(self, run: TaskRun) -> None:
        """Evaluate task ``run`` on its dev rows, keep its best adapter, maybe stop it."""
        run.selected_step = self.step
        if not run.eval_examples:
            self._save_best(run)
            return
        metrics = self.evaluate(run.name)
        key, value = headline(metrics)
        if run.best is None or value > run.best:
            run.best, run.bad_evals = value, 0
            self._save_best(run)
        else:
            run.bad_evals += 1
        self._write(
            run.out / "metrics.jsonl",
            {
                "step": self.step,
                "eval": {key: value, **{k: v for k, v in metrics.items() if k != "per_class"}},
                "best": run.best,
            },
        )
        if run.bad_evals >= self.args.patience:
            run.done, run.stopped_at = True, self.step
            self.log(
                f"task {run.name}: no better dev {key} in {run.bad_evals} evaluations; stopped"
            )

    def train(self) -> dict:
        args = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        for run in self.runs.values():
            run.out.mkdir(parents=True, exist_ok=True)
            (run.out / "metrics.jsonl").unlink(missing_ok=True)
        (self.out / "metrics.jsonl").unlink(missing_ok=True)
        rows = {n: len(r.items) for n, r in self.runs.items()}
        self.log(f"{len(self.runs)} tasks {rows}, {self.total} steps of {args.batch_size} rows")
        self.model.train()
        t0 = time.time()
        recent: list[float] = []
        try:
            while self.step < self.total and self.active():
                losses = self.train_step()
                recent.append(sum(losses.values()))
                if self.step % args.log_every == 0 or self.step == self.total:
                    for run in self.runs.values():
                        if run.recent:
                            self._write(
                                run.out / "metrics.jsonl",
                                {
                                    "step": self.step,
                                    "loss": sum(run.recent) / len(run.recent),
                                    "lr": run.sched.get_last_lr()[0],
                                    "rows": run.rows_seen,
                                },
                            )
                            run.recent = []
                    self._write(
                        self.out / "metrics.jsonl",
                        {
                            "step": self.step,
                            "loss": sum(recent) / len(recent),
                            "tasks": self.active(),
                            "elapsed_s": round(time.time() - t0, 2),
                        },
                    )
                    recent = []
                if self.step % args.eval_every == 0 or self.step == self.total:
                    for name in self.active():
                        self._select(self.runs[name])
            for run in self.runs.values():  # stopped because the others were all done
                if not run.done and run.selected_step != self.step:
                    self._select(run)
        finally:
            self.model.eval()
            self.model.set_trainable([])
        shared_dir = None
        if self.shared is not None:
            shared_dir = self._save_shared()
        for run in self.runs.values():
            plot_curves(run.out / "metrics.jsonl", run.out / "training_curve.png", self.log)
        return {
            "steps": self.step,
            "wall_s": round(time.time() - t0, 2),
            "shared_prompt": shared_dir,
            "tasks": {
                n: {
                    "train_rows": len(r.items),
                    "best": r.best,
                    "updates": r.updates,
                    "rows_seen": r.rows_seen,
                    "stopped_early": r.stopped_at is not None,
                    "stopped_at": r.stopped_at,
                    "adapter_step": r.adapter_step,
                    "adapter": str(r.out / "adapter"),
                }
                for n, r in self.runs.items()
            },
        }


# --------------------------------------------------------------------------------------------
# the CLI's `train --tasks`
# --------------------------------------------------------------------------------------------

_REFUSED = {  # flag -> why it cannot go with --tasks
    "train": "--tasks gives each task's training data (name=data)",
    "eval": "give each task's dev data with --tasks-eval name=data",
    "test": "evaluate each adapter afterwards with softprompt eval --adapter OUTPUT/<name>",
    "resume": "a --tasks run cannot be resumed yet",
    "fsdp": "--tasks runs in one process",
    "log_rows": "--tasks runs do not log rows",
    "compile": "--tasks runs do not compile the model yet",
    "init_from": "--init-from starts one task; train it without --tasks",
}


def train_tasks(args: argparse.Namespace):
    """``softprompt train --tasks ...`` from parsed flags: returns (summary, model, None).

    Everything is checked (names, data, templates, labels) before the model loads or anything
    is written.
    """
    import yaml

    import softprompt as sp

    from .cli import _adapter_config, _load_data, _output_dir, _unescape, _warn
    from .data import check_eval_labels, label_set
    from .distributed import fsdp_requested
    from .loading import load_base, model_kind
    from .methods.base import METHODS
    from .tasks import TaskSpec
    from .templates import Template, default_template

    for dest, why in _REFUSED.items():
        if getattr(args, dest, None):
            raise SoftPromptError(f"--{dest.replace('_', '-')} cannot go with --tasks: {why}")
    if fsdp_requested():
        raise SoftPromptError(
            "accelerate launch --use_fsdp (an FSDP config) cannot go with --tasks: "
            + _REFUSED["fsdp"]
        )
    if getattr(args, "report_to", "none") != "none" or args.grad_accum != 1:
        raise SoftPromptError("--tasks trains with --grad-accum 1 and --report-to none")
    if not args.output:
        raise SoftPromptError("train needs --output (on the command line or in --config)")
    train_specs = parse_tasks(args.tasks)
    eval_specs = parse_tasks(args.tasks_eval, "--tasks-eval") if args.tasks_eval else {}
    unknown = sorted(set(eval_specs) - set(train_specs))
    if unknown:
        raise SoftPromptError(f"--tasks-eval names {unknown}, which are not in --tasks")
    templates = parse_templates(args.task_template, list(train_specs))
    if model_kind(args.model) != "causal":
        raise SoftPromptError("--tasks trains decoder-only language models only")
    train_args = _tasks_train_args(args)
    level = METHODS[args.method][0].level == "input"
    if args.template:
        shared = _unescape(args.template)
    else:
        shared = default_template(args.task, level, args.num_virtual_tokens, encoder=False)
    data = {}
    for name, spec in train_specs.items():
        text = _unescape(templates[name]) if name in templates else shared
        template = Template.parse(text)
        try:
            rows = _load_data(spec, args.task, args.skip_bad, template)
            labels = label_set(rows) if args.task == "classify" else []
            dev = (
                _load_data(eval_specs[name], args.task, args.skip_bad, template)
                if name in eval_specs
                else []
            )
            if args.task == "classify" and dev:
                dev = check_eval_labels(labels, dev, args.skip_bad, _warn)
        except SoftPromptError as e:
            raise SoftPromptError(f"task {name!r}: {e}") from e
        data[name] = (text, template, rows, labels, dev)
    try:
        verbalizer = json.loads(args.verbalizer) if args.verbalizer else {}
    except json.JSONDecodeError as e:
        raise SoftPromptError(f"--verbalizer is not valid JSON: {e}") from e
    out = _output_dir(args.output)
    torch.manual_seed(args.seed)
    base, tok = load_base(args.model, args.dtype)
    model = sp.attach(base, tokenizer=tok)
    tasks = {}
    for name, (text, template, rows, labels, dev) in data.items():
        targs = argparse.Namespace(**vars(args))
        if args.init == "labels":
            targs.init_text = [verbalizer.get(lab, lab) for lab in labels]
        spec = TaskSpec(
            kind=args.task,
            template=text,
            labels=labels,
            verbalizer={k: v for k, v in verbalizer.items() if k in labels},
            max_length=args.max_length,
            max_new_tokens=args.max_new_tokens,
        )
        adapter = model.add_adapter(name, _adapter_config(targs, template), tok)
        adapter.task = spec.to_dict()
        try:
            tasks[name] = (Task(spec, model, tok), rows, dev)
        except SoftPromptError as e:
            raise SoftPromptError(f"task {name!r}: {e}") from e
    flags = {k: v for k, v in vars(args).items() if k not in ("func", "config", "command")}
    (out / "config.yaml").write_text(yaml.safe_dump(flags, sort_keys=False))
    if args.tie_shared and args.method != "mpt":
        raise SoftPromptError("--tie-shared ties MPT's shared prompt: it needs --method mpt")
    trainer = MultiTaskTrainer(model, tasks, train_args, tie_shared=args.tie_shared)
    result = trainer.train()
    summary = {
        "method": args.method,
        "model": args.model,
        "task": args.task,
        "tasks": {n: {"train": train_specs[n], "eval": eval_specs.get(n)} for n in train_specs},
        "train": result,
    }
    for name, info in result["tasks"].items():
        summary["tasks"][name].update(info)
    if result["shared_prompt"]:
        summary["shared_prompt"] = result["shared_prompt"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        "adapters: "
        + ", ".join(f"{n} -> {i['adapter']} (dev {i['best']})" for n, i in result["tasks"].items())
    )
    return summary, model, None


def _tasks_train_args(args) -> TrainArgs:
    return TrainArgs(
        output_dir=args.output,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        eval_every=args.eval_every,
        patience=args.patience,
        seed=args.seed,
        eval_batch_size=args.eval_batch_size,
        eval_limit=args.eval_limit,
        progress=False,
        gradient_checkpointing=getattr(args, "gradient_checkpointing", False),
        skip_bad=getattr(args, "skip_bad", False),
    )
