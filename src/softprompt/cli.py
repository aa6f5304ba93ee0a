"""The ``softprompt`` command line: train, eval, generate, inspect, serve, export, assets, demo.

Every subcommand has ``--help``. ``--config FILE.yaml`` reads flags from YAML (keys are flag
names, with - or _); flags on the command line win. ``train`` saves its effective flags as
``config.yaml`` in the output folder, so a run can be repeated with ``--config``.

Errors a user can act on (bad data, missing files, adapters for another model) print one
``error: ...`` line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path

import yaml

from . import __version__
from .errors import SoftPromptError


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def _int_at_least(low: int, high: int | None = None):
    """argparse type: an integer in [low, high] (also applied to --config values)."""

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _finite(low: float, inclusive: bool, high: float | None = None):
    """argparse type: a finite number above ``low`` (at least, with ``inclusive``)."""

    def parse(text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        ok = math.isfinite(value) and (value >= low if inclusive else value > low)
        if not ok or (high is not None and value > high):
            bound = f"{'>=' if inclusive else '>'} {low:g}" + (
                "" if high is None else f" and <= {high:g}"
            )
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


_POSITIVE = _int_at_least(1)


# --------------------------------------------------------------------------------------------
# building blocks shared by the subcommands
# --------------------------------------------------------------------------------------------


def _adapter_config(args, template, chat: bool = False):
    """The method's config from the flags: the common ones, plus each flag the config class
    names in ``cli_fields`` (no method names here: a registered method brings its own).
    ``chat``: a chat-form task; an input-level method's virtual tokens go where the task's
    placement puts their markers."""
    from .methods.base import METHODS

    cls = METHODS[args.method][0]
    fields = {f.name for f in dataclasses.fields(cls)}
    n = args.num_virtual_tokens
    extra = {}
    if chat and cls.level == "input" and "placement" in fields:
        extra["placement"] = "template"
    elif template.num_soft:
        if "placement" not in fields:
            raise SoftPromptError(
                f"--template has soft segments ([soft:N]) but --method {args.method} puts its "
                f"prompt inside attention; use a method with input-level virtual tokens "
                f"({', '.join(_methods_of_level('input'))}), or drop the [soft:N]"
            )
        extra["placement"] = "template"
        n = template.num_soft
    init = _resolved_init(cls, args.init)
    init_text = args.init_text
    if init == "text" and not init_text:
        raise SoftPromptError("--init text needs --init-text")
    for dest, field in cls.cli_fields.items():
        value = getattr(args, dest)
        extra[field] = _layers(value) if dest == "layers" else value
    return cls(num_virtual_tokens=n, init=init, init_text=init_text, seed=args.seed, **extra)


def _resolved_init(cls, init: str | None) -> str:
    """``--init`` for method config ``cls``: as given, or (None) vocab where the method takes
    it (the CLI's default), else the method's own default (adaption prompts: random)."""
    if init is not None:
        return init
    return "vocab" if "vocab" in cls.inits else _field_defaults(cls)["init"]


def _unescape(template: str) -> str:
    """``--template`` as typed in a shell: ``\\n`` is a newline, ``\\t`` a tab, ``\\\\`` a backslash
    (a shell's double quotes keep backslashes, so "Review: {text}\\nSentiment: {label}" would
    otherwise train on a literal backslash-n that no real newline in a prompt matches)."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], template)


def _methods_of_level(level: str) -> list[str]:
    from .methods.base import METHODS

    return sorted(name for name, (cls, _) in METHODS.items() if cls.level == level)


def _layers(value):
    if value in (None, "", "all"):
        return None
    if value == "top_half":
        return "top_half"
    try:
        return [int(x) for x in str(value).split(",")]
    except ValueError as e:
        raise SoftPromptError(
            f"--layers must be 'all', 'top_half' or e.g. '6,7,8', got {value!r}"
        ) from e


def _warn(msg: str) -> None:
    _err(f"warning: {msg}")


def _load_data(path, task, skip_bad, template):
    from .data import load_examples

    fields = set(template.fields) if template is not None else set()
    return load_examples(path, task, skip_bad=skip_bad, required_fields=sorted(fields), warn=_warn)


def _load_adapter_and_task(model_name, adapter_dir, dtype):
    import softprompt as sp

    from .io import read_adapter_config, recorded_base_model, resolve_adapter_dir
    from .loading import load_base
    from .tasks import Task, TaskSpec

    meta = read_adapter_config(adapter_dir)
    if model_name is None:
        model_name = recorded_base_model(meta, adapter_dir)
    base, tok = load_base(model_name, dtype)
    model = sp.load_adapter(base, adapter_dir, name="adapter")
    model.tokenizer = tok
    task_meta = model.adapters["adapter"].task
    if not task_meta:
        raise SoftPromptError(
            f"{adapter_dir} has no task in its adapter_config.json (not made by softprompt train)"
        )
    try:
        return model, tok, Task(TaskSpec.from_dict(task_meta), model, tok)
    except SoftPromptError as e:
        where = resolve_adapter_dir(adapter_dir) / "adapter_config.json"
        raise SoftPromptError(f"{where}: field 'task': {e}") from e


_ADAPTER_HELP = (
    "softprompt adapter folder, or a PEFT prompt-learning folder (it has no task: plain "
    "generation from the raw input, template '{input}'; data rows {input, target})"
)


_ENSEMBLE_HELP = (
    "; repeated (--adapter A --adapter B ...: adapters of one task) it is an ensemble, "
    "run as rows of one batch"
)
_COMBINE_HELP = (
    "ensemble: mean probability (the default; classify: of the labels; generate: every token "
    "from the mean of the adapters' next-token probabilities) or majority vote (classify: "
    "ties to the higher mean probability; generate: the most frequent output)"
)


def _main_field(task_kind: str) -> str:
    return {"classify": "text", "generate": "input", "chat": "messages"}[task_kind]


# --------------------------------------------------------------------------------------------
# train (and demo)
# --------------------------------------------------------------------------------------------


def cmd_train(args) -> dict:
    """``softprompt train``: returns the run's summary (also written to summary.json)."""
    return train_run(args)[0]


def train_run(args):
    """Train from parsed flags; returns (summary, the model with the selected adapter, its
    Task) so that a caller (``demo``) can go on using them."""
    import torch

    import softprompt as sp

    from .data import check_eval_labels, label_set
    from .encoder_tasks import ENCODER_TEMPLATES, EXTRACT_LABELS, tag_label_set
    from .loading import load_base, model_kind
    from .methods.base import METHODS
    from .tasks import CHAT_TEMPLATE, ENCODER_TASKS, Task, TaskSpec, headline
    from .templates import Template, default_template
    from .trainer import Trainer, make_accelerator

    # resolved before the flags are saved: config.yaml records the init used (and --resume
    # compares it with runs saved when --init defaulted to vocab), and the dtype
    args.init = _resolved_init(METHODS[args.method][0], args.init)
    if args.dtype is None:  # main() resolves it; demo's parsed flags come here unresolved
        from .distributed import launch_dtype

        args.dtype = launch_dtype(None, _warn)
    if getattr(args, "tasks", None):  # several tasks, one adapter each (softprompt.multitask)
        from .multitask import train_tasks

        return train_tasks(args)
    for flag in ("tasks_eval", "task_template", "tie_shared"):
        if getattr(args, flag, None) is not None:
            raise SoftPromptError(f"--{flag.replace('_', '-')} goes with --tasks")
    for flag in ("train", "output"):
        if not getattr(args, flag):
            raise SoftPromptError(f"train needs --{flag} (on the command line or in --config)")

    layered = "layers" in {f.name for f in dataclasses.fields(METHODS[args.method][0])}
    if args.layers not in (None, "") and not layered:
        raise SoftPromptError(
            f"--layers applies to per-layer methods (deep, prefix); --method {args.method} "
            "puts its prompt at the input only: drop --layers"
        )
    fields = {f.name for f in dataclasses.fields(METHODS[args.method][0])}
    if getattr(args, "adapter_layers", None) is not None and "adapter_layers" not in fields:
        raise SoftPromptError(
            f"--adapter-layers applies to --method adaption_prompt; --method {args.method} has "
            "no adapter layers: drop it (per-layer prefixes choose their layers with --layers)"
        )
    verbalizer, notes = _check_model_free_flags(args)  # before any data or model loads
    flags = {k: v for k, v in vars(args).items() if k not in ("func", "config", "command")}
    train_args = _train_args(args)  # checks the loop's flags before anything loads
    out = _output_dir(args.output)
    if args.resume:
        _check_resume_flags(out, flags)
    from .distributed import check_world_size, fsdp_requested

    acc = make_accelerator(args.report_to, args.output)
    check_world_size(acc.num_processes)
    main = acc.is_main_process
    log = print if main else (lambda *a, **k: None)
    torch.manual_seed(args.seed)

    kind = model_kind(args.model)
    encoder_only = kind == "encoder"
    encoder_task = args.task in ENCODER_TASKS
    if encoder_task:
        _check_encoder_task_flags(args, kind)
    if args.chat and args.task != "classify":
        raise SoftPromptError(
            "--chat is for --task classify (a chat task, --task chat, is always in chat form)"
        )
    chat = args.task == "chat" or args.chat
    if encoder_task:
        text = ENCODER_TEMPLATES[args.task]
    elif args.task == "chat":
        if args.template:
            raise SoftPromptError(
                "--task chat renders rows with the tokenizer's chat template; drop --template "
                "(put instructions in a system message)"
            )
        text = CHAT_TEMPLATE
    elif args.template:
        text = _unescape(args.template)
    elif chat:
        text = "{text}"
    else:
        text = default_template(
            args.task,
            METHODS[args.method][0].level == "input",
            args.num_virtual_tokens,
            encoder=kind != "causal",
        )
    template = Template.parse(text)
    train_rows = _load_data(args.train, args.task, args.skip_bad, template)
    labels = label_set(train_rows) if args.task == "classify" else []
    if encoder_task:
        labels = tag_label_set(train_rows) if args.task == "tag" else list(EXTRACT_LABELS)
    eval_rows = _load_data(args.eval, args.task, args.skip_bad, template) if args.eval else []
    test_rows = _load_data(args.test, args.task, args.skip_bad, template) if args.test else []
    if args.task == "classify":
        eval_rows = check_eval_labels(labels, eval_rows, args.skip_bad, _warn) if eval_rows else []
        test_rows = check_eval_labels(labels, test_rows, args.skip_bad, _warn) if test_rows else []
    unknown = [k for k in verbalizer if k not in labels]
    if unknown:
        raise SoftPromptError(
            f"--verbalizer names {', '.join(map(repr, unknown))}, which "
            f"{'is not a label' if len(unknown) == 1 else 'are not labels'} of {args.train} "
            f"(labels: {', '.join(map(repr, labels))}); fix the key(s)"
        )
    # a sharded base is loaded on the CPU and moved to the device block by block as it is cut
    # into shards (distributed.shard_frozen_base): no device holds all of it
    fsdp = fsdp_requested(args.fsdp)
    base, tok = load_base(args.model, args.dtype, device="cpu" if fsdp else str(acc.device))
    model = sp.attach(base, tokenizer=tok)
    if args.init == "labels":
        args.init_text = [verbalizer.get(lab, lab) for lab in labels]
    spec = TaskSpec(
        kind=args.task,
        template=text,
        labels=labels,
        verbalizer=verbalizer,
        head=encoder_only and (args.task == "classify" or encoder_task),
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        placement=args.placement,
        loss_turns=args.loss_turns,
        chat=args.chat,
        system=_unescape(args.system or ""),
    )
    config = _adapter_config(args, template, chat)
    if chat and getattr(config, "placement", None) == "template":
        spec.soft_tokens = config.num_virtual_tokens
    adapter = model.add_adapter(args.name, config, tok)
    adapter.task = spec.to_dict()
    if getattr(args, "init_from", None):  # prompt transfer: start from a trained adapter
        from .transfer import init_from

        init_from(model, args.name, args.init_from)
    if spec.head:
        adapter.set_task_head(len(labels)).to(model.device)
        model.set_active(args.name)
    task = Task(spec, model, tok)
    for note in notes:  # once every check passed: an error stays the one line printed
        _warn(note)
    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(flags, sort_keys=False))

    summary: dict = {
        "method": args.method,
        "model": args.model,
        "task": args.task,
        "train_rows": len(train_rows),
        "template": text,
        "world_size": acc.num_processes,
        "distributed_type": str(acc.distributed_type).split(".")[-1],
    }
    trainer = Trainer(model, task, train_rows, eval_rows, train_args, acc, log=log)
    if test_rows and not spec.head and not args.resume:
        model.set_active(None)
        zs, _ = trainer.evaluate(test_rows)
        model.set_active(args.name)
        name, value = headline(zs)
        summary["zero_shot"] = zs
        log(f"zero-shot {name} on {args.test}: {value:.4f}")
    result = trainer.train()
    summary["train"] = result
    summary["fsdp"] = trainer.args.fsdp
    if trainer.args.fsdp:
        summary["fsdp_reshard_after_forward"] = trainer.reshard_after_forward
    summary["gradient_checkpointing"] = trainer.checkpointing
    summary["base_parameters"] = sum(p.numel() for p in base.parameters())
    summary["base_local_parameters"] = trainer.base_local_parameters or summary["base_parameters"]
    best_dir = out / "adapter"
    model.delete_adapter(args.name)
    sp.load_adapter(model, best_dir, name=args.name)
    task = Task(spec, model, tok)
    trainer.task = task
    if test_rows:
        tuned, preds = trainer.evaluate(test_rows)
        name, value = headline(tuned)
        summary["test"] = tuned
        log(f"tuned {name} on {args.test}: {value:.4f}")
        if main:
            _write_jsonl(out / "test_predictions.jsonl", preds)
    if main:
        _, _, line = model.trainable_parameters()
        summary["adapter"] = str(best_dir)
        summary["adapter_bytes"] = sum(f.stat().st_size for f in best_dir.iterdir())
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log(
            f"adapter: {best_dir} ({summary['adapter_bytes'] / 1024:.0f} KB); "
            f"curve: {out / 'training_curve.png'}; log: {out / 'metrics.jsonl'}"
        )
    return summary, model, task


