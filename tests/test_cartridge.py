"""Cartridges: the method (init from prefill, frozen sink, files) and context distillation."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import softprompt as sp
from softprompt.errors import SoftPromptError
from softprompt.methods.cartridge import CartridgeConfig

TEXT = [5, 17, 33, 8, 91, 44, 12, 60, 71, 9, 3, 27]
CONT = [14, 55, 23, 81, 6]


def _attach(family: str, n: int, text=TEXT, **kw) -> sp.SoftPromptModel:
    torch.manual_seed(0)
    base = tiny_model(family)
    cfg = CartridgeConfig(num_virtual_tokens=n, init_token_ids=list(text), **kw)
    return sp.attach(base, cfg, name="cart")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_init_from_prefill_equals_text_in_context(family):
    n = 10
    model = _attach(family, n)
    model.eval()
    with torch.no_grad():
        got = model(input_ids=torch.tensor([CONT])).logits[0]
        full = model.base_model(input_ids=torch.tensor([TEXT[:n] + CONT])).logits[0, n:]
    assert torch.allclose(got, full, atol=1e-5), (got - full).abs().max()


def test_frozen_token_gets_no_gradient():
    model = _attach("llama", 10, num_frozen=2)
    model.train()
    out = model(input_ids=torch.tensor([CONT])).logits
    out.float().pow(2).mean().backward()
    grad = model.adapters["cart"].prefix.grad
    assert grad[:2].abs().max().item() == 0.0
    assert grad[2:].abs().max().item() > 0.0


def test_save_load_round_trip(tmp_path):
    model = _attach("llama", 10)
    with torch.no_grad():
        model.adapters["cart"].prefix.add_(0.1 * torch.randn_like(model.adapters["cart"].prefix))
    model.eval()
    ids = torch.tensor([CONT])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_adapter(tmp_path / "a")
    torch.manual_seed(0)
    other = sp.load_adapter(tiny_model("llama"), tmp_path / "a")
    assert other.adapters["cart"].config.num_frozen == 1
    with torch.no_grad():
        got = other(input_ids=ids).logits
    assert torch.equal(got, want)


def test_p_larger_than_text_is_refused():
    with pytest.raises(SoftPromptError, match="larger than the text"):
        _attach("llama", 20)


def test_bad_num_frozen_is_refused():
    with pytest.raises(SoftPromptError, match="num_frozen"):
        CartridgeConfig(num_virtual_tokens=4, init_token_ids=[1], num_frozen=5)


# ------------------------------------------------------------------------------ distillation


def _targets(model, n_rows=6, seed=0):
    from softprompt.cartridge import teacher_row

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        conv = torch.randint(3, 110, (9,), generator=g).tolist()
        rows.append(teacher_row(model.base_model, TEXT, conv, 4, 9, top_k=8))
    return rows


def test_distillation_kl_falls(tmp_path):
    from softprompt.cartridge import DistillTask
    from softprompt.trainer import TrainArgs, Trainer

    torch.manual_seed(0)
    base = tiny_model("llama")
    with torch.no_grad():  # sharper attention: the random model's output depends on its context
        for name, p in base.named_parameters():
            if "q_proj" in name or "k_proj" in name or "v_proj" in name:
                p.mul_(6)
            if "lm_head" in name:
                p.mul_(30)
    model = sp.attach(base, CartridgeConfig(num_virtual_tokens=12, init="vocab"))
    train, dev = _targets(model, 8), _targets(model, 4, seed=1)
    task = DistillTask(model, None)
    task.pad_id = 0
    model.eval()
    before = task.metrics(dev, task.predict(dev))["kl"]
    args = TrainArgs(
        output_dir=str(tmp_path),
        max_steps=30,
        lr=5e-2,
        batch_size=4,
        eval_every=10,
        progress=False,
        lower_layer_cache_mb=0,
    )
    result = Trainer(model, task, train, dev, args, log=lambda s: None).train()
    model.eval()
    after = task.metrics(dev, task.predict(dev))["kl"]
    assert before > 0.01
    assert after < 0.5 * before, (before, after)
    assert result["best"] == pytest.approx(-after, rel=1e-4)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert any('"neg_kl"' in ln for ln in lines)
    # the prefill init: the teacher's context itself gives zero KL
    model.add_adapter("exact", CartridgeConfig(num_virtual_tokens=12, init_token_ids=TEXT))
    assert task.metrics(dev, task.predict(dev))["kl"] < 1e-6


def test_topk_kl_is_zero_for_equal_distributions_and_positive_else():
    from softprompt.cartridge import topk_kl

    logits = torch.randn(3, 20)
    logp = torch.log_softmax(logits, -1)
    vals, idx = logp.topk(20, -1)
    assert topk_kl(logits, idx, vals).abs().max() < 1e-6
    assert (topk_kl(logits + torch.randn(3, 20), idx, vals) > 0).all()


# ------------------------------------------------------------------------------ corpus, command


@pytest.mark.parametrize(
    "data, match",
    [(b"", "empty"), (b"  \n\t", "empty"), (b"abc\x00def", "binary"), (b"\xff\xfeab", "UTF-8")],
)
def test_bad_corpus_is_refused(tmp_path, data, match):
    from softprompt.cartridge import read_corpus

    path = tmp_path / "c.txt"
    path.write_bytes(data)
    with pytest.raises(SoftPromptError, match=match):
        read_corpus(path)
    with pytest.raises(SoftPromptError, match="does not exist"):
        read_corpus(tmp_path / "missing.txt")


CORPUS = (
    "The lighthouse of Varn stands on a granite cliff. It was built in 1854 by Ada Morrow. "
    "Its lamp burns whale oil and can be seen for twenty miles. The keeper, Tomas Reed, "
    "climbs its 212 steps every evening. In 1901 a storm broke the lens, and a new one came "
    "from Paris. "
) * 2


def test_cartridge_command_writes_chat_rows_resumes_and_trains(tiny_folders, tmp_path, capsys):
    import json

    from softprompt.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    out = tmp_path / "run"
    argv = [
        "cartridge",
        str(corpus),
        "--output",
        str(out),
        "--model",
        tiny_folders["llama"],
        "--tokens",
        "16",
        "--steps",
        "4",
        "--conversations",
        "3",
        "--dev",
        "2",
        "--chunk-tokens",
        "40",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    rows = [json.loads(ln) for ln in (out / "selfstudy.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]
    assert rows[0]["messages"][0]["content"] in CORPUS
    assert len((out / "dev.jsonl").read_text().splitlines()) == 2
    assert (out / "teacher.pt").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["method"] == "cartridge" and cfg["config"]["num_virtual_tokens"] == 16
    # resumable: a cut file continues with the same rows
    lines = (out / "selfstudy.jsonl").read_text().splitlines()
    (out / "selfstudy.jsonl").write_text(lines[0] + "\n" + lines[1][:10])
    argv[argv.index("--steps") + 1] = "6"
    assert main(argv) == 0
    again = (out / "selfstudy.jsonl").read_text().splitlines()
    assert again == lines
    capsys.readouterr()
    # P larger than the corpus: a clear error
    assert main([*argv[:6], "--tokens", "5000", *argv[8:]]) == 2
    assert "larger than the corpus" in capsys.readouterr().err


# ------------------------------------------------------------------------------ composition


def test_two_cartridges_in_one_row_equal_the_concatenated_text():
    from softprompt.cartridge import compose

    model = _attach("llama", 12)  # the prefill of TEXT, cut into two cartridges of 6 tokens
    whole = model.adapters["cart"].prefix.detach()
    for nm, rows in (("a", whole[:6]), ("b", whole[6:])):
        ad = model.add_adapter(nm, CartridgeConfig(num_virtual_tokens=6, init="vocab"))
        ad.load_baked({"prefix": rows})
    compose(model, ["a", "b"], "ab")
    model.eval()
    with torch.no_grad():
        got = model(input_ids=torch.tensor([CONT]), adapter_names=["ab"]).logits[0]
        full = model.base_model(input_ids=torch.tensor([TEXT + CONT])).logits[0, 12:]
        alone_a = model(input_ids=torch.tensor([CONT]), adapter_names=["a"]).logits[0]
    assert torch.allclose(got, full, atol=1e-5), (got - full).abs().max()
    assert (alone_a - full).abs().max() > 1e-3
    with pytest.raises(SoftPromptError, match="cartridges"):
        model.add_adapter("p", sp.PrefixTuningConfig(num_virtual_tokens=3))
        compose(model, ["a", "p"], "ap")


def test_cartridges_mix_with_task_adapters_across_rows():
    from conftest import perturb

    model = _attach("llama", 10)
    model.add_adapter("task", sp.PrefixTuningConfig(num_virtual_tokens=3))
    perturb(model)
    model.eval()
    rows = [[7, 8, 9, 10, 11], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34]]
    names = ["cart", "task", None]
    with torch.no_grad():
        mixed = model(input_ids=torch.tensor(rows), adapter_names=names).logits
        gen = model.generate(
            input_ids=torch.tensor(rows), adapter_names=names, max_new_tokens=4, do_sample=False
        )
        for i, (r, n) in enumerate(zip(rows, names, strict=True)):
            alone = model(input_ids=torch.tensor([r]), adapter_names=[n]).logits[0]
            assert torch.allclose(mixed[i], alone, atol=1e-5)
            one = model.generate(
                input_ids=torch.tensor([r]), adapter_names=[n], max_new_tokens=4, do_sample=False
            )
            assert torch.equal(gen[i], one[0])


def test_server_serves_a_composed_cartridge_beside_a_task_adapter(tiny_folders, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt import server as srv
    from softprompt.cartridge import compose

    folder = tiny_folders["llama"]
    tok = AutoTokenizer.from_pretrained(folder)
    model = sp.attach(AutoModelForCausalLM.from_pretrained(folder), tokenizer=tok)
    plain = {"kind": "generate", "template": "{input}"}
    for nm, text in (("a", "The lighthouse stands on a cliff."), ("b", "Ada Morrow built it.")):
        model.add_adapter(nm, CartridgeConfig(num_virtual_tokens=5, init_text=text)).task = plain
    compose(model, ["a", "b"], "ab")
    model.add_adapter("task", sp.PrefixTuningConfig(num_virtual_tokens=3)).task = plain
    from conftest import perturb

    perturb(model)
    dirs = {}
    for nm in ("ab", "task"):
        model.save_adapter(tmp_path / nm, nm)
        dirs[nm] = str(tmp_path / nm)
    app = srv.create_app(
        AutoModelForCausalLM.from_pretrained(folder), tok, dirs, srv.ServeSettings(max_wait_ms=50)
    )
    prompt = "who built it"
    ids = tok(prompt)["input_ids"]
    with TestClient(app) as client:

        def ask(nm):
            body = {"model": nm, "prompt": prompt, "max_tokens": 4, "temperature": 0}
            return client.post("/v1/completions", json=body)

        with ThreadPoolExecutor(2) as pool:  # both in the server's batch
            answers = list(pool.map(ask, ["ab", "task"]))
    for nm, r in zip(["ab", "task"], answers, strict=True):
        assert r.status_code == 200, r.text
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids]),
                adapter_names=[nm],
                max_new_tokens=4,
                do_sample=False,
                min_new_tokens=4,
                pad_token_id=srv.pad_id(tok),
            )
        want = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
        got = r.json()["choices"][0]["text"]
        assert want.startswith(got), (nm, got, want)


def test_server_composes_cartridges_per_request(tiny_folders, tmp_path):
    """``"model": "a+b"``: the loaded cartridges a and b in one row's prefix, made on first use
    (listed in /v1/models), equal to ``compose`` offline; unloading a part removes it; parts
    that are not loaded or not cartridges are 404 / 400 naming ``model``."""
    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt import server as srv
    from softprompt.cartridge import compose

    folder = tiny_folders["llama"]
    tok = AutoTokenizer.from_pretrained(folder)
    model = sp.attach(AutoModelForCausalLM.from_pretrained(folder), tokenizer=tok)
    plain = {"kind": "generate", "template": "{input}"}
    for nm, text in (("a", "The lighthouse stands on a cliff."), ("b", "Ada Morrow built it.")):
        model.add_adapter(nm, CartridgeConfig(num_virtual_tokens=5, init_text=text)).task = plain
    model.add_adapter("task", sp.PrefixTuningConfig(num_virtual_tokens=3)).task = plain
    from conftest import perturb

    perturb(model)
    dirs = {}
    for nm in ("a", "b", "task"):
        model.save_adapter(tmp_path / nm, nm)
        dirs[nm] = str(tmp_path / nm)
    compose(model, ["b", "a"], "ba")
    model.eval()
    app = srv.create_app(
        AutoModelForCausalLM.from_pretrained(folder),
        tok,
        dirs,
        srv.ServeSettings(max_wait_ms=0, adapter_roots=[str(tmp_path)]),
    )
    prompt = "who built it"
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            adapter_names=["ba"],
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=srv.pad_id(tok),
        )
    eos = srv.eos_ids(model, tok)
    new = out[0, len(ids) :].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
    want = tok.decode(new, skip_special_tokens=True)
    with TestClient(app) as client:

        def ask(nm):
            body = {"model": nm, "prompt": prompt, "max_tokens": 6, "temperature": 0}
            return client.post("/v1/completions", json=body)

        r = ask("b+a")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert listed["b+a"]["num_virtual_tokens"] == 10
        assert ask("b+a").json()["choices"][0]["text"] == want  # kept, not made again
        r = ask("a+nope")
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        r = ask("a+task")
        assert r.status_code == 400 and "not cartridges" in r.json()["error"]["message"]
        assert client.delete("/v1/adapters/a").status_code == 200
        assert "b+a" not in {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert ask("b+a").status_code == 404


def test_compose_a_cartridge_imported_from_peft_equals_composing_the_native_one(tmp_path):
    """A cartridge imported from PEFT numbers the real tokens after itself (position_offset P);
    on rotary Llama compose rotates its keys by -P first, so the composed prefix gives what
    composing the native cartridge it came from gives."""
    from softprompt.cartridge import compose
    from softprompt.peft_compat import save_peft

    model = sp.attach(tiny_model("llama"))
    for nm, ids in (("a", TEXT[:5]), ("b", TEXT[5:11])):
        model.add_adapter(nm, CartridgeConfig(num_virtual_tokens=len(ids), init_token_ids=ids))
    save_peft(model, tmp_path / "peft_a", "a")
    sp.load_adapter(model, tmp_path / "peft_a", name="pa")
    assert model.adapters["pa"].position_offset == 5
    compose(model, ["pa", "b"], "pab")
    compose(model, ["a", "b"], "ab")
    assert model.adapters["pab"].position_offset == 0
    model.eval()
    rows = [CONT, CONT]
    with torch.no_grad():
        got = model(input_ids=torch.tensor(rows), adapter_names=["pab", "b"]).logits[0]
        want = model(input_ids=torch.tensor([CONT]), adapter_names=["ab"]).logits[0]
        alone = model(input_ids=torch.tensor([CONT]), adapter_names=["pa"]).logits[0]
        native = model(input_ids=torch.tensor([CONT]), adapter_names=["a"]).logits[0]
    assert (got - want).abs().max() < 1e-5, (got - want).abs().max()
    assert (alone - native).abs().max() < 1e-5  # the import itself is exact
    raw = model.adapters["pa"].prefix.detach()  # PEFT's keys, for real tokens at 5..
    assert (model.adapters["pab"].prefix[:5] - raw).abs().max() > 1e-3  # really rotated
    torch.testing.assert_close(
        model.adapters["pab"].prefix, model.adapters["ab"].prefix, atol=1e-5, rtol=0
    )


def test_compose_on_absolute_positions_names_the_reason():
    from softprompt.cartridge import compose

    model = _attach("gpt2", 5)
    model.add_adapter("b", CartridgeConfig(num_virtual_tokens=4, init_token_ids=TEXT[5:9]))
    with pytest.raises(SoftPromptError, match=r"'cart' numbers the real tokens from .*5.*GPT2"):
        compose(model, ["cart", "b"], "ab")
    with pytest.raises(SoftPromptError, match="learned absolute positions"):
        compose(model, ["cart", "b"], "ab")


@pytest.mark.parametrize("family", ["t5", "bart", "bert"])
def test_cartridge_needs_a_decoder_only_lm(family):
    model = sp.attach(tiny_model(family))
    with pytest.raises(SoftPromptError, match="cartridges need a decoder-only LM"):
        model.add_adapter("c", CartridgeConfig(num_virtual_tokens=4, init_token_ids=TEXT))
    assert "c" not in model.adapters


def test_cartridge_command_refuses_an_encoder_decoder_before_self_study(
    tiny_folders, tmp_path, capsys
):
    from softprompt.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    out = tmp_path / "run"
    argv = ["cartridge", str(corpus), "--output", str(out), "--model", tiny_folders["t5"]]
    assert main([*argv, "--tokens", "16", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cartridges need a decoder-only LM" in err and "T5ForConditionalGeneration" in err
    assert not (out / "selfstudy.jsonl").exists()


@pytest.mark.parametrize("flag", ["--top-k", "--tokens", "--steps", "--batch-size"])
def test_cartridge_counts_below_one_are_refused_by_name(tmp_path, capsys, flag):
    from softprompt.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("a document")
    with pytest.raises(SystemExit) as e:
        main(["cartridge", str(corpus), "--output", str(tmp_path / "o"), flag, "0"])
    assert e.value.code == 2
    assert f"argument {flag}: must be an integer >= 1, got 0" in capsys.readouterr().err
