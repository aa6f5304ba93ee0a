"""The serving engine: one frozen model, many adapters, rows batched across adapters.

No HTTP here: :mod:`softprompt.server` is the FastAPI layer on top. The engine validates and
encodes what a request asks for (``encode_completion``, ``encode_chat``, ``encode_classify``),
queues rows (``submit``: one ``Future`` per row) and runs them on one worker thread.
Classification and scoring rows: ONE model call per kind with ``adapter_names=[...]``, one
adapter per row. Generation rows (``ServeSettings.scheduling``): "step" (default) keeps a
running batch over one KV cache (``softprompt.decoding.StepBatch``): between two decode steps
the worker prefills whatever arrived (one forward) and adds it, and a finished row leaves at
once, so a 2-token request never waits for a 200-token one; "batch" runs each batch's
``generate`` to its end. Either way generation settings never split a batch: sampling runs
per row (own temperature, top-p and seeded generator), and each row stops on its own
``max_tokens``, stop ids or stop strings (``softprompt.decoding.RowDecoder``); a row's answer
is sent as soon as it is finished, and a streamed row's text after every decode step. A
failing call is retried row by row, so one bad row fails alone.

Errors are :class:`EngineError` with a ``kind`` ("invalid", "not_found", "conflict",
"forbidden", "busy", "unavailable", "closed", "internal"); the HTTP layer maps kinds to status
codes.

Shutdown (``Engine.drain``): no new rows are taken, rows in flight get ``graceful_timeout``
seconds to finish, then what remains is cancelled ("unavailable") and ``generate`` stops at its
next decode step.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import _hf
from .decoding import (  # noqa: F401  (GenerationRow, eos_ids, token_entry: re-exported)
    GenerationRow,
    RowDecoder,
    StepBatch,
    can_step,
    eos_ids,
    nan_error,
    pick_groups,
    token_entry,
)
from .errors import SoftPromptError
from .lm import pad_left, pad_prompts, row_answer_logprobs
from .tasks import pad_id

log = logging.getLogger("softprompt.engine")

SCHEDULING = ("step", "batch")
COMPOSE = "+"  # "model": "a+b": cartridges a and b in one row
MAX_COMPOSED = 32
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
BASE_ALIAS = "base"


@dataclass
class ServeSettings:
    """Server limits and options (the ``softprompt serve`` flags).

    Attributes:
        model_name: the base model's name in the API (default: its ``name_or_path``); ``"base"``
            always works too.
        api_key: if set, every request except ``GET /health`` needs ``Authorization: Bearer KEY``.
        adapter_roots: folders ``POST /v1/adapters`` may load from (symlinks resolved). None:
            the parent folders of the adapters given at start.
        max_batch: most rows (prompts) in one model call.
        max_wait_ms: how long the oldest queued row waits for others before its batch runs.
        max_queue: most rows waiting; more is answered 429.
        max_body_bytes: largest request body; more is answered 413.
        max_prompt_tokens: longest prompt in tokens (after the adapter's template).
        max_tokens_limit: largest ``max_tokens`` a request may ask for.
        max_prompts: most prompts (times ``n``) in one request.
        default_max_tokens: ``max_tokens`` when a completions request gives none (OpenAI's
            legacy completions default: 16). Chat requests without one generate until the
            answer ends, at most ``max_tokens_limit`` tokens or what the context leaves.
        graceful_timeout: seconds rows in flight get to finish at shutdown before they are
            cancelled (503).
        scheduling: "step" (default): generation rows join and leave the running batch at
            decode-step boundaries (``softprompt.decoding.StepBatch``), so a new request's
            prefill runs at the next step and a short request never waits for a long one;
            "batch": each batch's ``generate`` runs to its end before the queue is looked at
            again. Models whose cache cannot be regrouped (encoder-decoders, sliding-window
            caches) always run "batch".
    """

    model_name: str | None = None
    api_key: str | None = None
    adapter_roots: list[str] | None = None
    max_batch: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 2048
    max_tokens_limit: int = 512
    max_prompts: int = 64
    default_max_tokens: int = 16
    graceful_timeout: float = 60.0
    scheduling: str = "step"

    def __post_init__(self) -> None:
        if self.scheduling not in SCHEDULING:
            raise SoftPromptError(
                f"ServeSettings.scheduling must be one of {SCHEDULING}, got {self.scheduling!r}"
            )
        for name in (
            "max_batch",
            "max_queue",
            "max_body_bytes",
            "max_prompt_tokens",
            "max_tokens_limit",
            "max_prompts",
            "default_max_tokens",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SoftPromptError(
                    f"ServeSettings.{name} must be a positive integer, got {value!r}"
                )
        for name in ("max_wait_ms", "graceful_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise SoftPromptError(
                    f"ServeSettings.{name} must be a finite number >= 0, got {value!r}"
                )


class EngineError(Exception):
    """An error answered to one request, without HTTP: ``kind`` (what went wrong, see the
    module docstring), message, error ``code`` and the request field at fault (``param``)."""

    KINDS = (
        "invalid",
        "forbidden",
        "not_found",
        "conflict",
        "too_large",
        "busy",
        "closed",
        "internal",
        "unavailable",
    )

    def __init__(
        self,
        kind: str,
        message: str,
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown EngineError kind {kind!r}")
        # a lone surrogate from the request (echoed in a message) cannot be encoded as UTF-8
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after


# --------------------------------------------------------------------------------------------
# Running rows: generation and classification, each ONE model call for rows of many adapters
# --------------------------------------------------------------------------------------------


class _RowSampler:
    """Logits processor for ``generate``: rows with temperature > 0 (and rows that keep
    log-probabilities) choose their token through their ``RowDecoder``; the chosen token gets
    logit 0 and every other -inf, so ``generate``'s greedy step picks it. Greedy rows without
    log-probabilities pass through unchanged (no host sync)."""

    def __init__(self, decoders: Sequence[RowDecoder]) -> None:
        self.decoders = decoders
        self.picking = [
            (b, d)
            for b, d in enumerate(decoders)
            if (d.gen is not None or d.row.logprobs is not None) and d.row.group is None
        ]
        self.grouped = any(d.row.group is not None for d in decoders)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bad = scores.isnan().any(-1)  # (B,)
        if bad.any():
            raise nan_error(self.decoders[int(bad.nonzero()[0, 0])].row.adapter)
        if not self.picking and not self.grouped:
            return scores
        forced: dict[int, int] = {}  # row -> the token it must take
        for b, d in self.picking:
            if not d.done:
                token = d.pick(scores[b])
                if d.gen is not None:
                    forced[b] = token
        if self.grouped:  # mean-probability ensembles: every member takes the group's token
            picks = [0] * len(self.decoders)
            for b in pick_groups(self.decoders, scores, picks):
                forced[b] = picks[b]
        if not forced:
            return scores
        out = scores.clone()  # (B, V)
        rows = torch.tensor(list(forced), device=scores.device)
        out[rows] = float("-inf")
        out[rows, torch.tensor(list(forced.values()), device=scores.device)] = 0.0
        return out


class Cancelled(Exception):
    """``generate_rows`` was cancelled (``cancel`` set) before every row finished."""


class _RowStops:
    """Stopping criterion for ``generate``: pushes each step's tokens to the rows'
    ``RowDecoder`` (stop ids, ``max_tokens``, stop strings, abort, streamed text); every row
    ends at once when ``cancel`` is set (checked between decode steps)."""

    def __init__(self, decoders: Sequence[RowDecoder], cancel=None) -> None:
        self.decoders = decoders
        self.cancel = cancel

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.cancel is not None and self.cancel.is_set():
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].tolist()
        done = [d.push(last[b]) for b, d in enumerate(self.decoders)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def row_decoders(model, tokenizer, rows, on_done=None, decode=None, on_delta=None):
    """One ``RowDecoder`` per row, calling ``on_done(b, result)`` / ``on_delta(b, text,
    entries)`` with the row's index."""
    if decode is None:

        def decode(ids):
            return tokenizer.decode(ids, skip_special_tokens=True)

    eos = set(eos_ids(model, tokenizer))

    def bind(fn, b):
        return None if fn is None else (lambda *a: fn(b, *a))

    return [
        RowDecoder(r, eos, decode, model.device, bind(on_done, b), bind(on_delta, b))
        for b, r in enumerate(rows)
    ]


@torch.no_grad()
def generate_rows(
    model,
    tokenizer,
    rows: Sequence[GenerationRow],
    on_done=None,
    decode=None,
    cancel: threading.Event | None = None,
    on_delta=None,
):
    """Complete rows of different adapters and settings in ONE ``generate`` call.

    Args:
        model: a ``SoftPromptModel`` (decoder-only or encoder-decoder).
        rows: the prompts and their settings.
        on_done: ``on_done(b, result)`` is called as soon as row b is finished.
        decode: token ids -> text (default: ``tokenizer.decode(..., skip_special_tokens=True)``).
        cancel: when set, generation stops after the current decode step.
        on_delta: ``on_delta(b, text, entries)``: new text of a streamed row (see ``_RowStops``).

    Returns:
        One dict per row: ``text``, ``finish_reason`` ("stop", "length", or "aborted" when the
        row's ``abort`` was set), ``completion_tokens``, ``token_ids``, ``logprobs`` (None,
        or one entry per token: ``id``, ``logprob``, ``top``: [(id, logprob), ...]) and
        ``stop_logprob`` (the entry of the stop token that ended the row, if any). A row's result equals that row run alone (greedy rows: the same
        tokens; sampled rows: the same draws from its seeded generator).

    Raises:
        Cancelled: ``cancel`` was set before every row finished (finished rows were passed to
            ``on_done``).
        SoftPromptError: a row's logits are NaN (a non-finite adapter).
    """
    from transformers import LogitsProcessorList, StoppingCriteriaList

    pad = pad_id(tokenizer)
    # generate ends a row at any of ``eos_token_id``: the model's EOS only, which ends every
    # row; a row's own stop ids (a chat row's end of turn) end that row alone, through its
    # RowDecoder in ``_RowStops``, so they never leak into the other rows of the batch
    eos = eos_ids(model, tokenizer)
    decoders = row_decoders(model, tokenizer, rows, on_done, decode, on_delta)
    ids, mask = pad_prompts(model, [r.ids for r in rows], pad)
    model.generate(
        input_ids=ids,
        attention_mask=mask,
        adapter_names=[r.adapter for r in rows],
        max_new_tokens=max(r.max_tokens for r in rows),
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=eos or None,
        logits_processor=LogitsProcessorList([_RowSampler(decoders)]),
        stopping_criteria=StoppingCriteriaList([_RowStops(decoders, cancel)]),
    )
    if not all(d.done for d in decoders):
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled before every row finished")
        raise RuntimeError("generate returned before every row finished")
    return [d.result for d in decoders]


@torch.no_grad()
def classify_rows(model, prompts: Sequence[Sequence[int]], adapters: Sequence[str], tasks) -> list:
    """Class scores for rows of different classification adapters, scored by the code training
    and ``softprompt eval`` use.

    Label words (verbalizers): ``lm.row_answer_logprobs`` (``Task.class_scores``'s
    ``lm.answer_logprobs`` with each row's own labels), ONE forward for the batch. Linear heads
    (encoders): ``Task.class_scores`` (each row through its own adapter's head), one forward
    per number of labels in the batch.

    Returns:
        One (C_b,) tensor of class logits per row (C_b: that row's number of labels).
    """
    if tasks[0].spec.head:
        out: list = [None] * len(prompts)
        groups: dict[int, list[int]] = {}
        for b, t in enumerate(tasks):
            groups.setdefault(len(t.spec.labels), []).append(b)
        for rows in groups.values():
            scores = tasks[rows[0]].class_scores(
                [prompts[b] for b in rows], [adapters[b] for b in rows]
            )
            for b, s in zip(rows, scores, strict=True):
                out[b] = s.float()
        return out
    return row_answer_logprobs(
        model, prompts, [t.answers for t in tasks], list(adapters), pad_id(tasks[0].tok)
    )


@torch.no_grad()
def prompt_logprobs(model, tokenizer, rows) -> list[list[dict | None]]:
    """Log-probability of each real prompt token given the tokens before it, in ONE forward.

    Args:
        rows: objects with ``ids`` (token ids; negative: template virtual tokens), ``adapter``
            and ``top`` (how many most likely tokens to give per position).

    Returns:
        Per row, one entry per real (non-negative) token: None for the row's first token (it
        has no context), else ``token_entry``'s dict.
    """
    head = _hf.lm_body_and_head(model.base_model)[1]
    ids, mask = pad_left([r.ids for r in rows], pad_id(tokenizer), model.device)
    hidden = model(
        input_ids=ids,
        attention_mask=mask,
        adapter_names=[r.adapter for r in rows],
        body_only=True,
        use_cache=False,
    ).last_hidden_state  # (B, T, d)
    width = ids.shape[1]
    out = []
    for b, r in enumerate(rows):
        off = width - len(r.ids)
        real = [i for i, t in enumerate(r.ids) if t >= 0]
        scored = [i for i in real if i > 0]
        entries: dict[int, dict] = {}
        if scored:
            at = torch.tensor([off + i - 1 for i in scored], device=model.device)
            logp = F.log_softmax(head(hidden[b, at]).float(), dim=-1)  # (N, V)
            if not torch.isfinite(logp).all():
                raise SoftPromptError(
                    f"adapter {r.adapter!r} gave non-finite logits; its weights are not finite "
                    "(or overflow in this dtype): load a good adapter"
                )
            for j, i in enumerate(scored):
                entries[i] = token_entry(logp[j], r.ids[i], r.top)
        out.append([entries.get(i) for i in real])
    return out


# --------------------------------------------------------------------------------------------
# Tokens as raw bytes (OpenAI chat logprobs' "bytes")
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's printable stand-in character for each byte (GPT-2's table; based on
    openai/gpt-2 src/encoder.py ``bytes_to_unicode``)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}
