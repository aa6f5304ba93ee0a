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

import os

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
    return flag or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def shard_frozen_base(model) -> int:
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

    Args:
        model: a ``SoftPromptModel`` on a decoder-only LM, in a process group of N >= 2.

    Returns:
        The number of base-model parameters this process holds.

    Raises:
        SoftPromptError: not launched with several processes, or a base whose blocks softprompt
            cannot find (encoder-decoder and encoder models).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

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
    mesh = init_device_mesh(model.device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # The shared prompt prefix reads the virtual tokens' keys and values from inside the blocks,
    # not from a block's output, so FSDP's pre-backward hooks (on block outputs) would not
    # gather the weights again for its backward: splice the virtual tokens instead.
    model.prompt_sharing = "never"
    return sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel()
        for p in model.base_model.parameters()
    )
