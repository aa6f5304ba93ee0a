"""Export adapters for engines that take prompt embeddings or a key/value prefix.

    softprompt export runs/prompt/adapter --format prompt-embeds      # -> prompt_embeds.safetensors
    softprompt export runs/prefix/adapter --format prefix-kv          # -> prefix_kv.safetensors
    softprompt export runs/prefix/adapter --format peft --output OUT  # -> a PEFT folder

Two safetensors layouts (metadata: string key -> string value, JSON where structured):

* ``prompt-embeds`` (prompt tuning, P-tuning): one tensor ``prompt_embeds`` of shape
  (P, hidden), the baked virtual-token embeddings. Put them before the embeddings of the real
  tokens (``placement`` "prepend"; "append": after them; "template": where the ``template``'s
  ``[soft:N]`` segments are, in order) and feed the result as ``inputs_embeds`` (transformers)
  or ``prompt_embeds`` (vLLM). Positions run over the whole sequence, virtual tokens included,
  as in softprompt.
* ``prefix-kv`` (prefix tuning, deep prompts): per attention slot ``layers.{i}.key`` and
  ``layers.{i}.value`` (decoder-only; encoder-decoder slots are ``encoder.layers.{i}``,
  ``decoder.layers.{i}`` and ``cross.layers.{i}``), each of shape (num_kv_heads, P, head_dim):
  a cache entry of batch 1. Keys carry no position embedding (no rotary), and softprompt gives
  the real tokens positions 0..T-1 (the prefix takes none). docs/serving.md shows how to use
  them as a transformers ``DynamicCache`` prefix.

The ``peft`` format writes a PEFT prompt-learning folder (``softprompt.peft_compat``).

The prefix-kv and peft exports load the base model (to split the flat prefix into heads).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import SoftPromptError
from .io import (
    WEIGHTS_NAME,
    _read_tensors,
    atomic_write,
    check_output_path,
    read_adapter_config,
    resolve_adapter_dir,
)

FORMATS = {
    "prompt-embeds": "prompt_embeds.safetensors",
    "prefix-kv": "prefix_kv.safetensors",
    "peft": "peft",  # a folder
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def slot_tensor_name(slot_key: str) -> str:
    """``"self.3"`` -> ``"layers.3"``; ``"cross.1"`` -> ``"cross.layers.1"``."""
    kind, layer = slot_key.split(".")
    return f"layers.{layer}" if kind == "self" else f"{kind}.layers.{layer}"


_GATED = (
    "{d} is an adaption prompt: gated adapter tokens with their own softmax in each adapted "
    "layer, neither input embeddings nor a key/value prefix another engine can take; "
    "--format peft writes it as PEFT's ADAPTION_PROMPT"
)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    meta = read_adapter_config(directory)
    if "peft" in meta:  # a PEFT folder: its prompt or prefix, by what it is
        from .peft_compat import (
            ADAPTION_TYPE,
            MPT_TYPE,
            PROMPT_TYPES,
            read_peft_prompt,
            read_peft_weights,
        )

        ptype = meta["peft"]["peft_type"]
        if ptype == ADAPTION_TYPE:
            raise SoftPromptError(_GATED.format(d=directory))
        if ptype in (*PROMPT_TYPES, MPT_TYPE):  # MPT: task 0's baked prompt
            return {"prompt": read_peft_prompt(directory, meta)}
        return {"prefix": read_peft_weights(directory)}
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise SoftPromptError(f"{path} is missing: {directory} is not a saved adapter")
    tensors = _read_tensors(path)  # refuses a corrupt file and NaN / infinite values
    if "adaption_prompt" in tensors:
        raise SoftPromptError(_GATED.format(d=directory))
    return tensors


def _common_metadata(meta: dict, fmt: str) -> dict[str, str]:
    base = meta["base_model"]
    return {
        "format": f"softprompt-{fmt}",
        "format_version": "1",
        "library_version": __version__,
        "method": meta["method"],
        "num_virtual_tokens": str(meta["config"]["num_virtual_tokens"]),
        "adapter_config": json.dumps(meta["config"]),
        "base_model": str(base.get("name_or_path", "")),
        "model_type": str(base.get("model_type", "")),
        "template": (meta.get("task") or {}).get("template", ""),
    }


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=metadata))


def _cast(t: torch.Tensor, dtype: str | None) -> torch.Tensor:
    return t if dtype is None else t.to(DTYPES[dtype])


def export_prompt_embeds(
    directory: str | Path, output: str | Path | None = None, dtype: str | None = None
) -> Path:
    """Write an input-level adapter's virtual tokens as ``prompt_embeds`` (P, hidden).

    Returns:
        The file written (default: ``DIR/prompt_embeds.safetensors``).
    """
    directory = resolve_adapter_dir(directory)  # an adapter, or the run folder train wrote
    meta = read_adapter_config(directory)
    tensors = _weights(directory)
    if "prompt" not in tensors:
        raise SoftPromptError(
            f"{directory} is a {meta['method']} adapter: its prompt lives inside attention, not "
            "in the input embeddings; export it with --format prefix-kv"
        )
    prompt = _cast(tensors["prompt"], dtype)  # (P, hidden)
    md = _common_metadata(meta, "prompt-embeds")
    md.update(
        hidden_size=str(prompt.shape[1]),
        placement=str(meta["config"].get("placement", "prepend")),
        positions="virtual tokens count as tokens: they take positions like real ones",
    )
    path = Path(output) if output else directory / FORMATS["prompt-embeds"]
    _save(path, {"prompt_embeds": prompt}, md)
    return path


def _load_model(name: str):
    """The base model alone (float32, CPU): no tokenizer needed to export."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from .assets import resolve_model
    from .loading import model_kind

    cls = {"seq2seq": AutoModelForSeq2SeqLM, "causal": AutoModelForCausalLM, "encoder": AutoModel}
    try:
        return cls[model_kind(name)].from_pretrained(resolve_model(name), dtype=torch.float32)
    except OSError as e:
        raise SoftPromptError(f"cannot load model {name!r}: {e}") from e


