"""Cartridges by self-study: synthetic conversations about a corpus, and context distillation.

Eyuboglu et al. 2025 (arXiv 2506.06266). The cartridge itself is the ``cartridge`` method
(``softprompt.methods.cartridge``); this module makes its training data and trains it:

1. ``self_study``: the corpus is cut into chunks of ``chunk_tokens`` tokens; per conversation a
   chunk and a seed prompt of one of ``SEED_KINDS`` (question, summary, quote, use case) are
   drawn, the base model *with the chunk in its context* writes the user's message, then answers
   it. Rows are chat JSONL (``{"messages": [system = chunk, user, assistant]}``: the teacher's
   view), one per line, appended as they are made: a rerun continues where the file ends.
2. ``teacher_targets``: the teacher (model + chunk + conversation) runs once per row; its top-k
   next-token log-probabilities on the answer tokens are stored (``teacher.pt``).
3. ``DistillTask``: the student (model + cartridge + conversation, no chunk) is trained on
   KL(teacher || student) over the stored top-k of each answer token; the ``Trainer`` runs it
   (resume, progress bar, curve, dev evaluation on held-out synthetic conversations: the
   headline is ``neg_kl``, higher is better).

Contexts longer than the model's are never cut silently: chunks are at most ``chunk_tokens``,
and a chunk plus its conversation that does not fit the model's context is an error.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from . import _hf
from .errors import SoftPromptError
from .lm import pad_left
from .tasks import pad_id

SEED_KINDS: dict[str, list[str]] = {
    "question": [
        "Ask one specific question about a fact stated in the text above. Write only the question.",
        "Write a question that someone who has read the text above could answer. Only the question.",
    ],
    "summary": [
        "Ask for a short summary of one part of the text above. Write only the request.",
    ],
    "quote": [
        "Ask for the exact sentence of the text above that says something specific. Only the request.",
    ],
    "use_case": [
        "Ask how the information in the text above applies to a practical situation. Only the question.",
    ],
}
DATA_NAME = "selfstudy.jsonl"
DEV_NAME = "dev.jsonl"
TEACHER_NAME = "teacher.pt"


# ------------------------------------------------------------------------------ corpus


def read_corpus(path: str | Path) -> str:
    """The text of a corpus file.

    Raises:
        SoftPromptError: a missing, empty (or whitespace-only), binary (NUL bytes) or non-UTF-8
            file.
    """
    path = Path(path)
    if not path.is_file():
        raise SoftPromptError(f"corpus {path} does not exist or is not a file")
    data = path.read_bytes()
    if b"\x00" in data:
        raise SoftPromptError(f"corpus {path} is binary (it holds NUL bytes); give a text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SoftPromptError(
            f"corpus {path} is not UTF-8 text (byte {e.start}: {data[e.start : e.start + 4]!r})"
        ) from e
    if not text.strip():
        raise SoftPromptError(f"corpus {path} is empty")
    return text


def corpus_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def chunks(ids: list[int], chunk_tokens: int) -> list[list[int]]:
    """Consecutive chunks of at most ``chunk_tokens`` tokens covering ``ids`` (the last shorter)."""
    if chunk_tokens < 1:
        raise SoftPromptError(f"chunk_tokens must be positive, got {chunk_tokens}")
    return [ids[i : i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)]


def render(tok, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template."""
    text = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return tok(text, add_special_tokens=False)["input_ids"]


def context_ids(tok, text: str) -> list[int]:
    """The context a teacher (or a prefill-initialised cartridge) reads: ``text`` as the system
    message."""
    return render(tok, [{"role": "system", "content": text}])


