"""PEFT prompt-learning folders in and out.

A PEFT prompt-learning folder holds ``adapter_config.json`` (with ``peft_type``) and
``adapter_model.safetensors`` (legacy: ``adapter_model.bin``, a pickle) with one tensor,
``prompt_embeddings``: what PEFT's ``get_prompt_embedding_to_save`` returns, the encoder's output
for P-tuning and prefix tuning (the encoder itself is not saved).

In (``softprompt.load_adapter`` dispatches here on ``peft_type``):

* ``PROMPT_TUNING`` and ``P_TUNING``: (P, hidden) virtual-token embeddings, put before the input
  as softprompt's prompt tuning does (method ``prompt``, a trainable table);
* ``PREFIX_TUNING`` (``prefix_projection`` true or false) and ``CARTRIDGE``: a (P, layers * 2 *
  token_dim) key/value prefix. PEFT's ``get_prompt`` views it as (P, layers * 2, heads,
  head_dim) and permutes to per-layer (key, value), each (heads, P, head_dim): per layer the key
  columns then the value columns, heads outermost -- softprompt's flat prefix layout
  (``methods.base.FlatPrefix``) exactly, with token_dim = kv_heads * head_dim under
  grouped-query attention (method ``deep``, a trainable table).

* ``ADAPTION_PROMPT`` (LLaMA-Adapter): per adapted layer ``...layers.{i}.self_attn.
  adaption_prompt`` (1, P, hidden) and ``adaption_gate`` (1,), the top ``adapter_layers``
  layers (method ``adaption_prompt``); refused where ``o_proj`` has a bias (PEFT adds
  ``o_proj(adapter)``, so the bias twice; softprompt adds the adapter before ``o_proj``).

Positions: PEFT hands a prefix to the model as ``past_key_values``, so the real tokens take
positions P..P+T-1, while softprompt's prefixes take none (real tokens 0..T-1). The imported
adapter keeps PEFT's numbering (``Adapter.position_offset = P``): exact on every decoder whose
forward takes ``position_ids`` (any rope type, learned absolute positions as GPT-2's; with or
without an LM head, ``LlamaModel`` for FEATURE_EXTRACTION), and a round trip gives back the
same tensor. Refused: models without ``position_ids``, ALiBi, and sliding-window or chunked
attention (PEFT's prefix leaves the window; softprompt's stays visible). Prompt tuning puts the
virtual tokens at 0..P-1 in both libraries.

Checks on load: the sizes in ``adapter_config.json`` against the model; ``task_type``
CAUSAL_LM only on a causal LM; a ``base_model_name_or_path`` whose last part differs from the
model's name is a warning (a PEFT folder records no weights to compare, and names of the same
weights differ).

Out (``save_peft`` / ``export_peft``, ``softprompt export DIR --format peft``): prompt tuning
and P-tuning (baked, written as ``PROMPT_TUNING``: see ``save_peft``), prefix tuning and deep
prompts on every layer of a decoder-only model, adaption prompts (as ``ADAPTION_PROMPT``,
``peft_adaption_tensors_and_config``). A softprompt prefix (real tokens at 0..T-1)
becomes PEFT's (real tokens at P..P+T-1) by rotating its keys by P positions on rotary models
(partial rotary included: Phi, Persimmon, GPT-NeoX); on absolute-position models that is not
expressible and is refused. Adaption prompts export only on the model types PEFT's
ADAPTION_PROMPT takes (``peft_adaption_model_types``: llama, mistral). PEFT has no task
template: one other than ``{input}`` is dropped with a warning.

peft is not needed at run time: configs are plain JSON with the fields PEFT's config classes
take.
"""

from __future__ import annotations

import inspect
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import _hf
from .errors import SoftPromptError
from .methods.adaption_prompt import AdaptionPromptConfig, top_slots
from .methods.base import Adapter, AdapterConfig
from .methods.cartridge import CartridgeConfig
from .methods.deep_prompt import DeepPromptConfig
from .methods.prompt_tuning import PromptTuningConfig
from .model import SoftPromptModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
KEY = "prompt_embeddings"
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING")
PREFIX_TYPES = ("PREFIX_TUNING", "CARTRIDGE")
MPT_TYPE = "MULTITASK_PROMPT_TUNING"
ADAPTION_TYPE = "ADAPTION_PROMPT"  # LLaMA-Adapter: per-layer gated prompts (its own tensors)
MPT_KEYS = ("prefix_task_cols", "prefix_task_rows")  # besides KEY, the shared prompt
TASK_TYPES = (None, "CAUSAL_LM", "FEATURE_EXTRACTION")
# A PEFT folder has no softprompt task: generate from the raw input.
PLAIN_TASK = {"kind": "generate", "template": "{input}"}

_CONVERT_BIN = (
    "if you trust where it came from, convert it once (this runs the pickle): python -c "
    "\"import torch; from safetensors.torch import save_file; d = '{dir}'; "
    "sd = torch.load(d + '/adapter_model.bin', weights_only=False); "
    "save_file({{k: v.contiguous() for k, v in sd.items()}}, d + '/adapter_model.safetensors')\""
)


# --------------------------------------------------------------------------------------------
# In
# --------------------------------------------------------------------------------------------


