"""Tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import softprompt as sp

V = 120  # vocabulary size of the tiny models

# Tiny models are dominated by per-op overhead: one thread is faster and does not fight other
# processes for the two cores (tests on real weights raise it again).
torch.set_num_threads(1)


def _gpt2(vocab=V, pad=0, bos=1, eos=2):
    return GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=4,
            vocab_size=vocab,
            n_positions=64,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    )


def _llama(vocab=V, pad=0, bos=1, eos=2):  # grouped-query attention: 4 query, 2 key/value heads
    return LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=3,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=vocab,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    )


def _qwen3(vocab=V, pad=0, bos=1, eos=2):
    return Qwen3ForCausalLM(
        Qwen3Config(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=64,
            vocab_size=vocab,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    )


def _t5(vocab=V, pad=0, bos=1, eos=2):
    return T5ForConditionalGeneration(
        T5Config(
            num_layers=3,
            num_decoder_layers=3,
            d_model=32,
            d_kv=8,
            num_heads=4,
            d_ff=64,
            vocab_size=vocab,
            pad_token_id=pad,
            eos_token_id=eos,
            decoder_start_token_id=pad,
        )
    )


def _bart(vocab=V, pad=0, bos=1, eos=2):
    return BartForConditionalGeneration(
        BartConfig(
            encoder_layers=2,
            decoder_layers=2,
            d_model=32,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            vocab_size=vocab,
            max_position_embeddings=256,
            pad_token_id=pad,
            bos_token_id=bos,
            eos_token_id=eos,
            decoder_start_token_id=eos,
            forced_eos_token_id=None,
        )
    )


def _bert(vocab=V, pad=0, bos=1, eos=2):
    return BertModel(
        BertConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=vocab,
            max_position_embeddings=64,
            type_vocab_size=2,
            pad_token_id=pad,
        )
    )


BUILDERS = {
    "gpt2": _gpt2,
    "llama": _llama,
    "qwen3": _qwen3,
    "t5": _t5,
    "bart": _bart,
    "bert": _bert,
}
DECODER_ONLY = ("gpt2", "llama", "qwen3")
ENC_DEC = ("t5", "bart")
ENCODER = ("bert",)
FAMILIES = tuple(BUILDERS)


def tiny_model(family: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    model = BUILDERS[family]()
    model.set_attn_implementation(attn)
    return model.eval()


def method_config(method: str, **kw) -> sp.AdapterConfig:
    if method == "prompt":
        return sp.PromptTuningConfig(num_virtual_tokens=kw.pop("n", 4), **kw)
    if method == "prefix":
        return sp.PrefixTuningConfig(
            num_virtual_tokens=kw.pop("n", 3), encoder_hidden_size=16, **kw
        )
    if method == "deep":
        return sp.DeepPromptConfig(num_virtual_tokens=kw.pop("n", 3), **kw)
    if method == "ptuning":
        return sp.PTuningConfig(num_virtual_tokens=kw.pop("n", 4), encoder_hidden_size=16, **kw)
    if method == "mpt":
        return sp.MultitaskPromptConfig(num_virtual_tokens=kw.pop("n", 4), num_ranks=2, **kw)
    raise ValueError(method)


METHODS = ("prompt", "prefix", "deep", "ptuning", "mpt")


def perturb(model: sp.SoftPromptModel, scale: float = 0.5, seed: int = 1) -> None:
    """Move every adapter's parameters away from their init so that tests see a real effect
    (P-tuning's residual head starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in model.adapters.values():
            for p in ad.parameters():
                p.add_(
                    torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1)
                    + 0.05
                )


def mean_reference(model, ids, names, steps, eos, temperature=0.0, seed=None) -> list[int]:
    """Mean-probability ensemble decoding by full forwards, no cache (what a
    ``GenerationRow.group`` must give): each step, the members' softmax over the next token,
    averaged; its argmax, or at ``temperature`` a draw from the mean tempered by
    ``temperature`` (``torch.Generator`` seeded ``seed``). Stops after a token in ``eos``."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            probs = torch.stack(
                [
                    model(input_ids=torch.tensor([ids + tokens]), adapter_names=[n])
                    .logits[0, -1]
                    .float()
                    .softmax(-1)
                    for n in names
                ]
            ).mean(0)
        if gen is None:
            token = int(probs.argmax())
        else:
            tempered = (probs.log() / temperature).softmax(-1)
            token = int(torch.multinomial(tempered, 1, generator=gen))
        tokens.append(token)
        if token in eos:
            break
    return tokens


def inputs_for(family: str, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    kw = {"input_ids": ids, "attention_mask": mask}
    if family in ENC_DEC:
        kw["decoder_input_ids"] = torch.tensor([[0, 5, 6, 7]] * ids.shape[0])
    return kw


def out_tensor(family: str, out) -> torch.Tensor:
    return out.last_hidden_state if family in ENCODER else out.logits


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def _tokenizer():
    from transformers import AutoTokenizer

    from softprompt.assets import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """Tiny random LMs saved as local folders with the real SmolLM2 tokenizer (for the CLI)."""
    tok = _tokenizer()
    vocab = len(tok)
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    ids = dict(vocab=vocab, pad=tok.pad_token_id, bos=tok.bos_token_id, eos=tok.eos_token_id)
    specs = {name: BUILDERS[name](**ids) for name in ("llama", "t5", "bart")}
    out = {}
    for name, model in specs.items():
        path = root / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = str(path)
    return out
