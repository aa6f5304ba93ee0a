"""Adapter files: safetensors + JSON, exact round trips, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, METHODS, inputs_for, method_config, out_tensor, perturb, tiny_model
from safetensors.torch import load_file

import softprompt as sp

IDS = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
MASK = (IDS != 0).long()


def _trained(family, method):
    model = sp.attach(tiny_model(family))
    model.add_adapter("task", method_config(method))
    perturb(model)
    return model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_gives_bit_identical_outputs(tmp_path, family, method):
    model = _trained(family, method)
    kw = inputs_for(family, IDS, MASK)
    with torch.no_grad():
        ref = out_tensor(family, model(**kw))
        model.save_adapter(tmp_path / "ad")
        loaded = sp.load_adapter(tiny_model(family), tmp_path / "ad")
        got = out_tensor(family, loaded(**kw))
    assert loaded.active == "task"
    assert torch.equal(got, ref)
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [
        "adapter.safetensors",
        "adapter_config.json",
    ]


@pytest.mark.parametrize("method", METHODS)
def test_saved_keys_and_config(tmp_path, method):
    model = _trained("llama", method)
    model.save_adapter(tmp_path / "ad")
    tensors = load_file(tmp_path / "ad" / "adapter.safetensors")
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    p = model.adapters["task"].num_virtual_tokens
    if method in ("prompt", "ptuning", "mpt"):
        assert list(tensors) == ["prompt"] and tensors["prompt"].shape == (p, 32)
        assert meta["slots"] == []
    else:
        # 3 layers x (key + value) x 2 kv heads x head_dim 8
        assert list(tensors) == ["prefix"] and tensors["prefix"].shape == (p, 3 * 2 * 2 * 8)
        assert meta["slots"] == ["self.0", "self.1", "self.2"]
    assert meta["format"] == "softprompt-adapter" and meta["method"] == method
    assert meta["library_version"] == sp.__version__
    ident = meta["base_model"]
    assert ident["model_type"] == "llama" and ident["vocab_size"] == 120
    assert (
        ident["hidden_size"] == 32
        and ident["kv_dims"] == [16]
        and len(ident["embedding_sample"]) == 64
    )
    assert meta["config"]["num_virtual_tokens"] == p


@pytest.mark.parametrize("method", ["prefix", "ptuning"])
def test_checkpoint_keeps_the_reparameterisation_and_trains_on(tmp_path, method):
    model = _trained("llama", method)
    model.save_adapter(tmp_path / "ck", trainable=True)
    state = load_file(tmp_path / "ck" / "trainable.safetensors")
    expected = {k for k, _ in model.adapters["task"].named_parameters()}
    assert set(state) == expected  # exactly the adapter's parameters: MLP / encoder included
    loaded = sp.load_adapter(tiny_model("llama"), tmp_path / "ck")
    assert not loaded.adapters["task"].is_baked
    assert {k for k, p in loaded.named_parameters() if p.requires_grad} == {
        f"adapters.task.{k}" for k in expected
    }
    # one identical optimisation step on both gives identical parameters
    for m in (model, loaded):
        m.train()
        opt = torch.optim.SGD(m.parameters_to_train(), lr=0.1)
        m(input_ids=IDS, attention_mask=MASK, labels=IDS).loss.backward()
        opt.step()
    for (k, a), b in zip(
        model.adapters["task"].named_parameters(), loaded.adapters["task"].parameters(), strict=True
    ):
        assert torch.equal(a, b), k
    # the baked export loads as a baked (inference) adapter with the same outputs
    model.save_adapter(tmp_path / "baked")
    baked = sp.load_adapter(tiny_model("llama"), tmp_path / "baked")
    assert baked.adapters["task"].is_baked and baked.trainable_parameters()[0] == 0
    with torch.no_grad():
        assert torch.equal(baked(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_adapter_for_another_base_model_is_refused(tmp_path):
    model = _trained("llama", "prefix")
    model.save_adapter(tmp_path / "ad")
    with pytest.raises(
        sp.SoftPromptError, match=r"model_type: adapter has 'llama', model has 'gpt2'"
    ):
        sp.load_adapter(tiny_model("gpt2"), tmp_path / "ad")
    other = tiny_model("llama")
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.5)
    with pytest.raises(sp.SoftPromptError, match="embedding weights differ"):
        sp.load_adapter(other, tmp_path / "ad")
    # same checkpoint in bfloat16 is the same model
    sp.load_adapter(tiny_model("llama").to(torch.bfloat16), tmp_path / "ad")


def test_corrupt_and_missing_files_are_clear_errors(tmp_path):
    model = _trained("llama", "prompt")
    ad = tmp_path / "ad"
    model.save_adapter(ad)
    base = tiny_model("llama")
    with pytest.raises(sp.SoftPromptError, match="does not exist"):
        sp.load_adapter(base, tmp_path / "nope")
    weights = (ad / "adapter.safetensors").read_bytes()
    (ad / "adapter.safetensors").write_bytes(weights[:50])
    with pytest.raises(
        sp.SoftPromptError, match="adapter.safetensors is not a readable safetensors"
    ):
        sp.load_adapter(base, ad)
    (ad / "adapter.safetensors").write_bytes(weights)
    (ad / "adapter_config.json").write_text("{not json")
    with pytest.raises(sp.SoftPromptError, match="adapter_config.json is not valid JSON"):
        sp.load_adapter(base, ad)
    (ad / "adapter_config.json").unlink()
    with pytest.raises(sp.SoftPromptError, match="adapter_config.json is missing"):
        sp.load_adapter(base, ad)
    # a failed load leaves the model as it was
    wrapped = sp.attach(base)
    with pytest.raises(sp.SoftPromptError):
        sp.load_adapter(wrapped, ad)
    assert list(wrapped.adapters) == []


def test_no_pickle_anywhere(tmp_path):
    model = _trained("t5", "prefix")
    model.save_adapter(tmp_path / "ad", trainable=True)
    for f in (tmp_path / "ad").iterdir():
        assert f.suffix in (".json", ".safetensors"), f


# ------------------------------------------------------------------------------ hardening


def _saved(tmp_path, method="prompt", trainable=False):
    model = _trained("llama", method)
    model.save_adapter(tmp_path / "ad", trainable=trainable)
    return tmp_path / "ad", tiny_model("llama")


def _edit_config(ad, **changes):
    path = ad / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("trainable", [False, True])
def test_non_finite_weights_are_refused_naming_file_and_tensor(tmp_path, trainable):
    from safetensors.torch import save_file

    ad, base = _saved(tmp_path, "ptuning", trainable=trainable)
    name = "trainable.safetensors" if trainable else "adapter.safetensors"
    tensors = load_file(ad / name)
    key = "embedding" if trainable else "prompt"
    tensors[key][1, 2] = float("nan")
    tensors[key][0, 0] = float("inf")
    save_file(tensors, ad / name)
    with pytest.raises(sp.SoftPromptError, match=rf"{name}: tensor '{key}' holds 2 NaN or inf"):
        sp.load_adapter(base, ad)


@pytest.mark.parametrize(
    "method, trainable, key, dtype",
    [
        ("prompt", False, "prompt", torch.int64),
        ("prompt", False, "prompt", torch.bool),
        ("prefix", False, "prefix", torch.int32),
        ("prefix", True, "embedding.weight", torch.int64),
    ],
)
def test_tensors_that_are_not_floating_point_are_refused(tmp_path, method, trainable, key, dtype):
    from safetensors.torch import save_file

    ad, base = _saved(tmp_path, method, trainable=trainable)
    name = "trainable.safetensors" if trainable else "adapter.safetensors"
    tensors = load_file(ad / name)
    assert key in tensors
    tensors[key] = (tensors[key] * 1000).to(dtype)
    save_file(tensors, ad / name)
    with pytest.raises(sp.SoftPromptError) as err:
        sp.load_adapter(base, ad)
    assert str(err.value) == (
        f"{ad / name}: tensor {key!r} has dtype {str(dtype)[6:]}, not a floating-point dtype; "
        "the file was altered or not written by softprompt: restore it or retrain the adapter"
    )


def test_trainable_that_disagrees_with_the_baked_adapter_is_refused(tmp_path):
    from safetensors.torch import save_file

    ad, base = _saved(tmp_path, "prefix", trainable=True)
    sp.load_adapter(base, ad)  # as saved, they agree
    tensors = load_file(ad / "adapter.safetensors")
    tensors["prefix"] = tensors["prefix"] + 0.01
    save_file(tensors, ad / "adapter.safetensors")
    with pytest.raises(sp.SoftPromptError) as err:
        sp.load_adapter(tiny_model("llama"), ad)
    assert f"{ad / 'trainable.safetensors'} and {ad / 'adapter.safetensors'} disagree" in str(
        err.value
    )
    # the baked form alone still loads
    assert sp.load_adapter(tiny_model("llama"), ad, trainable=False).adapters["task"].is_baked
    # another shape is refused from the header, before the data is read
    save_file({"prefix": torch.zeros(5, 96)}, ad / "adapter.safetensors")
    with pytest.raises(sp.SoftPromptError, match=r"disagree: tensor 'prefix' is \(5, 96\) in"):
        sp.load_adapter(tiny_model("llama"), ad)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format_version": 99}, "format_version 99 is newer than this softprompt reads (1)"),
        ({"base_model": "/etc"}, "field 'base_model' must be an object, got str"),
        ({"config": [1, 2]}, "field 'config' must be an object, got list"),
        ({"method": "bogus"}, "field 'method' is 'bogus', not one of"),
        ({"task_head": "x"}, "field 'task_head' must be [hidden_size, num_labels]"),
        ({"name": 5}, "field 'name' must be a non-empty string"),
        *[
            (
                {"position_offset": bad},
                "field 'position_offset' must be an integer in [0, 2**31) (where the real "
                f"tokens' positions start), got {bad!r}",
            )
            for bad in ("abc", [1], -5, 2.7, True, 2**31)
        ],
        ({"source": 5}, "field 'source' must be an object, got 5"),
        ({"source": "peft"}, "field 'source' must be an object, got 'peft'"),
    ],
)
def test_bad_adapter_config_fields_are_named(tmp_path, changes, message):
    ad, base = _saved(tmp_path)
    _edit_config(ad, **changes)
    with pytest.raises(sp.SoftPromptError) as err:
        sp.load_adapter(base, ad)
    assert str(err.value).startswith(str(ad / "adapter_config.json")) and message in str(err.value)


@pytest.mark.parametrize(
    "config_changes, message",
    [
        ({"num_virtual_tokens": "4"}, "num_virtual_tokens must be an integer, got '4'"),
        ({"seed": 2.5}, "seed must be an integer or null, got 2.5"),
        ({"init_text": [1]}, "init_text must be a string or a list of strings or null, got [1]"),
        ({"placement": "middle"}, "placement must be one of"),
        ({"num_virtual_tokens": 10**6}, "num_virtual_tokens=1,000,000 does not fit the context"),
        ({"num_virtual_tokens": 10**12}, "does not fit the context"),
        (
            {"num_virtual_tokens": 7},
            "tensor 'prompt' has shape (4, 32), the adapter expects (7, 32)",
        ),
    ],
)
def test_bad_method_config_is_refused_before_allocating(tmp_path, config_changes, message):
    ad, base = _saved(tmp_path)
    meta = json.loads((ad / "adapter_config.json").read_text())
    _edit_config(ad, config={**meta["config"], **config_changes})
    with pytest.raises(sp.SoftPromptError) as err:
        sp.load_adapter(base, ad)
    assert message in str(err.value), str(err.value)


def test_a_recorded_position_offset_and_source_load(tmp_path):
    ad, base = _saved(tmp_path)
    _edit_config(ad, position_offset=3, source={"peft": {"peft_type": "PROMPT_TUNING"}})
    loaded = sp.load_adapter(base, ad).adapters["task"]
    assert loaded.position_offset == 3 and loaded.source == {"peft": {"peft_type": "PROMPT_TUNING"}}


@pytest.mark.parametrize("bad", ["7", "abc", [-1], []])
@pytest.mark.parametrize(
    "method, cls", [("prefix", "PrefixTuningConfig"), ("deep", "DeepPromptConfig")]
)
def test_bad_layers_in_the_config_are_named(tmp_path, method, cls, bad):
    ad, base = _saved(tmp_path, method)
    meta = json.loads((ad / "adapter_config.json").read_text())
    _edit_config(ad, config={**meta["config"], "layers": bad})
    with pytest.raises(sp.SoftPromptError) as err:
        sp.load_adapter(base, ad)
    assert str(err.value) == (
        f"{ad / 'adapter_config.json'}: field 'config': {cls}.layers must be null (all layers), "
        f"'top_half' or a non-empty list of block indices (integers >= 0), got {bad!r}"
    )


def test_layers_take_a_tuple_as_the_list_it_saves_as():
    assert sp.PrefixTuningConfig(layers=(2, 0)).layers == [2, 0]
    assert sp.DeepPromptConfig(layers="top_half").to_dict()["layers"] == "top_half"


def test_duplicate_keys_in_adapter_config_are_refused(tmp_path):
    ad, base = _saved(tmp_path)
    path = ad / "adapter_config.json"
    lines = path.read_text().splitlines()
    lines.insert(2, '  "method": "prefix",')  # line 3 repeats a key the file already has
    path.write_text("\n".join(lines))
    with pytest.raises(sp.SoftPromptError, match=r"adapter_config.json:\d+: key 'method' appears"):
        sp.load_adapter(base, ad)


def test_a_run_folder_loads_its_adapter(tmp_path):
    model = _trained("llama", "deep")
    model.save_adapter(tmp_path / "run" / "adapter")
    loaded = sp.load_adapter(tiny_model("llama"), tmp_path / "run")
    assert torch.equal(loaded.adapters["task"].prefix, model.adapters["task"].prefix)
    assert sp.io.read_adapter_config(tmp_path / "run")["method"] == "deep"


def test_io_never_imports_the_model_at_run_time():
    """The model calls io (files), never the reverse: io's only mention of softprompt.model is
    under TYPE_CHECKING, for annotations."""
    import ast
    from pathlib import Path

    import softprompt.io

    tree = ast.parse(Path(softprompt.io.__file__).read_text())
    guarded = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    imports = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module in ("model", "bank", "softprompt.model")
    ]
    assert imports and all(id(node) in guarded for node in imports)
