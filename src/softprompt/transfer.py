"""Prompt transfer (SPoT: Vu et al. 2022, "SPoT: Better Frozen Model Adaptation through Soft
Prompt Transfer", arXiv 2110.07904).

* ``init_from(model, name, directory)``: start adapter ``name`` from a trained adapter of the same
  method, shape and base model (``softprompt train --init-from ADAPTER``): its parameters are
  copied exactly (the trainable form when the folder has one, else the saved prompt).
* ``similarity(target, source)``: the paper's task-embedding similarities between two prompts
  (P, d) and (Q, d): ``mean`` is the cosine of the mean-pooled prompts, ``tokens`` the average
  cosine over every pair of virtual tokens, (1/PQ) sum_i sum_j cos(t_i, s_j).
* ``rank_library``: every adapter in a folder, ranked by similarity to a target prompt
  (``softprompt similar ADAPTER --library DIR``). Input-level methods compare their virtual-token
  embeddings; prefix methods their keys and values, one row per virtual token.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import SoftPromptError
from .model import SoftPromptModel

METRICS = ("mean", "tokens")


def init_from(model: SoftPromptModel, name: str, directory: str | Path) -> None:
    """Copy the trained adapter in ``directory`` into adapter ``name`` of ``model``.

    Raises:
        SoftPromptError: a folder made for another base model (the check ``load_adapter``
            makes), another method, or another shape (virtual tokens, layers, widths).
    """
    from .bank import load_into
    from .io import read_adapter_config, resolve_adapter_dir

    directory = resolve_adapter_dir(directory)
    meta = read_adapter_config(directory)
    target = model.adapters[name]
    if meta["method"] != target.config.method:
        raise SoftPromptError(
            f"--init-from {directory}: it is a {meta['method']!r} adapter, this run trains "
            f"{target.config.method!r}; give an adapter of the same --method"
        )
    tmp = f"{name}__init_from"
    active = model.active
    try:
        load_into(model, directory, tmp)  # base-model, file and shape checks
    except SoftPromptError as e:
        raise SoftPromptError(f"--init-from: {e}") from e
    try:
        src = model.adapters[tmp]
        if src.is_baked:  # its parameters were never loaded: only what they give is
            raise SoftPromptError(
                f"--init-from {directory} holds only the baked (inference) form of a "
                f"{target.config.method} adapter, not the reparameterisation this run trains: "
                "give a folder saved with its trainable form (a run's checkpoint/, or "
                "save_adapter(..., trainable=True))"
            )
        got = {k: v for k, v in src.named_parameters()}
        mine = dict(target.named_parameters())
        diffs = [
            f"{k}: {tuple(got[k].shape) if k in got else 'missing'} vs {tuple(p.shape)}"
            for k, p in mine.items()
            if k not in got or got[k].shape != p.shape
        ]
        if diffs:
            raise SoftPromptError(
                f"--init-from {directory} has another shape than this run's adapter ("
                + "; ".join(diffs)
                + "): give the flags it was trained with (--num-virtual-tokens, --layers, ...)"
            )
        with torch.no_grad():
            for k, p in mine.items():
                p.copy_(got[k])
    finally:
        if tmp in model.adapters:
            model.delete_adapter(tmp)
        model.set_active(active)


def prompt_rows(adapter) -> torch.Tensor:
    """(P, D) one row per virtual token: the input embeddings, a prefix's keys and values of
    every layer concatenated, or an adaption prompt's per-layer prompts concatenated."""
    with torch.no_grad():
        prompt = adapter.input_prompt()
        if prompt is not None:
            return prompt.detach().float()
        kv = adapter.kv()
        gated = adapter.gated_prompts()
        if not kv and gated:  # adaption prompts: each adapted layer's prompt, concatenated
            return torch.cat([gated[s][0] for s in sorted(gated)], dim=1).detach().float()
        if not kv:
            raise SoftPromptError(f"a {adapter.config.method} adapter has no prompt to compare")
        p = adapter.num_virtual_tokens
        parts = [t.reshape(p, -1) for slot in sorted(kv) for t in kv[slot]]  # each (P, h*hd)
        return torch.cat(parts, dim=1).detach().float()


def similarity(target: torch.Tensor, source: torch.Tensor) -> dict[str, float]:
    """SPoT's prompt similarities of (P, D) and (Q, D): ``mean`` (cosine of the mean-pooled
    prompts) and ``tokens`` (average cosine over all P x Q token pairs)."""
    if target.shape[1] != source.shape[1]:
        raise SoftPromptError(
            f"prompts of width {target.shape[1]} and {source.shape[1]} cannot be compared"
        )
    mean = F.cosine_similarity(target.mean(0), source.mean(0), dim=0)
    tokens = (F.normalize(target, dim=-1) @ F.normalize(source, dim=-1).T).mean()
    return {"mean": float(mean), "tokens": float(tokens)}


