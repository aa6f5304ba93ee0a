"""Decoding rows one step at a time: each row's sampling and stop rules, and a running batch
that rows join and leave at decode-step boundaries (continuous batching).

``RowDecoder`` is one row's state: its seeded sampler, the tokens so far, its stop rules
(stop ids, ``max_tokens``, stop strings, an abort from the client) and the text released to a
streaming client. ``generate_rows`` (``softprompt.engine``, one ``generate`` call per batch) and
``StepBatch`` (below) drive the same ``RowDecoder``, so a row gives the same answer either way.

``StepBatch`` owns a decoder-only model's KV cache for the rows in flight: ``add`` prefills new
rows (one forward for all of them, with their own adapters, virtual tokens and positions) and
merges their cache into the running one, left-padded to a common length; ``step`` runs ONE
decode forward for every row, each with its own adapter; finished rows leave the cache at once.
Prefix adapters enter through the attention seam (``softprompt._hf``) per row, as in
``generate``; prompt adapters' virtual tokens are either in the cache (spliced at prefill) or
a shared prefix (``AdapterBank.prompt_sharing``), chosen per prefill exactly as ``generate``
chooses, and remembered per row.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import _hf
from .errors import SoftPromptError
from .lm import pad_left
from .prefix_state import PrefixState  # noqa: F401  (the state's type)
from .splice import mask_positions, offset_positions
from .tasks import pad_id


@dataclass
class GenerationRow:
    """One prompt to complete.

    Attributes:
        ids: prompt token ids (negative ids: template virtual tokens, see softprompt.templates).
        adapter: adapter name, or None for the bare model.
        max_tokens: most new tokens.
        temperature: 0 = greedy; otherwise sample from softmax(logits / temperature).
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.
        stop: strings that end the completion (not included in the text).
        seed: seed of this row's own sampling generator (None: a random one); any integer,
            taken modulo 2**64.
        stop_ids: token ids that end this row (None: the model's EOS ids); a chat row's
            end-of-turn token.
        logprobs: keep each new token's log-probability and this many top alternatives
            (None: none).
        stream: report text as it is generated (``on_delta``), held back only while it may be
            the start of a stop string or an unfinished multi-byte character.
        abort: when set (the client went away), the row ends at the next decode step.
        group: rows of one batch with the same (hashable, not None) group decode as ONE
            mean-probability ensemble (Lester et al. 2021, section 6): every step, the next
            token comes from the mean of the members' next-token probabilities (greedy, or
            drawn with the first member's sampler) and every member takes it, so they finish
            together with one text. The members must run in the same batch (``StepBatch.add``
            / one ``generate_rows`` call) and share their stop rules; each keeps its own
            adapter and prompt. ``logprobs`` are then the ensemble distribution's.
    """

    ids: list[int]
    adapter: str | None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stop_ids: tuple[int, ...] | None = None
    logprobs: int | None = None
    stream: bool = False
    abort: threading.Event | None = field(default=None, compare=False, repr=False)
    group: Hashable | None = field(default=None, compare=False)


def eos_ids(model, tokenizer) -> list[int]:
    """Token ids that end a completion: the generation config's and the tokenizer's EOS."""
    ids = model.base_model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def token_entry(logp: torch.Tensor, token: int, top: int) -> dict:
    """A token's log-probability and the ``top`` most likely tokens at its position.

    Args:
        logp: (V,) log-probabilities at the position.
    """
    entry = {"id": token, "logprob": float(logp[token]), "top": []}
    if top > 0:
        values, ids = logp.topk(min(top, logp.shape[-1]))
        entry["top"] = list(zip(ids.tolist(), values.tolist(), strict=True))
    return entry


def _unfinished_tail(text: str) -> int:
    """How many trailing characters of ``text`` are U+FFFD (a multi-byte character whose
    remaining bytes are still to come)."""
    return len(text) - len(text.rstrip("\ufffd"))


def nan_error(adapter: str | None) -> SoftPromptError:
    return SoftPromptError(
        f"adapter {adapter!r} gave NaN logits; its weights are not finite "
        "(or overflow in this dtype): load a good adapter"
    )


class RowDecoder:
    """One row's decoding: sampling, stop rules and streamed text.

    ``pick(logits)`` chooses the row's next token (greedy, or drawn with the row's own seeded
    generator, so a row's draws do not depend on the other rows of its batch); ``push(token)``
    adds it and applies the stop rules. When the row ends, ``result`` is set and
    ``on_done(result)`` called; a streamed row's new text goes to ``on_delta(text, entries)``
    after each token, held back while it may still change (a stop string's start, an unfinished
    character), so the released text is always a prefix of the final text.
    """

    def __init__(
        self,
        row: GenerationRow,
        eos: set[int],
        decode: Callable[[list[int]], str],
        device: torch.device,
        on_done: Callable[[dict], None] | None = None,
        on_delta: Callable[[str, list | None], None] | None = None,
    ) -> None:
        self.row = row
        self.eos = eos
        self.stop_ids = eos if row.stop_ids is None else set(row.stop_ids)
        self.decode = decode
        self.on_done = on_done
        self.on_delta = on_delta
        self.gen = None
        if row.temperature > 0:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(row.seed % 2**64 if row.seed is not None else secrets.randbits(63))
        self.tokens: list[int] = []
        self.entries: list[dict] = []  # one per picked token: {"id", "logprob", "top"}
        self.ends: list[int] = []  # per token: end of its text
        self.sent = ""  # text released to on_delta
        self.sent_entries = 0
        self.hold = max((len(x) for x in row.stop), default=1) - 1
        self.result: dict | None = None
        self.owner = None  # the caller's handle (the engine's queued row)

    @property
    def done(self) -> bool:
        return self.result is not None

    # ------------------------------------------------------------------ choosing a token
    def pick(self, logits: torch.Tensor, greedy: int | None = None) -> int:
        """The next token from the model's (V,) ``logits`` (``greedy``: their argmax, when the
        caller has it already)."""
        if self.gen is not None:
            token = self._draw(logits)
        else:
            token = int(logits.argmax()) if greedy is None else greedy
        self.record(logits, token)
        return token

    def record(self, logits: torch.Tensor, token: int) -> None:
        """Keep ``token``'s log-probability entry under ``logits`` (rows with ``logprobs``):
        the distribution before temperature."""
        if self.row.logprobs is not None:
            logp = F.log_softmax(logits.float(), dim=-1)  # (V,)
            self.entries.append(token_entry(logp, token, self.row.logprobs))

    def _draw(self, logits: torch.Tensor) -> int:
        logits = logits.float()  # (V,)
        # <= 0, max 0, divided in float64: a tiny temperature gives -inf, never NaN
        logits = ((logits - logits.max()).double() / self.row.temperature).float()
        if self.row.top_p < 1.0:
            ordered, order = logits.sort(descending=True)
            probs = ordered.softmax(-1)
            drop = probs.cumsum(-1) - probs >= self.row.top_p  # mass before it already enough
            drop[0] = False
            ordered = ordered.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(0, order, ordered)
        return int(torch.multinomial(logits.softmax(-1), 1, generator=self.gen))

    # ------------------------------------------------------------------ stop rules
    def push(self, token: int) -> bool:
        """Add the row's next token; True when the row has ended (``result`` set)."""
        if self.result is not None:
            return True
        row = self.row
        self.tokens.append(token)
        new = self.tokens
        text = None
        if row.stop or row.stream or row.logprobs is not None:
            text = self.decode(new)
            self.ends.append(len(text))
        if row.abort is not None and row.abort.is_set():
            self.finish("aborted")
        elif token in self.stop_ids or token in self.eos:
            self.finish("stop", stop_token=True)
        elif row.stop and any(s in text for s in row.stop):
            self.finish("stop")
        elif len(new) >= row.max_tokens:
            self.finish("length")
        elif row.stream and self.on_delta is not None:
            self._release(text)
        return self.result is not None

    def finish(self, reason: str, stop_token: bool = False) -> None:
        """End the row; ``stop_token``: its last token is the stop token that ended it (left
        out of the text; its log-probability entry becomes ``stop_logprob``)."""
        tokens = self.tokens[:-1] if stop_token else list(self.tokens)
        text = self.decode(tokens)
        want = self.row.logprobs is not None
        stop_entry = self.entries[len(tokens)] if stop_token and want else None
        entries = self.entries[: len(tokens)] if want else None
        stops = [i for i in (text.find(s) for s in self.row.stop) if i >= 0]
        if stops:
            text, reason = text[: min(stops)], "stop"
            ends = self.ends
            keep = sum(1 for i in range(len(tokens)) if (ends[i - 1] if i else 0) < len(text))
            tokens = tokens[:keep]
            entries = None if entries is None else entries[:keep]
        self.result = {
            "text": text,
            "finish_reason": reason,
            "completion_tokens": len(tokens),
            "token_ids": tokens,
            "logprobs": entries,
            "stop_logprob": stop_entry,
        }
        if self.on_done is not None:
            self.on_done(self.result)

    def _release(self, text: str) -> None:
        if not text.startswith(self.sent):  # decoding changed earlier text: wait for the end
            return
        safe = len(text) - max(_unfinished_tail(text), self.hold)
        if safe <= len(self.sent):
            return
        delta = text[len(self.sent) : safe]
        self.sent = text[:safe]
        entries = None
        if self.row.logprobs is not None:
            n = sum(1 for e in self.ends if e <= safe)
            entries = self.entries[self.sent_entries : n]
            self.sent_entries = n
        self.on_delta(delta, entries)