_PIECE_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte fallback


def token_scheme(tokenizer) -> str:
    """How a tokenizer's token strings spell bytes: "byte_level" (GPT-2 style BPE: each
    character stands for one byte), "sentencepiece" ("\u2581" is a space, ``<0xNN>`` one byte)
    or "text" (the token's decoded text)."""
    if getattr(tokenizer, "byte_decoder", None) is not None:  # a Python GPT-2 tokenizer
        return "byte_level"
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    try:  # the decoder's JSON, e.g. {"type": "ByteLevel", ...} or a "Sequence" of decoders
        state = decoder.__getstate__() if decoder is not None else b""
        state = state.decode("utf-8", "replace") if isinstance(state, bytes) else str(state)
    except Exception:  # a decoder that cannot be serialised: read tokens as text
        state = ""
    if '"ByteLevel"' in state:
        return "byte_level"
    marks = ('"Metaspace"', '"ByteFallback"', "\u2581", "\\u2581")
    if any(m in state for m in marks) or hasattr(tokenizer, "sp_model"):
        return "sentencepiece"
    return "text"


def token_bytes(tokenizer, ids: Sequence[int], scheme: str) -> list[bytes]:
    """Each token's own raw bytes: a token holding part of a multi-byte UTF-8 character gives
    those bytes (its decoded text alone would be U+FFFD), so the bytes of a completion's tokens,
    joined, are its text's UTF-8 (``scheme``: ``token_scheme(tokenizer)``)."""
    out = []
    for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)), strict=True):
        if scheme == "byte_level" and piece and all(c in BYTE_OF_CHAR for c in piece):
            out.append(bytes(BYTE_OF_CHAR[c] for c in piece))
        elif scheme == "sentencepiece" and piece and _PIECE_BYTE.match(piece):
            out.append(bytes([int(piece[3:5], 16)]))
        elif scheme == "sentencepiece" and piece:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
        else:  # special and added tokens, other tokenizers: the decoded text
            out.append(tokenizer.decode([i]).encode("utf-8"))
    return out