def library_folders(library: str | Path) -> list[Path]:
    """The adapter folders in ``library``: every sub-folder (searched to any depth) with an
    ``adapter_config.json``, a run folder counted once (its ``adapter/``, not ``checkpoint/``)."""
    root = Path(library)
    if not root.is_dir():
        raise SoftPromptError(f"--library {root} is not a folder")
    found = sorted(p.parent for p in root.rglob("adapter_config.json"))
    return [p for p in found if p.name not in ("checkpoint", "checkpoint.old")]


def rank_library(
    model: SoftPromptModel,
    target: str,
    library: str | Path,
    metric: str = "mean",
    skip_bad: bool = False,
    warn=None,
) -> list[dict]:
    """Adapters of ``library`` ranked by similarity to adapter ``target`` of ``model``.

    Adapters of another method, base model or width are listed as skipped (with why), never
    compared. A corrupt adapter folder is an error naming it (``skip_bad``: a warning, skipped).

    Returns:
        One dict per adapter folder: ``adapter``, ``mean``, ``tokens`` (SPoT's similarities),
        best first by ``metric``; skipped ones last with ``skipped``.
    """
    from .bank import load_into
    from .io import read_adapter_config

    if metric not in METRICS:
        raise SoftPromptError(f"--metric must be one of {list(METRICS)}, got {metric!r}")
    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    mine = prompt_rows(model.adapters[target])
    method = model.adapters[target].config.method
    folders = library_folders(library)
    if not folders:
        raise SoftPromptError(f"--library {library} holds no adapter folders (adapter_config.json)")
    ranked, skipped = [], []
    try:
        for folder in folders:
            try:
                meta = read_adapter_config(folder)
                if meta["method"] != method:
                    skipped.append({"adapter": str(folder), "skipped": f"method {meta['method']}"})
                    continue
                load_into(model, folder, "__library")
            except SoftPromptError as e:
                if "another base model" in str(e):
                    skipped.append({"adapter": str(folder), "skipped": "another base model"})
                    continue
                if not skip_bad:
                    raise SoftPromptError(
                        f"--library: {folder} is not a usable adapter ({e}); fix or remove it, or "
                        "pass --skip-bad"
                    ) from e
                warn(f"skipped {folder}: {e}")
                continue
            try:
                theirs = prompt_rows(model.adapters["__library"])
                if theirs.shape[1] != mine.shape[1]:
                    skipped.append({"adapter": str(folder), "skipped": "another prompt width"})
                    continue
                ranked.append({"adapter": str(folder), **similarity(mine, theirs)})
            finally:
                model.delete_adapter("__library")
    finally:
        model.set_active(target)
    ranked.sort(key=lambda r: -r[metric])
    return ranked + skipped


def cmd_similar(args) -> list[dict]:
    """``softprompt similar ADAPTER --library DIR``: JSON lines, most similar first."""
    import softprompt as sp

    from .io import read_adapter_config, recorded_base_model
    from .loading import load_base

    meta = read_adapter_config(args.adapter)
    base, tok = load_base(args.model or recorded_base_model(meta, args.adapter), "float32")
    model = sp.load_adapter(base, args.adapter, name="target")
    ranked = rank_library(model, "target", args.library, args.metric, args.skip_bad)
    for r in ranked[: args.top_k] if args.top_k else ranked:
        print(json.dumps(r))
    return ranked


def add_similar_parser(sub) -> None:
    from .cli import _int_at_least

    s = sub.add_parser(
        "similar",
        help="rank a folder of adapters by prompt similarity to a (briefly trained) adapter "
        "(SPoT's retrieval; pick one for train --init-from)",
    )
    s.add_argument("adapter", help="the target task's adapter (or run folder)")
    s.add_argument("--library", required=True, help="folder of adapters (searched recursively)")
    s.add_argument(
        "--metric",
        choices=list(METRICS),
        default="mean",
        help="mean: cosine of the mean-pooled prompts; tokens: average cosine over all "
        "virtual-token pairs (default: %(default)s)",
    )
    s.add_argument("--model", help="base model (default: the one the adapter names)")
    s.add_argument(
        "--top-k", type=_int_at_least(0), default=0, help="print only the first K (0: all)"
    )
    s.add_argument("--skip-bad", action="store_true", help="warn about and skip corrupt folders")
    s.set_defaults(func=cmd_similar)
