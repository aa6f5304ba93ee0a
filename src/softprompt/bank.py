"""The adapter bank of a ``SoftPromptModel``: adding, deleting, activating, baking and saving
adapters, what trains, and which adapter each row of a call uses.

``AdapterBank`` is a mixin of ``SoftPromptModel`` (it reads the wrapper's ``adapters``
``ModuleDict``, ``base_model``, ``info``, ``tokenizer`` and kept tables); the forward path lives
in ``softprompt.model``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ._hf import check_virtual_tokens, identity_mismatches
from .errors import SoftPromptError
from .io import (
    CONFIG_NAME,
    TRAINABLE_NAME,
    WEIGHTS_NAME,
    _check_baked_agrees,
    _check_shapes,
    _expected_shapes,
    _header_shapes,
    _read_tensors,
    read_adapter_config,
    resolve_adapter_dir,
)
from .methods.base import METHODS, Adapter, AdapterConfig, InitContext


def is_adapter_key(key: str, name: str | None = None) -> bool:
    """The one predicate: does a parameter (by its name in the wrapper) belong to an adapter?

    ``name`` narrows it to one adapter. It decides what trains (``set_active``), what the
    optimiser sees (``trainable_parameters``) and what a checkpoint saves.
    """
    prefix = "adapters." if name is None else f"adapters.{name}."
    return key.startswith(prefix)


class AdapterBank:
    """Named adapters on one frozen model; one of them active (the default of a call)."""

    def add_adapter(
        self, name: str, config: AdapterConfig, tokenizer=None, *, _init: bool = True
    ) -> Adapter:
        """Create adapter ``name`` from ``config`` and make it the active one.

        Args:
            tokenizer: needed only for ``init="text"``/``"labels"`` with ``init_text``.
        """
        if not isinstance(name, str) or not name or "." in name or "/" in name:
            raise SoftPromptError(
                f"adapter name must be a non-empty string without '.' or '/', got {name!r}"
            )
        if name in self.adapters:
            raise SoftPromptError(
                f"an adapter named {name!r} already exists; delete_adapter it first"
            )
        if config.method not in METHODS:
            raise SoftPromptError(f"unknown method {config.method!r}")
        check_virtual_tokens(self.base_model, config.num_virtual_tokens)  # before allocating
        ctx = None
        if _init:
            gen = torch.Generator()
            if config.seed is not None:
                gen.manual_seed(config.seed)
            else:
                gen.seed()
            ctx = InitContext(self.base_model, self.info, tokenizer or self.tokenizer, gen)
        adapter = METHODS[config.method][1](config, self.info, ctx)
        self._kept.forget(name)
        self.adapters[name] = adapter.to(self.device)
        self.set_active(name)
        return adapter

    def delete_adapter(self, name: str) -> None:
        self._check_names([name])
        del self.adapters[name]
        self._kept.forget(name)
        if self.active == name:
            self.active = None

    def set_active(self, name: str | None) -> None:
        """Make ``name`` the adapter used when ``adapter_names`` is not given, and the only
        trainable one (None: the bare model, nothing trains)."""
        if name is not None:
            self._check_names([name])
        self.active = name
        self.set_trainable([] if name is None else [name])

    def set_trainable(self, names) -> None:
        """Make the adapters ``names`` (and nothing else) trainable. A parameter an adapter
        keeps frozen (``Adapter.trains``) stays frozen; one that several adapters hold (MPT's
        tied shared prompt) trains if any of them does."""
        want = set(names)
        on: dict[int, bool] = {}
        for owner, ad in self.adapters.items():
            for param, p in ad.named_parameters():
                on[id(p)] = on.get(id(p), False) or (owner in want and ad.trains(param))
        for p in self.parameters():
            p.requires_grad_(on.get(id(p), False))

    @contextlib.contextmanager
    def using(self, name: str | None) -> Iterator[AdapterBank]:
        """Make ``name`` the active adapter inside the block, the previous one again after it:
        picks the adapter of calls that pass no ``adapter_names``, such as a pipeline's
        (``with model.using("summary"): pipe(text)``). None: the bare model."""
        previous = self.active
        self.set_active(name)
        try:
            yield self
        finally:
            self.set_active(previous if previous in self.adapters else None)

    def bake(self, name: str | None = None) -> None:
        """Replace adapter ``name``'s reparameterisation by its output (inference form)."""
        name = name or self.active
        self._check_names([name])
        self.adapters[name].bake()
        self._kept.forget(name)
        self.set_active(self.active)

    def save_adapter(self, directory, name: str | None = None, *, trainable: bool = False):
        """Save adapter ``name`` (default: the active one); see ``softprompt.io.save_adapter``."""
        from .io import save_adapter

        return save_adapter(self, directory, name, trainable=trainable)

    def trainable_parameters(self) -> tuple[int, int, str]:
        """(trainable, total, printable line), e.g. 'trainable 230,400 of 134,745,408 (0.171%)'.

        Total counts the base model plus the adapters.
        """
        trainable = sum(p.numel() for k, p in self.named_parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        line = f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
        return trainable, total, line

    def parameters_to_train(self) -> list[nn.Parameter]:
        """What the optimiser sees: the active adapter's trainable parameters."""
        return [
            p
            for k, p in self.named_parameters()
            if is_adapter_key(k, self.active) and p.requires_grad
        ]

    def _check_names(self, names) -> None:
        unknown = sorted({n for n in names if n is not None and n not in self.adapters})
        if unknown:
            raise SoftPromptError(f"unknown adapter(s) {unknown}; loaded: {sorted(self.adapters)}")

    def _rows(self, adapter_names, batch: int) -> list[str | None]:
        if adapter_names is None:
            return [self.active] * batch
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names] * batch
        adapter_names = list(adapter_names)
        if len(adapter_names) != batch:
            raise SoftPromptError(
                f"adapter_names has {len(adapter_names)} entries for a batch of {batch} rows"
            )
        self._check_names(adapter_names)
        return adapter_names


