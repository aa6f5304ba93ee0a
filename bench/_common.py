"""Shared pieces of the benchmark scripts: model and data loading, the four method pairs,
interleaved timing, process memory, machine info and the result-file format.

Not run directly; see ``bench/run_all.py``.

Result files (``bench/results/<section>.json``) share one schema so ``bench/report.py`` can render
any section, including ones added later (quality):

    {"section": str, "title": str, "order": int, "machine": {...}, "config": {...},
     "intro": [markdown paragraphs], "tables": [{"title", "columns", "rows", "notes"}],
     "targets": [{"name", "target", "value", "met", "detail", "why"}],
     "plots": [{"file", "title", "ylabel", "labels", "series": {name: [values]}, "ref": float}],
     "notes": [markdown paragraphs], "raw": {...}}
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
MODEL = "smollm2-135m-instruct"
THREADS = 2
NUM_VIRTUAL = 20
ENCODER_HIDDEN = 512

# method key -> (softprompt label, PEFT label)
METHODS = {
    "prompt": ("PromptTuning", "PromptTuning"),
    "prefix_mlp": ("PrefixTuning (MLP 512)", "PrefixTuning prefix_projection=True, h=512"),
    "prefix_flat": ("DeepPrompt (flat prefix)", "PrefixTuning prefix_projection=False"),
    "ptuning_mlp": ("PTuning (MLP 512)", "PromptEncoder MLP, h=512"),
}


DEVICE = torch.device("cpu")


def setup(threads: int = THREADS, quick: bool = False, device: str = "cpu") -> None:
    """Fix threads and the device, silence library chatter (progress bars, deprecation notes);
    a full run waits at most 15 s in total for a quiet machine, a quick run does not wait.

    ``device="cuda"``: models and batches go to the GPU (fp32, TF32 off, as on the CPU), timed
    regions synchronise the device, memory is CUDA's peak allocation, and the result files are
    written as separate ``<section>_gpu`` sections.
    """
    global DEVICE
    DEVICE = torch.device(device)
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device on this machine")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(threads)
    QUIET_WAIT_BUDGET["left"] = 0.0 if quick else 15.0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from peft.utils import logging as _  # noqa: F401
    except Exception:
        pass


# ------------------------------------------------------------------------------ model and data
def model_path() -> str:
    from softprompt.assets import resolve_model

    return resolve_model(MODEL)


def load_base():
    """A fresh, untouched SmolLM2-135M-Instruct in fp32, eval mode (sdpa attention)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32)
    return base.to(DEVICE).eval()


def on_gpu() -> bool:
    return DEVICE.type == "cuda"


def sync() -> None:
    """Wait for queued device work (a no-op on the CPU), so that a host clock times it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def device_label() -> str:
    """The word CPU, or the GPU's name, for report texts."""
    return torch.cuda.get_device_name(DEVICE) if on_gpu() else "CPU"


def add_device_arg(ap) -> None:
    ap.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="cuda: the same measurements on the GPU, written as the <section>_gpu section",
    )


GPU_NOTE = (
    "On the GPU, 8 rows of about 40 tokens leave a 135M-parameter model's arithmetic far below "
    "the card's capacity: step and generate times are set mostly by the number of kernel "
    "launches and the host-side Python work per call, so these ratios measure per-call "
    "overhead more than arithmetic. The times are absolute (host clock after a device "
    "synchronise)."
)


def default_out(section: str, device: str) -> Path:
    return RESULTS / (f"{section}_gpu.json" if device == "cuda" else f"{section}.json")


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


def _rows(split: str = "train") -> list[dict]:
    from softprompt.assets import resolve_data

    with open(resolve_data("rotten-tomatoes", split)) as f:
        return [json.loads(line) for line in f]


def train_batches(tok, n_batches: int, batch: int = 8, lo: int = 34, hi: int = 46) -> list[dict]:
    """Classification-style training batches of real text, about 40 tokens a row.

    Each row is ``"Review: {text}\\nSentiment: {label}"``; labels are -100 except on the answer
    token(s) (realistic answer-only supervision). Rows are chosen with total length in
    ``[lo, hi]`` and right-padded to the longest row of their batch.
    """
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples = []
    for r in _rows():
        prompt = tok(f"Review: {r['text']}\nSentiment:")["input_ids"]
        answer = tok(f" {r['label']}", add_special_tokens=False)["input_ids"]
        if lo <= len(prompt) + len(answer) <= hi:
            examples.append((prompt, answer))
        if len(examples) >= n_batches * batch:
            break
    return [pack_batch(examples[i * batch : (i + 1) * batch], pad) for i in range(n_batches)]