# --------------------------------------------------------------------------------------------
# The engine: adapters, validation, queue and the batching worker
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class AdapterEntry:
    """A loaded adapter as the server sees it."""

    name: str
    path: Path
    meta: dict
    task: Any  # softprompt.tasks.Task or None
    input_tokens: int  # virtual tokens it adds to the input (input-level methods), else 0
    template_placement: bool
    created: int = field(default_factory=lambda: int(time.time()))
    parts: tuple[str, ...] = ()  # a composition of cartridges ("a+b"): the loaded parts

    def describe(self, root: str) -> dict:
        spec = None if self.task is None else self.task.spec
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "softprompt",
            "root": root,
            "parent": root,
            "method": self.meta["method"],
            "num_virtual_tokens": self.meta["config"].get("num_virtual_tokens"),
            "task": None if spec is None else spec.kind,
            "labels": None if spec is None or spec.kind != "classify" else list(spec.labels),
        }


def _units(rows: Sequence[_Row]) -> list[list[_Row]]:
    """``rows`` as the units a failed batch is retried in: a row alone, or all the members of
    a mean-probability ensemble together (in their order)."""
    units: list[list[_Row]] = []
    groups: dict = {}
    for r in rows:
        if r.group is None:
            units.append([r])
        elif r.group in groups:
            groups[r.group].append(r)
        else:
            groups[r.group] = [r]
            units.append(groups[r.group])
    return units


@dataclass(eq=False)
class _Row:
    """A queued row. ``sink`` (streamed rows): called from the worker thread with
    ``("delta", (text, entries))``, then ``("done", result)`` or ``("error", exception)``."""

    kind: str  # "generate" | "classify" | "score"
    entry: AdapterEntry | None
    ids: list[int]
    gen: GenerationRow | None = None
    future: Future = field(default_factory=Future)
    enqueued: float = 0.0
    sink: Any = None
    top: int = 0  # "score" rows: top log-probabilities per prompt token

    @property
    def adapter(self) -> str | None:
        return None if self.entry is None else self.entry.name

    @property
    def group(self):
        """The mean-probability ensemble this row is a member of (None: none)."""
        return None if self.gen is None else self.gen.group

    @property
    def done(self) -> bool:
        return self.future.done()

    def resolve(self, value) -> None:
        try:
            self.future.set_result(value)
        except InvalidStateError:  # already answered, or the client went away
            return
        if self.sink is not None:
            self.sink(("done", value))

    def fail(self, err: BaseException) -> None:
        try:
            self.future.set_exception(err)
        except InvalidStateError:
            return
        if self.sink is not None:
            self.sink(("error", err))