def ensemble_groups(decoders: Sequence[RowDecoder]) -> dict[Hashable, list[int]]:
    """The unfinished rows of each mean-probability group (``GenerationRow.group``), by
    batch index, in batch order."""
    groups: dict[Hashable, list[int]] = {}
    for b, d in enumerate(decoders):
        if d.row.group is not None and not d.done:
            groups.setdefault(d.row.group, []).append(b)
    return groups


def mean_logits(logits: torch.Tensor, members: Sequence[int]) -> torch.Tensor:
    """(V,) log of the mean of the member rows' next-token probabilities: the ensemble's
    distribution as logits (their argmax is the mean probability's; temperature and top_p
    apply to it as to one row's)."""
    logp = F.log_softmax(logits[list(members)].float(), dim=-1)  # (K, V)
    return torch.logsumexp(logp, dim=0) - math.log(len(members))


def pick_groups(decoders, logits: torch.Tensor, picks: list[int], bad=None) -> set[int]:
    """Pick each mean-probability group's token (its first unfinished member's sampler, the
    members' mean distribution) into ``picks`` for every member; returns the rows picked.
    Groups with a ``bad`` row (NaN logits) are left out."""
    done: set[int] = set()
    for members in ensemble_groups(decoders).values():
        if bad is not None and any(bad[b] for b in members):
            continue
        mixed = mean_logits(logits, members)
        token = decoders[members[0]].pick(mixed)
        for b in members:
            if b != members[0]:
                decoders[b].record(mixed, token)
            picks[b] = token
        done.update(members)
    return done


