"""How many processes a training run was asked for, and a loud failure when it got fewer.

Data-parallel training starts one process per rank:

    accelerate launch --multi_gpu --num_processes 2 -m softprompt.cli train ...   # torchrun inside
    torchrun --nproc_per_node 2 -m softprompt.cli train ...

``--multi_gpu`` is accelerate's name for its torchrun launcher; on a machine without GPUs it starts
the same N processes, and each one's ``Accelerator(cpu=True)`` joins a gloo group
(``DistributedType.MULTI_CPU``). Without it, ``accelerate launch --num_processes N`` (and
``--cpu``) uses its *simple* launcher, which starts ONE process whatever N says, and that process
sees no ``WORLD_SIZE``: training would run on one rank and look as if it worked.
``check_world_size`` turns that into an error that says which command to use.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import SoftPromptError

_COUNT_FLAGS = ("--num_processes", "--num-processes", "--nproc_per_node", "--nproc-per-node")


def _flag_value(argv: list[str], names: tuple[str, ...]) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def launcher_request(argv: list[str]) -> int | None:
    """The process count an ``accelerate launch`` / ``torchrun`` command line asks for, or None
    when ``argv`` is not such a launcher (or names no count)."""
    words = [os.path.basename(a) for a in argv[:4]]
    is_accelerate = any(w in ("accelerate", "accelerate.commands.launch") for w in words) and (
        "launch" in words or "accelerate.commands.launch" in words
    )
    is_torchrun = any(w in ("torchrun", "torch.distributed.run") for w in words)
    if not (is_accelerate or is_torchrun):
        return None
    value = _flag_value(argv, _COUNT_FLAGS)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _parent_argv() -> list[str]:
    try:
        import psutil  # a dependency of accelerate

        return psutil.Process(os.getppid()).cmdline()
    except Exception:  # no parent to read (exited, other OS, permissions): nothing to check
        return []


def requested_processes() -> int | None:
    """How many processes the launcher of this one was asked for: ``WORLD_SIZE`` when a
    distributed launcher set it, else the ``--num_processes`` of a parent ``accelerate launch``
    (whose simple launcher sets nothing), else None (a plain ``softprompt train``)."""
    world = os.environ.get("WORLD_SIZE")
    if world and world.isdigit():
        return int(world)
    return launcher_request(_parent_argv())


def check_world_size(got: int) -> None:
    """Raise when the launcher was asked for more processes than the run has.

    Args:
        got: the number of processes the run's ``Accelerator`` sees.
    """
    asked = requested_processes()
    if asked is not None and asked > got:
        raise SoftPromptError(
            f"the launcher was asked for {asked} processes but this run has {got}: "
            "`accelerate launch --num_processes N` without --multi_gpu starts a single process. "
            f"Use `accelerate launch --multi_gpu --num_processes {asked} -m softprompt.cli train "
            f"...` (on a CPU machine it starts {asked} gloo processes) or `torchrun "
            f"--nproc_per_node {asked} -m softprompt.cli train ...`"
        )


# --------------------------------------------------------------------------------------------
# A frozen base sharded across the processes (FSDP2), the adapter replicated.
# --------------------------------------------------------------------------------------------


def fsdp_requested(flag: bool = False) -> bool:
    """``--fsdp``, or an ``accelerate launch --use_fsdp`` / FSDP config (``ACCELERATE_USE_FSDP``)."""
    return flag or _env_true("ACCELERATE_USE_FSDP")


def _env_true(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("true", "1", "yes")


@dataclass(frozen=True)
class FsdpSettings:
    """What softprompt's sharding takes from an ``accelerate launch --use_fsdp`` / FSDP config.

    accelerate passes the config to its processes as ``FSDP_*`` environment variables. softprompt
    shards the frozen base itself (``shard_frozen_base``: one FSDP2 unit per decoder block, the
    adapter replicated), so of those it takes:

    Attributes:
        reshard_after_forward: ``fsdp_reshard_after_forward`` (FSDP2 configs), or
            ``fsdp_sharding_strategy`` (FSDP1 configs): ``SHARD_GRAD_OP`` keeps each block's
            gathered weights from forward to backward (ZeRO-2), ``FULL_SHARD`` frees them.
        activation_checkpointing: ``fsdp_activation_checkpointing``: recompute the blocks'
            activations in backward (``--gradient-checkpointing``).
        ignored: the config's settings this sharding does not apply, as
            ``"fsdp_name value (why)"``, for a one-line warning.
    """

    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    ignored: tuple[str, ...] = ()


def accelerate_fsdp_settings() -> FsdpSettings:
    """The FSDP settings an ``accelerate launch`` FSDP config gave this process (defaults where
    it was not launched with one)."""
    if not _env_true("ACCELERATE_USE_FSDP"):
        return FsdpSettings()
    env = os.environ.get
    strategy = env("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
    ignored = []
    if env("FSDP_VERSION", "1").strip() == "2":
        reshard = _env_true("FSDP_RESHARD_AFTER_FORWARD", "true")
    else:  # FSDP1 names: a number (accelerate's old form) or the strategy's name
        strategy = {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP", "3": "NO_SHARD"}.get(
            strategy, strategy
        )
        reshard = strategy != "SHARD_GRAD_OP"
        if strategy not in ("FULL_SHARD", "SHARD_GRAD_OP"):
            ignored.append(
                f"fsdp_sharding_strategy {strategy} (every decoder block is sharded across all "
                "processes, as FULL_SHARD)"
            )
    if _env_true("FSDP_OFFLOAD_PARAMS"):
        ignored.append("fsdp_offload_params true (the blocks' shards stay on the device)")
    policy = env("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip().upper()
    if policy not in ("TRANSFORMER_BASED_WRAP", ""):
        ignored.append(f"fsdp_auto_wrap_policy {policy} (one FSDP unit per decoder block)")
    return FsdpSettings(reshard, _env_true("FSDP_ACTIVATION_CHECKPOINTING"), tuple(ignored))


@contextmanager
def accelerator_env():
    """Make an ``Accelerator`` for a run that softprompt shards itself: accelerate's own FSDP
    plugin (from ``ACCELERATE_USE_FSDP``) is kept out, since it wants an accelerator device even
    where no model is given to it to wrap, and the flag is put back for ``fsdp_requested``. A
    DeepSpeed launch is refused (its engine would wrap a model softprompt never hands it)."""
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        raise SoftPromptError(
            "accelerate launch --use_deepspeed (a DeepSpeed config) is not supported: softprompt "
            "shards the frozen base itself with FSDP2; launch with `accelerate launch "
            "--use_fsdp ...` or an FSDP config (ZeRO-3's sharding of the frozen weights), or "
            "--multi_gpu for data parallel"
        )
    saved = os.environ.get("ACCELERATE_USE_FSDP")
    if saved is not None:
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


_MIXED_PRECISION = {"no": None, "bf16": "bfloat16", "fp16": "float16"}


def launch_dtype(dtype: str | None, warn: Callable[[str], None]) -> str:
    """``--dtype`` as given, else the precision ``accelerate launch --mixed_precision`` (or the
    accelerate config) asked for: ``bf16`` runs the frozen base in bfloat16, ``fp16`` in float16
    with loss scaling, both with float32 adapters and optimiser state; else float32.

    The frozen base has no weights to keep in float32, so running it in the half type is what
    mixed precision means here (autocast would keep float32 copies of weights that never
    change). An explicit ``--dtype`` wins, with a warning when the launch asked for another.
    """
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"
    if asked not in _MIXED_PRECISION:
        raise SoftPromptError(
            f"accelerate launch --mixed_precision {asked}: softprompt runs the frozen base in "
            "float32, bfloat16 or float16; launch with --mixed_precision no, bf16 or fp16 "
            "(or give --dtype)"
        )
    mapped = _MIXED_PRECISION[asked]
    if dtype is None:
        return mapped or "float32"
    if mapped is not None and mapped != dtype:
        warn(
            f"accelerate launch --mixed_precision {asked} is not used: --dtype {dtype} sets the "
            "base model's precision"
        )
    return dtype


def shard_frozen_base(
    model, device: torch.device | str | None = None, reshard_after_forward: bool = True
) -> int:
    """Shard every decoder block of ``model``'s frozen base across the processes.

    Each block becomes an FSDP2 unit (``torch.distributed.fsdp.fully_shard`` over a 1-D mesh of
    all processes): a process keeps 1/N of each block's weights and gathers a block's weights
    only while that block runs, forward and backward. The adapter is not sharded: every process
    holds it whole, its gradients are summed across processes as in data parallel, and the main
    process saves it. The input embeddings, final norm and LM head stay whole as well: they run
    outside the blocks (virtual tokens are spliced into the embeddings, the head runs only on
    supervised positions), and on the models this is for they are a small part of the weights.

    Every process must then run the same sequence of forwards and backwards (each block's
    all-gather is a collective): the trainer gives a process with no rows in a micro-batch a
    zero-weight row, evaluates equal numbers of rows per process and decodes with
    ``synced_gpus``, and turns the lower-layer cache off. Prepended virtual tokens are spliced
    (``prompt_sharing = "never"``).

    The model may be loaded on the CPU and sharded onto ``device``: each block is moved there
    whole and cut down to its shard before the next one moves, so no device ever holds the whole
    base (a base too large for one device can be loaded this way); the rest (embeddings, norm,
    head, the adapters) is then moved as it is.

    Args:
        model: a ``SoftPromptModel`` on a decoder-only LM, in a process group of N >= 2.
        device: where the shards and the rest go (default: where the model is).
        reshard_after_forward: free each block's gathered weights after its forward and gather
            them again in backward (``FULL_SHARD``); False keeps them (``SHARD_GRAD_OP``: less
            communication, more memory).

    Returns:
        The number of base-model parameters this process holds.

    Raises:
        SoftPromptError: not launched with several processes, or a base whose blocks softprompt
            cannot find (encoder-decoder and encoder models).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from . import _hf

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        raise SoftPromptError(
            "--fsdp shards the base model across processes: launch with several, e.g. "
            "`accelerate launch --multi_gpu --num_processes 2 -m softprompt.cli train --fsdp ...` "
            "(or `accelerate launch --use_fsdp ...` on GPUs)"
        )
    layers = _hf.decoder_layers(model.base_model)
    if layers is None:
        raise SoftPromptError(
            f"--fsdp shards the decoder blocks of decoder-only LMs; "
            f"{type(model.base_model).__name__} has none softprompt can find: train it without "
            "--fsdp (data parallel keeps a whole copy per process)"
        )
    device = torch.device(device) if device is not None else model.device
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, torch.accelerator.current_device_index())
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:  # moves the block to the mesh's device, then keeps 1/N of it
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    with torch.no_grad():  # the unsharded rest, as FSDP moves its own (tensor by tensor)
        for t in itertools.chain(model.parameters(), model.buffers()):
            if not isinstance(t, DTensor) and t.device != device:
                t.data = t.data.to(device)
    # The shared prompt prefix reads the virtual tokens' keys and values from inside the blocks,
    # not from a block's output, so FSDP's pre-backward hooks (on block outputs) would not
    # gather the weights again for its backward: splice the virtual tokens instead.
    model.prompt_sharing = "never"
    return sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel()
        for p in model.base_model.parameters()
    )
