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

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from ._hf import SoftPromptError, identity_mismatches
from .methods.base import AdapterConfig
from .model import SoftPromptModel, attach

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
TRAINABLE_NAME = "trainable.safetensors"
FORMAT = "softprompt-adapter"


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
    slots = [model.info.slots[s].key for s in ad.layout.slots] if hasattr(ad, "layout") else []
    return {
        "format": FORMAT,
        "format_version": 1,
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


def read_adapter_config(directory: str | Path) -> dict:
    """Read and validate ``adapter_config.json``; errors name the file and what is wrong.

    A PEFT prompt-learning folder (``peft_type`` in its config) reads as the softprompt config
    it converts to (``softprompt.peft_compat.peft_meta``), with the PEFT config under ``peft``.
    """
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise SoftPromptError(f"adapter directory {directory} does not exist")
    if not path.is_file():
        raise SoftPromptError(f"{path} is missing: {directory} is not a softprompt adapter")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SoftPromptError(f"{path} is not valid JSON ({e}); the file is corrupt") from e
    if isinstance(meta, dict) and "peft_type" in meta:  # a PEFT folder: softprompt.peft_compat
        from .peft_compat import peft_meta

        return peft_meta(Path(directory), meta)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SoftPromptError(f"{path}: 'format' is not {FORMAT!r}; not a softprompt adapter")
    for field in ("method", "config", "base_model"):
        if field not in meta:
            raise SoftPromptError(f"{path}: missing field {field!r}")
    return meta


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
    if not path.is_file():
        raise SoftPromptError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SoftPromptError(
            f"{path} is not a readable safetensors file ({e}); the file is corrupt"
        ) from e


def load_adapter(
    model, directory: str | Path, name: str | None = None, *, trainable: bool | None = None
) -> SoftPromptModel:
    """Load an adapter directory onto a base model or a ``SoftPromptModel``.

    The directory may also be a PEFT prompt-learning folder (``softprompt.peft_compat``): it
    loads with the logits ``PeftModel.from_pretrained`` gives.

    Args:
        model: a transformers model (attached first) or a ``SoftPromptModel``.
        name: name to give it (default: the name it was saved under).
        trainable: restore the trainable form (needs ``trainable.safetensors``). Default: when
            present.

    Returns:
        The ``SoftPromptModel``, with the loaded adapter active.

    Raises:
        SoftPromptError: missing or corrupt files, or an adapter made for another base model.
    """
    directory = Path(directory)
    meta = read_adapter_config(directory)
    model = model if isinstance(model, SoftPromptModel) else attach(model)
    if "peft" in meta:
        from .peft_compat import load_peft

        return load_peft(model, directory, meta, name)
    diffs = identity_mismatches(meta["base_model"], model.info.identity)
    if diffs:
        made_for = meta["base_model"].get("name_or_path") or meta["base_model"].get("architecture")
        raise SoftPromptError(
            f"adapter {directory} was made for another base model ({made_for}): " + "; ".join(diffs)
        )
    config = AdapterConfig.from_dict(meta["config"])
    name = name or meta.get("name") or "default"
    has_trainable = (directory / TRAINABLE_NAME).is_file()
    if trainable and not has_trainable:
        raise SoftPromptError(
            f"{directory} holds only the baked inference form; it was not saved with trainable=True"
        )
    use_trainable = has_trainable if trainable is None else trainable
    adapter = model.add_adapter(name, config, _init=False)
    adapter.task = meta.get("task")
    adapter.position_offset = int(meta.get("position_offset") or 0)
    adapter.source = meta.get("source")
    if meta.get("task_head"):
        adapter.set_task_head(int(meta["task_head"][1])).to(model.device)
    try:
        if use_trainable:
            state = _read_tensors(directory / TRAINABLE_NAME)
            missing = set(adapter.state_dict()) - set(state) - {"baked"}
            if missing:
                raise SoftPromptError(
                    f"{directory / TRAINABLE_NAME} lacks tensors {sorted(missing)}"
                )
            for key, val in state.items():
                target = dict(adapter.named_parameters()).get(key)
                if target is None or target.shape != val.shape:
                    raise SoftPromptError(
                        f"{directory / TRAINABLE_NAME}: tensor {key!r} has shape {tuple(val.shape)}, "
                        f"the adapter expects {None if target is None else tuple(target.shape)}"
                    )
                with torch.no_grad():
                    target.copy_(val)
        else:
            tensors = _read_tensors(directory / WEIGHTS_NAME)
            head = {k[10:]: tensors.pop(k) for k in list(tensors) if k.startswith("task_head.")}
            if adapter.task_head is not None:
                try:
                    adapter.task_head.load_state_dict(head)
                except RuntimeError as e:
                    raise SoftPromptError(f"{directory / WEIGHTS_NAME}: bad task head ({e})") from e
            expected = {k: tuple(v.shape) for k, v in adapter.baked_tensors().items()}
            got = {k: tuple(v.shape) for k, v in tensors.items()}
            if expected != got:
                raise SoftPromptError(
                    f"{directory / WEIGHTS_NAME} holds {got}, the config implies {expected}"
                )
            with torch.no_grad():
                adapter.load_baked({k: v.to(model.device) for k, v in tensors.items()})
    except Exception:
        model.delete_adapter(name)
        raise
    model.set_active(name)
    return model
