"""Data-parallel training really runs N processes, each on its own rows (softprompt.distributed).

The adapter of a two-process run equals the one-process adapter either way, so that alone cannot
tell whether a second process existed: each test also reads the world size the run recorded and
the rows each rank wrote (``--log-rows``), and ``assert_ran_on`` is shown to fail on a one-process
run, which is what a launcher that silently falls back produces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softprompt.distributed import launcher_request
from softprompt.errors import SoftPromptError

STEPS, BATCH = 4, 4
POS = ["a wonderful, moving film", "brilliant and funny", "a joy to watch", "great acting"]
NEG = ["a dull, tedious mess", "boring and far too long", "awful script", "a waste of time"]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dp")
    rows = [{"text": t, "label": "positive"} for t in POS] + [
        {"text": t, "label": "negative"} for t in NEG
    ]
    path = d / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train_argv(model: str, train: Path, out: Path) -> list[str]:
    return [
        "-m",
        "softprompt.cli",
        "train",
        "--model",
        model,
        "--method",
        "deep",
        "--train",
        str(train),
        "--max-steps",
        str(STEPS),
        "--batch-size",
        str(BATCH),
        "--eval-every",
        "100",
        "--num-virtual-tokens",
        "3",
        "--no-progress",
        "--log-rows",
        "--output",
        str(out),
    ]


def _run(prefix: list[str], argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [*prefix, *argv], env=env, capture_output=True, text=True, timeout=600, check=False
    )


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
ACCELERATE_FLAGS = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
LAUNCHERS = {
    "accelerate": [*ACCELERATE, "--multi_gpu", "--num_processes", "2", *ACCELERATE_FLAGS],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
}


def _rows(out: Path, rank: int) -> dict[int, list[str]]:
    path = out / f"rows.rank{rank}.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return {r["step"]: r["rows"] for r in recs if r["rank"] == rank}


def assert_ran_on(out: Path, n: int, reference: Path) -> None:
    """The run in ``out`` had ``n`` processes and each trained on its own slice of every global
    batch of the one-process ``reference`` run."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == n, summary
    ref = _rows(reference, 0)
    assert sorted(ref) == list(range(1, STEPS + 1))
    per_rank = [_rows(out, r) for r in range(n)]
    for rank, rows in enumerate(per_rank):
        assert sorted(rows) == sorted(ref), f"rank {rank} ran steps {sorted(rows)}"
        for step, got in rows.items():
            assert got == ref[step][rank::n], (rank, step)  # its own slice, nobody else's
    for step in ref:
        union = [x for rows in per_rank for x in rows[step]]
        assert sorted(union) == sorted(ref[step]) and len(set(union)) == len(union)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_folders, train_file) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    res = _run([sys.executable], _train_argv(tiny_folders["llama"], train_file, out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_each_train_their_rows_and_reach_the_one_process_adapter(
    tmp_path, tiny_folders, train_file, one_process, launcher
):
    out = tmp_path / "two"
    argv = _train_argv(tiny_folders["llama"], train_file, out)
    res = _run(LAUNCHERS[launcher], argv)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_ran_on(out, 2, one_process)
    a = load_file(one_process / "adapter" / "adapter.safetensors")["prefix"]
    b = load_file(out / "adapter" / "adapter.safetensors")["prefix"]
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_two_processes_reach_the_one_process_adapter_on_targets_of_unequal_length(
    tmp_path, tiny_folders
):
    """A generate task whose rows' targets are 1-9 words, 3 rows a step (2 on rank 0, 1 on
    rank 1) with 2 micro-batches: each process's loss is weighted by its share of the step's
    target tokens, so the two-process adapter is the one-process one (weighting each process's
    token mean by its rows gave a gradient at cosine 0.7 to the right one)."""
    words = "the quick brown fox jumps over a lazy dog".split()
    gen = tmp_path / "gen.jsonl"
    gen.write_text(
        "".join(
            json.dumps(
                {"input": f"say {words[i % 9]}", "target": " ".join(words[: 1 + (5 * i) % 9])}
            )
            + "\n"
            for i in range(12)
        )
    )

    def argv(out: Path) -> list[str]:
        a = _train_argv(tiny_folders["llama"], gen, out)
        a[a.index("--batch-size") + 1] = "3"
        return [*a, "--task", "generate", "--grad-accum", "2", "--max-grad-norm", "0"]

    one = _run([sys.executable], argv(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(LAUNCHERS["torchrun"], argv(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    a = load_file(tmp_path / "one" / "adapter" / "adapter.safetensors")["prefix"]
    b = load_file(tmp_path / "two" / "adapter" / "adapter.safetensors")["prefix"]
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    losses = [
        [json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
        for r in ("one", "two")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_the_assertions_fail_on_a_one_process_run(one_process):
    """What a silent fallback to one process leaves behind does not pass ``assert_ran_on``."""
    with pytest.raises(AssertionError):
        assert_ran_on(one_process, 2, one_process)


def test_accelerate_without_multi_gpu_fails_loudly(tmp_path, tiny_folders, train_file):
    """accelerate's simple launcher starts one process whatever --num_processes says: the run
    stops with an error naming the command that works, and trains nothing."""
    out = tmp_path / "fallback"
    argv = _train_argv(tiny_folders["llama"], train_file, out)
    res = _run([*ACCELERATE, "--cpu", "--num_processes", "2", *ACCELERATE_FLAGS], argv)
    assert res.returncode != 0
    assert "asked for 2 processes but this run has 1" in res.stderr
    assert "--multi_gpu" in res.stderr and "torchrun" in res.stderr
    assert not (out / "adapter").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["/x/bin/python", "/x/bin/accelerate", "launch", "--num_processes", "2", "-m", "a"], 2),
        (["python", "-m", "accelerate.commands.launch", "--num_processes=3", "t.py"], 3),
        (["accelerate", "launch", "--cpu", "t.py"], None),
        (["/usr/bin/torchrun", "--nproc_per_node", "4", "t.py"], 4),
        (["python", "-m", "torch.distributed.run", "--nproc-per-node=2", "t.py"], 2),
        (["bash", "-c", "softprompt train --num_processes 2"], None),
        (["python", "-m", "pytest", "--num_processes", "2"], None),
    ],
)
def test_launcher_request_reads_the_count_a_launcher_was_asked_for(argv, expected):
    assert launcher_request(argv) == expected


# ------------------------------------------------------------------------------ sharded base


# accelerate's own FSDP launch with an FSDP2 config: it keeps each block's gathered weights
# from forward to backward, recomputes activations, and asks for an offload softprompt ignores
ACCELERATE_FSDP = [
    *ACCELERATE,
    "--use_fsdp",
    "--num_processes",
    "2",
    *ACCELERATE_FLAGS,
    "--fsdp_version",
    "2",
    "--fsdp_reshard_after_forward",
    "false",
    "--fsdp_activation_checkpointing",
    "true",
    "--fsdp_offload_params",
    "true",
]


@pytest.mark.parametrize(
    "method, launch",
    [("deep", "--fsdp"), ("prompt", "accelerate --use_fsdp")],
)
def test_fsdp_shards_the_base_and_reaches_the_one_process_adapter(
    tmp_path, tiny_folders, train_file, method, launch
):
    """A two-process sharded run, by ``train --fsdp`` under a data-parallel launch or by
    ``accelerate launch --use_fsdp`` with an FSDP config (its reshard and activation
    checkpointing settings taken, its offload named as not applied): each process holds
    about half of the frozen blocks' weights, evaluation on an odd number of dev rows runs in
    step on both, and the adapter (the only thing replicated and saved) equals the one-process
    adapter."""
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(train_file.read_text().splitlines(keepends=True)[:7]))

    def argv(out: Path) -> list[str]:
        a = _train_argv(tiny_folders["llama"], train_file, out)
        a[a.index("deep")] = method
        return [*a, "--eval", str(dev), "--eval-every", "2"]

    one = _run([sys.executable], argv(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    if launch == "--fsdp":
        res = _run(LAUNCHERS["accelerate"], [*argv(tmp_path / "two"), "--fsdp"])
    else:
        res = _run(ACCELERATE_FSDP, argv(tmp_path / "two"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_ran_on(tmp_path / "two", 2, tmp_path / "one")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["fsdp"] is True
    from_config = launch != "--fsdp"
    assert summary["fsdp_reshard_after_forward"] is not from_config
    assert summary["gradient_checkpointing"] is from_config
    warned = "it does not apply fsdp_offload_params true" in res.stdout
    assert warned is from_config, res.stdout[-2000:]
    # each process keeps half of the blocks' weights (the tiny model's 49k-word embedding and
    # head, kept whole, are most of its size)
    from transformers import AutoModelForCausalLM

    blocks = AutoModelForCausalLM.from_pretrained(tiny_folders["llama"]).model.layers
    in_blocks = sum(p.numel() for p in blocks.parameters())
    dropped = summary["base_parameters"] - summary["base_local_parameters"]
    assert abs(dropped - in_blocks / 2) <= 0.02 * in_blocks, (dropped, in_blocks)
    single = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert single["fsdp"] is False
    assert single["base_local_parameters"] == single["base_parameters"]
    key = "prefix" if method == "deep" else "prompt"
    a = load_file(tmp_path / "one" / "adapter" / "adapter.safetensors")[key]
    b = load_file(tmp_path / "two" / "adapter" / "adapter.safetensors")[key]
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    evals = [
        json.loads(x)["eval"]
        for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
        if "eval" in json.loads(x)
    ]
    ref = [
        json.loads(x)["eval"]
        for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
        if "eval" in json.loads(x)
    ]
    assert [e["accuracy"] for e in evals] == [e["accuracy"] for e in ref] and len(ref) == 2


def test_fsdp_without_processes_is_a_clear_error(tmp_path, tiny_folders, train_file):
    res = _run(
        [sys.executable], [*_train_argv(tiny_folders["llama"], train_file, tmp_path), "--fsdp"]
    )
    assert res.returncode == 2 and "launch with several" in res.stderr


def test_fsdp_on_an_encoder_decoder_is_a_clear_error(tmp_path, tiny_folders, train_file):
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"input": f"say {w}", "target": w}) + "\n" for w in "abcd"))
    argv = [*_train_argv(tiny_folders["t5"], gen, tmp_path / "t5"), "--fsdp"]
    res = _run(LAUNCHERS["torchrun"], [*argv, "--task", "generate"])
    assert res.returncode != 0
    assert "shards the decoder blocks of decoder-only LMs" in res.stderr


# ------------------------------------------------------------------------------ launch settings


@pytest.mark.parametrize(
    "env, reshard, ckpt, ignored",
    [
        ({}, True, False, []),  # not an FSDP launch: its variables are not read
        (
            {"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP", "FSDP_OFFLOAD_PARAMS": "true"},
            True,
            False,
            [],
        ),
        ({"ACCELERATE_USE_FSDP": "true"}, True, False, []),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"},
            False,
            False,
            [],
        ),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "2"}, False, False, []),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"},
            True,
            False,
            ["fsdp_sharding_strategy HYBRID_SHARD"],
        ),
        (
            {
                "ACCELERATE_USE_FSDP": "true",
                "FSDP_VERSION": "2",
                "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP",  # FSDP2 reads reshard_after_forward
                "FSDP_RESHARD_AFTER_FORWARD": "false",
                "FSDP_ACTIVATION_CHECKPOINTING": "true",
                "FSDP_OFFLOAD_PARAMS": "true",
                "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP",
            },
            False,
            True,
            ["fsdp_offload_params true", "fsdp_auto_wrap_policy SIZE_BASED_WRAP"],
        ),
    ],
)
def test_an_accelerate_fsdp_config_is_read_and_what_it_does_not_apply_is_named(
    monkeypatch, env, reshard, ckpt, ignored
):
    from softprompt.distributed import accelerate_fsdp_settings

    for k in [k for k in os.environ if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    got = accelerate_fsdp_settings()
    assert (got.reshard_after_forward, got.activation_checkpointing) == (reshard, ckpt)
    assert [g.split(" (")[0] for g in got.ignored] == ignored


def test_accelerator_env_keeps_accelerates_fsdp_plugin_out_and_puts_the_flag_back(monkeypatch):
    from softprompt.distributed import accelerator_env, fsdp_requested

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with accelerator_env():
        assert os.environ["ACCELERATE_USE_FSDP"] == "false" and not fsdp_requested()
    assert os.environ["ACCELERATE_USE_FSDP"] == "true" and fsdp_requested()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with accelerator_env():
        assert "ACCELERATE_USE_FSDP" not in os.environ
    assert "ACCELERATE_USE_FSDP" not in os.environ


@pytest.mark.parametrize(
    "asked, given, want, warns",
    [
        (None, None, "float32", False),
        ("no", None, "float32", False),
        ("bf16", None, "bfloat16", False),
        ("fp16", None, "float16", False),
        ("bf16", "bfloat16", "bfloat16", False),
        ("bf16", "float32", "float32", True),  # an explicit --dtype wins, said
        (None, "float16", "float16", False),
    ],
)
def test_launch_dtype_takes_accelerates_mixed_precision(monkeypatch, asked, given, want, warns):
    from softprompt.distributed import launch_dtype

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if asked is not None:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", asked)
    said = []
    assert launch_dtype(given, said.append) == want
    assert bool(said) is warns
    if warns:
        assert said[0].startswith(f"accelerate launch --mixed_precision {asked} is not used")


def test_fp8_mixed_precision_is_a_clear_error(monkeypatch):
    from softprompt.distributed import launch_dtype

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(SoftPromptError, match="--mixed_precision fp8: softprompt runs"):
        launch_dtype(None, print)


def test_accelerate_launch_mixed_precision_bf16_trains_a_bfloat16_base(
    tmp_path, tiny_folders, train_file
):
    """``accelerate launch --mixed_precision bf16 -m softprompt.cli train`` (one process) runs
    the frozen base in bfloat16 (recorded in config.yaml) with a float32 adapter; before, the
    setting was silently dropped and the run was float32."""
    out = tmp_path / "bf16"
    res = _run(
        [
            *ACCELERATE,
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "bf16",
            "--dynamo_backend",
            "no",
        ],
        _train_argv(tiny_folders["llama"], train_file, out),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["dtype"] == "bfloat16"
    assert load_file(out / "adapter" / "adapter.safetensors")["prefix"].dtype == torch.float32
    plain = tmp_path / "plain"
    res = _run([sys.executable], _train_argv(tiny_folders["llama"], train_file, plain))
    assert res.returncode == 0, res.stderr[-3000:]
    assert yaml.safe_load((plain / "config.yaml").read_text())["dtype"] == "float32"


def test_a_deepspeed_launch_is_a_clear_error(monkeypatch):
    from softprompt.trainer import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(SoftPromptError, match="--use_deepspeed .* is not supported.*--use_fsdp"):
        make_accelerator()