def load_into(
    model, directory: str | Path, name: str | None = None, *, trainable: bool | None = None
):
    """``softprompt.load_adapter`` (its arguments, result and errors) for a ``model`` that is
    already a ``SoftPromptModel``; softprompt's own, run and PEFT folders alike."""
    directory = resolve_adapter_dir(directory)
    meta = read_adapter_config(directory)
    path = directory / CONFIG_NAME
    if "peft" in meta:
        from .peft_compat import load_peft

        return load_peft(model, directory, meta, name)
    diffs = identity_mismatches(meta["base_model"], model.info.identity)
    if diffs:
        made_for = meta["base_model"].get("name_or_path") or meta["base_model"].get("architecture")
        raise SoftPromptError(
            f"adapter {directory} was made for another base model ({made_for}): " + "; ".join(diffs)
        )
    try:
        config = AdapterConfig.from_dict(meta["config"])
        check_virtual_tokens(model.base_model, config.num_virtual_tokens)
    except SoftPromptError as e:
        raise SoftPromptError(f"{path}: field 'config': {e}") from e
    name = name or meta.get("name") or "default"
    has_trainable = (directory / TRAINABLE_NAME).is_file()
    if trainable and not has_trainable:
        raise SoftPromptError(
            f"{directory} holds only the baked inference form; it was not saved with trainable=True"
        )
    use_trainable = has_trainable if trainable is None else trainable
    head = int(meta["task_head"][1]) if meta.get("task_head") else None
    file = directory / (TRAINABLE_NAME if use_trainable else WEIGHTS_NAME)
    try:  # shapes from the header, before anything of the config's size is allocated
        expected = _expected_shapes(model, config, head, use_trainable)
    except SoftPromptError as e:
        raise SoftPromptError(f"{path}: field 'config': {e}") from e
    _check_shapes(file, _header_shapes(file), expected)
    tensors = _read_tensors(file)
    adapter = model.add_adapter(name, config, _init=False)
    adapter.task = meta.get("task")
    adapter.position_offset = int(meta.get("position_offset") or 0)
    adapter.source = meta.get("source")
    if head is not None:
        adapter.set_task_head(head).to(model.device)
    try:
        if use_trainable:
            params = dict(adapter.named_parameters())
            with torch.no_grad():
                for key, val in tensors.items():
                    if key in params:
                        params[key].copy_(val)
            _check_baked_agrees(directory, adapter)
        else:
            head_state = {
                k[10:]: tensors.pop(k) for k in list(tensors) if k.startswith("task_head.")
            }
            if adapter.task_head is not None:
                adapter.task_head.load_state_dict(head_state)
            with torch.no_grad():
                adapter.load_baked({k: v.to(model.device) for k, v in tensors.items()})
    except Exception:
        model.delete_adapter(name)
        raise
    model.set_active(name)
    return model