def _check_model_free_flags(args) -> tuple[dict[str, str], list[str]]:
    """``train``'s checks that need neither the data nor the model (so that their error shows
    before a model loads): --layers, --verbalizer (returned parsed), --init / --init-text, and
    a given --template's [soft:N] and main field. A template's [soft:N] decides the number of
    virtual tokens: ``args.num_virtual_tokens`` is set to it (config.yaml records the value
    used), with a warning (returned, to print once the run is set up) when
    --num-virtual-tokens asked for another."""
    from .methods.base import METHODS, AdapterConfig
    from .templates import Template

    cls = METHODS[args.method][0]
    if args.layers not in (None, "") and "layers" in {f.name for f in dataclasses.fields(cls)}:
        _layers(args.layers)
    verbalizer: dict[str, str] = {}
    notes: list[str] = []
    if args.verbalizer:
        if args.task in ("generate", "chat"):
            raise SoftPromptError(
                f"--verbalizer applies to --task classify (label -> word), not {args.task}: drop it"
            )
        try:
            verbalizer = json.loads(args.verbalizer)
        except json.JSONDecodeError as e:
            raise SoftPromptError(f"--verbalizer is not valid JSON: {e}") from e
        if not isinstance(verbalizer, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in verbalizer.items()
        ):
            raise SoftPromptError(
                f"--verbalizer must be a JSON object of label: word strings, e.g. "
                f'\'{{"positive": "great"}}\', got {args.verbalizer!r:.80}'
            )
    if args.init == "labels" and args.task != "classify":
        raise SoftPromptError(f"--init labels applies to --task classify, not {args.task}")
    if args.init == "text" and not args.init_text:
        raise SoftPromptError("--init text needs --init-text")
    if args.init_text is not None and args.init != "text":
        raise SoftPromptError(
            f"--init-text is the text for --init text, but --init is {args.init}: add --init "
            "text, or drop --init-text"
        )
    if args.template and args.task in ("classify", "generate") and not args.chat:
        text = _unescape(args.template)
        template = Template.parse(text)
        main = _main_field(args.task)
        if main not in template.fields:
            raise SoftPromptError(
                f"template {text!r} has no {{{main}}}: the model would never see the "
                f"input; put {{{main}}} in the template (e.g. 'Text: {{{main}}} ...')"
            )
        if template.num_soft:
            if "placement" not in {f.name for f in dataclasses.fields(cls)}:
                raise SoftPromptError(
                    f"--template has soft segments ([soft:N]) but --method {args.method} puts "
                    f"its prompt inside attention; use a method with input-level virtual tokens "
                    f"({', '.join(_methods_of_level('input'))}), or drop the [soft:N]"
                )
            default = _field_defaults(AdapterConfig)["num_virtual_tokens"]
            given = args.num_virtual_tokens
            if given not in (default, template.num_soft):  # the parser's default: not given
                notes.append(
                    f"--num-virtual-tokens {given} is ignored: the template's [soft:N] segments "
                    f"decide the number ({template.num_soft} in all); drop the flag or make it "
                    f"{template.num_soft}"
                )
            args.num_virtual_tokens = template.num_soft
    return verbalizer, notes


