"""Per-row decoding (RowDecoder) and the per-step running batch (StepBatch)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import mean_reference, perturb, tiny_model

import softprompt as sp
from softprompt import _hf
from softprompt.decoding import GenerationRow, RowDecoder, StepBatch, can_step, eos_ids
from softprompt.engine import generate_rows


def test_row_decoder_follows_each_rows_temperature_and_top_p():
    """Greedy rows take the argmax; sampled rows draw from softmax(logits / T) cut to top-p."""
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    rows = [
        GenerationRow([1], None, 1),  # greedy
        GenerationRow([1], None, 1, temperature=1.0, top_p=0.5, seed=0),  # only the top token
        GenerationRow([1], None, 1, temperature=1.0, top_p=0.9, seed=1),  # top three
        GenerationRow([1], None, 1, temperature=2.0, seed=2),  # flatter: softmax(log p / 2)
    ]
    decoders = [RowDecoder(r, set(), str, torch.device("cpu")) for r in rows]
    counts = torch.zeros(4, 4)
    for _ in range(3000):
        for b, d in enumerate(decoders):
            counts[b, d.pick(probs.log())] += 1
    freq = counts / 3000
    assert freq[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert freq[1].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert freq[2, 3] == 0 and abs(freq[2, 0] - 0.6 / 0.95) < 0.04
    flat = probs.sqrt() / probs.sqrt().sum()
    assert (freq[3] - flat).abs().max() < 0.04


def test_row_decoder_stop_rules_and_streamed_text():
    """Stop ids end the row without the stop token; stop strings cut the text; max_tokens ends
    it with "length"; streamed deltas are a prefix of the final text and never show a stop
    string's start."""
    vocab = {1: "a", 2: "b", 3: "#", 4: "#", 9: "<eos>"}

    def decode(ids):
        return "".join(vocab[i] for i in ids)

    cpu = torch.device("cpu")
    d = RowDecoder(GenerationRow([0], None, 10), {9}, decode, cpu)
    assert [d.push(t) for t in (1, 2, 9)] == [False, False, True]
    assert d.result["text"] == "ab" and d.result["finish_reason"] == "stop"
    assert d.result["token_ids"] == [1, 2]
    d = RowDecoder(GenerationRow([0], None, 2), {9}, decode, cpu)
    assert [d.push(t) for t in (1, 1)] == [False, True]
    assert d.result["finish_reason"] == "length" and d.result["completion_tokens"] == 2
    sent = []
    d = RowDecoder(
        GenerationRow([0], None, 10, stop=("##",), stream=True),
        {9},
        decode,
        cpu,
        on_delta=lambda text, entries: sent.append(text),
    )
    for t in (1, 3, 2, 3, 4, 1):
        if d.push(t):
            break
    assert d.result["text"] == "a#b" and d.result["finish_reason"] == "stop"
    assert d.result["token_ids"] == [1, 3, 2]
    assert sent == ["a", "#", "b"]  # the "#" that began the stop string "##" never went out


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen3"])
def mixed(request):
    """A tiny LM with adapters of every input/prefix kind, perturbed (non-trivial); on GPT-2
    (absolute positions) prepended prompts are spliced into the cache, on the rotary models
    they are a shared prefix."""
    torch.manual_seed(0)
    model = sp.attach(tiny_model(request.param))
    configs = {
        "prompt": sp.PromptTuningConfig(num_virtual_tokens=3),
        "tmpl": sp.PromptTuningConfig(num_virtual_tokens=2, placement="template"),
        "prefix": sp.PrefixTuningConfig(num_virtual_tokens=4),
        "deep": sp.DeepPromptConfig(num_virtual_tokens=2),
        "ptuning": sp.PTuningConfig(num_virtual_tokens=3),
    }
    if request.param == "llama":  # adaption prompts: Llama-style attention only
        configs["adapt"] = sp.AdaptionPromptConfig(num_virtual_tokens=3, adapter_layers=1)
    for name, config in configs.items():
        model.add_adapter(name, copy.deepcopy(config))
    perturb(model)
    model.eval()
    for name in configs:
        model.adapters[name].bake()
    return model


class _Tok:
    pad_token_id = 0
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _run_stepwise(model, schedule, rows):
    """Run ``rows`` through one StepBatch: row i joins before decode step ``schedule[i]``."""
    batch = StepBatch(model, _Tok())
    eos = set(eos_ids(model, _Tok()))  # as generate_rows: the generation config's EOS
    decoders = [RowDecoder(r, eos, _Tok().decode, model.device) for r in rows]
    step, pending = 0, list(range(len(rows)))
    while pending or len(batch):
        join = [i for i in pending if schedule[i] <= step]
        if join:
            batch.add([decoders[i] for i in join])
            pending = [i for i in pending if i not in join]
        assert batch.step() == []
        step += 1
    return [d.result for d in decoders]


