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

from ._hf import SoftPromptError

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
