"""Multitask prompt tuning (method "mpt"): PEFT's MULTITASK_PROMPT_TUNING folders load with
PeftModel's logits, the prompt is shared * (cols @ rows), files round-trip, training moves the
factors (and the shared prompt only when asked)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from peft import MultitaskPromptTuningConfig, PeftModel, get_peft_model
from torch.testing import assert_close

import softprompt as sp
from softprompt.errors import SoftPromptError

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def peft_mpt_folder(family, path, tasks=3, ranks=2):
    base = tiny_model(family)
    base.name_or_path = f"tiny-{family}"
    cfg = MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=tasks, num_ranks=ranks
    )
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * p.std())
    pm.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_mpt_folder_gives_peft_logits_per_task(family, tmp_path):
    path = peft_mpt_folder(family, tmp_path / "mpt")
    pm = PeftModel.from_pretrained(tiny_model(family), path).eval()
    model = sp.load_adapter(tiny_model(family), path)
    ad = model.adapters[model.active]
    bare = sp.attach(tiny_model(family))
    with torch.no_grad():
        plain = bare(input_ids=IDS).logits
        for t in range(3):
            want = pm(input_ids=IDS, task_ids=torch.full((2,), t)).logits[:, -IDS.shape[1] :]
            ad.set_task(t)
            got = model(input_ids=IDS).logits
            assert_close(got, want, atol=1e-4, rtol=0)
            assert (got - plain).abs().max() > 1e-3  # the prompt has an effect


def test_peft_mpt_bad_factors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = peft_mpt_folder("llama", tmp_path / "mpt")
    w = load_file(str(path / "adapter_model.safetensors"))
    w["prefix_task_rows"] = w["prefix_task_rows"][:, :1].contiguous()
    save_file(w, str(path / "adapter_model.safetensors"))
    with pytest.raises(SoftPromptError, match="prefix_task_rows"):
        sp.load_adapter(tiny_model("llama"), path)


def test_prompt_is_shared_times_low_rank_and_starts_at_shared():
    model = sp.attach(
        tiny_model("llama"), sp.MultitaskPromptConfig(num_virtual_tokens=4, num_ranks=2)
    )
    ad = model.adapters[model.active]
    assert_close(ad.input_prompt(), ad.shared, atol=1e-2, rtol=1e-2)  # product ~1 at init
    with torch.no_grad():
        ad.cols.normal_()
        ad.rows.normal_()
    assert_close(ad.input_prompt(), ad.shared * (ad.cols[0] @ ad.rows[0]), atol=0, rtol=0)


def test_save_load_round_trip_and_trainable(tmp_path):
    model = sp.attach(
        tiny_model("llama"), sp.MultitaskPromptConfig(num_virtual_tokens=4, num_ranks=2)
    )
    ad = model.adapters[model.active]
    with torch.no_grad():
        ad.cols.normal_()
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    model.save_adapter(tmp_path / "a", trainable=True)
    again = sp.load_adapter(tiny_model("llama"), tmp_path / "a")
    with torch.no_grad():
        assert_close(again(input_ids=IDS).logits, want, atol=1e-5, rtol=0)
    back = again.adapters[again.active]
    assert_close(back.cols, ad.cols)


def train(model, steps=30, lr=0.05):
    opt = torch.optim.Adam(model.parameters_to_train(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("train_shared", [True, False])
def test_training_lowers_loss_and_freezes_shared_on_request(tmp_path, train_shared):
    stage1 = sp.attach(tiny_model("llama"), sp.PromptTuningConfig(num_virtual_tokens=4))
    stage1.save_adapter(tmp_path / "shared")
    cfg = sp.MultitaskPromptConfig(
        num_virtual_tokens=4,
        num_ranks=2,
        train_shared=train_shared,
        shared_init_from=str(tmp_path / "shared"),
    )
    model = sp.attach(tiny_model("llama"), cfg)
    ad = model.adapters[model.active]
    assert_close(ad.shared.detach(), stage1.adapters[stage1.active].embedding.detach())
    shared0 = ad.shared.detach().clone()
    losses = train(model)
    assert losses[-1] < losses[0] - 0.05
    moved = (ad.shared.detach() - shared0).abs().max().item()
    assert (moved > 0) == train_shared


def test_bad_config_and_shared_source_are_refused(tmp_path):
    with pytest.raises(SoftPromptError, match="task_id"):
        sp.MultitaskPromptConfig(num_tasks=2, task_id=2)
    with pytest.raises(SoftPromptError, match="num_ranks"):
        sp.MultitaskPromptConfig(num_ranks=0)
    with pytest.raises(SoftPromptError, match="not an adapter folder"):
        sp.attach(tiny_model("llama"), sp.MultitaskPromptConfig(shared_init_from=str(tmp_path)))
    stage1 = sp.attach(tiny_model("llama"), sp.PromptTuningConfig(num_virtual_tokens=3))
    stage1.save_adapter(tmp_path / "s")
    with pytest.raises(SoftPromptError, match="shape"):
        sp.attach(
            tiny_model("llama"),
            sp.MultitaskPromptConfig(num_virtual_tokens=4, shared_init_from=str(tmp_path / "s")),
        )


def test_export_to_peft_is_its_baked_prompt(tmp_path):
    from softprompt.peft_compat import save_peft

    path = peft_mpt_folder("llama", tmp_path / "mpt")
    model = sp.load_adapter(tiny_model("llama"), path)
    model.adapters[model.active].set_task(1)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    out = save_peft(model, tmp_path / "out")
    pm = PeftModel.from_pretrained(tiny_model("llama"), out).eval()
    assert pm.peft_config["default"].peft_type == "PROMPT_TUNING"
    with torch.no_grad():
        got = pm(input_ids=IDS).logits[:, -IDS.shape[1] :]
    assert_close(got, want, atol=1e-4, rtol=0)