def test_rows_joining_and_leaving_at_step_boundaries_equal_each_row_alone(mixed):
    """Rows of every method (and the bare model), different prompt lengths and max_tokens,
    joining a running batch at different steps: each gives the tokens it gives alone."""
    assert can_step(mixed) is None
    g = torch.Generator().manual_seed(1)
    names = ["prompt", "prefix", None, "deep", "ptuning", "tmpl", "prefix", "prompt", None]
    if "adapt" in mixed.adapters:
        names[6] = "adapt"  # joins at step 4, decodes 7 tokens
    rows = []
    for i, name in enumerate(names):
        ids = torch.randint(1, 90, (3 + 2 * i,), generator=g).tolist()
        if name == "tmpl":  # virtual tokens inside the prompt: template markers -1, -2
            ids = ids[:2] + [-1, -2] + ids[2:]
        rows.append(GenerationRow(ids, name, max_tokens=[2, 9, 5, 12, 3, 4, 7, 1, 6][i]))
    got = _run_stepwise(mixed, [0, 0, 1, 3, 3, 3, 4, 8, 10], rows)
    for r, res in zip(rows, got, strict=True):
        alone = generate_rows(mixed, _Tok(), [r])[0]
        assert res["token_ids"] == alone["token_ids"], r
        assert res["finish_reason"] == alone["finish_reason"]


def test_step_logits_equal_a_full_forward(mixed):
    """The decode step's logits for a row that joined late equal one forward over its prompt
    and tokens alone (cache regrouping, left padding and positions are exact)."""
    row_a = GenerationRow(list(range(5, 25)), "prefix", max_tokens=6)
    row_b = GenerationRow([7, 8, 9], "prompt", max_tokens=4)
    batch = StepBatch(mixed, _Tok())
    da, db = (RowDecoder(r, set(), _Tok().decode, mixed.device) for r in (row_a, row_b))
    batch.add([da])
    batch.step()
    batch.add([db])
    seen = []
    real = mixed.base_model.forward

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append(out.logits[:, -1].clone())
        return out

    mixed.base_model.forward = spy
    try:
        batch.step()
    finally:
        del mixed.base_model.forward
    assert len(batch) == 2 and batch.cache.get_seq_length() == 20 + 2
    for b, d in enumerate((da, db)):
        ids = torch.tensor([d.row.ids + d.tokens[:-1]])
        with torch.no_grad():
            full = mixed(input_ids=ids, adapter_names=[d.row.adapter]).logits[0, -1]
        torch.testing.assert_close(seen[0][b], full, atol=1e-5, rtol=0)


def test_finished_rows_leave_the_cache_and_dead_columns_are_dropped(mixed):
    long = GenerationRow(list(range(1, 40)), None, max_tokens=2)
    short = GenerationRow([3, 4], "deep", max_tokens=6)
    batch = StepBatch(mixed, _Tok())
    batch.add([RowDecoder(r, set(), _Tok().decode, mixed.device) for r in (long, short)])
    assert batch.cache.get_seq_length() == 39
    batch.step()  # the long row ends (2 tokens): only the short row's columns remain
    assert len(batch) == 1
    assert batch.cache.get_seq_length() == batch.mask.shape[1] == 2 + 1
    assert batch.mask.all()


def test_a_nan_adapter_fails_alone_in_a_step(mixed):
    model = mixed
    model.add_adapter("bad", sp.DeepPromptConfig(num_virtual_tokens=2))
    try:
        _nan_fails_alone(model)
    finally:
        model.delete_adapter("bad")


def _nan_fails_alone(model):
    good = GenerationRow([3, 4, 5], "prefix", max_tokens=4)
    bad = GenerationRow([3, 4, 5], "bad", max_tokens=4)
    batch = StepBatch(model, _Tok())
    dg, db = (RowDecoder(r, set(), _Tok().decode, model.device) for r in (good, bad))
    batch.add([dg, db])
    with torch.no_grad():
        for p in model.adapters["bad"].parameters():
            p.fill_(float("nan"))
    failed = batch.step()
    assert [d for d, _ in failed] == [db] and "NaN" in str(failed[0][1])
    assert batch.rows == [dg]
    while len(batch):
        assert batch.step() == []
    assert dg.result["token_ids"] == generate_rows(model, _Tok(), [good])[0]["token_ids"]