def peft_meta(directory: Path, data: dict) -> dict:
    """The softprompt view of a PEFT ``adapter_config.json`` (what ``read_adapter_config``
    returns for a PEFT folder): method and config it converts to, the base model it names, the
    plain task, and the PEFT config itself under ``peft``.

    Raises:
        SoftPromptError: a PEFT type or task type that is not a prompt-learning method
            softprompt can express, a config without ``num_virtual_tokens``, or a count field
            (``num_virtual_tokens``, ``token_dim``, ``num_layers``, ...) that is not a positive
            integer (a string, a bool, a float, 0), naming the field.
    """
    where = directory / CONFIG_NAME
    ptype = data.get("peft_type")
    known = PROMPT_TYPES + PREFIX_TYPES + (MPT_TYPE, ADAPTION_TYPE)
    if ptype not in known:
        raise SoftPromptError(
            f"{where}: peft_type {ptype!r} is not supported; softprompt loads the PEFT "
            f"prompt-learning types {list(known)} "
            "(LoRA and other weight adapters change the model's weights, not its prompt)"
        )
    task_type = data.get("task_type")
    if task_type not in TASK_TYPES:
        raise SoftPromptError(
            f"{where}: task_type {task_type!r} is not supported; softprompt loads PEFT "
            "prompt-learning adapters of causal language models (CAUSAL_LM, FEATURE_EXTRACTION)"
        )
    if not isinstance(data.get("base_model_name_or_path") or "", str):
        raise SoftPromptError(
            f"{where}: field 'base_model_name_or_path' must be a string, got "
            f"{data['base_model_name_or_path']!r}"
        )
    if ptype == ADAPTION_TYPE:
        return _adaption_meta(where, data)
    if data.get("modules_to_save"):
        raise SoftPromptError(
            f"{where}: modules_to_save {data['modules_to_save']!r} (e.g. a classifier head) are "
            "trained model weights, not a soft prompt; softprompt cannot load them"
        )
    n = _int_field(where, data, "num_virtual_tokens", required=True)
    for field in ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
        _int_field(where, data, field)
    subs = data.get("num_transformer_submodules") or 1
    if subs != 1:
        raise SoftPromptError(
            f"{where}: num_transformer_submodules={subs} (an encoder-decoder PEFT adapter); "
            "softprompt loads PEFT adapters of decoder-only models only"
        )
    dim = data.get("token_dim")
    if ptype == MPT_TYPE:
        from .methods.multitask_prompt import MultitaskPromptConfig

        # PEFT's defaults (1) only where the field is absent or null: 0 is an error
        ranks = _int_field(where, data, "num_ranks") or 1
        tasks = _int_field(where, data, "num_tasks") or 1
        config: AdapterConfig = MultitaskPromptConfig(
            num_virtual_tokens=n, num_ranks=ranks, num_tasks=tasks
        )
        geometry = {"hidden_size": dim} if dim else {}
    elif ptype in PROMPT_TYPES:
        config = PromptTuningConfig(num_virtual_tokens=n)
        geometry = {"hidden_size": dim} if dim else {}
    else:
        if ptype == "CARTRIDGE":
            frozen = data.get("num_frozen_tokens", 1)
            if not _is_int(frozen) or not 0 <= frozen <= n:
                raise SoftPromptError(
                    f"{where}: field 'num_frozen_tokens' must be an integer in [0, {n}], got "
                    f"{frozen!r}"
                )
            config = CartridgeConfig(num_virtual_tokens=n, num_frozen=frozen)
        else:
            config = DeepPromptConfig(num_virtual_tokens=n)
        geometry = {}
        if dim:
            geometry["kv_dims"] = [dim]
        if data.get("num_layers"):
            geometry["slots"] = [f"self:{data['num_layers']}"]
    return {
        "format": "peft",
        "method": config.method,
        "config": config.to_dict(),
        "name": None,
        "base_model": {"name_or_path": data.get("base_model_name_or_path") or "", **geometry},
        "task": dict(PLAIN_TASK),
        "peft": data,
    }


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a count


def _int_field(where: Path, data: dict, field: str, required: bool = False) -> int | None:
    """``data[field]``: a positive integer, or None where absent or null (unless
    ``required``); a string, a bool, a float or a number below 1 is refused, naming the field.
    """
    v = data.get(field)
    if v is None and not required:
        return None
    if not _is_int(v) or v < 1:
        raise SoftPromptError(
            f"{where}: field {field!r} must be a positive integer (a JSON number), got {v!r}; "
            "fix adapter_config.json"
        )
    return v


def _adaption_meta(where: Path, data: dict) -> dict:
    """``peft_meta`` of an ``ADAPTION_PROMPT`` config (``adapter_len``, ``adapter_layers``)."""
    n = _int_field(where, data, "adapter_len", required=True)
    layers = _int_field(where, data, "adapter_layers", required=True)
    target = data.get("target_modules")
    if target not in (None, "self_attn"):
        raise SoftPromptError(
            f"{where}: target_modules {target!r}; softprompt loads PEFT adaption prompts of "
            "Llama-style models (target_modules 'self_attn'; GPT-2's 'attn' form adds the "
            "adapter after c_proj, which softprompt does not serve)"
        )
    config = AdaptionPromptConfig(num_virtual_tokens=n, adapter_layers=layers)
    return {
        "format": "peft",
        "method": config.method,
        "config": config.to_dict(),
        "name": None,
        "base_model": {"name_or_path": data.get("base_model_name_or_path") or ""},
        "task": dict(PLAIN_TASK),
        "peft": data,
    }


