"""One method-agnostic training loop on Hugging Face accelerate.

Only the active adapter's parameters train; the base model stays frozen and in eval mode. The loop
never looks at the method: it asks the task for a loss and the model for its trainable parameters.

* Data parallel: ``accelerate launch --multi_gpu --num_processes N`` or ``torchrun
  --nproc_per_node N`` (gloo on CPU; see ``softprompt.distributed``). Every process walks the
  same seeded sequence of global batches and takes its slice; gradients are summed across
  processes, each slice's loss weighted by its share of the global batch, so N processes reach
  the single-process adapter up to float summation order.
* Schedule: linear warmup then linear decay; gradient accumulation; gradient clipping.
* Evaluation every ``eval_every`` steps on the dev split only, early stopping after ``patience``
  evaluations without improvement, best adapter kept in ``output/adapter``.
* Checkpoints (``output/checkpoint``: trainable adapter, optimizer, scheduler, RNG and loop state)
  are written to a temporary folder and swapped in by rename; after a kill -9, ``resume=True``
  continues and ends with the adapter an uninterrupted run with the same seed ends with.
* Adapters that prompt only upper blocks (``layers="top_half"`` or a list without 0) train
  without rerunning the frozen blocks below them after the first epoch: what enters their lowest
  block is cached per sequence, up to ``lower_layer_cache_mb`` (``softprompt.layer_cache``).
* Logs: ``metrics.jsonl`` (one JSON object per log/eval step) and ``training_curve.png``.
  ``report_to="tensorboard"|"wandb"|"mlflow"`` (``--report-to``) sends every record to that
  tracker through accelerate's trackers, at the same steps: ``train/loss``, ``train/lr``,
  ``train/epoch`` and ``eval/<metric>``, ``eval/best``. Local files go under
  ``output/tracking`` (tensorboard event files, wandb's run folder, mlflow's file store unless
  ``MLFLOW_TRACKING_URI`` is set); wandb's offline mode is ``WANDB_MODE=offline``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    gather_object,
    is_mlflow_available,
    is_tensorboard_available,
    is_wandb_available,
)
from tqdm.auto import tqdm

from .data import Example
from .errors import SoftPromptError, require
from .io import save_adapter
from .methods.base import METHODS
from .model import SoftPromptModel
from .tasks import Task, headline

# --report-to: tracker -> (package to install, accelerate's availability check)
TRACKERS = {
    "tensorboard": ("tensorboard", is_tensorboard_available),
    "wandb": ("wandb", is_wandb_available),
    "mlflow": ("mlflow", is_mlflow_available),
}
REPORT_TO = ("none", *TRACKERS)


def default_lr(base_model: torch.nn.Module, method: str) -> float:
    """The learning rate ``method`` trains ``base_model`` with when none is given (declared by
    the method's config class: ``AdapterConfig.lr_for``)."""
    if method not in METHODS:
        raise SoftPromptError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    return METHODS[method][0].lr_for(base_model)


@dataclass
class TrainArgs:
    """Training-loop settings (the CLI's flags; ``softprompt train --help`` reads these lines).

    Attributes:
        output_dir: the run folder (adapter/, checkpoint/, metrics.jsonl, ...).
        epochs: passes over the training rows (ignored with max_steps).
        max_steps: optimizer steps to run (default: from epochs).
        lr: AdamW learning rate (default: the method's own, see --lr).
        batch_size: training rows per step (per micro-batch with grad_accum).
        grad_accum: micro-batches per optimizer step.
        warmup_ratio: share of the steps with a linear warm-up, then linear decay.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping norm (0: off).
        eval_every: steps between dev evaluations (and best-adapter selection).
        save_every: steps between checkpoints (default: eval_every).
        patience: dev evaluations without improvement before stopping early.
        seed: data order and initialisation seed.
        resume: continue from output_dir/checkpoint.
        log_every: steps between metrics.jsonl records.
        eval_batch_size: rows per evaluation batch.
        eval_limit: use only the first N dev rows for selection.
        progress: show a progress bar.
        group_by_length: batch rows of similar length together (less padding, faster steps).
        lower_layer_cache_mb: adapters on upper layers only (--layers): memory for caching
            the frozen blocks below them after the first epoch (0: off).
        log_rows: each process writes the training rows it ran to OUTPUT/rows.rank<R>.jsonl.
        fsdp: shard the frozen base's decoder blocks across the processes (FSDP2); implied
            by `accelerate launch --use_fsdp`.
        report_to: experiment tracker for loss, lr and dev metrics (files under
            OUTPUT/tracking).
        compile: torch.compile the frozen decoder blocks (decoder-only LMs; the first
            steps of each new shape compile; generation stays eager).
        gradient_checkpointing: recompute the frozen blocks' activations in backward instead
            of keeping them (less memory for long sequences, about one more forward a step);
            implied by an accelerate FSDP config's fsdp_activation_checkpointing.
        skip_bad: a row that cannot be encoded (too long for max_length even with its
            main field or user messages emptied) is reported and left out, not an error.
    """

    output_dir: str
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 50
    save_every: int | None = None
    patience: int = 5
    seed: int = 0
    resume: bool = False
    log_every: int = 10
    eval_batch_size: int = 32
    eval_limit: int | None = None
    progress: bool = True
    group_by_length: bool = False
    lower_layer_cache_mb: int = 1024
    log_rows: bool = False  # each process writes the rows it trained on to rows.rank<R>.jsonl
    fsdp: bool = False  # shard the frozen base's blocks across the processes (distributed.py)
    report_to: str = "none"  # or "tensorboard", "wandb", "mlflow" (module docstring: Logs)
    compile: bool = False  # SoftPromptModel.compile_body: the frozen blocks, not the adapter
    gradient_checkpointing: bool = False  # SoftPromptModel.gradient_checkpointing_enable
    skip_bad: bool = False  # rows that cannot be encoded: reported and left out

    def __post_init__(self) -> None:
        check_report_to(self.report_to)
        if self.compile and self.fsdp:
            raise SoftPromptError(
                "--compile does not go with --fsdp yet (FSDP wraps the blocks that --compile "
                "compiles); drop one of them"
            )

        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        def number(name: str, cls: type, low: float, low_ok: bool, high: float = math.inf):
            value = getattr(self, name)
            if value is None and name in ("lr", "max_steps", "save_every", "eval_limit"):
                return
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and (cls is float or isinstance(value, int)) and math.isfinite(value)
            ok = ok and (value >= low if low_ok else value > low) and value <= high
            if not ok:
                kind = "an integer" if cls is int else "a finite number"
                bound = f"{'>=' if low_ok else '>'} {low:g}" + (
                    f" and <= {high}" if high < math.inf else ""
                )
                raise SoftPromptError(f"{flag(name)} must be {kind} {bound}, got {value!r}")

        for name in ("batch_size", "grad_accum", "eval_every", "log_every", "eval_batch_size"):
            number(name, int, 1, True)
        for name in ("max_steps", "save_every", "patience", "eval_limit"):
            number(name, int, 1, True)
        number("lower_layer_cache_mb", int, 0, True)
        number("seed", int, 0, True, 2**32 - 1)
        number("epochs", float, 0, False)
        number("lr", float, 0, False)  # inf or NaN would train an all-NaN adapter
        number("warmup_ratio", float, 0, True, 1)
        number("weight_decay", float, 0, True)
        number("max_grad_norm", float, 0, True)


# TrainArgs fields a resumed run must share with the checkpoint: they shape the data order, the
# optimisation or the logs. The others (max_steps / epochs to extend a run, eval_every,
# save_every, patience, progress, eval_batch_size, lower_layer_cache_mb) may change on resume.
RESUME_MUST_MATCH = (
    "lr",
    "batch_size",
    "grad_accum",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "seed",
    "group_by_length",
    "log_every",
    "eval_limit",
)


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the half-written ``.checkpoint.tmp-*`` / ``.adapter.tmp-*`` folders that a killed
    run leaves behind (``_atomic_dir`` removes its own on any normal exit)."""
    stale = [p for pat in (".checkpoint.tmp-*", ".adapter.tmp-*") for p in out.glob(pat)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def check_report_to(report_to: str) -> None:
    """Refuse an unknown tracker, or one whose package is not installed."""
    if report_to not in REPORT_TO:
        raise SoftPromptError(f"--report-to must be one of {list(REPORT_TO)}, got {report_to!r}")
    if report_to != "none" and not TRACKERS[report_to][1]():
        pkg = TRACKERS[report_to][0]
        raise SoftPromptError(
            f"--report-to {report_to} needs the {pkg} package, which is not installed: "
            f"pip install {pkg} (or --report-to none)"
        )


def make_accelerator(report_to: str = "none", output_dir: str | Path | None = None) -> Accelerator:
    """The Accelerator training runs on; with a tracker, its files go to ``output_dir/tracking``."""
    check_report_to(report_to)
    from .distributed import accelerator_env

    # Precision is softprompt's own (--dtype, which `accelerate launch --mixed_precision` sets:
    # distributed.launch_dtype, with its own loss scaler); accelerate's would scale twice.
    kw = dict(cpu=not torch.cuda.is_available(), mixed_precision="no")
    if report_to != "none":
        if output_dir is None:
            raise SoftPromptError(f"--report-to {report_to} needs an output folder")
        kw.update(log_with=report_to, project_dir=str(Path(output_dir) / "tracking"))
    with accelerator_env():
        return Accelerator(**kw)


def tracker_values(record: dict) -> dict[str, float]:
    """A ``metrics.jsonl`` record as tracker scalars: ``train/loss``, ``train/lr``,
    ``train/epoch`` for a log step; ``eval/<metric>`` and ``eval/best`` for an evaluation."""

    def number(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    out = {}
    for key, val in record.items():
        if key in ("step", "elapsed_s"):
            continue
        if isinstance(val, dict):
            out.update({f"eval/{k}": v for k, v in val.items() if number(v)})
        elif number(val):
            out[f"eval/{key}" if key == "best" else f"train/{key}"] = val
    return out


def length_grouped_batches(
    order: list[int], lengths: Sequence[int], batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """Batches of rows of similar length, in random order.

    The (already shuffled) ``order`` is cut into pools of 64 batches' rows; each pool is sorted
    by length and cut into batches, and the batches are shuffled. Only the last pool can leave a
    short batch, as with plain batching.
    """
    pool = batch_size * 64
    batches = []
    for i in range(0, len(order), pool):
        chunk = sorted(order[i : i + pool], key=lambda j: -lengths[j])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[k] for k in perm]


def _atomic_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Write a folder completely under a temporary name, then swap it in by rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        fill(tmp)
        old = target.with_name(target.name + ".old")
        if target.exists():
            if old.exists():
                shutil.rmtree(old)
            os.rename(target, old)
        os.rename(tmp, target)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _checkpoint_dir(out: Path) -> Path | None:
    """The newest complete checkpoint (a crash between the two renames leaves ``.old``)."""
    for cand in (out / "checkpoint", out / "checkpoint.old"):
        if (cand / "trainer_state.json").is_file():
            return cand
    return None


class Trainer:
    """Trains the active adapter of ``model`` on ``task``."""

    def __init__(
        self,
        model: SoftPromptModel,
        task: Task,
        train_examples: Sequence[Example],
        eval_examples: Sequence[Example] | None,
        args: TrainArgs,
        accelerator: Accelerator | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        if model.active is None:
            raise SoftPromptError("the model has no active adapter to train")
        self.model, self.task, self.args, self.log = model, task, args, log
        self.acc = accelerator or make_accelerator(args.report_to, args.output_dir)
        if args.report_to != "none" and args.report_to not in {str(t) for t in self.acc.log_with}:
            raise SoftPromptError(
                f"report_to={args.report_to!r} needs an Accelerator made with "
                f"log_with={args.report_to!r} (softprompt.trainer.make_accelerator)"
            )
        self.out = Path(args.output_dir)

        def warn(msg: str) -> None:
            if self.acc.is_main_process:
                log(f"warning: {msg}")

        self.items, _ = task.encode_examples(train_examples, "training", args.skip_bad, warn)
        self._lengths = [len(it["prompt"]) + len(it.get("target", ())) for it in self.items]
        self.eval_examples = list(eval_examples or [])[: args.eval_limit]
        if self.eval_examples and task.spec.kind in ("classify", "generate", "chat"):
            # checked now, not at the first evaluation after minutes of training
            _, self.eval_examples = task.encode_examples(
                self.eval_examples, "dev", args.skip_bad, warn
            )
        method = model.adapters[model.active].config.method
        self.lr = args.lr if args.lr is not None else default_lr(model.base_model, method)
        self.params = model.parameters_to_train()
        self.base_local_parameters = None
        self.reshard_after_forward: bool | None = None  # with fsdp
        checkpointing = args.gradient_checkpointing
        if args.fsdp:
            from .distributed import accelerate_fsdp_settings, shard_frozen_base

            fsdp = accelerate_fsdp_settings()
            if fsdp.ignored and self.acc.is_main_process:
                log(
                    "warning: softprompt shards each decoder block itself (FSDP2); of the "
                    "accelerate FSDP config it does not apply " + "; ".join(fsdp.ignored)
                )
            checkpointing = checkpointing or fsdp.activation_checkpointing
            self.base_local_parameters = shard_frozen_base(
                model, self.acc.device, reshard_after_forward=fsdp.reshard_after_forward
            )
            self.reshard_after_forward = fsdp.reshard_after_forward
        if checkpointing:
            model.gradient_checkpointing_enable()
        self.checkpointing = checkpointing
        if not self.params:
            raise SoftPromptError(f"adapter {model.active!r} has nothing to train (is it baked?)")
        if args.compile and not model._compiled:
            model.compile_body()
        # what each row adds to a step's mean loss (rows, or supervised tokens)
        self._units = [task.loss_units(it) for it in self.items]
        n_batches = math.ceil(len(self.items) / args.batch_size)
        # a shorter last step takes the micro-batches left over: every row trains each epoch
        self.steps_per_epoch = math.ceil(n_batches / args.grad_accum)
        self.total = args.max_steps or max(1, round(args.epochs * self.steps_per_epoch))
        self.opt = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=args.weight_decay)
        # A float16 base: its activations' gradients underflow; the loss is scaled (the adapter
        # and its optimiser state stay float32, bfloat16 needs no scaling)
        fp16 = model.base_model.get_input_embeddings().weight.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.acc.device.type) if fp16 else None
        self.skipped_steps = 0  # float16: steps whose scaled gradients overflowed, skipped
        warm = int(args.warmup_ratio * self.total)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt,
            lambda s: (
                (s + 1) / (warm + 1)
                if s < warm
                else max(0.0, (self.total - s) / max(1, self.total - warm))
            ),
        )
        self.step = 0
        self.best: float | None = None
        self.bad_evals = 0
        self.last_metric: float | None = None
        self.recent: list[float] = []  # step losses since the last log line (kept on resume)
        self.saved_step: int | None = None  # the step of the checkpoint on disk
        self.adapter_step: int | None = None  # the step of output/adapter

    # ------------------------------------------------------------------ data order
    def _micro_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.args.seed * 100_003 + epoch)
        order = torch.randperm(len(self.items), generator=g).tolist()
        b = self.args.batch_size
        if not self.args.group_by_length:
            return [order[i : i + b] for i in range(0, len(order), b)]
        return length_grouped_batches(order, self._lengths, b, g)

    def _my_slice(self, rows: list[int]) -> list[int]:
        return rows[self.acc.process_index :: self.acc.num_processes]

    # ------------------------------------------------------------------ state
    def _state(self) -> dict:
        return {
            "step": self.step,
            "best": self.best,
            "bad_evals": self.bad_evals,
            "last_metric": self.last_metric,
            "lr": self.lr,
            "total": self.total,
            "recent": self.recent,
            "adapter_step": self.adapter_step,
            "args": asdict(self.args),
        }

    def save_checkpoint(self) -> None:
        self.saved_step = self.step  # every process knows which step is on disk
        if not self.acc.is_main_process:
            return

        def fill(tmp: Path) -> None:
            save_adapter(self.model, tmp, trainable=True)
            torch.save(
                {
                    "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(),
                    "rng": torch.get_rng_state(),
                    "scaler": None if self.scaler is None else self.scaler.state_dict(),
                },
                tmp / "optimizer.pt",
            )
            (tmp / "trainer_state.json").write_text(json.dumps(self._state(), indent=2))

        _atomic_dir(self.out / "checkpoint", fill)

    def _resume(self) -> None:
        ck = _checkpoint_dir(self.out)
        if ck is None:
            self.log(f"--resume: no checkpoint in {self.out}; starting from scratch")
            return
        from .io import CONFIG_NAME, TRAINABLE_NAME, _read_tensors

        def damaged(what: str, err: Exception | str) -> SoftPromptError:
            return SoftPromptError(
                f"--resume: {ck / what} is damaged ({str(err)[:200]}); delete {ck} to train "
                "from scratch"
            )

        try:
            state = json.loads((ck / "trainer_state.json").read_text())
            step, best = int(state["step"]), state["best"]
            bad_evals, last_metric = state["bad_evals"], state["last_metric"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise damaged("trainer_state.json", e) from e
        self._check_resume_args(ck, state.get("args") or {})
        adapter = self.model.adapters[self.model.active]
        try:
            saved = json.loads((ck / CONFIG_NAME).read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError):
            saved = None
        now = adapter.config.to_dict()
        if saved is not None and saved != now:
            diffs = [
                f"{k} {saved.get(k)!r} -> {now.get(k)!r}"
                for k in sorted(set(saved) | set(now))
                if saved.get(k) != now.get(k)
            ]
            raise SoftPromptError(
                f"--resume: the checkpoint in {ck} holds another adapter ({'; '.join(diffs)}); "
                "resume with the flags it was trained with, or train into a new --output"
            )
        tensors = _read_tensors(ck / TRAINABLE_NAME)
        params = dict(adapter.named_parameters())
        for name, p in params.items():
            if name not in tensors or tensors[name].shape != p.shape:
                got = tuple(tensors[name].shape) if name in tensors else "nothing"
                raise SoftPromptError(
                    f"--resume: {ck / TRAINABLE_NAME} holds {got} for {name!r}, this run's "
                    f"adapter has {tuple(p.shape)}; resume with the flags the checkpoint was "
                    "trained with, or train into a new --output"
                )
        try:  # never a plain unpickle
            blob = torch.load(ck / "optimizer.pt", weights_only=True)
            self.opt.load_state_dict(blob["optimizer"])
            self.sched.load_state_dict(blob["scheduler"])
            if self.scaler is not None and blob.get("scaler"):
                self.scaler.load_state_dict(blob["scaler"])
            rng = blob["rng"]
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
            raise damaged("optimizer.pt", e) from e
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
        torch.set_rng_state(rng)
        self.step, self.best = step, best
        self.bad_evals, self.last_metric = bad_evals, last_metric
        self.recent = [float(x) for x in state.get("recent", [])]
        self.saved_step, self.adapter_step = step, state.get("adapter_step")
        log = self.out / "metrics.jsonl"
        if log.exists() and self.acc.is_main_process:  # drop what was logged after the checkpoint
            keep = [
                ln
                for ln in log.read_text().splitlines()
                if ln and json.loads(ln)["step"] <= self.step
            ]
            log.write_text("".join(k + "\n" for k in keep))
        self.log(f"resumed from {ck} at step {self.step}")

    def _log_rows(self, rows: list[int]) -> None:
        """Record which training rows this process ran at this step (``--log-rows``)."""
        record = {
            "step": self.step + 1,
            "rank": self.acc.process_index,
            "world_size": self.acc.num_processes,
            "rows": [self.items[i]["source"] for i in rows],
        }
        with open(self.out / f"rows.rank{self.acc.process_index}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _check_resume_args(self, ck: Path, saved: dict) -> None:
        now = asdict(self.args)
        diffs = [
            f"--{k.replace('_', '-')} {saved[k]!r} (checkpoint) vs {now[k]!r} (now)"
            for k in RESUME_MUST_MATCH
            if k in saved and saved[k] != now[k]
        ]
        if diffs:
            raise SoftPromptError(
                f"--resume: the checkpoint in {ck} was trained with other settings: "
                + "; ".join(diffs)
                + ". Resume with the same ones, or train into a new --output"
            )

    def _adapter_finite(self) -> bool:
        """Whether the trained weights and what they give (the baked prompt / prefix that is
        saved) are all finite: only such a state is ever checkpointed."""
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            return False
        with torch.no_grad():
            baked = self.model.adapters[self.model.active].baked_tensors()
            return all(bool(torch.isfinite(t).all()) for t in baked.values())

    def _nonfinite(self, what: str) -> SoftPromptError:
        ck = f"{self.out / 'checkpoint'} (step {self.saved_step})" if self.saved_step else None
        ad = f"{self.out / 'adapter'} (step {self.adapter_step})" if self.adapter_step else None
        kept = " and ".join(x for x in (ck, ad) if x) or "nothing (no checkpoint was saved yet)"
        return SoftPromptError(
            f"training stopped at step {self.step + 1}: {what} is not finite (NaN or infinite; "
            f"is the learning rate {self.lr:g} too high?). Kept from before: {kept}. Lower --lr "
            "and train again"
        )

    def _write_log(self, record: dict) -> None:
        if self.acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.args.report_to != "none":
            self.acc.log(tracker_values(record), step=record["step"])

    def _start_tracking(self) -> None:
        """Start the tracker with the run's settings; a resumed run's tensorboard hides what
        the interrupted one logged after the checkpoint (as metrics.jsonl drops it)."""
        tracking = self.out / "tracking"
        tracking.mkdir(parents=True, exist_ok=True)
        if self.args.report_to == "mlflow":  # a file store beside the run unless the user set one
            os.environ.setdefault("MLFLOW_TRACKING_URI", (tracking / "mlruns").resolve().as_uri())
        kwargs = {"wandb": {"dir": str(tracking)}, "mlflow": {"logging_dir": str(tracking)}}
        if self.step:
            kwargs["tensorboard"] = {"purge_step": self.step + 1}
        config = {k: v for k, v in asdict(self.args).items() if isinstance(v, int | float | str)}
        config.update(
            method=self.model.adapters[self.model.active].config.method,
            lr=self.lr,
            total_steps=self.total,
        )
        self.acc.init_trackers("softprompt", config=config, init_kwargs=kwargs)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, examples: Sequence[Example]) -> tuple[dict, list[dict]]:
        """Metrics and predictions on ``examples``, sharded across processes."""
        n, rank = self.acc.num_processes, self.acc.process_index
        mine = list(range(rank, len(examples), n))
        gen = {}
        if self.args.fsdp:  # every process runs as many batches and decoding steps as the others
            have = len(mine)
            mine += [mine[0] if mine else 0] * (math.ceil(len(examples) / n) - have)
            gen["synced_gpus"] = True
        preds = self.task.predict([examples[i] for i in mine], self.args.eval_batch_size, **gen)
        if self.args.fsdp:
            mine, preds = mine[:have], preds[:have]
        if self.acc.num_processes > 1:
            pairs = gather_object(list(zip(mine, preds, strict=True)))
            preds = [p for _, p in sorted(pairs, key=lambda x: x[0])]
        return self.task.metrics(examples, preds), preds

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        args, acc, model = self.args, self.acc, self.model
        self.out.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            for p in remove_stale_temporaries(self.out):
                self.log(f"removed {p}, left half-written by an interrupted run")
        if args.resume:
            self._resume()
        elif acc.is_main_process and (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()
        rows_log = self.out / f"rows.rank{acc.process_index}.jsonl"
        if rows_log.exists():  # keep what the checkpoint covers, as for metrics.jsonl
            keep = [
                ln
                for ln in rows_log.read_text().splitlines()
                if args.resume and ln and json.loads(ln)["step"] <= self.step
            ]
            rows_log.write_text("".join(k + "\n" for k in keep))
        if args.report_to != "none":
            self._start_tracking()
        _, _, line = model.trainable_parameters()
        self.log(f"{line}; {len(self.items)} training rows, {self.total} steps, lr {self.lr:g}")
        model.train()
        lc = model.cache_lower_layers(0 if args.fsdp else args.lower_layer_cache_mb << 20)
        if lc is not None:
            self.log(f"caching the frozen blocks below block {lc.layer} after the first epoch")
        try:
            return self._loop()
        finally:
            model.cache_lower_layers(0)  # frees the cache
            if args.report_to != "none":
                acc.end_training()

    def _loop(self) -> dict:
        args, acc, model = self.args, self.acc, self.model
        save_every = args.save_every or args.eval_every
        bar = tqdm(
            total=self.total,
            initial=self.step,
            disable=not (args.progress and acc.is_main_process),
            desc="train",
            dynamic_ncols=True,
        )
        t0 = time.time()

        def log_losses() -> None:  # a metrics.jsonl record of the steps since the last one
            self._write_log(
                {
                    "step": self.step,
                    "epoch": round(self.step / self.steps_per_epoch, 3),
                    "loss": sum(self.recent) / len(self.recent),
                    "lr": self.sched.get_last_lr()[0],
                    "elapsed_s": round(time.time() - t0, 2),
                }
            )
            self.recent = []

        # a resumed run that had stopped early stays stopped (unless --patience was raised)
        stop = bool(self.eval_examples) and self.bad_evals >= args.patience
        if stop:
            self.log(
                f"the checkpoint's run stopped early at step {self.step} ({self.bad_evals} dev "
                f"evaluations without improvement, --patience {args.patience}); raise "
                "--patience to train on"
            )
        while self.step < self.total and not stop:
            epoch, first = divmod(self.step, self.steps_per_epoch)
            batches = self._micro_batches(epoch)
            for k in range(first, self.steps_per_epoch):
                self.opt.zero_grad(set_to_none=True)
                loss_sum = 0.0
                group = batches[k * args.grad_accum : (k + 1) * args.grad_accum]
                # each micro-batch's mean loss weighted by its share of the step's terms (over
                # every micro-batch and process): the step's loss and gradient are those of the
                # whole step's rows in one batch, whatever their sizes and target lengths
                units = max(1, sum(self._units[i] for rows in group for i in rows))
                for rows in group:
                    mine = self._my_slice(rows)
                    if not mine and not args.fsdp:
                        continue
                    if args.log_rows and mine:
                        self._log_rows(mine)
                    weight = sum(self._units[i] for i in mine) / units
                    if not mine:  # sharded blocks gather collectively: run a row, weighted 0
                        mine = rows[:1]
                    loss = self.task.loss([self.items[i] for i in mine])
                    scaled = loss * weight
                    acc.backward(scaled if self.scaler is None else self.scaler.scale(scaled))
                    loss_sum += loss.item() * weight
                if acc.num_processes > 1:
                    for p in self.params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        p.grad = acc.reduce(p.grad, reduction="sum")
                    loss_sum = acc.reduce(torch.tensor(loss_sum, device=acc.device), "sum").item()
                if not math.isfinite(loss_sum):
                    raise self._nonfinite(f"the loss ({loss_sum})")
                if self.scaler is not None:
                    self.scaler.unscale_(self.opt)  # the same on every process: grads reduced
                grads = [p.grad for p in self.params if p.grad is not None]
                norm = (
                    torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
                    )
                    if grads
                    else torch.zeros(())
                )
                overflow = not torch.isfinite(norm)
                if overflow and self.scaler is None:
                    raise self._nonfinite("the gradient")
                if args.max_grad_norm and not overflow:
                    torch.nn.utils.clip_grad_norm_(self.params, args.max_grad_norm)
                try:
                    if self.scaler is None:
                        self.opt.step()
                    else:  # skips the step when the scaled gradients overflowed
                        self.scaler.step(self.opt)
                        self.scaler.update()
                        self.skipped_steps += overflow
                except RuntimeError as e:  # the step size itself overflows (lr near 1e38)
                    if "overflow" not in str(e):
                        raise
                    raise self._nonfinite("the update") from e
                if not self._adapter_finite():
                    raise self._nonfinite("the adapter after the update")
                self.sched.step()
                self.step += 1
                self.recent.append(loss_sum)
                bar.update(1)
                post = {"loss": f"{loss_sum:.4f}"}
                if self.last_metric is not None:
                    post[headline_name(self.task)] = f"{self.last_metric:.4f}"
                bar.set_postfix(post)
                if self.step % args.log_every == 0 or self.step == self.total:
                    log_losses()
                if self.eval_examples and (
                    self.step % args.eval_every == 0 or self.step == self.total
                ):
                    stop = self._eval_and_select()
                    if stop and self.recent:  # stopped early: the steps since the last record
                        log_losses()
                elif not self.eval_examples and (
                    self.step % args.eval_every == 0 or self.step == self.total
                ):
                    self._save_best()
                if self.step % save_every == 0 or self.step == self.total or stop:
                    self.save_checkpoint()
                    acc.wait_for_everyone()
                if self.step >= self.total or stop:
                    break
        bar.close()
        model.eval()
        if acc.is_main_process:
            plot_curves(self.out / "metrics.jsonl", self.out / "training_curve.png", self.log)
        result = {"steps": self.step, "best": self.best, "lr": self.lr, "stopped_early": stop}
        if self.scaler is not None:
            result["skipped_steps"] = self.skipped_steps  # this run's, not a resumed one's
        return result

    def _save_best(self) -> None:
        if self.acc.is_main_process:
            _atomic_dir(self.out / "adapter", lambda tmp: save_adapter(self.model, tmp))
        self.adapter_step = self.step

    def _eval_and_select(self) -> bool:
        self.model.eval()
        metrics, _ = self.evaluate(self.eval_examples)
        self.model.train()
        name, value = headline(metrics)
        self.last_metric = value
        improved = self.best is None or value > self.best
        if improved:
            self.best, self.bad_evals = value, 0
            self._save_best()
        else:
            self.bad_evals += 1
        self._write_log(
            {
                "step": self.step,
                "eval": {name: value, **{k: v for k, v in metrics.items() if k != "per_class"}},
                "best": self.best,
            }
        )
        self.acc.wait_for_everyone()
        return self.bad_evals >= self.args.patience


def headline_name(task: Task) -> str:
    named = getattr(task, "headline_name", None)  # a task that names its own (cartridge.py)
    if isinstance(named, str):
        return named
    kind = task.spec.kind
    return {"classify": "accuracy", "tag": "span_f1", "extract": "exact_match"}.get(kind, "rougeL")


def plot_curves(log_path: Path, png: Path, log: Callable[[str], None] = print) -> None:
    """Training loss and dev metric against step, from metrics.jsonl. Without matplotlib (the
    ``plot`` extra) the curve is skipped with a note: the run's results are all saved."""
    try:
        matplotlib = require("matplotlib", "plot", "the training curve (training_curve.png)")
    except SoftPromptError as e:
        log(f"note: no {png.name}: {e}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not log_path.exists():
        return
    recs = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    evals = [(r["step"], next(iter(r["eval"].values()))) for r in recs if "eval" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        name = next(iter(next(r["eval"] for r in recs if "eval" in r)))
        ax2.plot(*zip(*evals, strict=True), "o-", color="tab:orange", label=f"dev {name}")
        ax2.set_ylabel(f"dev {name}", color="tab:orange")
    ax.set_title("softprompt training")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