def test_a_mean_probability_group_decodes_the_mean_of_its_members(mixed):
    """Rows of one ``group`` (adapters of every kind) take, each step, the argmax of the mean of
    their next-token probabilities, in ONE generate call and in a StepBatch that they join
    mid-way beside other rows; a row outside the group is unaffected. Sampled groups draw
    from the mean distribution with the first member's seeded generator."""
    names = ["prompt", "prefix", "deep", "ptuning"]
    ids = [11, 12, 13, 14, 15]
    eos = set(eos_ids(mixed, _Tok()))
    want = mean_reference(mixed, ids, names, 7, eos)
    alone = [generate_rows(mixed, _Tok(), [GenerationRow(ids, n, 7)])[0] for n in names]
    # some member alone decodes otherwise (or the test could not tell a group from its rows)
    assert any(a["token_ids"] != want for a in alone)
    other = GenerationRow([5, 6, 7], "prefix", max_tokens=9)
    group = [GenerationRow(ids, n, 7, group="g") for n in names]
    got = generate_rows(mixed, _Tok(), [other, *group])
    for r in got[1:]:
        assert r["token_ids"] == want and r["finish_reason"] == got[1]["finish_reason"]
    assert got[0]["token_ids"] == generate_rows(mixed, _Tok(), [other])[0]["token_ids"]
    stepped = _run_stepwise(mixed, [0, 2, 2, 2, 2], [other, *group])
    assert [r["token_ids"] for r in stepped[1:]] == [want] * 4
    assert stepped[0]["token_ids"] == got[0]["token_ids"]
    # log-probabilities are the ensemble's: log of the mean probability of each token
    with_lp = [GenerationRow(ids, n, 3, group="g", logprobs=2) for n in names[:2]]
    res = generate_rows(mixed, _Tok(), with_lp)[0]
    first = torch.stack(
        [
            mixed(input_ids=torch.tensor([ids]), adapter_names=[n]).logits[0, -1].softmax(-1)
            for n in names[:2]
        ]
    ).mean(0)
    assert res["logprobs"][0]["logprob"] == pytest.approx(float(first.max().log()), abs=1e-5)
    # sampling: the first member's generator draws from the (tempered) mean distribution
    sampled = [
        GenerationRow(ids, n, 5, temperature=0.8, seed=7 if k == 0 else 99, group="s")
        for k, n in enumerate(names[:3])
    ]
    want_s = mean_reference(mixed, ids, names[:3], 5, eos, temperature=0.8, seed=7)
    for res in (generate_rows(mixed, _Tok(), sampled), _run_stepwise(mixed, [0] * 3, sampled)):
        assert [r["token_ids"] for r in res] == [want_s] * 3


def test_a_nan_member_fails_its_whole_group(mixed):
    model = mixed
    model.add_adapter("bad", sp.DeepPromptConfig(num_virtual_tokens=2))
    try:
        rows = [GenerationRow([3, 4, 5], n, max_tokens=4, group=1) for n in ("prefix", "bad")]
        solo = GenerationRow([3, 4, 5], "deep", max_tokens=4)
        batch = StepBatch(model, _Tok())
        decoders = [RowDecoder(r, set(), _Tok().decode, model.device) for r in (solo, *rows)]
        batch.add(decoders)
        with torch.no_grad():
            for p in model.adapters["bad"].parameters():
                p.fill_(float("nan"))
        failed = batch.step()
        assert [d for d, _ in failed] == decoders[1:]
        assert all("'bad'" in str(e) for _, e in failed)  # both name the member at fault
        assert batch.rows == decoders[:1]
        # dropping one member takes its group with it
        batch2 = StepBatch(model, _Tok())
        model.delete_adapter("bad")
        model.add_adapter("bad", sp.DeepPromptConfig(num_virtual_tokens=2))
        decoders = [RowDecoder(r, set(), _Tok().decode, model.device) for r in (solo, *rows)]
        batch2.add(decoders)
        gone = batch2.drop(lambda d: d.row.adapter == "bad")
        assert gone == decoders[1:] and batch2.rows == decoders[:1]
    finally:
        model.delete_adapter("bad")


def test_a_cache_that_cannot_be_regrouped_is_named():
    cfg = tiny_model("llama").config
    cfg.layer_types = ["sliding_attention"] * cfg.num_hidden_layers
    cfg.sliding_window = 4
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg)
    reason = _hf.steppable_cache(model)
    assert reason is not None and "DynamicSlidingWindowLayer" in reason
