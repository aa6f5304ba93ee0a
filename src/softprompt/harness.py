"""lm-evaluation-harness model ``softprompt``: a frozen base model plus a soft-prompt adapter.

    python -m softprompt.harness --model softprompt \\
        --model_args pretrained=smollm2-135m-instruct,adapter=runs/x/adapter --tasks hellaswag

lm-eval 0.4.13 looks models up in its own registry only (no entry points for models), so the
class is registered when this module is imported. ``python -m softprompt.harness ARGS`` imports
it and then runs lm-eval's own command line with the same ``ARGS`` (``lm_eval ARGS`` alone does
not know the name); from Python, ``import softprompt.harness`` before
``lm_eval.simple_evaluate(model="softprompt", ...)``.

Model arguments (``--model_args k=v,...``):
    pretrained: hub id, local folder or embedded asset (``softprompt.loading.load_base``);
        default: the base model the adapter's ``adapter_config.json`` names.
    adapter: a softprompt adapter folder; omitted: the bare model through the same code (the
        zero-shot baseline).
    dtype: float32 (default), bfloat16 or float16. device: default cuda when available.
    batch_size: rows per forward (default 1). max_length: context length in tokens; default
        (and most) the model's positions minus those the adapter takes: its input-level
        virtual tokens and its ``position_offset`` (a cartridge on GPT-2, a prefix imported
        from PEFT); on an encoder-decoder, the encoder's positions where it has a position
        table (BART), no limit from T5's relative positions.
    max_gen_toks: default generation budget (256) when a task names none.
    add_bos_token: force the tokenizer's special tokens on or off (default: its own setting).

The virtual tokens go before each request's text (after any left padding), as in training
with ``placement="prepend"``; adapters trained with a template's ``[soft:N]`` segments or
``placement="append"`` are refused (their prompts need the task's own layout: use
``softprompt eval``). Decoder-only rows are left-padded (softprompt numbers their positions
from the first real token); encoder inputs of an encoder-decoder are right-padded (the
encoder is bidirectional, and BART numbers its positions 0..T-1 whatever the mask says). A row
gets the same logits alone and in a padded batch, so ``batch_size`` does not change the
scores.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import require

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
        resolve_max_length,
    )
except ImportError:  # the package missing: say which extra brings it
    require("lm_eval", "eval", "softprompt.harness (the lm-eval integration)")
    raise
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from . import _hf
from ._hf import SoftPromptError
from .io import read_adapter_config, recorded_base_model
from .lm import _head, pad_left, pad_prompts
from .model import SoftPromptModel, attach, load_adapter

__all__ = ["SoftPromptLM", "main"]

# module names of position tables (learned or sinusoidal): an encoder with one has a hard limit
_POSITION_TABLES = {"embed_positions", "wpe", "position_embeddings"}


class _StopStrings(StoppingCriteria):
    """Per-row stop when the generated text (not the prompt) contains one of ``stops``.

    The generated part starts where the ids stood at the first call minus the one new token, so
    it is right whether generate saw the prompt as ids or as embeddings (spliced virtual tokens:
    then the ids hold only the new tokens).
    """

    def __init__(self, tokenizer, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        width = max(
            (len(tokenizer.encode(s, add_special_tokens=False)) for s in self.stops), default=1
        )
        self.lookback = width + 2
        self.start: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1] - 1
        tail = input_ids[:, max(self.start, input_ids.shape[1] - self.lookback) :]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=False)
        done = [any(s in t for s in self.stops) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class SoftPromptLM(TemplateLM):
    """lm-eval's ``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until`` through a
    ``SoftPromptModel`` (decoder-only or encoder-decoder LM) with one adapter active.

    Args:
        pretrained: what ``load_base`` takes, or an already loaded transformers model or
            ``SoftPromptModel`` (then pass ``tokenizer``). Default: the adapter's base model.
        adapter: an adapter folder, or None for the bare model.
        tokenizer: a tokenizer object, with a model object in ``pretrained``.
        dtype, device: for ``load_base`` (``cuda`` falls back to the CPU where there is none).
        batch_size: rows per forward; "auto" means 1 (no memory probing here).
        max_length: context length (tokens); default: the model's positions minus those the
            adapter takes (``position_bound``, also the most allowed where there is one).
        max_gen_toks: default number of new tokens for ``generate_until``.
        add_bos_token: passed to the tokenizer as ``add_special_tokens``.
        prefix_token_id: the token that conditions an empty context (default BOS, else EOS).
        max_batch_size: lm-eval's generic argument for ``batch_size=auto``; ignored.
        **unknown: refused (a misspelt model argument must not pass unnoticed).
    """

    def __init__(
        self,
        pretrained=None,
        adapter: str | None = None,
        tokenizer=None,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        max_batch_size: int | None = None,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise SoftPromptError(
                f"unknown model_args {sorted(unknown)}; softprompt takes pretrained, adapter, "
                "dtype, device, batch_size, max_length, max_gen_toks, add_bos_token, "
                "prefix_token_id"
            )
        if pretrained is None:
            if adapter is None:
                raise SoftPromptError("model_args need pretrained=MODEL, adapter=DIR or both")
            pretrained = recorded_base_model(read_adapter_config(adapter), adapter)
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's command line sends device=cuda by default
        if isinstance(pretrained, str):
            from .loading import load_base

            base, tok = load_base(pretrained, dtype=dtype, device=device)
            self.pretrained = pretrained
        else:
            if tokenizer is None:
                raise SoftPromptError("a model object as pretrained= needs tokenizer= as well")
            base, tok = pretrained, tokenizer
            self.pretrained = getattr(getattr(base, "config", None), "name_or_path", "")
        model = base if isinstance(base, SoftPromptModel) else attach(base)
        if not (model.info.is_causal_lm or model.info.is_encoder_decoder):
            raise SoftPromptError(
                f"{type(model.base_model).__name__} is an encoder without an LM head; "
                "lm-eval needs a causal or sequence-to-sequence language model"
            )
        if adapter is not None:
            model = load_adapter(model, adapter)
        if model.active is not None:
            place = getattr(model.adapters[model.active].config, "placement", "prepend")
            if place != "prepend":
                raise SoftPromptError(
                    f"adapter {adapter or model.active} puts its virtual tokens by "
                    f"placement={place!r}; lm-eval hands over plain text, so only adapters "
                    "whose prompt goes before the input work here (evaluate this one on its "
                    "own data with softprompt eval)"
                )
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.model = model.eval()
        self.tokenizer = tok
        self.adapter = adapter
        self.backend = "seq2seq" if model.info.is_encoder_decoder else "causal"
        self.batch_size = 1 if str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = max_length
        bound = self.position_bound()
        if max_length and bound is not None and int(max_length) > bound:
            raise SoftPromptError(
                f"max_length={max_length} does not fit: {type(model.base_model).__name__} reads "
                f"{self._positions()} positions{self._taken()}; use max_length <= {bound} (or "
                "leave it out)"
            )
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id

    # ------------------------------------------------------------------ lm-eval's interface
    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """``--model_args`` win over lm-eval's generic ones (its CLI always sends
        ``batch_size=1``, which would clash with ``batch_size=`` in the model arguments)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(
            lm_utils.simple_parse_args_string(arg_string), additional_config
        )

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    def _positions(self) -> int:
        """The positions the model reads (its config's context; lm-eval's default without)."""
        return resolve_max_length(self.model.config, self.tokenizer)

    def _used(self) -> tuple[int, int]:
        """(input-level virtual tokens, position offset) of the active adapter: the positions
        it takes from the real tokens. (0, 0) for a bare model, and on an encoder-decoder
        whose encoder has no position table (T5's relative position bias); BART's learned
        ``embed_positions`` (Marian's sinusoidal ones) number the virtual tokens too."""
        if self.model.active is None:
            return 0, 0
        if self.backend == "seq2seq":
            encoder = self.model.base_model.get_encoder()
            if not {n.split(".")[-1] for n, _ in encoder.named_modules()} & _POSITION_TABLES:
                return 0, 0
        ad = self.model.adapters[self.model.active]
        prompt = ad.input_prompt()
        return (prompt.shape[0] if prompt is not None else 0), int(ad.position_offset)

    def _taken(self) -> str:
        prompt, offset = self._used()
        parts = [f"{prompt} input-level virtual tokens"] if prompt else []
        if offset:
            parts.append(f"a position_offset of {offset} (its real tokens are numbered from it)")
        if not parts:
            return ""
        return f", of which adapter {self.adapter or self.model.active} takes " + " and ".join(
            parts
        )

    def position_bound(self) -> int | None:
        """The most tokens a row's context can hold: the model's positions minus the active
        adapter's input-level virtual tokens and its ``position_offset`` (``_used``); None
        where the model's config names no context length (T5: no hard limit)."""
        if _hf.context_length(self.model.base_model) is None:
            return None
        prompt, offset = self._used()
        return self._positions() - prompt - offset

    @property
    def max_length(self) -> int:
        if self._max_length:
            return int(self._max_length)
        prompt, offset = self._used()
        return self._positions() - prompt - offset

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def get_model_info(self) -> dict:
        return {"pretrained": self.pretrained, "adapter": self.adapter}

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kw
    ) -> list[int]:
        flag = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        kwargs = {} if flag is None else {"add_special_tokens": flag}
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            kwargs = {"add_special_tokens": False}
        ids = self.tokenizer.encode(string, **kwargs)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log P(continuation | context), continuation is greedy) for one batch."""
        pad, dev, length = self.tokenizer.pad_token_id, self.device, self.max_length
        conts = [c for _, c in pairs]
        for c in conts:
            if len(c) > length:
                raise SoftPromptError(
                    f"a continuation of {len(c)} tokens does not fit the context of {length}"
                )
        width = max(len(c) for c in conts)
        if self.backend == "causal":
            seqs = [(ctx + c)[-(length + 1) :][:-1] for ctx, c in pairs]
            ids, mask = pad_left(seqs, pad, dev)
            hidden = self.model(
                input_ids=ids, attention_mask=mask, body_only=True, use_cache=False
            ).last_hidden_state[:, -width:]  # (B, C, d): the positions that predict the ends
            logp = F.log_softmax(_head(self.model)(hidden).float(), dim=-1)  # (B, C, V)
            rows = [logp[b, width - len(c) :] for b, c in enumerate(conts)]
        else:
            # encoder inputs right-padded: BART numbers them 0..T-1 whatever the mask
            ids, mask = pad_prompts(self.model, [ctx[-length:] for ctx, _ in pairs], pad)
            labels = torch.full((len(pairs), width), -100, dtype=torch.long, device=dev)
            for b, c in enumerate(conts):
                labels[b, : len(c)] = torch.tensor(c)
            logits = self.model(input_ids=ids, attention_mask=mask, labels=labels).logits
            logp = F.log_softmax(logits.float(), dim=-1)  # (B, C, V)
            rows = [logp[b, : len(c)] for b, c in enumerate(conts)]
        out = []
        for lp, c in zip(rows, conts, strict=True):
            target = torch.tensor(c, device=dev)
            score = lp.gather(1, target[:, None]).sum()
            out.append((float(score), bool((lp.argmax(-1) == target).all())))
        return out

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """``requests``: ((context, continuation) or None, context ids, continuation ids)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        res: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="softprompt loglikelihood")
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            scores = self._score([(requests[i][1], requests[i][2]) for i in batch])
            for i, ans in zip(batch, scores, strict=True):
                res[i] = ans
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], ans)
            bar.update(len(batch))
        bar.close()
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log P(text) summed over its tokens, in disjoint windows of at most ``max_length``
        (each token predicted once, after as much preceding text as fits)."""
        windows, owner = [], []
        for k, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, scores, strict=True):
            totals[k] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        new = kwargs.pop("max_gen_toks")
        kwargs.pop("max_length", None)
        if not kwargs.get("do_sample"):
            kwargs.pop("temperature", None)
        room = self.max_length - (new if self.backend == "causal" else 0)
        if room <= 0:
            raise SoftPromptError(
                f"max_gen_toks={new} leaves no room for the prompt in a context of "
                f"{self.max_length} tokens"
            )
        seqs = [self.tok_encode(c, left_truncate_len=room) for c in contexts]
        ids, mask = pad_prompts(self.model, seqs, self.tokenizer.pad_token_id)  # enc-dec: right
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            stopping_criteria=StoppingCriteriaList([_StopStrings(self.tokenizer, until)]),
            pad_token_id=self.tokenizer.pad_token_id,
            **kwargs,
        )
        if self.backend == "causal":
            out = out[:, ids.shape[1] :]  # the new tokens only
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [postprocess_generated_text(t, until, None) for t in texts]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or the task's sampling) continuation of each context, cut at the first of
        its ``until`` strings (and EOS), at most ``max_gen_toks`` tokens."""
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen) in enumerate(args):
            groups.setdefault(repr(sorted(gen.items())), []).append(i)
        res: list = [None] * len(args)
        bar = tqdm(total=len(args), disable=disable_tqdm, desc="softprompt generate_until")
        for idx in groups.values():
            idx = sorted(idx, key=lambda i: -len(self.tok_encode(args[i][0])))
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start : start + self.batch_size]
                gen = args[batch[0]][1]
                texts = self._generate([args[i][0] for i in batch], gen)
                for i, text in zip(batch, texts, strict=True):
                    res[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
                bar.update(len(batch))
        bar.close()
        return res


if __name__ != "__main__":  # under python -m, the real module (imported below) registers it
    register_model("softprompt")(SoftPromptLM)


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with the ``softprompt`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    from softprompt.harness import main as _main

    _main()
