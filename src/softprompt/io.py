"""Adapter files: safetensors + JSON, never pickle.

An adapter directory holds

* ``adapter_config.json``: format, library version, method and its hyperparameters, the adapter
  name, and the base model's identity (architecture, sizes, attention slots, an embedding sample);
* ``adapter.safetensors``: the inference form (``prompt`` (P, d) or ``prefix`` (P, width) where
  width = sum over the adapter's slots of 2 * kv_heads * head_dim, slots in the order listed in
  the config's ``slots``, each slot's key columns then its value columns);
* ``trainable.safetensors`` (training checkpoints only): every parameter of the adapter module,
  reparameterisation included, so training resumes where it stopped.

Writes go to a temporary file in the same folder and are renamed into place (atomic).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__, _json
from .errors import SoftPromptError
from .methods.base import METHODS, AdapterConfig

if TYPE_CHECKING:  # annotations only: the model calls io, never the reverse
    from .model import SoftPromptModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
TRAINABLE_NAME = "trainable.safetensors"
# what makes up an adapter folder, softprompt's or PEFT's (adapter_model.safetensors, legacy .bin);
# not what eval and export write into it (predictions.jsonl, prompt_embeds.safetensors, peft/)
ADAPTER_FILES = (
    CONFIG_NAME,
    WEIGHTS_NAME,
    TRAINABLE_NAME,
    "adapter_model.safetensors",
    "adapter_model.bin",
)
FORMAT = "softprompt-adapter"
FORMAT_VERSION = 1  # the newest adapter format this library reads and writes
# a trainable.safetensors must reproduce adapter.safetensors within this (relative to its scale)
BAKED_TOLERANCE = 1e-4


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_output_path(value: str | Path, flag: str, example: str, *, folder: bool = False) -> Path:
    """Where a command will write (``flag`` names it in messages): a file, or with ``folder`` a
    folder. Checked before any work, so that a bad path fails at once, not after the model ran;
    a missing parent folder is created (as ``train --output`` does).

    Args:
        example: a file (folder) name the message suggests, e.g. ``"predictions.jsonl"``.
    """
    path = Path(value)
    if path.is_dir() and not folder:
        raise SoftPromptError(
            f"{flag} {path} is a folder; give a file path (e.g. {path / example})"
        )
    if path.exists() and folder and not path.is_dir():
        raise SoftPromptError(f"{flag} {path} is a file; give a new or existing folder")
    for p in path.parents:
        if p.exists() and not p.is_dir():
            raise SoftPromptError(f"{flag} {path}: {p} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SoftPromptError(
            f"{flag} {path}: cannot create the folder {path.parent} ({e.strerror})"
        ) from e
    if not os.access(path.parent, os.W_OK):
        raise SoftPromptError(f"{flag} {path}: the folder {path.parent} is not writable")
    return path


def _write_json(path: Path, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, tmp, metadata={"format": "pt"}))


def adapter_metadata(model: SoftPromptModel, name: str) -> dict:
    ad = model.adapters[name]
    # the slots an adapter changes: a prefix's layout, or an adaption prompt's adapted layers
    own = ad.layout.slots if hasattr(ad, "layout") else sorted(ad.gated_prompts() or {})
    slots = [model.info.slots[s].key for s in own]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "name": name,
        "method": ad.config.method,
        "config": ad.config.to_dict(),
        "slots": slots,
        "base_model": model.info.identity,
        "task": ad.task,
        "task_head": None if ad.task_head is None else list(ad.task_head.weight.shape[::-1]),
        **({"position_offset": ad.position_offset} if ad.position_offset else {}),
        **({"source": ad.source} if ad.source else {}),
    }


def save_adapter(
    model: SoftPromptModel,
    directory: str | Path,
    name: str | None = None,
    *,
    trainable: bool = False,
) -> Path:
    """Save adapter ``name`` (default: the active one) to ``directory``.

    Args:
        trainable: also write ``trainable.safetensors`` (the reparameterisation), so that
            ``load_adapter`` gives back an adapter that trains on exactly where it stopped.

    Returns:
        The directory.
    """
    name = name or model.active
    if name is None or name not in model.adapters:
        raise SoftPromptError(f"no adapter {name!r} to save; loaded: {sorted(model.adapters)}")
    directory = Path(directory)
    ad = model.adapters[name]
    with torch.no_grad():
        baked = dict(ad.baked_tensors())
        if ad.task_head is not None:
            baked.update({f"task_head.{k}": v for k, v in ad.task_head.state_dict().items()})
        _write_tensors(directory / WEIGHTS_NAME, baked)
        if trainable:
            state = {k: v for k, v in ad.state_dict().items() if v is not None}
            _write_tensors(directory / TRAINABLE_NAME, state)
        elif (directory / TRAINABLE_NAME).exists():
            (directory / TRAINABLE_NAME).unlink()
    meta = adapter_metadata(model, name)
    meta["baked"] = True
    meta["has_trainable"] = trainable
    _write_json(directory / CONFIG_NAME, meta)
    return directory


def resolve_adapter_dir(directory: str | Path) -> Path:
    """The adapter folder ``directory`` stands for: itself, or the ``adapter/`` folder inside a
    run folder that ``softprompt train`` wrote (``runs/x`` -> ``runs/x/adapter``)."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() and (directory / "adapter" / CONFIG_NAME).is_file():
        return directory / "adapter"
    return directory