def _check_encoder_task_flags(args, kind: str) -> None:
    """--task tag / extract: an encoder, no template, verbalizer or label init."""
    if kind != "encoder":
        raise SoftPromptError(
            f"--task {args.task} needs an encoder model (BERT, MiniLM, e.g. --model "
            f"all-minilm-l6-v2); {args.model} is a {kind} model"
        )
    for flag in ("template", "verbalizer"):
        if getattr(args, flag):
            raise SoftPromptError(
                f"--{flag} does not apply to --task {args.task}: the encoder reads the row's "
                "fields as they are (see README: Encoder tasks); drop it"
            )
    if args.init == "labels":
        raise SoftPromptError(f"--init labels applies to --task classify, not {args.task}")


# flags that may differ between a run and its --resume (see docs: extending a run with more
# --max-steps / --epochs, evaluating or saving more or less often, another --test set). Every
# other flag of 'train' must be what the checkpoint's run was started with.
RESUME_MAY_CHANGE = {
    "max_steps",
    "epochs",
    "eval_every",
    "save_every",
    "patience",
    "eval_batch_size",
    "lower_layer_cache_mb",
    "test",
    "skip_bad",
    "no_progress",
    "resume",
    "output",
    "report_to",
    "compile",
    "gradient_checkpointing",
}