def export_prefix_kv(
    directory: str | Path,
    output: str | Path | None = None,
    model: str | None = None,
    dtype: str | None = None,
) -> Path:
    """Write a prefix/deep adapter's per-slot keys and values, each (num_kv_heads, P, head_dim).

    Args:
        model: the base model (default: the one the adapter names); loaded to read its
            attention geometry, and checked against the adapter.

    Returns:
        The file written (default: ``DIR/prefix_kv.safetensors``).
    """
    import softprompt as sp

    directory = resolve_adapter_dir(directory)  # an adapter, or the run folder train wrote
    meta = read_adapter_config(directory)
    if "prefix" not in _weights(directory):
        raise SoftPromptError(
            f"{directory} is a {meta['method']} adapter: its virtual tokens are input "
            "embeddings, not keys and values; export it with --format prompt-embeds"
        )
    name = model or meta["base_model"].get("name_or_path")
    if not name:
        raise SoftPromptError(f"{directory} does not name its base model; pass --model")
    base = _load_model(name)
    wrapped = sp.load_adapter(base, directory, name="export")
    info = wrapped.info
    tensors, slots = {}, []
    with torch.no_grad():
        for s, (k, v) in sorted(wrapped.adapters["export"].kv().items()):
            key = info.slots[s].key
            slots.append(key)
            stem = slot_tensor_name(key)
            tensors[f"{stem}.key"] = _cast(k.permute(1, 0, 2), dtype)  # (kvh, P, hd)
            tensors[f"{stem}.value"] = _cast(v.permute(1, 0, 2), dtype)
    md = _common_metadata(meta, "prefix-kv")
    offset = wrapped.adapters["export"].position_offset  # imported from PEFT: P
    md.update(
        position_offset=str(offset),
        slots=json.dumps(slots),
        tensor_names=json.dumps({s: slot_tensor_name(s) for s in slots}),
        layout="(num_kv_heads, num_virtual_tokens, head_dim)",
        covers_all_layers=json.dumps(len(slots) == len(info.slots)),
        positions=(
            f"keys carry no position embedding; real tokens take positions {offset}..{offset}+T-1 "
            "(with rotary models pass position_ids, see docs/serving.md)"
        ),
    )
    path = Path(output) if output else directory / FORMATS["prefix-kv"]
    _save(path, tensors, md)
    return path