def split_row(tok, messages: list[dict]) -> dict:
    """One chat row's teacher context, conversation and answer span.

    Returns:
        {"context": ids of the system message, "conv": ids of the rest, "answer": (start, end)
        of the last assistant message (its text and end-of-turn token) in ``conv``}.
    """
    if (
        not messages
        or messages[0].get("role") != "system"
        or messages[-1].get("role") != "assistant"
    ):
        raise SoftPromptError("a self-study row is [system (the chunk), ..., assistant]")
    full = render(tok, messages)
    ctx = render(tok, messages[:1])
    head = render(tok, messages[:-1], generation_prompt=True)
    if full[: len(ctx)] != ctx or full[: len(head)] != head:
        raise SoftPromptError(
            "the chat template does not render a conversation as its system message followed by "
            "the rest; the teacher's and the student's tokens would not align"
        )
    conv = full[len(ctx) :]
    return {"context": ctx, "conv": conv, "answer": (len(head) - len(ctx), len(conv))}


# ------------------------------------------------------------------------------ self-study


@torch.no_grad()
def _generate(model, tok, messages: list[dict], max_new_tokens: int, seed: int) -> str:
    ids = torch.tensor([render(tok, messages, generation_prompt=True)], device=model.device)
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        pad_token_id=pad_id(tok),
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def self_study(
    model,
    tok,
    text: str,
    output: str | Path,
    *,
    conversations: int = 32,
    dev: int = 8,
    chunk_tokens: int = 512,
    max_new_tokens: int = 64,
    seed: int = 0,
    log=print,
) -> tuple[Path, Path]:
    """Write ``conversations`` training rows to OUTPUT/selfstudy.jsonl and ``dev`` held-out rows
    to OUTPUT/dev.jsonl (resumable: rows already there are kept, generation continues).

    ``model`` is a transformers model or a ``SoftPromptModel`` (used without adapters). Row i
    depends only on (seed, i), so a resumed file equals an uninterrupted one.

    Returns:
        (train path, dev path).
    """
    base = getattr(model, "base_model", model)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    parts = chunks(corpus_ids(tok, text), chunk_tokens)
    limit = _hf.context_length(base)
    kinds = sorted(SEED_KINDS)
    paths = (out / DATA_NAME, out / DEV_NAME)
    for path, total, offset in ((paths[0], conversations, 0), (paths[1], dev, 1_000_003)):
        have = _complete_lines(path)
        with path.open("a", encoding="utf-8") as f:
            for i in range(have, total):
                rng = random.Random(seed * 7_919 + offset + i)
                c = rng.randrange(len(parts))
                chunk = tok.decode(parts[c])
                kind = kinds[(i + offset) % len(kinds)]
                system = {"role": "system", "content": chunk}
                need = len(context_ids(tok, chunk)) + 3 * max_new_tokens + 64
                if limit is not None and need > limit:
                    raise SoftPromptError(
                        f"a chunk of {chunk_tokens:,} tokens plus its conversation needs about "
                        f"{need:,} positions, the model has {limit:,}: use a smaller chunk "
                        "(the teacher's context is never cut silently)"
                    )
                ask = rng.choice(SEED_KINDS[kind])
                question = _generate(
                    base,
                    tok,
                    [system, {"role": "user", "content": ask}],
                    max_new_tokens // 2,
                    seed=rng.randrange(2**31),
                )
                question = question or ask
                user = {"role": "user", "content": question}
                answer = _generate(base, tok, [system, user], max_new_tokens, rng.randrange(2**31))
                row = {
                    "messages": [system, user, {"role": "assistant", "content": answer}],
                    "kind": kind,
                    "chunk": c,
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                log(f"{path.name} {i + 1}/{total} [{kind}] {question[:60]!r}")
    return paths


def _complete_lines(path: Path) -> int:
    """Rows already in ``path``; a half-written last line (an interrupted run) is dropped."""
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").split("\n")
    good = []
    for ln in lines:
        if not ln.strip():
            continue
        try:
            json.loads(ln)
        except json.JSONDecodeError:
            break
        good.append(ln)
    path.write_text("".join(g + "\n" for g in good), encoding="utf-8")
    return len(good)


def read_rows(path: str | Path) -> list[dict]:
    rows = []
    for n, ln in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if ln.strip():
            try:
                rows.append(json.loads(ln))
            except json.JSONDecodeError as e:
                raise SoftPromptError(f"{path}:{n}: not JSON ({e})") from e
    return rows


# ------------------------------------------------------------------------------ teacher


@torch.no_grad()
def teacher_targets(model, tok, rows: Sequence[dict], top_k: int = 20) -> list[dict]:
    """The teacher's top-k next-token log-probabilities on each row's answer tokens.

    The teacher is the bare model reading the row's system message (the chunk) and the
    conversation; ``model`` is a ``SoftPromptModel`` (run with no adapter) or a plain model.

    Returns:
        per row {"prompt": conversation ids, "start", "end": answer span in them,
        "topk_ids": (A, k) long, "topk_logp": (A, k) float}; A = end - start answer tokens,
        position j predicting conversation token start + j.
    """
    base = getattr(model, "base_model", model)
    limit = _hf.context_length(base)
    out = []
    for r in rows:
        s = split_row(tok, r["messages"])
        ids = s["context"] + s["conv"]
        if limit is not None and len(ids) > limit:
            raise SoftPromptError(
                f"a teacher context of {len(ids):,} tokens does not fit the model's {limit:,}: "
                "use smaller chunks"
            )
        out.append(teacher_row(base, s["context"], s["conv"], *s["answer"], top_k))
    return out


@torch.no_grad()
def teacher_row(base, context: list[int], conv: list[int], start: int, end: int, top_k: int):
    """One ``teacher_targets`` entry: the model reads ``context + conv``; its top-k on the
    tokens predicting ``conv[start:end]``."""
    if start < 1:
        raise SoftPromptError("the answer must follow at least one conversation token")
    ids = torch.tensor([context + conv], device=base.device)
    logits = base(input_ids=ids).logits[0].float()
    c = len(context)
    logp = F.log_softmax(logits[c + start - 1 : c + end - 1], dim=-1)  # (A, V)
    vals, idx = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
    return {
        "prompt": list(conv),
        "start": start,
        "end": end,
        "topk_ids": idx.cpu(),
        "topk_logp": vals.cpu(),
    }


def save_targets(targets: list[dict], path: str | Path) -> None:
    torch.save(targets, path)


def load_targets(path: str | Path) -> list[dict]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------ student


def topk_kl(student_logits: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) restricted to the teacher's top-k, per position.

    Args:
        student_logits: (A, V); ids, logp: (A, k) the teacher's top-k token ids and
            log-probabilities (not renormalised: the tail's mass is left out).

    Returns:
        (A,) sum over k of p_t * (log p_t - log q_s).
    """
    q = F.log_softmax(student_logits.float(), dim=-1).gather(-1, ids)
    return (logp.exp() * (logp - q)).sum(-1)


class _Spec:
    kind = "distill"


class DistillTask:
    """Context distillation as a ``Trainer`` task: rows are ``teacher_targets`` entries.

    ``adapter_names`` picks what the student runs with (default: the active adapter; None in
    the list: the bare model).
    """

    spec = _Spec()
    headline_name = "neg_kl"

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tok = tokenizer
        self.pad_id = pad_id(tokenizer)

    def encode(self, ex: dict) -> dict:
        return ex

    def encode_examples(
        self, examples: Sequence[dict], what: str = "training", skip_bad: bool = False, warn=None
    ) -> tuple[list[dict], list[dict]]:
        """``Task.encode_examples`` for the ``Trainer``: teacher-target rows are encoded
        already, so every row is kept. Returns (items, the examples kept)."""
        rows = list(examples)
        return rows, rows

    def loss_units(self, item: dict) -> int:
        """Terms a row adds to the mean ``loss`` takes: its answer tokens (the trainer weights
        micro-batches by them)."""
        return item["end"] - item["start"]

    def _kl(self, batch: list[dict], adapter_names=None) -> list[torch.Tensor]:
        ids, mask = pad_left([b["prompt"] for b in batch], self.pad_id, self.model.device)
        kw = {} if adapter_names is None else {"adapter_names": adapter_names}
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits
        out = []
        width = ids.shape[1]
        for i, b in enumerate(batch):
            pad = width - len(b["prompt"])
            rows = logits[i, pad + b["start"] - 1 : pad + b["end"] - 1]  # (A, V)
            dev = rows.device
            out.append(topk_kl(rows, b["topk_ids"].to(dev), b["topk_logp"].to(dev)))
        return out

    def loss(self, batch: list[dict]) -> torch.Tensor:
        """Mean top-k KL over every answer token of the batch."""
        return torch.cat(self._kl(batch)).mean()

    @torch.no_grad()
    def predict(self, examples: Sequence[dict], batch_size: int = 8, **_) -> list[dict]:
        preds = []
        for i in range(0, len(examples), batch_size):
            for kl in self._kl(list(examples[i : i + batch_size])):
                preds.append({"kl_sum": float(kl.sum()), "tokens": int(kl.numel())})
        return preds

    def metrics(self, examples: Sequence[dict], predictions: Sequence[dict]) -> dict:
        tokens = sum(p["tokens"] for p in predictions)
        kl = sum(p["kl_sum"] for p in predictions) / max(1, tokens)
        return {"kl": kl, "neg_kl": -kl, "tokens": tokens}


# ------------------------------------------------------------------------------ the recipe


def _targets(model, tok, rows_path: Path, cache: Path, top_k: int, log) -> list[dict]:
    """Teacher targets of a rows file, computed once and kept in ``cache`` (recomputed when
    the rows file has changed length)."""
    rows = read_rows(rows_path)
    if cache.exists():
        kept = load_targets(cache)
        if len(kept) == len(rows):
            return kept
    log(f"teacher: top-{top_k} of {len(rows)} rows of {rows_path.name}")
    targets = teacher_targets(model, tok, rows, top_k)
    save_targets(targets, cache)
    return targets


def train_cartridge(
    model,
    tok,
    text: str,
    output: str | Path,
    *,
    tokens: int = 512,
    steps: int = 100,
    conversations: int = 32,
    dev: int = 8,
    chunk_tokens: int = 512,
    max_new_tokens: int = 64,
    top_k: int = 20,
    lr: float | None = None,
    batch_size: int = 4,
    eval_every: int = 25,
    num_frozen: int = 1,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    name: str = "cartridge",
    log=print,
) -> dict:
    """The whole recipe into OUTPUT: self-study rows, teacher targets, a cartridge of ``tokens``
    tokens initialised from the prefill of the corpus's first ``tokens`` tokens (as the system
    message), trained ``steps`` steps by context distillation; OUTPUT/adapter is the best on
    the held-out rows (a prefix adapter: load, serve and export it like any other).

    ``model`` is a ``SoftPromptModel``; adapter ``name`` is added to it.

    Returns:
        The trainer's result plus ``dev_kl_init`` (the cartridge's dev KL before training) and
        ``dev_kl_bare`` (the bare model's).
    """
    from .methods.cartridge import CartridgeConfig, check_decoder_only
    from .trainer import TrainArgs, Trainer

    check_decoder_only(model.info)  # before self-study spends minutes generating
    out = Path(output)
    ctx = context_ids(tok, text)
    if tokens > len(ctx):
        raise SoftPromptError(
            f"--tokens {tokens:,} is larger than the corpus ({len(ctx):,} tokens as the "
            "system message): a cartridge initialised from the corpus's prefill has at most "
            "that many tokens"
        )
    train_path, dev_path = self_study(
        model,
        tok,
        text,
        out,
        conversations=conversations,
        dev=dev,
        chunk_tokens=chunk_tokens,
        max_new_tokens=max_new_tokens,
        seed=seed,
        log=log,
    )
    train = _targets(model, tok, train_path, out / TEACHER_NAME, top_k, log)
    held = _targets(model, tok, dev_path, out / "teacher_dev.pt", top_k, log)
    cfg = CartridgeConfig(
        num_virtual_tokens=tokens, init_token_ids=ctx[:tokens], num_frozen=num_frozen, seed=seed
    )
    if name in model.adapters:
        model.delete_adapter(name)
    adapter = model.add_adapter(name, cfg, tok)
    adapter.task = {"kind": "generate", "template": "{input}"}
    task = DistillTask(model, tok)
    model.eval()
    bare = task.metrics(held, task_predict(task, held, [None]))["kl"]
    init = task.metrics(held, task.predict(held))["kl"]
    log(f"dev KL: bare model {bare:.4f}, cartridge at init {init:.4f}")
    args = TrainArgs(
        output_dir=str(out),
        max_steps=steps,
        lr=lr,
        batch_size=batch_size,
        eval_every=eval_every,
        seed=seed,
        resume=resume,
        progress=progress,
        eval_batch_size=batch_size,
        log_every=max(1, min(10, steps // 10)),
        lower_layer_cache_mb=0,
        warmup_ratio=0.0,
    )
    result = Trainer(model, task, train, held, args, log=log).train()
    return {**result, "dev_kl_bare": bare, "dev_kl_init": init}


def task_predict(task: DistillTask, examples: Sequence[dict], names: list) -> list[dict]:
    """``DistillTask.predict`` with every row on the adapter ``names[0]`` (None: bare)."""
    preds = []
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            batch = list(examples[i : i + 8])
            for kl in task._kl(batch, names * len(batch)):
                preds.append({"kl_sum": float(kl.sum()), "tokens": int(kl.numel())})
    return preds


def add_cartridge_parser(subparsers):
    """Register ``softprompt cartridge CORPUS.txt --output DIR``."""
    p = subparsers.add_parser(
        "cartridge",
        help="train a cartridge: a key/value prefix that stands for a corpus (self-study)",
        description="Self-study conversations about CORPUS (chat JSONL in DIR), the teacher's "
        "top-k on them, and a cartridge trained by context distillation (DIR/adapter). "
        "Rerunning with the same DIR continues (rows, teacher targets, --resume training).",
    )
    p.add_argument("corpus", help="a UTF-8 text file")
    p.add_argument("--output", required=True, help="folder for the data set, run and adapter")
    p.add_argument("--model", default="smollm2-135m-instruct")
    from .cli import _POSITIVE, _finite, _int_at_least

    p.add_argument("--tokens", type=_POSITIVE, default=512, help="P, the cartridge's length")
    p.add_argument("--steps", type=_POSITIVE, default=100, help="training steps")
    p.add_argument("--conversations", type=_POSITIVE, default=32, help="self-study training rows")
    p.add_argument("--dev", type=_int_at_least(0), default=8, help="held-out self-study rows")
    p.add_argument(
        "--chunk-tokens", type=_POSITIVE, default=512, help="corpus chunk per conversation"
    )
    p.add_argument("--max-new-tokens", type=_POSITIVE, default=64, help="per answer")
    p.add_argument("--top-k", type=_POSITIVE, default=20, help="teacher log-probs kept per token")
    p.add_argument(
        "--lr", type=_finite(0, False), default=None, help="default: the cartridge method's"
    )
    p.add_argument("--batch-size", type=_POSITIVE, default=4)
    p.add_argument("--seed", type=_int_at_least(0, 2**32 - 1), default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_cartridge)
    return p


def cmd_cartridge(args) -> None:
    from .loading import load_base
    from .model import attach

    for flag in (
        "tokens",
        "steps",
        "conversations",
        "dev",
        "chunk_tokens",
        "max_new_tokens",
        "top_k",
        "batch_size",
    ):
        if getattr(args, flag) < 1:
            raise SoftPromptError(f"--{flag.replace('_', '-')} must be positive")
    text = read_corpus(args.corpus)
    base, tok = load_base(args.model)
    model = attach(base, tokenizer=tok)
    out = Path(args.output)
    result = train_cartridge(
        model,
        tok,
        text,
        out,
        tokens=args.tokens,
        steps=args.steps,
        conversations=args.conversations,
        dev=args.dev,
        chunk_tokens=args.chunk_tokens,
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        resume=(out / "checkpoint").exists(),
        progress=not args.no_progress,
    )
    print(json.dumps({k: v for k, v in result.items()}, indent=2))


# ------------------------------------------------------------------------------ composition


def compose(model, names: Sequence[str], name: str):
    """Add adapter ``name``: the cartridges ``names`` in one prefix (their K/V concatenated in
    that order), for rows that should read several corpora. It is a cartridge like any other:
    it mixes with other adapters across the rows of a batch, in forward, generate and the
    server (save it and load it there).

    Exact where the parts are consecutive pieces of one prefill (the concatenated text's own
    K/V); independently made cartridges compose approximately, as in the paper (each was read
    at its own positions, without the other in context). A part that numbers the real tokens
    after itself (``position_offset``: a cartridge imported from PEFT) is first moved to
    softprompt's numbering on rotary models (``_at_offset_zero``).

    Raises:
        SoftPromptError: fewer than two names, a part that is not a cartridge, or parts with a
            ``position_offset`` on a model without relative rotary positions (GPT-2).
    """
    from .methods.cartridge import CartridgeConfig

    if len(names) < 2:
        raise SoftPromptError("compose needs at least two cartridges")
    model._check_names(list(names))
    parts = [model.adapters[n] for n in names]
    bad = [n for n, a in zip(names, parts, strict=True) if a.config.method != "cartridge"]
    if bad:
        raise SoftPromptError(f"compose takes cartridges; {bad} are not")
    with torch.no_grad():
        flats = [_at_offset_zero(model, n, a) for n, a in zip(names, parts, strict=True)]
        flat = torch.cat(flats, dim=0)
    cfg = CartridgeConfig(
        num_virtual_tokens=flat.shape[0], init="vocab", num_frozen=parts[0].config.num_frozen
    )
    ad = model.add_adapter(name, cfg, _init=False)
    ad.load_baked({"prefix": flat})
    ad.task = parts[0].task
    return ad


def _at_offset_zero(model, name: str, ad) -> torch.Tensor:
    """(P, width) cartridge ``name``'s flat K/V with the real tokens numbered from 0: a part
    with ``position_offset`` o (PEFT's numbering, real tokens at o..) has its keys rotated by
    -o, so a query at t scores them as one at o + t did (``_hf.rotate_keys``; the inverse of
    ``peft_compat._to_peft_positions``).

    Raises:
        SoftPromptError: o != 0 on a model without relative rotary positions (learned absolute
            positions are in the keys, and no change of them moves the real tokens).
    """
    flat = ad.prefix.detach()
    offset = ad.position_offset
    if offset == 0:
        return flat
    base = model.base_model
    encoding = _hf.position_encoding(base)
    if encoding != "rotary":
        why = (
            "its learned absolute positions are in the cartridges' keys, so no change of them "
            "moves the real tokens"
            if encoding == "absolute"
            else "softprompt cannot tell how its positions would move with them"
        )
        raise SoftPromptError(
            f"cartridge {name!r} numbers the real tokens from its length ({offset}: read at "
            f"positions 0..{offset - 1}), and one prefix can number them from one place only; "
            f"on {type(base).__name__} {why}, so cartridges with a position_offset cannot be "
            "composed (train one cartridge on the concatenated corpus instead)"
        )
    n, parts = flat.shape[0], []
    kv = ad.layout.split(flat)
    for s in ad.layout.slots:
        k, v = kv[s]  # (P, kvh, hd) each
        parts += [_hf.rotate_keys(base, k, -offset).reshape(n, -1), v.reshape(n, -1)]
    return torch.cat(parts, dim=1)  # (P, layers * 2 * kv_dim)