def _output_dir(value: str) -> Path:
    """``--output`` as a folder, created; an existing file on the way is a clear error."""
    out = Path(value)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise SoftPromptError(
                f"--output {out}: {p} is a file, not a folder; give a new or existing folder"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SoftPromptError(f"--output {out}: cannot create the folder ({e.strerror})") from e
    return out


def _read_flags_file(path: Path, who: str) -> dict:
    """A YAML file of saved flags (``--config``, a run's ``config.yaml``) as a mapping."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SoftPromptError(f"{who} {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise SoftPromptError(f"{who} {path} must be a mapping of flag: value")
    return data


def _check_resume_flags(out: Path, flags: dict) -> None:
    """Refuse --resume when a flag differs from the checkpoint's run (its config.yaml)."""
    from .trainer import _checkpoint_dir

    saved_file = out / "config.yaml"
    if _checkpoint_dir(out) is None or not saved_file.is_file():
        return  # nothing to resume from: the trainer says so and starts from scratch
    saved = _read_flags_file(saved_file, "--resume:")
    diffs = [
        f"--{k.replace('_', '-')} {saved[k]!r} (checkpoint) vs {v!r} (now)"
        for k, v in flags.items()
        if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != v
    ]
    if diffs:
        raise SoftPromptError(
            f"--resume: the checkpoint in {out} was trained with other flags: "
            + "; ".join(diffs)
            + ". Resume with the flags in its config.yaml (--config "
            + f"{saved_file}), or train into a new --output"
        )


def _train_args(args):
    from .distributed import fsdp_requested
    from .trainer import TrainArgs

    return TrainArgs(
        output_dir=args.output,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        group_by_length=args.group_by_length,
        lower_layer_cache_mb=args.lower_layer_cache_mb,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        eval_every=args.eval_every,
        save_every=args.save_every,
        patience=args.patience,
        seed=args.seed,
        resume=args.resume,
        eval_batch_size=args.eval_batch_size,
        eval_limit=args.eval_limit,
        progress=not args.no_progress,
        log_rows=args.log_rows,
        fsdp=fsdp_requested(args.fsdp),
        report_to=args.report_to,
        compile=args.compile,
        gradient_checkpointing=args.gradient_checkpointing,
        skip_bad=args.skip_bad,
    )


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


DEMO = dict(
    model="smollm2-135m-instruct",
    method="prefix",
    task="classify",
    train="rotten-tomatoes:train",
    eval="rotten-tomatoes:dev",
    test="rotten-tomatoes:test",
    template="Review: {text}\nSentiment: {label}",
    num_virtual_tokens=10,
    max_steps=150,
    batch_size=8,
    eval_every=50,
    eval_limit=200,
    output="runs/demo",
)


def cmd_demo(args) -> dict:
    """Prefix tuning on Rotten Tomatoes with SmolLM2, end to end, offline."""
    parser = build_parser()
    argv = ["train"]
    for k, v in DEMO.items():
        v = getattr(args, k, None) if getattr(args, k, None) is not None else v
        argv += [f"--{k.replace('_', '-')}", str(v)]
    targs = parser.parse_args(argv)
    summary, _, task = train_run(targs)
    examples = [
        "A gorgeous, heartfelt film that earns every one of its tears.",
        "Two hours of my life I will never get back.",
        "The plot is thin, but the performances are sharp and the jokes land.",
    ]
    from .data import Example

    preds = task.predict(
        [Example({"text": t, "label": ""}, "demo", i + 1) for i, t in enumerate(examples)]
    )
    print("\nlabelled by the tuned adapter:")
    for t, p in zip(examples, preds, strict=True):
        conf = max(p["scores"].values())
        print(f"  {p['prediction']:>8} ({conf:.2f})  {t}")
    return summary


# --------------------------------------------------------------------------------------------
# eval / generate / inspect / assets
# --------------------------------------------------------------------------------------------


def _ensemble(args) -> bool:
    """Whether eval/generate got several --adapter folders (an ensemble); with one, args.adapter
    becomes that folder and --combine is refused."""
    adapters = [args.adapter] if isinstance(args.adapter, str) else list(args.adapter)
    if len(adapters) > 1:
        args.adapter = adapters
        if getattr(args, "combine", None) is None:
            args.combine = "mean"
        return True
    if getattr(args, "combine", None) is not None:
        raise SoftPromptError("--combine needs several --adapter folders (an ensemble)")
    args.adapter = adapters[0]
    return False


def cmd_eval(args) -> dict:
    if _ensemble(args):  # several adapters of one task: softprompt.ensemble
        from .ensemble import cmd_eval_ensemble

        return cmd_eval_ensemble(args)
    from .data import check_eval_labels, load_examples
    from .io import check_output_path, resolve_adapter_dir

    target = (  # checked before the model loads: a bad path fails at once
        check_output_path(args.predictions, "--predictions", "predictions.jsonl")
        if args.predictions
        else resolve_adapter_dir(args.adapter) / "predictions.jsonl"
    )
    model, tok, task = _load_adapter_and_task(args.model, args.adapter, args.dtype)
    rows = load_examples(
        args.data,
        task.spec.kind,
        skip_bad=args.skip_bad,
        required_fields=sorted(task.template.fields),
        warn=_warn,
    )
    if task.spec.kind == "classify":
        rows = check_eval_labels(task.spec.labels, rows, args.skip_bad, _warn)
    preds = task.predict(rows, args.batch_size)
    metrics = task.metrics(rows, preds)
    _write_jsonl(target, preds)
    print(json.dumps(metrics))
    _err(f"predictions: {target}")
    return metrics


def generate_rows(args, kind: str) -> list:
    """``generate``'s rows (one adapter or an ensemble): ``--data`` rows (a chat row may end
    with its question), or the TEXT arguments (a chat TEXT is one user message)."""
    from .data import Example, load_examples

    field = _main_field(kind)
    if args.data:
        return load_examples(args.data, kind, skip_bad=args.skip_bad, warn=_warn, chat_prompts=True)
    if args.text and kind == "chat":
        return [
            Example({"messages": [{"role": "user", "content": t}]}, "argv", i + 1)
            for i, t in enumerate(args.text)
        ]
    if args.text:
        return [
            Example({field: t, "label": "", "target": ""}, "argv", i + 1)
            for i, t in enumerate(args.text)
        ]
    raise SoftPromptError("give TEXT arguments or --data FILE")


def cmd_generate(args) -> list[dict]:
    if _ensemble(args):  # several adapters of one task: softprompt.ensemble
        from .ensemble import cmd_generate_ensemble

        return cmd_generate_ensemble(args)

    model, tok, task = _load_adapter_and_task(args.model, args.adapter, args.dtype)
    if task.spec.kind in ("tag", "extract"):
        return _generate_encoder_task(args, task)
    field = _main_field(task.spec.kind)
    rows = generate_rows(args, task.spec.kind)
    if task.spec.kind in ("generate", "chat"):
        if args.max_new_tokens is not None:
            task.spec.max_new_tokens = args.max_new_tokens
    preds = task.predict(rows, args.batch_size)
    for p in preds:
        if task.spec.kind == "classify":
            print(json.dumps({"text": p[field], "label": p["prediction"], "scores": p["scores"]}))
        elif task.spec.kind == "chat":
            msgs = task.chat_messages(p)
            print(json.dumps({"messages": msgs, "output": p["prediction"]}, ensure_ascii=False))
        else:
            print(json.dumps({"input": p[field], "output": p["prediction"]}, ensure_ascii=False))
    return preds


def _generate_encoder_task(args, task) -> list[dict]:
    """generate for tag (TEXT: a sentence, split on whitespace) and extract (TEXT: QUESTION
    CONTEXT pairs); --data reads rows as eval does."""
    from .data import Example, load_examples

    kind = task.spec.kind
    if args.data:
        rows = load_examples(args.data, kind, skip_bad=args.skip_bad, warn=_warn)
    elif not args.text:
        raise SoftPromptError("give TEXT arguments or --data FILE")
    elif kind == "tag":
        rows = [
            Example({"tokens": t.split(), "tags": []}, "argv", i + 1)
            for i, t in enumerate(args.text)
            if t.split()
        ]
        if not rows:
            raise SoftPromptError("the TEXT arguments hold no words")
    else:
        if len(args.text) % 2:
            raise SoftPromptError(
                "--task extract: give TEXT as QUESTION CONTEXT pairs (an even number of arguments)"
            )
        pairs = zip(args.text[::2], args.text[1::2], strict=True)
        rows = [
            Example({"question": q, "context": c, "answer": ""}, "argv", i + 1)
            for i, (q, c) in enumerate(pairs)
        ]
    preds = task.predict(rows, args.batch_size)
    for p in preds:
        if kind == "tag":
            out = {"tokens": p["tokens"], "tags": p["prediction"]}
        else:
            out = {
                "question": p["question"],
                "answer": p["prediction"],
                "start": p["prediction_start"],
            }
        print(json.dumps(out, ensure_ascii=False))
    return preds


def cmd_inspect(args) -> dict:
    import torch

    import softprompt as sp

    from . import _hf
    from .io import adapter_bytes, read_adapter_config, recorded_base_model
    from .loading import load_base

    meta = read_adapter_config(args.adapter)
    model_name = args.model or recorded_base_model(meta, args.adapter)
    base, tok = load_base(model_name, "float32")
    model = sp.load_adapter(base, args.adapter, name="adapter")
    ad = model.adapters["adapter"]
    n_ad = sum(p.numel() for p in ad.parameters()) + sum(
        t.numel() for t in ad.baked_tensors().values() if ad.is_baked
    )
    n_base = sum(p.numel() for p in base.parameters())
    size = adapter_bytes(args.adapter)  # not the predictions eval writes into the folder
    report = {
        "method": meta["method"],
        "config": meta["config"],
        "task": meta.get("task"),
        "base_model": {  # a PEFT folder records little: the rest is the model it fits
            k: v
            for k, v in {**model.info.identity, **meta["base_model"]}.items()
            if k != "embedding_sample"
        },
        "adapter_parameters": n_ad,
        "base_parameters": n_base,
        "share": f"{100 * n_ad / n_base:.4f}%",
        "bytes_on_disk": size,
        "virtual_tokens": [],
    }
    k = args.top_k
    with torch.no_grad():
        prompt = ad.input_prompt()
        if prompt is not None:
            table = base.get_input_embeddings().weight.float()
            sims = (
                torch.nn.functional.normalize(prompt.float(), dim=-1)
                @ torch.nn.functional.normalize(table, dim=-1).T
            )
            space = "input embeddings (cosine)"
        else:
            kvs = ad.kv()
            if kvs:
                slot = ad.layout.slots[0]
                pk = kvs[slot][0]  # (P, kvh, hd)
            else:  # gated adapter tokens: their keys at the lowest adapted slot
                gated = ad.gated_prompts()
                slot = min(gated)
                pk = _hf.adaption_kv(base, model.info, {slot: gated[slot]})[slot][0]
            keys = _hf.token_keys(base, model.info, torch.arange(table_rows(base)), slot=slot)
            pk = pk.reshape(ad.num_virtual_tokens, -1).float()
            sims = (
                torch.nn.functional.normalize(pk, dim=-1)
                @ torch.nn.functional.normalize(keys, dim=-1).T
            )
            space = f"keys of attention slot {model.info.slots[slot].key} (cosine)"
        top = sims.topk(k, dim=-1)
        for i in range(sims.shape[0]):
            words = [tok.decode([int(t)]) for t in top.indices[i]]
            report["virtual_tokens"].append(
                {
                    "index": i,
                    "nearest": words,
                    "cosine": [round(float(x), 3) for x in top.values[i]],
                }
            )
    report["nearest_space"] = space
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    print(f"adapter      {args.adapter}")
    print(f"method       {report['method']}  ({json.dumps(report['config'])})")
    print(f"task         {json.dumps(report['task'])}")
    print(
        f"base model   {report['base_model']['name_or_path']} ({report['base_model']['architecture']}, "
        f"vocab {report['base_model']['vocab_size']}, hidden {report['base_model']['hidden_size']})"
    )
    print(
        f"parameters   {n_ad:,} adapter / {n_base:,} base = {report['share']}; {size / 1024:.1f} KB on disk"
    )
    print(f"nearest vocabulary words of each virtual token, in {space}:")
    for v in report["virtual_tokens"]:
        pairs = ", ".join(f"{w!r} {c:.2f}" for w, c in zip(v["nearest"], v["cosine"], strict=True))
        print(f"  [{v['index']:>3}] {pairs}")
    return report


def table_rows(base) -> int:
    return base.get_input_embeddings().weight.shape[0]


def cmd_assets(args) -> None:
    from .assets import fetch_all

    fetch_all(args.names or None)


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


def _add_model(p, default="smollm2-135m-instruct"):
    p.add_argument(
        "--model",
        default=default,
        help="hub id, local folder, or embedded asset name (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="the frozen base's precision (adapters stay float32); default float32, or what "
        "`accelerate launch --mixed_precision bf16|fp16` asked for",
    )


def _field_defaults(cls) -> dict:
    """A dataclass's field defaults, by field name (the CLI's defaults)."""
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


def _attribute_docs(*classes) -> dict[str, str]:
    """Field name -> its entry in the classes' Google-style "Attributes:" docstring sections
    (continuation lines joined; the first class that documents a name wins), for ``--help``."""
    docs: dict[str, str] = {}
    for cls in classes:
        mine: dict[str, str] = {}
        name = None
        for line in (cls.__doc__ or "").partition("Attributes:")[2].splitlines():
            m = re.match(r"^ {8}(\w+): (.*)$", line)
            if m:
                name = m.group(1)
                mine[name] = m.group(2).strip()
            elif name and line.startswith(" " * 12):
                mine[name] += " " + line.strip()
            else:
                name = None
        for key, text in mine.items():
            docs.setdefault(key, text)
    return docs


def _document(parser: argparse.ArgumentParser, docs: dict[str, str]) -> None:
    """Give every flag without its own help the line its dataclass field documents."""
    for action in parser._actions:  # noqa: SLF001
        if action.help is None and action.dest in docs:
            action.help = docs[action.dest] + (
                ""
                if action.default is None or action.default is False or action.default == ""
                else " (default: %(default)s)"
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softprompt", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"softprompt {__version__}")
    parser.add_argument("--config", help="YAML file of flags (saved flags); command-line flags win")
    sub = parser.add_subparsers(dest="command", required=True)
    from .chat import CHAT_PLACEMENTS, LOSS_TURNS
    from .export import add_export_parser
    from .methods import METHODS  # every registered method, the four built in and any plugin
    from .methods.base import AdapterConfig
    from .server import add_serve_parser
    from .tasks import TASKS, TaskSpec
    from .trainer import REPORT_TO, TrainArgs

    methods = sorted(METHODS)
    # defaults come from the dataclasses that take the values, never a second literal here
    loop = _field_defaults(TrainArgs)
    task = _field_defaults(TaskSpec)
    inits = sorted(set().union(*(cls.inits for cls, _ in METHODS.values())))
    t = sub.add_parser("train", help="train an adapter")
    _add_model(t)
    t.add_argument("--method", choices=methods, default="prefix")
    t.add_argument(
        "--train",
        help="JSONL/CSV/TSV file, datasets folder, or rotten-tomatoes[:split] / aclsum[:split]",
    )
    t.add_argument(
        "--eval", help="dev data: model selection and early stopping (never the test set)"
    )
    t.add_argument("--test", help="test data: zero-shot before and tuned metrics after training")
    t.add_argument("--output", help="output folder (required)")
    t.add_argument(
        "--task",
        choices=list(TASKS),
        default="classify",
        help="classify, generate, chat (rows {messages: [...]}); on encoders also tag (a BIO tag "
        "per word, rows {tokens, tags}) and extract (extractive QA, rows {question, context, "
        "answer}); default: %(default)s",
    )
    t.add_argument("--placement", choices=list(CHAT_PLACEMENTS), default=task["placement"])
    t.add_argument("--loss-turns", choices=list(LOSS_TURNS), default=task["loss_turns"])
    t.add_argument("--chat", action="store_true")
    t.add_argument("--system", default=task["system"])
    t.add_argument(
        "--template",
        help='e.g. "[soft:10] Review: {text}\\nSentiment: {label}" (\\n is a newline, \\t a tab, '
        "\\\\ a backslash)",
    )
    t.add_argument("--verbalizer", help='JSON label -> word, e.g. \'{"positive": "great"}\'')
    t.add_argument(
        "--num-virtual-tokens",
        type=_POSITIVE,
        default=_field_defaults(AdapterConfig)["num_virtual_tokens"],
    )
    t.add_argument(
        "--init",
        choices=inits,
        default=None,
        help="initialisation (default: vocab; adaption_prompt: random, its only one)",
    )
    t.add_argument("--init-text", help="text for --init text")
    t.add_argument("--layers", help="deep/prefix: 'all', 'top_half' or indices like '6,7,8'")
    t.add_argument(
        "--prefix-hidden",
        type=_POSITIVE,
        default=_field_defaults(METHODS["prefix"][0])["encoder_hidden_size"],
        help="prefix MLP width",
    )
    t.add_argument(
        "--encoder",
        choices=["mlp", "lstm"],
        default=_field_defaults(METHODS["ptuning"][0])["encoder"],
        help="P-tuning prompt encoder",
    )
    t.add_argument(
        "--adapter-layers",
        type=_POSITIVE,
        default=_field_defaults(METHODS["adaption_prompt"][0])["adapter_layers"],
        help="adaption_prompt: how many of the top layers get adapter tokens (default: all)",
    )
    mpt = _field_defaults(METHODS["mpt"][0])
    t.add_argument(
        "--num-ranks",
        type=_POSITIVE,
        default=mpt["num_ranks"],
        help="mpt: rank of the task's multiplicative update of the shared prompt",
    )
    t.add_argument(
        "--shared-from",
        dest="shared_init_from",
        default=mpt["shared_init_from"],
        help="mpt: adapter folder (softprompt prompt/mpt, or PEFT PROMPT_TUNING / "
        "MULTITASK_PROMPT_TUNING) whose prompt starts the shared prompt",
    )
    t.add_argument(
        "--freeze-shared",
        dest="train_shared",
        action="store_false",
        default=mpt["train_shared"],
        help="mpt: train only the rank-r factors, the shared prompt stays as loaded",
    )
    t.add_argument("--epochs", type=_finite(0, False), default=loop["epochs"])
    t.add_argument("--max-steps", type=_POSITIVE)
    t.add_argument(
        "--lr",
        type=_finite(0, False),
        help="default: per method: "
        + ", ".join(f"{m} {METHODS[m][0].lr_help()}" for m in methods)
        + " (prompt tuning on SmolLM2: 1e-2)",
    )
    t.add_argument("--batch-size", type=_POSITIVE, default=loop["batch_size"])
    t.add_argument("--grad-accum", type=_POSITIVE, default=loop["grad_accum"])
    t.add_argument(
        "--group-by-length",
        action="store_true",
    )
    t.add_argument(
        "--lower-layer-cache-mb",
        type=_int_at_least(0),
        default=loop["lower_layer_cache_mb"],
    )
    t.add_argument("--warmup-ratio", type=_finite(0, True, 1), default=loop["warmup_ratio"])
    t.add_argument("--weight-decay", type=_finite(0, True), default=loop["weight_decay"])
    t.add_argument("--max-grad-norm", type=_finite(0, True), default=loop["max_grad_norm"])
    t.add_argument("--eval-every", type=_POSITIVE, default=loop["eval_every"])
    t.add_argument("--save-every", type=_POSITIVE)
    t.add_argument(
        "--patience",
        type=_POSITIVE,
        default=loop["patience"],
    )
    t.add_argument(
        "--eval-limit", type=_POSITIVE, help="use only the first N dev rows for selection"
    )
    t.add_argument("--eval-batch-size", type=_POSITIVE, default=loop["eval_batch_size"])
    t.add_argument(
        "--max-length", type=_POSITIVE, default=task["max_length"], help="prompt tokens kept"
    )
    t.add_argument("--max-new-tokens", type=_POSITIVE, default=task["max_new_tokens"])
    t.add_argument("--seed", type=_int_at_least(0, 2**32 - 1), default=loop["seed"])
    t.add_argument("--name", default="default", help="adapter name")
    t.add_argument("--resume", action="store_true", help="continue from output/checkpoint")
    t.add_argument("--skip-bad", action="store_true", help="report and skip bad data rows")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument(
        "--log-rows",
        action="store_true",
    )
    t.add_argument(
        "--fsdp",
        action="store_true",
    )
    t.add_argument(
        "--compile",
        action="store_true",
    )
    t.add_argument(
        "--gradient-checkpointing",
        action="store_true",
    )
    t.add_argument(
        "--report-to",
        choices=list(REPORT_TO),
        default=loop["report_to"],
    )
    _add_multi_flags(t)
    t.set_defaults(func=cmd_train)
    methods_docs = (cls for cls, _ in METHODS.values())
    _document(t, _attribute_docs(TrainArgs, TaskSpec, AdapterConfig, *methods_docs))

    d = sub.add_parser(
        "demo", help="the embedded default: prefix on Rotten Tomatoes with SmolLM2 (offline)"
    )
    d.add_argument("--output", default=None)
    d.add_argument("--method", choices=methods, default=None)
    d.add_argument("--max-steps", type=_POSITIVE, default=None)
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("eval", help="metrics of an adapter on data (JSON on stdout)")
    _add_model(e, default=None)
    e.add_argument("--adapter", required=True, action="append", help=_ADAPTER_HELP + _ENSEMBLE_HELP)
    e.add_argument("--combine", choices=["mean", "vote"], help=_COMBINE_HELP)
    e.add_argument("--data", required=True)
    e.add_argument(
        "--predictions",
        help="where to write predictions JSONL (default: predictions.jsonl in the adapter "
        "folder; an ensemble: ensemble_predictions.jsonl in the first adapter's)",
    )
    e.add_argument("--batch-size", type=_POSITIVE, default=32)
    e.add_argument("--skip-bad", action="store_true")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="run an adapter on texts or a data file")
    _add_model(g, default=None)
    g.add_argument("--adapter", required=True, action="append", help=_ADAPTER_HELP + _ENSEMBLE_HELP)
    g.add_argument("--combine", choices=["mean", "vote"], help=_COMBINE_HELP)
    g.add_argument("text", nargs="*")
    g.add_argument("--data")
    g.add_argument(
        "--max-new-tokens", type=_POSITIVE, help="default: what the adapter was trained with"
    )
    g.add_argument("--batch-size", type=_POSITIVE, default=16)
    g.add_argument("--skip-bad", action="store_true")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="what an adapter is and what its virtual tokens are near")
    i.add_argument("adapter", help="softprompt adapter folder or PEFT prompt-learning folder")
    i.add_argument("--model", help="base model (default: the one the adapter names)")
    i.add_argument("--top-k", type=_POSITIVE, default=5)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    a = sub.add_parser("assets", help="fetch the embedded offline models and data sets")
    a.add_argument("names", nargs="*")
    a.set_defaults(func=cmd_assets)

    add_serve_parser(sub)
    from .transfer import add_similar_parser

    add_similar_parser(sub)
    add_export_parser(sub)
    from .cartridge import add_cartridge_parser

    add_cartridge_parser(sub)
    return parser