def export_peft(
    directory: str | Path,
    output: str | Path | None = None,
    model: str | None = None,
    dtype: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Write an adapter as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``)
    that ``PeftModel.from_pretrained(base, output)`` loads with the same logits.

    Prompt tuning and P-tuning become PEFT ``PROMPT_TUNING`` (baked embeddings), prefix tuning and
    deep prompts on every layer ``PREFIX_TUNING``; what PEFT cannot express is refused (see
    ``softprompt.peft_compat.peft_tensor_and_config``). PEFT keeps no task template: one other
    than ``"{input}"`` is dropped, and ``warn`` (default ``warnings.warn``) says so.

    Args:
        model: the base model (default: the one the adapter names); loaded to read its geometry
            (and its rotary embedding, to move a prefix to PEFT's positions).
        warn: called with the message when the adapter's template is dropped.

    Returns:
        The folder written (default: ``DIR/peft``).
    """
    import softprompt as sp

    from .io import recorded_base_model
    from .peft_compat import save_peft

    directory = resolve_adapter_dir(directory)  # an adapter, or the run folder train wrote
    meta = read_adapter_config(directory)
    name = model or recorded_base_model(meta, directory)
    adapter = meta.get("name") or "export"  # a fresh model: its own name, for messages
    wrapped = sp.load_adapter(_load_model(name), directory, name=adapter)
    out = Path(output) if output else directory / FORMATS["peft"]
    return save_peft(
        wrapped, out, adapter, base_name=name, dtype=DTYPES.get(dtype or ""), warn=warn
    )


def export_adapter(
    directory: str | Path,
    fmt: str,
    output: str | Path | None = None,
    model: str | None = None,
    dtype: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Export ``directory`` in format ``fmt`` ("prompt-embeds", "prefix-kv" or "peft");
    ``warn``: see ``export_peft``."""
    if fmt == "prompt-embeds":
        return export_prompt_embeds(directory, output, dtype)
    if fmt == "prefix-kv":
        return export_prefix_kv(directory, output, model, dtype)
    if fmt == "peft":
        return export_peft(directory, output, model, dtype, warn)
    raise SoftPromptError(f"--format must be one of {sorted(FORMATS)}, got {fmt!r}")


def cmd_export(args) -> dict:
    """``softprompt export``: one JSON line (output, format, tensor shapes; for ``--format
    peft`` of an adapter with a task template, the dropped ``template``), warnings on stderr."""
    warned: list[str] = []

    def warn(message: str) -> None:
        warned.append(message)
        print(f"warning: {message}", file=sys.stderr)

    if args.output:  # before any model loads: a bad path fails at once
        check_output_path(
            args.output, "--output", FORMATS[args.format], folder=args.format == "peft"
        )
    path = export_adapter(args.adapter, args.format, args.output, args.model, args.dtype, warn)
    tensors = load_file(str(path / "adapter_model.safetensors" if path.is_dir() else path))
    summary = {
        "output": str(path),
        "format": args.format,
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
    if warned:  # the template PEFT has no place for (export_peft)
        meta = read_adapter_config(resolve_adapter_dir(args.adapter))
        summary["template"] = (meta.get("task") or {}).get("template")
        summary["warnings"] = warned
    print(json.dumps(summary))
    return summary


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``softprompt export`` on a subparsers object."""
    p = subparsers.add_parser(
        "export",
        help="write an adapter as prompt embeddings or a key/value prefix for other engines",
        description="See docs/serving.md for how engines and transformers consume the files.",
    )
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter.safetensors)")
    p.add_argument(
        "--format",
        required=True,
        choices=sorted(FORMATS),
        help="prompt-embeds: prompt/P-tuning adapters; prefix-kv: prefix/deep adapters; "
        "peft: a PEFT folder (PeftModel.from_pretrained) of any adapter PEFT can express",
    )
    p.add_argument(
        "--output",
        help="file (folder for peft) to write (default: DIR/prompt_embeds.safetensors, "
        "DIR/prefix_kv.safetensors, DIR/peft)",
    )
    p.add_argument(
        "--model", help="prefix-kv, peft: the base model (default: the one the adapter names)"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast the tensors (default: as saved)")
    p.set_defaults(func=cmd_export)
    return p