class Engine:
    """Owns the model, the adapter table and the batching worker thread.

    Threads: HTTP handlers validate and enqueue on the event loop; the worker thread runs the
    model. ``model_lock`` guards the model (worker calls, adapter load/unload); ``tok_lock``
    guards the tokenizer (a fast tokenizer must not be used by two threads at once).
    """

    def __init__(self, model, tokenizer, settings: ServeSettings, roots: list[Path]) -> None:
        self.model = model
        self.tok = tokenizer
        self.settings = settings
        self.roots = [r.resolve() for r in roots]
        self.base_name = settings.model_name or model.info.identity.get("name_or_path") or "base"
        self.entries: dict[str, AdapterEntry] = {}
        self.model_lock = threading.Lock()
        self.tok_lock = threading.Lock()
        self._token_scheme: str | None = None  # token_scheme(tokenizer), read on first use
        self.created = int(time.time())
        self._cond = threading.Condition()
        self._queue: deque[_Row] = deque()
        self._running = 0
        self._stopping = False
        self._cancel = threading.Event()  # set: unfinished rows are answered 503
        self._draining = False
        self._thread: threading.Thread | None = None
        self.stats = {
            "requests": 0,
            "rows": 0,
            "model_calls": 0,
            "failed_calls": 0,
            "rejected_queue_full": 0,
            "batch_sizes": Counter(),
            "mixed_adapter_calls": 0,
            "max_adapters_in_call": 0,
            "aborted_rows": 0,
        }
        cfg = model.base_model.config
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self.can_generate = model.info.is_encoder_decoder or model.info.is_causal_lm
        self.stats["decode_steps"] = self.stats["mixed_adapter_steps"] = 0
        self.scheduling = settings.scheduling
        if self.scheduling == "step" and self.can_generate:
            why = can_step(model)
            if why is not None:
                log.info("generation runs batch at a time: %s", why)
                self.scheduling = "batch"
        self._steps: StepBatch | None = None  # the rows in flight (scheduling "step")

    # ---------------------------------------------------------------- adapters
    def load(self, name: str, path: str | Path, *, check_root: bool = True) -> AdapterEntry:
        """Load adapter ``path`` as ``name`` (validated; see the HTTP errors it raises)."""
        from .io import read_adapter_config, resolve_adapter_dir
        from .tasks import Task, TaskSpec

        if not isinstance(name, str) or not NAME_RE.match(name):
            raise EngineError(
                "invalid",
                f"adapter name {name!r} is invalid: use 1-64 letters, digits, '_' or '-'",
                param="name",
            )
        if name in (BASE_ALIAS, self.base_name):
            raise EngineError(
                "conflict",
                f"name: {name!r} is the base model's name; choose another",
                "conflict",
                "name",
            )
        if check_root:
            try:
                directory = self.allowed_path(path)
                if resolve_adapter_dir(directory) != directory:  # a run folder: its adapter/
                    directory = self.allowed_path(resolve_adapter_dir(directory))
                self._check_files_inside(path, directory)
            except (OSError, RuntimeError) as e:  # name too long, symlink loop, no permission
                raise EngineError(
                    "invalid",
                    f"path: cannot read {str(path)[:200]!r}: {e}",
                    "invalid_adapter",
                    "path",
                ) from e
        else:
            directory = resolve_adapter_dir(Path(path).resolve()).resolve()
        try:
            meta = read_adapter_config(directory)
        except SoftPromptError as e:
            raise EngineError("invalid", str(e), "invalid_adapter", "path") from e
        with self.model_lock:
            if name in self.entries:
                raise EngineError(
                    "conflict",
                    f"name: an adapter named {name!r} is loaded; DELETE it first",
                    "conflict",
                    "name",
                )
            identity, recorded = self.model.info.identity, meta["base_model"]
            if "peft" in meta:  # a PEFT folder records its hidden size only: the fields it
                # does not record are no difference (a corrupt file is a 400, not a 409)
                recorded = {**identity, **recorded}
            mismatch = _hf.identity_mismatches(recorded, identity)
            try:
                import softprompt as sp

                from .io import WEIGHTS_NAME

                # served baked (no prefix MLP / prompt encoder per request), also from a
                # folder that keeps the trainable form beside (a checkpoint, HF's callback)
                baked = (directory / WEIGHTS_NAME).exists()
                sp.load_adapter(
                    self.model, directory, name=name, trainable=False if baked else None
                )
            except SoftPromptError as e:
                kind = "conflict" if mismatch else "invalid"
                raise EngineError(
                    kind,
                    str(e),
                    "adapter_model_mismatch" if mismatch else "invalid_adapter",
                    "path",
                ) from e
            try:
                adapter = self.model.adapters[name]
                task = None
                if adapter.task:
                    with self.tok_lock:
                        task = Task(TaskSpec.from_dict(adapter.task), self.model, self.tok)
                prompt = adapter.input_prompt()
                placement = getattr(adapter.config, "placement", "prepend")
                entry = AdapterEntry(
                    name=name,
                    path=directory,
                    meta=meta,
                    task=task,
                    input_tokens=0 if prompt is None or placement == "template" else len(prompt),
                    template_placement=placement == "template",
                )
            except (SoftPromptError, TypeError) as e:
                self.model.delete_adapter(name)
                raise EngineError(
                    "invalid", f"{directory}: bad task in adapter_config.json: {e}"
                ) from e
            self.entries[name] = entry
        log.info("loaded adapter %s from %s (%s)", name, directory, meta["method"])
        return entry

    def unload(self, name: str) -> None:
        with self.model_lock:
            if name not in self.entries:
                raise EngineError(
                    "not_found", f"no adapter named {name!r} is loaded", "model_not_found"
                )
            del self.entries[name]
            self.model.delete_adapter(name)
            for other in [e for e in self.entries.values() if name in e.parts]:
                del self.entries[other.name]  # compositions that read it
                self.model.delete_adapter(other.name)
        log.info("unloaded adapter %s", name)

    def allowed_path(self, path: str | Path) -> Path:
        """Resolve ``path`` (absolute, or relative to an adapter root) inside an allowed root."""
        if not isinstance(path, str | Path) or not str(path) or "\x00" in str(path):
            raise EngineError("invalid", "path must be a non-empty folder path", param="path")
        if not self.roots:
            raise EngineError(
                "forbidden",
                "loading adapters at run time is disabled: start the server with --adapter-root",
                "forbidden_path",
                "path",
            )
        given = Path(path)
        candidates = [given] if given.is_absolute() else [root / given for root in self.roots]
        for cand in candidates:
            real = cand.resolve()
            if not any(real == r or r in real.parents for r in self.roots):
                raise EngineError(
                    "forbidden",
                    f"path {str(path)!r} is outside the allowed adapter folders (--adapter-root)",
                    "forbidden_path",
                    "path",
                )
            if real.is_dir():
                return real
        raise EngineError(
            "invalid",
            f"no adapter folder {str(path)!r} under the adapter roots",
            "invalid_adapter",
            "path",
        )

    def _check_files_inside(self, path: str | Path, directory: Path) -> None:
        """403 unless every adapter file of ``directory`` (and of a run folder's ``adapter/``)
        resolves inside an allowed root: a file symlink must not lead out either."""
        from . import peft_compat
        from .io import CONFIG_NAME, TRAINABLE_NAME, WEIGHTS_NAME

        names = (CONFIG_NAME, WEIGHTS_NAME, TRAINABLE_NAME, peft_compat.WEIGHTS_NAME)
        for folder in (directory, directory / "adapter"):
            for name in (*names, peft_compat.BIN_NAME):
                file = folder / name
                if not (file.exists() or file.is_symlink()):
                    continue
                real = file.resolve()
                if not any(real == r or r in real.parents for r in self.roots):
                    raise EngineError(
                        "forbidden",
                        f"{file.relative_to(directory)} in {str(path)!r} leads outside the allowed "
                        "adapter folders (--adapter-root)",
                        "forbidden_path",
                        "path",
                    )

    def resolve(self, name: str) -> AdapterEntry | None:
        """The adapter a request's ``model`` names (None: the base model); 404 if unknown."""
        if name in (BASE_ALIAS, self.base_name):
            return None
        entry = self.entries.get(name)
        if entry is None and COMPOSE in name:
            return self._compose(name)
        if entry is None:
            known = sorted(self.entries) + [BASE_ALIAS]
            raise EngineError(
                "not_found",
                f"the model {name!r} does not exist; loaded: {known}",
                "model_not_found",
                "model",
            )
        return entry

    def _compose(self, name: str) -> AdapterEntry:
        """``"a+b"``: cartridges a and b in one prefix (``cartridge.compose``), made on first
        use and kept (listed in /v1/models) until a part is unloaded."""
        from .cartridge import compose

        parts = name.split(COMPOSE)
        missing = [p for p in parts if p not in self.entries]
        if missing:
            raise EngineError(
                "not_found",
                f"model: {name!r} composes {missing}, which are not loaded; loaded: "
                f"{sorted(self.entries)}",
                "model_not_found",
                "model",
            )
        bad = [p for p in parts if self.entries[p].meta["method"] != "cartridge"]
        if bad or len(set(parts)) < len(parts):
            raise EngineError(
                "invalid",
                f"model: {name!r}: '{COMPOSE}' joins distinct cartridges"
                + (f"; {bad} are not cartridges" if bad else ""),
                "invalid_composition",
                "model",
            )
        with self.model_lock:
            if name in self.entries:
                return self.entries[name]
            if sum(1 for e in self.entries.values() if e.parts) >= MAX_COMPOSED:
                raise EngineError(
                    "invalid",
                    f"model: this server keeps at most {MAX_COMPOSED} compositions; unload "
                    "one of their cartridges to free them",
                    "too_many_compositions",
                    "model",
                )
            try:
                ad = compose(self.model, parts, name)
            except SoftPromptError as e:
                raise EngineError("invalid", f"model: {e}", "invalid_composition", "model") from e
            first = self.entries[parts[0]]
            entry = AdapterEntry(
                name=name,
                path=first.path,
                meta={
                    "method": "cartridge",
                    "config": {"num_virtual_tokens": ad.config.num_virtual_tokens},
                },
                task=first.task,
                input_tokens=0,
                template_placement=False,
                parts=tuple(parts),
            )
            self.entries[name] = entry
        log.info("composed %s (%d prefix tokens)", name, ad.config.num_virtual_tokens)
        return entry

    def models(self) -> list[dict]:
        base = {
            "id": self.base_name,
            "object": "model",
            "created": self.created,
            "owned_by": "softprompt",
            "root": self.base_name,
            "parent": None,
            "aliases": [BASE_ALIAS],
        }
        return [base] + [e.describe(self.base_name) for e in list(self.entries.values())]

    # ---------------------------------------------------------------- encoding
    def _template_field(self, entry: AdapterEntry, preferred: str) -> str | None:
        fields = entry.task.template.fields
        if preferred in fields or not fields:
            return preferred
        return next(iter(fields)) if len(fields) == 1 else None

    def encode_completion(
        self, entry: AdapterEntry | None, prompt: str | list[int], use_template: bool
    ):
        """Prompt ids: through the adapter's task template (its input field), as raw text, or
        (a list of token ids) the ids as they are, no template (OpenAI's token-id prompts)."""
        if isinstance(prompt, list):
            return self._check_prompt(self._token_ids(entry, prompt))
        if entry is not None and entry.task is not None and use_template:
            if entry.task.spec.kind == "chat":
                raise EngineError(
                    "invalid",
                    f"model: adapter {entry.name!r} is a chat adapter (task 'chat'): send "
                    'messages to /v1/chat/completions, or "use_template": false with the full '
                    "text",
                    "model_is_chat",
                    "model",
                )
            main = "input" if entry.task.spec.kind == "generate" else "text"
            name = self._template_field(entry, main)
            if name is None:
                raise EngineError(
                    "invalid",
                    f"adapter {entry.name!r}'s template {entry.task.spec.template!r} needs fields "
                    f"{sorted(entry.task.template.fields)}; a prompt fills one. Send "
                    '"use_template": false with the full text',
                    param="prompt",
                )
            ids = self._encode_row(entry, {name: prompt}, "prompt")
        else:
            if entry is not None and entry.template_placement:
                raise EngineError(
                    "invalid",
                    f"adapter {entry.name!r} places its virtual tokens with its template; "
                    'send "use_template": true',
                    param="use_template",
                )
            with self.tok_lock:
                ids = list(self.tok(prompt)["input_ids"])
        return self._check_prompt(ids)

    def encode_chat(
        self, entry: AdapterEntry | None, messages: list[dict]
    ) -> tuple[list[int], tuple[int, ...]]:
        """Prompt ids and end-of-turn ids of a conversation: the base model's chat template
        (with the generation prompt), or an adapter's chat task (``Task.prompt_ids``)."""
        if entry is None:
            if not getattr(self.tok, "chat_template", None):
                raise EngineError(
                    "invalid",
                    "model: the base model's tokenizer has no chat template; use "
                    "/v1/completions, or an adapter trained with --task chat",
                    param="model",
                )
            try:
                with self.tok_lock:
                    text = self.tok.apply_chat_template(
                        messages, add_generation_prompt=True, tokenize=False
                    )
                    ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
            except Exception as e:  # a template that raises on these messages (jinja)
                raise EngineError(
                    "invalid", f"messages: the chat template refused them: {e}", param="messages"
                ) from e
            stop = self._base_chat_stop_ids()
        else:
            kind = None if entry.task is None else getattr(entry.task.spec, "kind", None)
            if kind != "chat":
                raise EngineError(
                    "invalid",
                    f"model: adapter {entry.name!r} has task {kind!r}; chat completions need "
                    'an adapter trained with --task chat, or "model": "base" (use '
                    "/v1/completions or /v1/classify for this adapter)",
                    "model_not_chat",
                    "model",
                )
            try:
                with self.tok_lock:
                    ids = list(entry.task.prompt_ids({"messages": messages}))
                    stop = tuple(entry.task.stop_ids)
            except SoftPromptError as e:
                raise EngineError("invalid", f"messages: {e}", param="messages") from e
        return self._check_prompt(ids, "messages"), tuple(stop)

    def _base_chat_stop_ids(self) -> tuple[int, ...]:
        stop = eos_ids(self.model, self.tok)
        try:  # softprompt.chat (the chat-task module) knows templates' end-of-turn tokens
            from .chat import ChatFormat

            with self.tok_lock:
                extra = list(ChatFormat.of(self.tok).stop_ids)
        except Exception:  # not there, or a template it cannot probe: EOS only
            extra = []
        return tuple(dict.fromkeys(stop + extra))

    def encode_classify(self, entry: AdapterEntry, item: str | dict[str, str]):
        if isinstance(item, str):
            name = self._template_field(entry, "text")
            if name is None:
                raise EngineError(
                    "invalid",
                    f"adapter {entry.name!r}'s template needs fields "
                    f"{sorted(entry.task.template.fields)}; give each input as an object of them",
                    param="input",
                )
            item = {name: item}
        ids = self._check_prompt(self._encode_row(entry, item, "input"), "input")
        if self.max_positions is not None:  # the row as scored: virtual tokens, label words
            answers = getattr(entry.task, "answers", None) or ()
            label = 0 if entry.task.spec.head else max((len(a) for a in answers), default=0)
            offset = self.model.adapters[entry.name].position_offset
            need = len(ids) + entry.input_tokens + label + offset
            if need > self.max_positions:
                raise EngineError(
                    "invalid",
                    f"input ({len(ids)} tokens + {entry.input_tokens} virtual + {label} of the "
                    f"longest label word{f' + a position offset of {offset}' if offset else ''})"
                    f" exceeds the model's {self.max_positions} positions",
                    "context_length_exceeded",
                    "input",
                )
        return ids

    def _encode_row(self, entry: AdapterEntry, row: dict, param: str) -> list[int]:
        try:
            with self.tok_lock:
                if getattr(entry.task.spec, "is_chat", False):  # classify in chat form
                    return list(entry.task.prompt_ids(row))
                return entry.task.template.encode(row, self.tok)
        except SoftPromptError as e:
            fields = sorted(entry.task.template.fields)
            raise EngineError(
                "invalid",
                f"{param}: {e} (adapter {entry.name!r}'s template fields: {fields})",
                param=param,
            ) from e

    def _token_ids(self, entry: AdapterEntry | None, ids: list[int]) -> list[int]:
        if entry is not None and entry.template_placement:
            raise EngineError(
                "invalid",
                f"prompt: adapter {entry.name!r} places its virtual tokens with its template; "
                "send the prompt as text",
                param="prompt",
            )
        vocab = self.model.base_model.get_input_embeddings().weight.shape[0]
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise EngineError(
                "invalid",
                f"prompt: token id {ids[bad]} at position {bad} is outside the vocabulary "
                f"(0..{vocab - 1})",
                param="prompt",
            )
        return list(ids)

    def _check_prompt(self, ids: list[int], param: str = "prompt") -> list[int]:
        limit = self.settings.max_prompt_tokens
        if not any(i >= 0 for i in ids):
            raise EngineError("invalid", f"{param}: the prompt is empty (no tokens)", param=param)
        if len(ids) > limit:
            raise EngineError(
                "invalid",
                f"{param}: the prompt is {len(ids)} tokens; this server's limit is {limit} "
                "tokens (--max-prompt-tokens)",
                "prompt_too_long",
                param,
            )
        return ids

    def context_left(self, entry: AdapterEntry | None, ids: list[int]) -> int | None:
        """Positions the model has left for new tokens after the prompt ``ids`` and the
        adapter's virtual tokens (None: no known limit, or an encoder-decoder, whose decoder
        does not share the prompt's positions)."""
        if self.max_positions is None or self.model.info.is_encoder_decoder:
            return None
        extra = 0 if entry is None else entry.input_tokens
        return self.max_positions - len(ids) - extra

    def check_context(self, entry: AdapterEntry | None, ids: list[int], max_tokens: int) -> None:
        if self.max_positions is None:
            return
        extra = 0 if entry is None else entry.input_tokens
        need = len(ids) + extra + (0 if self.model.info.is_encoder_decoder else max_tokens)
        if need > self.max_positions:
            raise EngineError(
                "invalid",
                f"prompt ({len(ids)} tokens + {extra} virtual) plus max_tokens ({max_tokens}) "
                f"exceeds the model's {self.max_positions} positions",
                "context_length_exceeded",
                "max_tokens",
            )

    # ---------------------------------------------------------------- queue and worker
    def start(self) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = self._draining = False
                self._cancel.clear()
                self._thread = threading.Thread(
                    target=self._loop, name="softprompt-batcher", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued and running row, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self, grace: float | None = None) -> None:
        """Begin shutting down; returns at once (safe to call from a signal handler).

        New requests get 503; rows queued or running get ``grace`` seconds (default:
        ``settings.graceful_timeout``) to finish, then the rest are cancelled (``cancel``).
        A second call cancels at once.
        """
        grace = self.settings.graceful_timeout if grace is None else grace
        again = self._draining
        self._draining = True
        timer = threading.Timer(0 if again else grace, self._begin_stop_then_cancel)
        timer.daemon = True
        timer.start()
        if not again:  # stop taking rows now, off the signal handler's thread
            threading.Thread(target=self._begin_stop, daemon=True).start()

    def _begin_stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _begin_stop_then_cancel(self) -> None:
        self._begin_stop()
        self.cancel()

    def cancel(self) -> None:
        """Answer every queued row 503 now and stop the running batch at its next decode step."""
        self._cancel.set()
        with self._cond:
            rows = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for r in rows:
            r.fail(self._cancelled())

    def _cancelled(self) -> EngineError:
        return EngineError(
            "unavailable",
            "the server shut down before this request finished (--graceful-timeout "
            f"{self.settings.graceful_timeout:g} s); retry it",
            "shutting_down",
        )

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return self._running

    def submit(self, rows: list[_Row], param: str | None = None) -> list[Future]:
        """Queue a request's rows (all or none); 429 when the queue is full, 400 when it could
        never hold them (``param``: the request field that holds the rows)."""
        with self._cond:
            if self._stopping:
                raise EngineError("unavailable", "the server is shutting down", "shutting_down")
            limit = self.settings.max_queue
            if len(rows) > limit:  # never fits: not a retry-later
                raise EngineError(
                    "invalid",
                    f"this request has {len(rows)} rows (prompts x n); the queue holds at most "
                    f"{limit} rows (--max-queue): send at most {limit} per request",
                    "too_many_rows",
                    param,
                )
            sizes = Counter(r.group for r in rows if r.group is not None)
            if sizes and max(sizes.values()) > self.settings.max_batch:
                raise EngineError(
                    "invalid",
                    f"a mean-probability ensemble of {max(sizes.values())} members runs as rows "
                    f"of one batch; this server's batch holds at most {self.settings.max_batch} "
                    "rows (--max-batch): list fewer adapters",
                    "too_many_rows",
                    "model",
                )
            if len(self._queue) + len(rows) > limit:
                self.stats["rejected_queue_full"] += 1
                raise EngineError(
                    "busy",
                    f"the queue is full ({len(self._queue)} rows waiting, limit {limit}, "
                    "--max-queue); retry later",
                    "queue_full",
                    retry_after=1,
                )
            now = time.monotonic()
            for r in rows:
                r.enqueued = now
                self._queue.append(r)
            self.stats["requests"] += 1
            self._cond.notify_all()
        if self._thread is None:
            self.start()
        return [r.future for r in rows]

    def _take(self) -> list[_Row] | None:
        """The next rows to run: waits for the first (and ``max_wait_ms`` for more) when
        nothing is in flight; while rows are decoding, takes at once what fits beside them."""
        s = self.settings
        steps = self._steps
        in_flight = 0 if steps is None else len(steps)
        with self._cond:
            if in_flight:
                batch = self._pop(max(0, s.max_batch - in_flight))
                self._running = in_flight + len(batch)
                return batch
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None  # stopping, and nothing left
            deadline = self._queue[0].enqueued + s.max_wait_ms / 1000
            while len(self._queue) < s.max_batch and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = self._pop(s.max_batch)
            self._running = len(batch)
            return batch

    def _pop(self, room: int) -> list[_Row]:
        """Up to ``room`` rows from the queue's head, a mean-probability ensemble's members all
        or none (``submit`` refuses a group larger than ``max_batch``)."""
        queue, batch = self._queue, []
        while queue:
            head = queue[0]
            members = [head] if head.group is None else [r for r in queue if r.group == head.group]
            if len(batch) + len(members) > room:
                break
            for r in members:
                queue.remove(r)  # _Row compares by identity
            batch += members
        return batch

    def _loop(self) -> None:
        if self.scheduling == "step":
            self._steps = StepBatch(self.model, self.tok)
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run_batch(batch)
                if self._steps is not None and len(self._steps):
                    self._step()
            except BaseException as e:  # never leave a client waiting
                log.exception("batch failed")
                err = EngineError("internal", f"internal error: {type(e).__name__}: {e}")
                for r in batch:
                    r.fail(err)
                if self._steps is not None:
                    for d in self._steps.drop(lambda d: True):
                        d.owner.fail(err)
            finally:
                self._running = 0 if self._steps is None else len(self._steps)

    def _run_batch(self, batch: list[_Row]) -> None:
        for r in batch:  # the client went away while the row was queued
            if r.gen is not None and r.gen.abort is not None and r.gen.abort.is_set():
                self.stats["aborted_rows"] += 1
                r.fail(EngineError("closed", "the client closed the connection", "client_closed"))
        batch = [r for r in batch if not r.done]
        for kind in ("classify", "score", "generate"):
            rows = [r for r in batch if r.kind == kind]
            if not rows:
                continue
            with self.model_lock:
                live = []
                for r in rows:
                    if r.entry is not None and self.entries.get(r.entry.name) is not r.entry:
                        r.fail(
                            EngineError(
                                "not_found",
                                f"adapter {r.entry.name!r} was unloaded before this request ran",
                                "model_not_found",
                            )
                        )
                    else:
                        live.append(r)
                if live:
                    self._call(kind, live)

    def _step(self) -> None:
        """One decode step of the rows in flight (scheduling "step")."""
        steps = self._steps
        with self.model_lock:
            if self._cancel.is_set():
                for d in steps.drop(lambda d: True):
                    d.owner.fail(self._cancelled())
                return
            for d in steps.drop(lambda d: d.row.abort is not None and d.row.abort.is_set()):
                d.finish("aborted")  # counted by on_done
            gone = {d.owner.entry.name for d in steps.rows if not self._still_loaded(d.owner)}
            for d in steps.drop(lambda d: not self._still_loaded(d.owner)):
                name = d.owner.entry.name if d.owner.entry.name in gone else sorted(gone)[0]
                d.owner.fail(  # an ensemble's other members fail with it, naming it
                    EngineError(
                        "not_found",
                        f"adapter {name!r} was unloaded while this request ran",
                        "model_not_found",
                    )
                )
            if not len(steps):
                return
            adapters = {d.row.adapter for d in steps.rows}
            for d, err in steps.step():
                self.stats["failed_calls"] += 1
                d.owner.fail(EngineError("invalid", str(err), "invalid_adapter", "model"))
            self.stats["decode_steps"] += 1
            if len(adapters) > 1:
                self.stats["mixed_adapter_steps"] += 1

    def _still_loaded(self, row: _Row) -> bool:
        return row.entry is None or self.entries.get(row.entry.name) is row.entry

    def _call(self, kind: str, rows: list[_Row]) -> None:
        """One model call; if it fails, each unanswered row is retried alone."""
        if self._cancel.is_set():
            for r in rows:
                r.fail(self._cancelled())
            return
        self.stats["model_calls"] += 1
        try:
            if kind == "generate":
                self._generate(rows)
            elif kind == "score":
                self._score(rows)
            else:
                self._classify(rows)
        except Exception as e:
            if self._cancel.is_set():  # Cancelled, or a failure while shutting down
                for r in rows:
                    r.fail(self._cancelled())
                return
            self.stats["failed_calls"] += 1
            units = _units(rows)
            if len(units) == 1:  # one row, or one ensemble (its members fail together)
                log.warning("row failed: %s: %s", type(e).__name__, e)
                if isinstance(e, EngineError):
                    err = e
                elif isinstance(e, SoftPromptError):
                    err = EngineError("invalid", str(e), "invalid_adapter", "model")
                else:
                    err = EngineError("internal", f"internal error: {type(e).__name__}: {e}")
                for r in rows:
                    r.fail(err)
                return
            log.warning("batch of %d failed (%s); running its rows one by one", len(rows), e)
            for unit in units:  # a row alone, or an ensemble's members together
                if not any(r.done for r in unit):
                    self._call(kind, unit)
            return
        self.stats["rows"] += len(rows)
        self.stats["batch_sizes"][len(rows)] += 1
        adapters = {r.adapter for r in rows}
        if len(adapters) > 1:
            self.stats["mixed_adapter_calls"] += 1
        self.stats["max_adapters_in_call"] = max(self.stats["max_adapters_in_call"], len(adapters))

    def _decode(self, ids: list[int]) -> str:
        with self.tok_lock:
            return self.tok.decode(ids, skip_special_tokens=True)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text (special tokens included), for log-probability answers."""
        with self.tok_lock:
            return [self.tok.decode([i]) for i in ids]

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        """Each token's own raw bytes (``token_bytes``): part of a character where the token
        holds part of one."""
        with self.tok_lock:
            if self._token_scheme is None:
                self._token_scheme = token_scheme(self.tok)
            return token_bytes(self.tok, ids, self._token_scheme)

    def _generate(self, rows: list[_Row]) -> None:
        def done(b: int, result: dict) -> None:
            if result["finish_reason"] == "aborted":
                self.stats["aborted_rows"] += 1
            rows[b].resolve(result)

        def delta(b: int, text: str, entries) -> None:
            if rows[b].sink is not None:
                rows[b].sink(("delta", (text, entries)))

        if self._steps is None:
            generate_rows(
                self.model,
                self.tok,
                [r.gen for r in rows],
                done,
                self._decode,
                self._cancel,
                on_delta=delta,
            )
            return
        decoders = row_decoders(self.model, self.tok, [r.gen for r in rows], done, self._decode)
        for d, r in zip(decoders, rows, strict=True):
            d.owner = r
            d.on_delta = None if r.sink is None else (lambda t, e, r=r: r.sink(("delta", (t, e))))
        self._steps.add(decoders)  # prefill; the rows decode from the next step on

    def _score(self, rows: list[_Row]) -> None:
        """Prompt tokens' log-probabilities (``echo``): one forward over the rows."""
        for r, entries in zip(rows, prompt_logprobs(self.model, self.tok, rows), strict=True):
            r.resolve(entries)

    def _classify(self, rows: list[_Row]) -> None:
        scores = classify_rows(
            self.model,
            [r.ids for r in rows],
            [r.adapter for r in rows],
            [r.entry.task for r in rows],
        )
        for r, s in zip(rows, scores, strict=True):
            probs = s.float().softmax(-1)  # (C,)
            if not torch.isfinite(probs).all():  # this row alone: the others are answered
                r.fail(
                    EngineError(
                        "invalid",
                        f"adapter {r.adapter!r} gave non-finite class scores; its weights are "
                        "not finite (or overflow in this dtype): load a good adapter",
                        "invalid_adapter",
                        "model",
                    )
                )
                continue
            probs = probs.cpu().tolist()
            labels = r.entry.task.spec.labels
            best = max(range(len(probs)), key=probs.__getitem__)
            r.resolve({"label": labels[best], "scores": dict(zip(labels, probs, strict=True))})

    def snapshot(self) -> dict:
        stats = dict(self.stats)
        stats["batch_sizes"] = {str(k): v for k, v in sorted(self.stats["batch_sizes"].items())}
        return {"queued": self.queued, "running": self.running, **stats}