def _add_multi_flags(t) -> None:
    """train's flags for several tasks in one run and for prompt transfer."""
    t.add_argument(
        "--tasks",
        help="name=data[,name=data...]: train one adapter per task in one run over mixed "
        "batches, into OUTPUT/<name>/ (instead of --train; see softprompt.multitask)",
    )
    t.add_argument("--tasks-eval", help="name=data[,...]: each task's dev data (with --tasks)")
    t.add_argument(
        "--tie-shared",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mpt with --tasks: the tasks' adapters share ONE trained shared prompt (MPT stage "
        "1; saved as OUTPUT/shared/adapter for --shared-from), each with its own rank-r "
        "factors. Default: on for --method mpt without --shared-from",
    )
    t.add_argument(
        "--task-template",
        nargs="+",
        metavar="NAME=TEMPLATE",
        help="a task's own template (with --tasks; default: --template)",
    )
    t.add_argument(
        "--init-from",
        metavar="ADAPTER",
        help="start from a trained adapter of the same method and base model (prompt "
        "transfer, SPoT); the flags must give it the same shape",
    )


def _hoist_config(argv: list[str], commands) -> list[str]:
    """``softprompt train --config F ...`` as ``softprompt --config F train ...``: the flag is
    the top parser's, but users write it after the command too."""
    at = next((i for i, a in enumerate(argv) if a in commands), None)
    if at is None:
        return argv
    head, tail, moved = argv[: at + 1], [], []
    rest = argv[at + 1 :]
    i = 0
    while i < len(rest):
        if rest[i] == "--config" and i + 1 < len(rest):
            moved += rest[i : i + 2]
            i += 2
            continue
        if rest[i].startswith("--config="):
            moved.append(rest[i])
        else:
            tail.append(rest[i])
        i += 1
    return moved + head + tail if moved else argv


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    argv = _hoist_config(argv, parser._subparsers._group_actions[0].choices)  # noqa: SLF001
    args = parser.parse_args(argv)
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise SoftPromptError(f"--config {path} does not exist")
        data = _read_flags_file(path, "--config")
        sub = parser._subparsers._group_actions[0].choices[args.command]  # noqa: SLF001
        actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "version")}  # noqa: SLF001
        defaults = {}
        for key, value in data.items():
            dest = str(key).replace("-", "_")
            if dest not in actions:
                raise SoftPromptError(f"--config {path}: unknown flag {key!r} for '{args.command}'")
            defaults[dest] = _config_value(actions[dest], value, f"--config {path}: {key}")
        sub.set_defaults(**defaults)
        args = parser.parse_args(argv)
    return args