def read_peft_weights(directory: Path) -> torch.Tensor:
    """``prompt_embeddings`` of a PEFT folder: from ``adapter_model.safetensors``, or from the
    legacy pickle ``adapter_model.bin`` with ``torch.load(weights_only=True)`` only (tensors and
    plain containers; anything else is refused without running it).

    Returns:
        (rows, width) float tensor.
    """
    tensors, where = read_peft_tensors(directory)
    extra = sorted(set(tensors) - {KEY})
    if extra:
        raise SoftPromptError(
            f"{where} holds {extra} besides {KEY!r}: trained model weights (e.g. a classifier "
            "head), not a soft prompt; softprompt cannot load them"
        )
    return _checked(tensors, KEY, where, 2)


def _checked(tensors: dict, key: str, where: Path, dim: int) -> torch.Tensor:
    """``tensors[key]``, refused unless a finite float tensor of ``dim`` dimensions."""
    if key not in tensors or tensors[key].dim() != dim:
        raise SoftPromptError(f"{where} has no {dim}-D tensor {key!r}")
    table = tensors[key]
    if not table.is_floating_point():
        raise SoftPromptError(
            f"{where}: tensor {key!r} has dtype {table.dtype}, not a float dtype (PEFT saves "
            "float32, float16 or bfloat16): the file is not a PEFT prompt-learning checkpoint"
        )
    if not torch.isfinite(table).all():
        bad = int((~torch.isfinite(table.float())).sum())
        raise SoftPromptError(
            f"{where}: tensor {key!r} holds {bad} NaN or infinite values; the adapter is "
            "broken: retrain it"
        )
    return table