# --------------------------------------------------------------------------------------------
# A running batch over one KV cache: rows join and leave at decode-step boundaries
# --------------------------------------------------------------------------------------------


def can_step(model) -> str | None:
    """Why ``StepBatch`` cannot run ``model`` (None: it can): it needs a decoder-only LM whose
    cache is transformers' plain ``DynamicCache`` (no sliding-window or linear layers)."""
    if model.info.is_encoder_decoder or not model.info.is_causal_lm:
        return "per-step batching needs a decoder-only language model"
    return _hf.steppable_cache(model.base_model)


class StepBatch:
    """The rows in flight on a decoder-only model and their KV cache.

    Per row: its ``RowDecoder``, its prefix key (which prefix the attention seam gives it: the
    adapter's own key/value prefix, its shared virtual tokens, or none), its next position and
    its next input token. The cache (B, kvh, T, hd) per layer is left-padded; ``mask`` (B, T)
    marks each row's real columns (virtual tokens spliced at prefill included).
    """

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tok = tokenizer
        self.pad = pad_id(tokenizer)
        self.rows: list[RowDecoder] = []
        self.keys: list[str | None] = []  # per row: its adapter, or its shared prompt's key
        self.shared: dict[str, dict] = {}  # shared prompts' prefixes by key
        self.cache = None
        self.mask: torch.Tensor | None = None  # (B, T) long
        self.pos: torch.Tensor | None = None  # (B,) next position
        self.last: torch.Tensor | None = None  # (B,) next input token
        self.state: PrefixState | None = None
        self._state_rows: tuple | None = None

    def __len__(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------ joining
    @torch.no_grad()
    def add(self, decoders: Sequence[RowDecoder]) -> None:
        """Prefill ``decoders``' prompts in ONE forward, pick and push their first tokens, and
        add the unfinished ones to the running batch.

        Raises:
            SoftPromptError: a row's logits are NaN (prefill runs its rows together: the
                caller retries them one by one to find the bad one).
        """
        model = self.model
        self._state_rows = None  # an adapter may have been reloaded under its name
        names = [d.row.adapter for d in decoders]
        rows = model._rows(names, len(names))
        prompts = model._prompts(rows)
        markers = any(t < 0 for d in decoders for t in d.row.ids)  # on the host: no sync
        ids, mask = pad_left([d.row.ids for d in decoders], self.pad, model.device)
        shared = None
        if model._shared_ok(prompts, markers, None, None, {}):
            shared, prompts = model._kept.prompt_kvs(model, prompts), {}
        state = model._prefix_state(rows, shared)
        offsets = model._position_offsets(rows)
        call: dict = {}
        if not prompts and not markers:
            call["input_ids"] = ids
            positions = None
        else:
            emb, mask, positions, _, _, _ = model._splice(
                rows, prompts, ids, None, mask, None, None, None, markers
            )
            call["inputs_embeds"] = emb
            if mask is None:
                mask = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
        width = mask.shape[1]
        if positions is None:
            positions = mask_positions(mask)
        if offsets is not None:
            positions = offset_positions(positions, offsets, mask, width)
        cache = _hf.new_cache(model.base_model)
        call.update(attention_mask=mask, past_key_values=cache, use_cache=True)
        if model._takes_position_ids:
            call["position_ids"] = positions
        if model._takes_logits_to_keep:  # the head on the last position only, as generate does
            call["logits_to_keep"] = 1
        with _hf.generation_state(state):
            out = model.base_model(**call)
        logits = out.logits[:, -1]  # (B, V)
        firsts = self._pick(decoders, logits, names)
        keys = []  # the row's name in the state: its adapter, or its shared prompt's prefix
        for name in names:
            if shared and name in shared:
                keys.append("\x00shared:" + name)
                self.shared[keys[-1]] = shared[name]
            else:
                keys.append(name)
        keep = [b for b, d in enumerate(decoders) if not d.push(firsts[b])]
        if not keep:
            return
        idx = torch.tensor(keep, device=model.device)
        _hf.cache_select(cache, idx)
        new_mask, new_pos = mask[idx], positions[idx, -1] + 1
        new_last = torch.tensor([firsts[b] for b in keep], device=model.device)
        if self.cache is None:
            self.cache, self.mask, self.pos, self.last = cache, new_mask, new_pos, new_last
        else:
            self.cache, self.mask = _hf.cache_concat(self.cache, self.mask, cache, new_mask)
            self.pos = torch.cat([self.pos, new_pos])
            self.last = torch.cat([self.last, new_last])
        self.rows += [decoders[b] for b in keep]
        self.keys += [keys[b] for b in keep]

    # ------------------------------------------------------------------ one decode step
    @torch.no_grad()
    def step(self) -> list[tuple[RowDecoder, BaseException]]:
        """One decode forward for every row in flight; finished rows leave the batch.

        Returns:
            Rows that failed alone (NaN logits from their adapter), with their error; they
            have left the batch, the others are unaffected.
        """
        if not self.rows:
            return []
        model = self.model
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        call = dict(
            input_ids=self.last[:, None],
            attention_mask=self.mask,
            past_key_values=self.cache,
            use_cache=True,
        )
        if model._takes_position_ids:
            call["position_ids"] = self.pos[:, None]
        with _hf.generation_state(self._state()):
            out = model.base_model(**call)
        logits = out.logits[:, -1]  # (B, V)
        failed = []
        bad = logits.isnan().any(-1).tolist()
        errors = {b: nan_error(self.rows[b].row.adapter) for b, is_bad in enumerate(bad) if is_bad}
        for members in ensemble_groups(self.rows).values():  # a bad member fails its group
            err = next((errors[b] for b in members if b in errors), None)
            for b in members if err is not None else ():
                errors.setdefault(b, err)
                bad[b] = True
        tokens = self._pick(self.rows, logits, None, bad)
        keep = []
        for b, d in enumerate(self.rows):
            if bad[b]:
                failed.append((d, errors[b]))
            elif not d.push(tokens[b]):
                keep.append(b)
        self.pos = self.pos + 1
        self.last = torch.tensor(tokens, device=model.device)
        self._keep(keep)
        return failed

    def drop(self, which: Callable[[RowDecoder], bool]) -> list[RowDecoder]:
        """Take the rows for which ``which`` is true out of the batch, and the other members
        of their mean-probability groups (a group decodes whole or not at all); returns them."""
        hit = {b for b, d in enumerate(self.rows) if which(d)}
        groups = {self.rows[b].row.group for b in hit} - {None}
        hit |= {b for b, d in enumerate(self.rows) if d.row.group in groups}
        gone = [d for b, d in enumerate(self.rows) if b in hit]
        if gone:
            self._keep([b for b in range(len(self.rows)) if b not in hit])
        return gone

    # ------------------------------------------------------------------ helpers
    def _pick(self, decoders, logits, names, bad=None) -> list[int]:
        """Each row's next token; one host sync for the batch's argmax."""
        if bad is None:
            bad = logits.isnan().any(-1).tolist()
            for b, is_bad in enumerate(bad):
                if is_bad:
                    raise nan_error(names[b])
        greedy = logits.argmax(-1).tolist()
        picks = list(greedy)
        grouped = pick_groups(decoders, logits, picks, bad)
        for b, d in enumerate(decoders):
            if not bad[b] and b not in grouped:
                picks[b] = d.pick(logits[b], greedy[b])
        return picks

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[b] for b in keep]
        self.keys = [self.keys[b] for b in keep]
        if not keep:
            self.cache = self.mask = self.pos = self.last = None
            self.shared.clear()
            return
        idx = torch.tensor(keep, device=self.model.device)
        _hf.cache_select(self.cache, idx)
        self.mask, self.pos, self.last = self.mask[idx], self.pos[idx], self.last[idx]
        # columns no remaining row attends to (a long prompt that left): drop them
        lead = int((self.mask.cumsum(1) == 0).sum(1).min())
        if lead:
            _hf.cache_drop_left(self.cache, lead)
            self.mask = self.mask[:, lead:]
        live = set(self.keys)
        for k in [k for k in self.shared if k not in live]:
            del self.shared[k]

    def _state(self) -> PrefixState | None:
        """The rows' injection state, made again only when the rows change (``_prefix_state``:
        prefix adapters by name, shared prompts by their key)."""
        rows = tuple(self.keys)
        if rows != self._state_rows:
            used = {k: v for k, v in self.shared.items() if k in rows}
            self.state = self.model._prefix_state(list(rows), used)
            self._state_rows = rows
        return self.state