def _config_value(action: argparse.Action, value, where: str):
    """A --config value checked and converted as argparse would the same flag on the command
    line (its type and choices; true/false for switches); null is the flag's default."""
    if value is None:
        return action.default
    if action.nargs == 0:  # store_true and friends
        if not isinstance(value, bool):
            raise SoftPromptError(f"{where} must be true or false, got {value!r}")
        return value
    many = action.nargs in ("*", "+") or isinstance(action, argparse._AppendAction)  # noqa: SLF001
    values = value if many and isinstance(value, list) else [value]
    out = []
    for v in values:
        if isinstance(v, list | dict) or (isinstance(v, bool) and action.type is not None):
            raise SoftPromptError(f"{where} must be a single value, got {v!r}")
        text = str(v)
        try:
            converted = action.type(text) if action.type is not None else text
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise SoftPromptError(f"{where} {e}") from None
        if action.choices is not None and converted not in action.choices:
            raise SoftPromptError(
                f"{where} must be one of {', '.join(map(str, action.choices))}, got {v!r}"
            )
        out.append(converted)
    return out if many else out[0]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    parser = build_parser()
    try:
        args = _apply_config(parser, argv)
        if hasattr(args, "dtype") and args.command != "export":  # export's casts the file
            from .distributed import launch_dtype

            args.dtype = launch_dtype(args.dtype, _warn)
        args.func(args)
        return 0
    except SoftPromptError as e:
        _err(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