def pack_batch(examples: list[tuple[list[int], list[int]]], pad: int) -> dict:
    """Right-padded batch of (prompt, answer) id lists; labels only on the answer tokens."""
    width = max(len(p) + len(a) for p, a in examples)
    n = len(examples)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for b, (p, a) in enumerate(examples):
        k = len(p) + len(a)
        ids[b, :k] = torch.tensor(p + a)
        mask[b, :k] = 1
        labels[b, len(p) : k] = torch.tensor(a)
    return {
        "input_ids": ids.to(DEVICE),
        "attention_mask": mask.to(DEVICE),
        "labels": labels.to(DEVICE),
    }


def review_examples(tok, n: int, offset: int = 0) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of ``n`` training reviews, all lengths, in file order."""
    out = []
    for r in _rows()[offset : offset + n]:
        prompt = tok(f"Review: {r['text']}\nSentiment:")["input_ids"]
        out.append((prompt, tok(f" {r['label']}", add_special_tokens=False)["input_ids"]))
    return out


def generation_prompts(tok, batch: int = 8, offset: int = 0, extra: int = 0) -> dict:
    """Left-padded prompts ``"Review: {text}\\nSentiment:"`` (dev split), as a server sees them.

    ``extra`` > 0 prepends that many real tokens to every row (a same-length control for
    prompt tuning's virtual tokens).
    """
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = _rows("dev")[offset : offset + batch]
    filler = tok("The following is a short film review. " * 10)["input_ids"][:extra]
    seqs = [filler + tok(f"Review: {r['text']}\nSentiment:")["input_ids"] for r in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s) :] = torch.tensor(s)
        mask[b, width - len(s) :] = 1
    return {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE)}


# ------------------------------------------------------------------------------ the method pairs
def sp_config(method: str, seed: int = 0):
    import softprompt as sp

    if method == "prompt":
        return sp.PromptTuningConfig(num_virtual_tokens=NUM_VIRTUAL, seed=seed)
    if method == "prefix_mlp":
        return sp.PrefixTuningConfig(
            num_virtual_tokens=NUM_VIRTUAL, encoder_hidden_size=ENCODER_HIDDEN, seed=seed
        )
    if method == "prefix_flat":
        return sp.DeepPromptConfig(num_virtual_tokens=NUM_VIRTUAL, seed=seed)
    if method == "ptuning_mlp":
        return sp.PTuningConfig(
            num_virtual_tokens=NUM_VIRTUAL,
            encoder="mlp",
            encoder_hidden_size=ENCODER_HIDDEN,
            seed=seed,
        )
    raise KeyError(method)


def peft_config(method: str):
    import peft

    common = {"task_type": "CAUSAL_LM", "num_virtual_tokens": NUM_VIRTUAL}
    if method == "prompt":
        return peft.PromptTuningConfig(**common)
    if method == "prefix_mlp":
        return peft.PrefixTuningConfig(
            **common, prefix_projection=True, encoder_hidden_size=ENCODER_HIDDEN
        )
    if method == "prefix_flat":
        return peft.PrefixTuningConfig(**common, prefix_projection=False)
    if method == "ptuning_mlp":
        return peft.PromptEncoderConfig(
            **common, encoder_reparameterization_type="MLP", encoder_hidden_size=ENCODER_HIDDEN
        )
    raise KeyError(method)


def make_sp(method: str, base=None, name: str = "a"):
    """softprompt model with one adapter ``name`` of ``method`` (trainable, active)."""
    import softprompt as sp

    return sp.attach(base if base is not None else load_base(), sp_config(method), name=name)


def make_peft(method: str, base=None, name: str = "default"):
    import peft

    torch.manual_seed(0)
    return peft.get_peft_model(
        base if base is not None else load_base(), peft_config(method), adapter_name=name
    )


# ------------------------------------------------------------------------------ prompt sharing
@contextlib.contextmanager
def sharing(model, mode: str | None):
    """Run with ``model.prompt_sharing = mode``, then restore it; ``mode=None`` changes nothing
    (and takes any model, PEFT's or a bare one)."""
    if mode is None:
        yield
        return
    before = model.prompt_sharing
    model.prompt_sharing = mode
    try:
        yield
    finally:
        model.prompt_sharing = before


def auto_shares(model, batch: dict) -> bool:
    """Does the default ("auto") run the active adapter's prepended virtual tokens as a shared
    prefix in a training step (autograd on) on this batch?"""
    ids = batch["input_ids"]
    with torch.enable_grad():
        prompts = model._prompts([model.active] * len(ids))
        return model._shared_ok(prompts, bool((ids < 0).any()), None, None, {})


# ------------------------------------------------------------------------------ losses
try:  # the trainer's loss: the LM head only on supervised positions
    from softprompt.lm import lm_loss as _lm_loss
except Exception:  # not there yet (or broken on import)
    _lm_loss = None

SP_LOSS_NAME = "model(**batch).loss"


def resolve_sp_loss(model, batch) -> str:
    """Decide once which loss ``sp_loss`` uses: ``softprompt.lm.lm_loss`` when importable and it
    runs on this batch, else ``model(**batch).loss``. Returns a description of the choice."""
    global SP_LOSS_NAME, _lm_loss
    if _lm_loss is None:
        SP_LOSS_NAME = "model(**batch).loss (softprompt.lm.lm_loss not importable)"
        return SP_LOSS_NAME
    try:
        with torch.no_grad():
            a = _lm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            b = model(**batch).loss
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
            raise ValueError(f"lm_loss {a.item():.6f} != model(**batch).loss {b.item():.6f}")
        SP_LOSS_NAME = "softprompt.lm.lm_loss"
    except Exception as e:  # present but failing: fall back, say why
        _lm_loss = None
        SP_LOSS_NAME = f"model(**batch).loss (softprompt.lm.lm_loss failed: {e!r:.120})"
    return SP_LOSS_NAME


def sp_loss(model, batch) -> torch.Tensor:
    """softprompt's training loss: ``lm_loss`` if available (see ``resolve_sp_loss``)."""
    if _lm_loss is not None:
        return _lm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return model(**batch).loss


def full_loss(model, batch) -> torch.Tensor:
    """The usual Hugging Face loss: LM head over every position."""
    return model(**batch).loss


def train_step(model, opt, loss_fn: Callable, batch: dict) -> float:
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    opt.step()
    return float(loss.detach())


# ------------------------------------------------------------------------------ timing
# This machine is shared (2 cores); other processes' CPU use slows torch's OpenMP threads a lot
# (a thread descheduled at a barrier stalls every op). Each timed round therefore records how many
# cores *other* processes used meanwhile, and waits (boundedly) for a quiet machine before it
# starts. Rounds during which others used more than ``BUSY`` cores are flagged "contended".
# (Linux autogroup scheduling shares CPU fairly between sessions whatever a process's `nice`;
# raising the benchmark session's share, `echo -10 > /proc/self/autogroup` as root before
# running, keeps neighbours to about 0.25 cores. machine_info records the setting.)
_HZ = os.sysconf("SC_CLK_TCK")
BUSY = 0.3
QUIET_WAIT_BUDGET = {"left": 15.0}  # seconds of waiting allowed per process (per section)


def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks used by this process and its threads)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    busy = sum(parts) - parts[3] - (parts[4] if len(parts) > 4 else 0)  # minus idle, iowait
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    own = int(fields[11]) + int(fields[12])  # utime, stime
    return busy, own


class OthersCPU:
    """Cores used by other processes between ``start()`` and ``stop()``."""

    def start(self) -> None:
        self.t0, (self.b0, self.o0) = time.perf_counter(), _cpu_ticks()

    def stop(self) -> float:
        b1, o1 = _cpu_ticks()
        dt = max(time.perf_counter() - self.t0, 1e-3)
        return max(0.0, ((b1 - self.b0) - (o1 - self.o0)) / _HZ / dt)


def wait_quiet(threshold: float = BUSY / 2, window: float = 0.5) -> float:
    """Wait until other processes use less than ``threshold`` cores (bounded by the budget).

    Returns:
        seconds waited.
    """
    waited = 0.0
    probe = OthersCPU()
    while QUIET_WAIT_BUDGET["left"] > 0:
        probe.start()
        time.sleep(window)
        if probe.stop() < threshold:
            break
        waited += window
        QUIET_WAIT_BUDGET["left"] -= window
    return waited


def interleaved(
    fns: dict[str, Callable[[int], object]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Time each ``fn(round)`` ``repeats`` times after ``warmup`` untimed rounds.

    Within a round every function runs once; the order rotates each round (A B C, B C A, ...)
    and alternates direction, so slow drifts and neighbours' CPU load hit all of them alike.

    Returns:
        name -> list of seconds, one per timed round (index = round), plus the key
        ``"_others"``: cores used by other processes during each timed round, and ``"_waited"``:
        seconds spent waiting for a quiet machine before each timed round.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    times["_others"], times["_waited"] = [], []
    probe = OthersCPU()
    for r in range(warmup + repeats):
        k = r % len(names)
        order = names[k:] + names[:k]
        if r % 2:
            order = order[::-1]
        waited = wait_quiet() if r >= warmup else 0.0
        probe.start()
        for n in order:
            gc.collect()
            sync()
            t0 = time.perf_counter()
            fns[n](r)
            sync()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[n].append(dt)
        others = probe.stop()
        if r >= warmup:
            times["_others"].append(round(others, 3))
            times["_waited"].append(waited)
    return times


def clean(times: dict[str, list[float]], min_rounds: int = 3) -> tuple[dict[str, list[float]], int]:
    """Drop contended rounds (others used > ``BUSY`` cores) if at least ``min_rounds`` remain.

    Returns:
        (name -> times without the private keys, number of rounds dropped).
    """
    others = times.get("_others", [])
    keep = [i for i, o in enumerate(others) if o <= BUSY]
    public = {k: v for k, v in times.items() if not k.startswith("_")}
    if len(keep) < min(min_rounds, len(others)) or len(keep) == len(others):
        return public, 0
    return {k: [v[i] for i in keep] for k, v in public.items()}, len(others) - len(keep)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i] (robust to load that changes between rounds)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def ratio_range(num: list[float], den: list[float]) -> tuple[float, float]:
    """(min, max) over rounds of num[i] / den[i]: how far single rounds scatter."""
    rs = [a / b for a, b in zip(num, den, strict=True)]
    return min(rs), max(rs)


def fmt_range(lo: float, hi: float, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    return "[" + fmt.format(lo * scale) + "-" + fmt.format(hi * scale) + "]"


def spread(xs: list[float]) -> float:
    """Relative spread: (max - min) / median."""
    return (max(xs) - min(xs)) / statistics.median(xs) if len(xs) > 1 else 0.0


# ------------------------------------------------------------------------------ memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Release freed heap to the OS and reset the kernel's peak-RSS mark (VmHWM).

    Linux >= 4.0: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ results
def machine_info() -> dict:
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except Exception:
        peft_version = None
    import softprompt

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = None
    try:  # Linux autogroup scheduling: CPU is shared fairly between sessions, whatever `nice`
        with open("/proc/self/autogroup") as f:
            autogroup = f.read().strip()
    except OSError:
        autogroup = None
    gpu = {}
    if on_gpu():
        props = torch.cuda.get_device_properties(DEVICE)
        gpu = {
            "device": props.name,
            "gpu_memory_gb": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "tf32": False,
        }
    return {
        **gpu,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nice": os.nice(0),
        "autogroup": autogroup,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gb": round(mem_gb, 1) if mem_gb else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "softprompt": softprompt.__version__,
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()),
    }


def write_result(section: str, data: dict, out: Path | None = None) -> Path:
    """Write one section's result file; on the GPU it becomes section ``<section>_gpu``, titled
    with the GPU's name, ordered after the CPU sections, its targets marked "(GPU)"."""
    if on_gpu():
        section = f"{section}_gpu"
        data.setdefault("intro", []).append(GPU_NOTE)
        data["title"] = f"{data.get('title', section)} on GPU ({device_label()})"
        data["order"] = data.get("order", 0) + 10
        for t in data.get("targets", []):
            t["name"] = f"{t['name']} (GPU)"
        for spec in data.get("plots", []):
            spec["file"] = spec["file"].replace(".png", "_gpu.png")
    data = {"section": section, **data}
    data["machine"]["loadavg_end"] = list(os.getloadavg())
    out = out or RESULTS / f"{section}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, default=float) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt_x(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}x"


def target(name: str, goal: str, value: str, met: bool, detail: str = "", why: str = "") -> dict:
    return {
        "name": name,
        "target": goal,
        "value": value,
        "met": bool(met),
        "detail": detail,
        "why": why,
    }


def lm_head_fraction(config, seq_len: int) -> float:
    """Share of a decoder-only forward's multiply-adds spent in the LM head, per position.

    Per layer: q and o projections (d x heads*hd each), k and v (d x kv_heads*hd each), gated MLP
    (3 x d x ff), attention scores and values (2 x seq_len x heads*hd). Head: d x vocab.
    """
    d, layers = config.hidden_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * hd
    kv = config.num_key_value_heads * hd
    layer = 2 * d * q + 2 * d * kv + 3 * d * config.intermediate_size + 2 * seq_len * q
    head = d * config.vocab_size
    return head / (layers * layer + head)