# field -> (check, what it must be) for the optional fields of adapter_config.json
_OPTIONAL = {
    "name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "task": (lambda v: isinstance(v, dict), "an object"),
    "slots": (
        lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "a list of strings",
    ),
    "task_head": (
        lambda v: (
            isinstance(v, list)
            and len(v) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 < x < 2**31 for x in v)
        ),
        "[hidden_size, num_labels] (two positive integers)",
    ),
    "baked": (lambda v: isinstance(v, bool), "true or false"),
    "has_trainable": (lambda v: isinstance(v, bool), "true or false"),
    "library_version": (lambda v: isinstance(v, str), "a string"),
    "position_offset": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31,
        "an integer in [0, 2**31) (where the real tokens' positions start)",
    ),
    # what an imported adapter came from: {"peft": its PEFT adapter_config.json}
    "source": (lambda v: isinstance(v, dict), "an object"),
}


def _check_base_model(path: Path, ident: dict) -> None:
    name = ident.get("name_or_path", "")
    if not isinstance(name, str):
        raise SoftPromptError(f"{path}: field 'base_model.name_or_path' must be a string")
    sample = ident.get("embedding_sample")
    if sample is not None and not (
        isinstance(sample, list)
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in sample)
    ):
        raise SoftPromptError(
            f"{path}: field 'base_model.embedding_sample' must be a list of numbers"
        )


def read_adapter_config(directory: str | Path) -> dict:
    """Read and validate ``adapter_config.json`` of an adapter (or run) folder; errors name the
    file and the field, and what is wrong.

    A PEFT prompt-learning folder (``peft_type`` in its config) reads as the softprompt config
    it converts to (``softprompt.peft_compat.peft_meta``), with the PEFT config under ``peft``.
    """
    directory = resolve_adapter_dir(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise SoftPromptError(f"adapter directory {directory} does not exist")
    if not path.is_file():
        raise SoftPromptError(f"{path} is missing: {directory} is not a softprompt adapter")
    try:
        text = path.read_text(encoding="utf-8")
        meta = _json.loads(text)
    except UnicodeDecodeError as e:
        raise SoftPromptError(f"{path} is not valid JSON ({e}); the file is corrupt") from e
    except _json.JSONError as e:
        line, col = _json.line_col(text, e.pos)
        if e.key is not None:
            raise SoftPromptError(
                f"{path}:{line}: key {e.key!r} appears twice in one object; keep one"
            ) from e
        raise SoftPromptError(
            f"{path} is not valid JSON (line {line} column {col}: {e.msg}); the file is corrupt"
        ) from e
    if isinstance(meta, dict) and "peft_type" in meta:  # a PEFT folder: softprompt.peft_compat
        from .peft_compat import peft_meta

        return peft_meta(directory, meta)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SoftPromptError(f"{path}: 'format' is not {FORMAT!r}; not a softprompt adapter")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SoftPromptError(f"{path}: field 'format_version' must be a positive integer")
    if version > FORMAT_VERSION:
        raise SoftPromptError(
            f"{path}: format_version {version} is newer than this softprompt reads "
            f"({FORMAT_VERSION}); upgrade softprompt (pip install -U softprompt)"
        )
    for field in ("method", "config", "base_model"):
        if field not in meta:
            raise SoftPromptError(f"{path}: missing field {field!r}")
    if not isinstance(meta["method"], str) or meta["method"] not in METHODS:
        raise SoftPromptError(
            f"{path}: field 'method' is {meta['method']!r}, not one of {sorted(METHODS)}"
        )
    for field in ("config", "base_model"):
        if not isinstance(meta[field], dict):
            raise SoftPromptError(
                f"{path}: field {field!r} must be an object, got {type(meta[field]).__name__}"
            )
    if meta["config"].get("method", meta["method"]) != meta["method"]:
        raise SoftPromptError(
            f"{path}: field 'config.method' ({meta['config'].get('method')!r}) disagrees with "
            f"'method' ({meta['method']!r})"
        )
    _check_base_model(path, meta["base_model"])
    for field, (ok, what) in _OPTIONAL.items():
        if meta.get(field) is not None and not ok(meta[field]):
            raise SoftPromptError(
                f"{path}: field {field!r} must be {what}, got {meta[field]!r:.80}"
            )
    return meta


def adapter_bytes(directory: str | Path) -> int:
    """The size on disk of an adapter (or run) folder's own files (``ADAPTER_FILES``)."""
    directory = resolve_adapter_dir(directory)
    return sum((directory / f).stat().st_size for f in ADAPTER_FILES if (directory / f).is_file())


def recorded_base_model(meta: dict, where: str | Path) -> str:
    """The base model an adapter config names (for loading it without --model).

    An embedded asset's cache folder recorded on another machine resolves to the asset's name.
    """
    from .assets import ASSETS

    name = meta["base_model"].get("name_or_path") or ""
    if not name:
        raise SoftPromptError(f"{where} does not name its base model; pass --model")
    if not Path(name).exists() and Path(name).name in ASSETS:
        return Path(name).name
    return name


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; refuses tensors that are not floating point, and NaN
    or infinite values, naming the tensor."""
    if not path.is_file():
        raise SoftPromptError(f"{path} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, OverflowError) as e:
        raise SoftPromptError(
            f"{path} is not a readable safetensors file ({e}); the file is corrupt"
        ) from e
    for key, value in tensors.items():
        if not value.is_floating_point():  # every adapter tensor is float32, bfloat16, ...
            dtype = str(value.dtype).removeprefix("torch.")
            raise SoftPromptError(
                f"{path}: tensor {key!r} has dtype {dtype}, not a floating-point dtype; the "
                "file was altered or not written by softprompt: restore it or retrain the adapter"
            )
        if not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise SoftPromptError(
                f"{path}: tensor {key!r} holds {bad} NaN or infinite values; the adapter is "
                "broken (trained with too high a learning rate?): retrain it"
            )
    return tensors


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, without reading the data."""
    if not path.is_file():
        raise SoftPromptError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, OverflowError) as e:
        raise SoftPromptError(
            f"{path} is not a readable safetensors file ({e}); the file is corrupt"
        ) from e