def read_peft_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Every tensor of a PEFT folder's weights file (see ``read_peft_weights``), and the file."""
    st, binary = directory / WEIGHTS_NAME, directory / BIN_NAME
    if st.is_file():
        try:
            tensors = load_file(str(st))
        except (SafetensorError, OSError, ValueError) as e:
            raise SoftPromptError(
                f"{st} is not a readable safetensors file ({e}); the file is corrupt"
            ) from e
        where = st
    elif binary.is_file():
        try:
            tensors = torch.load(binary, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SoftPromptError(
                f"{binary} is a pickle that torch.load(weights_only=True) refuses ({first}); "
                "softprompt never runs pickled code. " + _CONVERT_BIN.format(dir=directory)
            ) from e
        where = binary
        if not isinstance(tensors, dict) or not all(
            isinstance(v, torch.Tensor) for v in tensors.values()
        ):
            raise SoftPromptError(f"{binary} does not hold a dict of tensors")
    else:
        raise SoftPromptError(
            f"{directory} has a PEFT adapter_config.json but neither {WEIGHTS_NAME} nor {BIN_NAME}"
        )
    return tensors, where


def _model_heads(model) -> int | None:
    """The base model's attention head count, read as PEFT reads it (``_prepare_prompt_learning_
    config``)."""
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in ("num_attention_heads", "n_head", "num_heads"):
        if getattr(cfg, key, None) is not None:
            return int(getattr(cfg, key))
    return None


def _is_decoder(model: SoftPromptModel) -> bool:
    """Whether every attention slot is causal: a decoder-only model, with an LM head
    (``LlamaForCausalLM``) or without (``LlamaModel``), not a bidirectional encoder (BERT)."""
    modules = _hf.slot_modules(model.base_model, model.info).values()
    return bool(modules) and all(getattr(m, "is_causal", False) is True for m in modules)


def _check_task_type(model: SoftPromptModel, directory: Path, data: dict) -> None:
    """Refuse a ``task_type`` the model is not made for: CAUSAL_LM on a model without an LM
    head (others than CAUSAL_LM, FEATURE_EXTRACTION and none are refused by ``peft_meta``)."""
    where, base = directory / CONFIG_NAME, model.base_model
    if data.get("task_type") == "CAUSAL_LM" and not model.info.is_causal_lm:
        raise SoftPromptError(
            f"{where}: task_type 'CAUSAL_LM': the adapter is for a causal language model with "
            f"an LM head (AutoModelForCausalLM); {type(base).__name__} is not one. Load it onto "
            f"the causal LM it was made for ({data.get('base_model_name_or_path') or 'unnamed'})"
        )


def _warn_other_name(model: SoftPromptModel, directory: Path, data: dict) -> None:
    """Warn when ``base_model_name_or_path`` names another model than the one given (last
    path parts compared, case-folded).

    A PEFT folder records no vocabulary or weights to compare (softprompt's own adapters do:
    ``_hf.identity_mismatches``), only its base model's name; names differ for the same
    weights (a hub id, a local copy, softprompt's asset cache), so a differing name is a
    warning, not an error.
    """
    where, base = directory / CONFIG_NAME, model.base_model
    made_for = data.get("base_model_name_or_path") or ""
    have = getattr(base, "name_or_path", "") or model.info.identity.get("name_or_path") or ""
    if made_for and have and _basename(made_for) != _basename(have):
        warnings.warn(
            f"{where}: base_model_name_or_path is {made_for!r}, the model is {have!r}; softprompt "
            "checks only the sizes of a PEFT adapter, so if this is not the model it was made "
            "for (or a copy of it), its outputs are meaningless",
            UserWarning,
            stacklevel=5,  # load_adapter's caller
        )


def _basename(name: str) -> str:
    """``"org/Model-1B"``, ``"/models/model-1b/"`` -> ``"model-1b"``."""
    return Path(name.rstrip("/\\")).name.casefold()


def _check_base(model: SoftPromptModel, directory: Path, data: dict, rows: int, width: int):
    """Refuse a PEFT folder made for another base model, as softprompt's own adapters are."""
    info = model.info
    ptype, n = data["peft_type"], data["num_virtual_tokens"]
    layers = sum(s.kind == "self" for s in info.slots)
    kv = {(s.kv_heads, s.head_dim) for s in info.slots}
    diffs = []
    if info.is_encoder_decoder:
        diffs.append("the model is an encoder-decoder; the adapter is for a decoder-only model")
    if ptype in PROMPT_TYPES + (MPT_TYPE,):
        if width != info.hidden_size:
            diffs.append(
                f"token_dim: adapter has {width}, model has hidden size {info.hidden_size}"
            )
        expect = {"num_layers": layers, "num_attention_heads": _model_heads(model)}
        if rows != n:
            diffs.append(f"{KEY} has {rows} rows for num_virtual_tokens={n}")
    else:
        if len(kv) != 1 or not _is_decoder(model) or info.is_encoder_decoder:
            raise SoftPromptError(
                f"{directory}: a PEFT prefix needs a decoder-only model (causal attention, with "
                "or without an LM head) with one attention geometry in every layer; "
                f"{type(model.base_model).__name__} is not one"
            )
        ((kv_heads, head_dim),) = kv
        expect = {"num_layers": layers, "num_attention_heads": kv_heads}
        if data.get("token_dim") not in (None, kv_heads * head_dim):
            diffs.append(
                f"token_dim: adapter has {data['token_dim']}, model has {kv_heads * head_dim} "
                f"(key/value heads {kv_heads} x head dim {head_dim})"
            )
        if rows != n or width != layers * 2 * kv_heads * head_dim:
            diffs.append(
                f"{KEY} has shape {(rows, width)}, the model takes "
                f"{(n, layers * 2 * kv_heads * head_dim)} (num_virtual_tokens x layers * 2 * "
                "key/value heads * head dim)"
            )
    for field, have in expect.items():
        got = data.get(field)
        if got is not None and have is not None and got != have:
            diffs.append(f"{field}: adapter has {got}, model has {have}")
    if diffs:
        made_for = data.get("base_model_name_or_path") or "unnamed"
        raise SoftPromptError(
            f"PEFT adapter {directory} was made for another base model ({made_for}): "
            + "; ".join(diffs)
        )


def load_peft(
    model: SoftPromptModel, directory: str | Path, meta: dict, name: str | None = None
) -> SoftPromptModel:
    """Load a PEFT prompt-learning folder (``meta`` from ``peft_meta``) as adapter ``name``
    (default "default"); same logits as ``PeftModel.from_pretrained(base, directory)``.

    Returns:
        The model, with the adapter active.

    Raises:
        SoftPromptError: a folder for another model (sizes, or task_type CAUSAL_LM on a model
            without an LM head), broken tensors, or a prefix on a model where softprompt cannot
            give the real tokens PEFT's positions (``_prefix_positions_refusal``).
    """
    directory = Path(directory)
    data = meta["peft"]
    _check_task_type(model, directory, data)
    if data["peft_type"] == MPT_TYPE:
        model = _load_peft_mpt(model, directory, meta, name)
    elif data["peft_type"] == ADAPTION_TYPE:
        model = _load_peft_adaption(model, directory, meta, name)
    else:
        model = _load_peft_table(model, directory, meta, name)
    _warn_other_name(model, directory, data)  # loaded: the sizes agree
    return model


def _load_peft_table(
    model: SoftPromptModel, directory: Path, meta: dict, name: str | None
) -> SoftPromptModel:
    """A folder with one ``prompt_embeddings`` table: a prompt (P, hidden) or a prefix
    (P, layers * 2 * token_dim)."""
    data = meta["peft"]
    table = read_peft_weights(directory).float()  # (P, hidden) or (P, layers * 2 * token_dim)
    _check_base(model, directory, data, *table.shape)
    prefix = data["peft_type"] in PREFIX_TYPES
    why = _prefix_positions_refusal(model.base_model) if prefix else None
    if why:
        raise SoftPromptError(
            f"{directory}: PEFT gives the real tokens positions P..P+T-1 after its prefix "
            f"(held as cache entries at 0..P-1); {why}, so the adapter would not give PEFT's "
            "outputs"
        )

    def fill(adapter) -> None:
        adapter.load_baked({"prefix" if prefix else "prompt": table.to(model.device)})
        adapter.position_offset = table.shape[0] if prefix else 0

    return _install(model, name, AdapterConfig.from_dict(meta["config"]), meta, fill)


def _prefix_positions_refusal(base) -> str | None:
    """Why softprompt cannot reproduce a PEFT prefix on ``base`` by starting the real tokens'
    ``position_ids`` at P (``Adapter.position_offset``), or None where it can: a forward that
    takes ``position_ids`` and reads positions only from them (rotary of any rope type, learned
    tables), without ALiBi or a sliding / chunked attention window."""
    cls = type(base).__name__
    if _hf.position_encoding(base) in ("rotary", "absolute"):
        return None
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{cls}'s forward takes no position_ids softprompt could shift to match"
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if getattr(cfg, "alibi", False):
        return f"{cls} uses ALiBi, whose biases follow the attention mask, not position_ids"
    kinds = set(getattr(cfg, "layer_types", None) or [])
    window = (
        getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    )
    if window or "sliding_attention" in kinds:
        return (
            f"{cls} has sliding-window attention (sliding_window={window}): PEFT's prefix drops "
            "out of the window of every token more than sliding_window positions after it, "
            "while softprompt's prefix stays visible to every token"
        )
    chunk = getattr(cfg, "attention_chunk_size", None)
    if chunk or "chunked_attention" in kinds:
        return (
            f"{cls} has chunked attention (attention_chunk_size={chunk}): PEFT's prefix is "
            "visible only inside the first chunk, softprompt's to every token"
        )
    return None


def _install(
    model: SoftPromptModel,
    name: str | None,
    config: AdapterConfig,
    meta: dict,
    fill: Callable[[Adapter], None],
) -> SoftPromptModel:
    """Add adapter ``name`` (default "default") made from a PEFT folder: ``fill`` loads its
    tensors, then its task and source are recorded and it becomes active. A failure leaves the
    model as it was (the half-made adapter is deleted)."""
    name = name or "default"
    adapter = model.add_adapter(name, config, _init=False)
    try:
        with torch.no_grad():
            fill(adapter)
        adapter.task = dict(meta["task"])
        adapter.source = {"peft": meta["peft"]}
    except Exception:
        model.delete_adapter(name)
        raise
    model.set_active(name)
    return model


def _load_peft_mpt(
    model: SoftPromptModel, directory: Path, meta: dict, name: str | None
) -> SoftPromptModel:
    """A PEFT MULTITASK_PROMPT_TUNING folder as softprompt's ``mpt`` method, task 0 active
    (PEFT's ``task_ids``: set ``adapter.config.task_id`` for another task)."""
    shared, cols, rows = _mpt_factors(directory, meta)
    _check_base(model, directory, meta["peft"], *shared.shape)
    config = AdapterConfig.from_dict(meta["config"])
    return _install(model, name, config, meta, lambda ad: ad.load_factors(shared, cols, rows))


def _mpt_factors(directory: Path, meta: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A MULTITASK_PROMPT_TUNING folder's ``shared`` (P, d), ``cols`` (tasks, P, r) and
    ``rows`` (tasks, r, d), float32, checked against its config."""
    tensors, where = read_peft_tensors(directory)
    extra = sorted(set(tensors) - {KEY, *MPT_KEYS})
    if extra:
        raise SoftPromptError(
            f"{where} holds {extra} besides {[KEY, *MPT_KEYS]}: not a multitask prompt; "
            "softprompt cannot load them"
        )
    shared = _checked(tensors, KEY, where, 2).float()  # (P, d)
    cols = _checked(tensors, MPT_KEYS[0], where, 3).float()  # (tasks, P, r)
    rows = _checked(tensors, MPT_KEYS[1], where, 3).float()  # (tasks, r, d)
    config = AdapterConfig.from_dict(meta["config"])
    want = {
        MPT_KEYS[0]: (config.num_tasks, config.num_virtual_tokens, config.num_ranks),
        MPT_KEYS[1]: (config.num_tasks, config.num_ranks, shared.shape[1]),
    }
    for key, t in ((MPT_KEYS[0], cols), (MPT_KEYS[1], rows)):
        if tuple(t.shape) != want[key]:
            raise SoftPromptError(
                f"{where}: tensor {key!r} has shape {tuple(t.shape)}; adapter_config.json "
                f"(num_tasks, num_virtual_tokens, num_ranks) implies {want[key]}"
            )
    return shared, cols, rows


def read_peft_prompt(directory: Path, meta: dict) -> torch.Tensor:
    """The (P, hidden) virtual-token embeddings a PEFT prompt folder (``meta`` from
    ``peft_meta``) puts before the input: ``prompt_embeddings`` for PROMPT_TUNING and
    P_TUNING; for MULTITASK_PROMPT_TUNING task 0's, shared * (cols[0] @ rows[0]), as
    ``load_adapter`` activates it (PEFT's ``task_ids=[0]``)."""
    if meta["peft"]["peft_type"] != MPT_TYPE:
        return read_peft_weights(directory)
    shared, cols, rows = _mpt_factors(directory, meta)
    t = AdapterConfig.from_dict(meta["config"]).task_id
    return shared * (cols[t] @ rows[t])  # (P, d) = (P, d) * ((P, r) @ (r, d))


_ADAPTION_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.self_attn\.(adaption_prompt|adaption_gate)$")


def _load_peft_adaption(
    model: SoftPromptModel, directory: Path, meta: dict, name: str | None
) -> SoftPromptModel:
    """A PEFT ``ADAPTION_PROMPT`` folder as softprompt's ``adaption_prompt`` method: per layer
    ``...layers.{i}.self_attn.adaption_prompt`` (1, P, d) and ``adaption_gate`` (1,), the top
    ``adapter_layers`` layers.

    Raises:
        SoftPromptError: another key, shape or set of layers, a model the method cannot serve
            (``_hf.check_adaption``), or one whose ``o_proj`` has a bias (PEFT then adds it
            twice: its outputs are not the paper's, and softprompt does not reproduce them).
    """
    tensors, where = read_peft_tensors(directory)
    config = AdapterConfig.from_dict(meta["config"])
    info = model.info
    try:
        slots = top_slots(info, config.adapter_layers)
    except SoftPromptError as e:
        raise SoftPromptError(f"{directory / CONFIG_NAME}: {e}") from e
    _hf.check_adaption(model.base_model, info, slots)
    biased = _hf.biased_output_layers(model.base_model, info, slots)
    if biased:
        raise SoftPromptError(
            f"{directory}: {type(model.base_model).__name__}'s o_proj has a bias (layers "
            f"{biased}); PEFT's adaption prompt adds o_proj(adapter) after o_proj, which adds "
            "that bias a second time (even with a zero gate), while softprompt adds the "
            "adapter before o_proj (the paper's form). The outputs would differ: retrain the "
            "adapter with softprompt (--method adaption_prompt)"
        )
    layers = [info.slots[s].layer for s in slots]
    n, d = config.num_virtual_tokens, info.hidden_size
    found: dict[tuple[int, str], torch.Tensor] = {}
    for key, t in tensors.items():
        m = _ADAPTION_KEY.match(key)
        if m is None:
            raise SoftPromptError(
                f"{where} holds {key!r}: not an adaption prompt or gate; softprompt cannot load it"
            )
        found[(int(m.group(1)), m.group(2))] = t
    if sorted({i for i, _ in found}) != layers or len(found) != 2 * len(layers):
        raise SoftPromptError(
            f"{where} has adaption prompts and gates for layers {sorted({i for i, _ in found})}; "
            f"adapter_layers={config.adapter_layers} on this {len(info.slots)}-layer model means "
            f"both for layers {layers}"
        )
    want = {"adaption_prompt": (1, n, d), "adaption_gate": (1,)}
    prompts, gates = [], []
    for i in layers:
        for kind, out in (("adaption_prompt", prompts), ("adaption_gate", gates)):
            t = found[(i, kind)]
            if tuple(t.shape) != want[kind]:
                raise SoftPromptError(
                    f"{where}: layer {i} {kind} has shape {tuple(t.shape)}, the model takes "
                    f"{want[kind]} (adapter_len x hidden size {d})"
                )
            out.append(_checked({kind: t}, kind, where, len(want[kind])).float())
    baked = {
        "adaption_prompt": torch.cat(prompts).to(model.device),  # (L, P, d)
        "adaption_gate": torch.stack(gates).to(model.device),  # (L, 1)
    }
    return _install(model, name, config, meta, lambda ad: ad.load_baked(baked))


# --------------------------------------------------------------------------------------------
# Out
# --------------------------------------------------------------------------------------------

# Fields PEFT's PromptTuningConfig / PrefixTuningConfig write (peft 0.21.2), minus the ones
# filled per adapter.
_COMMON = {
    "auto_mapping": None,
    "inference_mode": True,
    "modules_to_save": None,
    "num_transformer_submodules": 1,
    "revision": None,
    "task_type": "CAUSAL_LM",
}
_NATIVE = {
    "PROMPT_TUNING": {
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    },
    "PREFIX_TUNING": {"init_weights": None, "prefix_projection": False},
}


def peft_tensor_and_config(
    model: SoftPromptModel, name: str | None = None, base_name: str | None = None
) -> tuple[torch.Tensor, dict]:
    """Adapter ``name`` as PEFT's ``prompt_embeddings`` and ``adapter_config.json``.

    Prompt tuning and P-tuning become ``PROMPT_TUNING`` with the baked (P, hidden) embeddings:
    PEFT's ``P_TUNING`` would rebuild a randomly initialised encoder and, loaded trainable, run
    it on the saved output. Prefix tuning and deep prompts become ``PREFIX_TUNING`` without
    projection (P, layers * 2 * kv_dim), keys rotated by P positions on rotary models (PEFT's
    real tokens sit at P..P+T-1). An adapter imported from PEFT is written back with its
    original config and type.

    Raises:
        SoftPromptError: what PEFT cannot express (template or append placement, a subset of
            layers, encoder-decoder prefixes, a task head, a prefix on an absolute-position
            model).
    """
    name = name or model.active
    if name is None or name not in model.adapters:
        raise SoftPromptError(f"no adapter {name!r} to export; loaded: {sorted(model.adapters)}")
    ad, info = model.adapters[name], model.info
    what = f"adapter {name!r} ({ad.config.method})"
    if ad.gated_prompts():
        raise SoftPromptError(
            f"{what} is an adaption prompt: PEFT keeps one prompt and gate per layer, not one "
            "prompt_embeddings tensor; use save_peft (peft_adaption_tensors_and_config)"
        )
    if info.is_encoder_decoder:
        raise SoftPromptError(
            f"{what} is on an encoder-decoder model: PEFT's seq2seq prompt learning prefixes "
            "only the decoder (and reuses one stored prefix for several layers); softprompt's "
            "encoder, decoder and cross-attention prompts cannot be expressed in PEFT"
        )
    if ad.task_head is not None:
        raise SoftPromptError(f"{what} has a task head; PEFT prompt learning has no place for it")
    source = (ad.source or {}).get("peft") or {}
    if source.get("peft_type") == MPT_TYPE:  # exported as its baked prompt: PROMPT_TUNING
        source = {"base_model_name_or_path": source.get("base_model_name_or_path")}
    with torch.no_grad():
        baked = {k: v.detach().float().cpu() for k, v in ad.baked_tensors().items()}
    n = ad.num_virtual_tokens
    layers = sum(s.kind == "self" for s in info.slots)
    if "prompt" in baked:
        placement = getattr(ad.config, "placement", "prepend")
        if placement != "prepend":
            raise SoftPromptError(
                f"{what} has placement {placement!r}: PEFT puts virtual tokens only before the "
                "input, so template and append placements cannot be expressed"
            )
        tensor = baked["prompt"]  # (P, hidden)
        ptype = source.get("peft_type") if source.get("peft_type") in PROMPT_TYPES else None
        geometry = {
            "num_attention_heads": _model_heads(model),
            "num_layers": layers,
            "token_dim": info.hidden_size,
        }
    else:
        slots = ad.layout.slots
        if len(slots) != len(info.slots):
            raise SoftPromptError(
                f"{what} prompts {len(slots)} of {len(info.slots)} layers: PEFT's prefix covers "
                "every layer, so a subset of layers cannot be expressed"
            )
        kv = {(info.slots[s].kv_heads, info.slots[s].head_dim) for s in slots}
        if len(kv) != 1:
            raise SoftPromptError(f"{what}: layers of different attention geometry; PEFT has one")
        ((kv_heads, head_dim),) = kv
        tensor = baked["prefix"]  # (P, layers * 2 * kv_dim), PEFT's layout
        if ad.position_offset != n:
            tensor = _to_peft_positions(model, ad, tensor, what)
        ptype = source.get("peft_type") if source.get("peft_type") in PREFIX_TYPES else None
        extra = {}
        if ad.config.method == "cartridge":
            ptype = ptype or "CARTRIDGE"
            extra = {"num_frozen_tokens": ad.config.num_frozen}
        geometry = {
            "num_attention_heads": kv_heads,
            "num_layers": layers,
            "token_dim": kv_heads * head_dim,
            **extra,
        }
    ptype = ptype or ("PROMPT_TUNING" if "prompt" in baked else "PREFIX_TUNING")
    if ptype == "PREFIX_TUNING" and "encoder_hidden_size" not in source:
        geometry["encoder_hidden_size"] = geometry["token_dim"]
    task_type = "CAUSAL_LM" if info.is_causal_lm else "FEATURE_EXTRACTION"
    config = {**_COMMON, "task_type": task_type, **_NATIVE.get(ptype, {}), **source, **geometry}
    config.update(
        peft_type=ptype,
        num_virtual_tokens=n,
        inference_mode=True,
        base_model_name_or_path=source.get("base_model_name_or_path")
        or base_name
        or info.identity.get("name_or_path")
        or None,
    )
    return tensor, dict(sorted(config.items()))


def peft_adaption_tensors_and_config(
    model: SoftPromptModel, name: str, base_name: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """An adaption-prompt adapter as PEFT's ``ADAPTION_PROMPT`` tensors (per adapted layer,
    ``base_model.model.<attention module path>.adaption_prompt`` (1, P, d) and ``.adaption_gate``
    (1,)) and ``adapter_config.json``.

    Raises:
        SoftPromptError: a model type PEFT's ADAPTION_PROMPT does not take
            (``peft_adaption_model_types``), a model whose ``o_proj`` has a bias (PEFT would add
            it twice), or adapted layers that are not the top ones (PEFT adapts the top
            ``adapter_layers``).
    """
    ad, info, base = model.adapters[name], model.info, model.base_model
    what = f"adapter {name!r} ({ad.config.method})"
    if ad.task_head is not None:
        raise SoftPromptError(f"{what} has a task head; PEFT prompt learning has no place for it")
    supported = peft_adaption_model_types()
    if base.config.model_type not in supported:
        raise SoftPromptError(
            f"{what} is on model_type {base.config.model_type!r}: PEFT's ADAPTION_PROMPT "
            f"supports only {supported} (with target_modules 'self_attn'), so "
            "PeftModel.from_pretrained would refuse the folder; not exported. Serve it with "
            "softprompt, or export another method (prompt, prefix, deep) trained on this model"
        )
    slots = sorted(ad.gated_prompts(), key=lambda s: info.slots[s].layer)
    biased = _hf.biased_output_layers(base, info, slots)
    if biased:
        raise SoftPromptError(
            f"{what}: {type(base).__name__}'s o_proj has a bias (layers {biased}); PEFT's "
            "adaption prompt adds o_proj(adapter) after o_proj, which adds the bias a second "
            "time, so PEFT would not give softprompt's outputs: not exported"
        )
    if slots != top_slots(info, len(slots)):
        raise SoftPromptError(f"{what}: PEFT adapts the top layers only")
    paths = {id(m): p for p, m in base.named_modules()}
    modules = _hf.slot_modules(base, info)
    tensors = {}
    with torch.no_grad():
        for s, (prompt, gate) in ad.gated_prompts().items():
            key = f"base_model.model.{paths[id(modules[s])]}"
            tensors[f"{key}.adaption_prompt"] = prompt.detach().float().cpu()[None]  # (1, P, d)
            tensors[f"{key}.adaption_gate"] = gate.detach().float().cpu().reshape(1)  # (1,)
    source = (ad.source or {}).get("peft") or {}
    config = {
        "adapter_layers": len(slots),
        "adapter_len": ad.num_virtual_tokens,
        "auto_mapping": None,
        "base_model_name_or_path": source.get("base_model_name_or_path")
        or base_name
        or info.identity.get("name_or_path")
        or None,
        "inference_mode": True,
        "peft_type": ADAPTION_TYPE,
        "revision": None,
        "target_modules": "self_attn",
        "task_type": "CAUSAL_LM",
    }
    return tensors, config


# PEFT 0.21.2's ADAPTION_PROMPT model types with the Llama form (target_modules "self_attn"),
# used where peft is not installed
_ADAPTION_MODEL_TYPES = ("llama", "mistral")


def peft_adaption_model_types() -> list[str]:
    """The model types PEFT's ADAPTION_PROMPT takes in softprompt's (Llama) form: read from the
    installed peft (``peft.tuners.adaption_prompt.config.TRANSFORMERS_MODEL_CONFIG``, the
    entries with ``target_modules`` "self_attn"; GPT-2's "attn" form adds the adapter after
    ``c_proj``), else peft 0.21.2's."""
    try:
        from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG
    except Exception:  # peft not installed, or not importable with this transformers
        return list(_ADAPTION_MODEL_TYPES)
    return sorted(
        t for t, c in TRANSFORMERS_MODEL_CONFIG.items() if c.target_modules == "self_attn"
    )


def _to_peft_positions(model: SoftPromptModel, ad, flat: torch.Tensor, what: str) -> torch.Tensor:
    """A softprompt prefix (real tokens at ``position_offset``..) as PEFT's (real tokens at
    P..P+T-1): keys rotated by the difference on rotary models; refused elsewhere.

    Args:
        flat: (P, layers * 2 * kv_dim).
    """
    n, shift = ad.num_virtual_tokens, ad.num_virtual_tokens - ad.position_offset
    encoding = _hf.position_encoding(model.base_model)
    if encoding == "other":
        raise SoftPromptError(
            f"{what} is on {type(model.base_model).__name__}: PEFT gives the real tokens "
            f"positions {n}..{n}+T-1 after its prefix, and softprompt cannot tell how this "
            "model's positions would change that, so it is not exported"
        )
    if encoding != "rotary":
        raise SoftPromptError(
            f"{what} is on {type(model.base_model).__name__}, which has learned absolute "
            f"positions: PEFT gives the real tokens positions {n}..{n}+T-1 after its prefix, "
            f"softprompt {ad.position_offset}..T-1, and no change of the prefix makes up for "
            "that, so it cannot be expressed in PEFT (adapters imported from PEFT can)"
        )
    parts = []
    for _s, (k, v) in sorted(ad.layout.split(flat).items()):  # (P, kvh, hd) each
        k = _hf.rotate_keys(model.base_model, k.to(model.device), shift).cpu()
        parts += [k.reshape(n, -1), v.reshape(n, -1)]
    return torch.cat(parts, dim=1)  # (P, layers * 2 * kv_dim)


def dropped_template(ad: Adapter) -> str | None:
    """The template of ``ad``'s task when a PEFT export loses it (anything but the raw input,
    ``PLAIN_TASK``), else None."""
    template = (ad.task or {}).get("template")
    return None if template in (None, PLAIN_TASK["template"]) else template


def save_peft(
    model: SoftPromptModel,
    output: str | Path,
    name: str | None = None,
    *,
    base_name: str | None = None,
    dtype: torch.dtype | None = None,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Write adapter ``name`` as a PEFT folder (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``PeftModel.from_pretrained(base, output)`` loads with
    softprompt's logits (see ``peft_tensor_and_config``).

    PEFT keeps no task: an adapter trained with a template other than the raw input
    (``dropped_template``) is written all the same, and ``warn`` (default ``warnings.warn``)
    says so; PEFT users must format their inputs with the template themselves.

    Returns:
        The folder.
    """
    from .io import _write_json, _write_tensors

    which = name or model.active
    if which in model.adapters and model.adapters[which].gated_prompts():
        tensors, config = peft_adaption_tensors_and_config(model, which, base_name)
    else:
        tensor, config = peft_tensor_and_config(model, name, base_name)
        tensors = {KEY: tensor}
    output = Path(output)
    if (output / "adapter.safetensors").exists():  # its adapter_config.json would be replaced
        raise SoftPromptError(
            f"{output} holds a softprompt adapter (adapter.safetensors); writing a PEFT folder "
            "there would replace its adapter_config.json: give a new or empty folder"
        )
    _write_tensors(
        output / WEIGHTS_NAME, {k: t if dtype is None else t.to(dtype) for k, t in tensors.items()}
    )
    _write_json(output / CONFIG_NAME, config)
    template = dropped_template(model.adapters[which])
    if template is not None:
        message = (
            f"{output}: adapter {which!r} was trained with the task template {template!r}, "
            "which a PEFT folder has no place for: PEFT (and softprompt, loading this folder) "
            "feed the raw input, so format inputs with the template yourself"
        )
        (warn or (lambda m: warnings.warn(m, UserWarning, stacklevel=3)))(message)
    return output