def _expected_shapes(
    model: SoftPromptModel, config: AdapterConfig, head: int | None, trainable: bool
) -> dict[str, tuple[int, ...]]:
    """The tensors (name -> shape) the file of ``config``'s adapter holds, from an adapter built
    on the meta device (nothing allocated)."""
    with torch.device("meta"):
        ad = METHODS[config.method][1](config, model.info, None)
        if head is not None:
            ad.set_task_head(head)
        tensors = ad.state_dict() if trainable else dict(ad.baked_tensors())
        if not trainable and head is not None:
            tensors.update({f"task_head.{k}": v for k, v in ad.task_head.state_dict().items()})
    return {k: tuple(v.shape) for k, v in tensors.items() if v is not None}


def _check_shapes(path: Path, got: dict, expected: dict) -> None:
    for key in sorted(set(expected) - set(got)):
        raise SoftPromptError(
            f"{path} lacks tensor {key!r} {expected[key]} that its adapter_config.json implies"
        )
    for key in sorted(got):
        if key not in expected:
            raise SoftPromptError(
                f"{path}: unexpected tensor {key!r}; the config implies {sorted(expected)}"
            )
        if got[key] != expected[key]:
            raise SoftPromptError(
                f"{path}: tensor {key!r} has shape {got[key]}, the adapter expects "
                f"{expected[key]} (adapter_config.json and the weights disagree)"
            )


def _check_baked_agrees(directory: Path, adapter) -> None:
    """A trainable.safetensors must reproduce the adapter.safetensors saved beside it."""
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        return
    with torch.no_grad():
        computed = dict(adapter.baked_tensors())
        if adapter.task_head is not None:
            computed.update(
                {f"task_head.{k}": v for k, v in adapter.task_head.state_dict().items()}
            )
    shapes = _header_shapes(weights)  # before reading: the file may claim anything

    def disagree(key: str, how: str) -> SoftPromptError:
        return SoftPromptError(
            f"{directory / TRAINABLE_NAME} and {weights} disagree: tensor {key!r} {how}; one "
            f"of them was replaced: delete {TRAINABLE_NAME} to use {WEIGHTS_NAME}"
        )

    for key, value in computed.items():
        if shapes.get(key) != tuple(value.shape):
            got = shapes.get(key, "missing")
            raise disagree(key, f"is {got} in {WEIGHTS_NAME}, {tuple(value.shape)} from the other")
    saved = _read_tensors(weights)
    for key, value in computed.items():
        a, b = value.detach().float().cpu(), saved[key].float()
        diff = (a - b).abs().max().item() if a.numel() else 0.0
        if diff > BAKED_TOLERANCE * (1 + b.abs().max().item()):
            raise disagree(key, f"computed from {TRAINABLE_NAME} differs by up to {diff:.3g}")
