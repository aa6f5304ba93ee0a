"""Device check: the paths that only an accelerator takes, on tiny random models (no weights to
carry). Not part of run_all or the tests (CI has no GPU); run it where a GPU is lent:

    python bench/gpu_check.py --device cuda

Checks, each against the same computation on the CPU or through the other path:
1. a forward with mixed adapters on the device equals the CPU forward (same weights);
2. ``generate`` with mixed rows: the decoding-step path gives the tokens and scores of joining
   the prefix to the cache; the stacked prefix tables are built once across calls;
3. a prompt-tuning training step with ``prompt_sharing="auto"`` (splices under autograd on an
   accelerator) gives the loss and gradients of ``"always"`` (shared prefix).
Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import _common as C  # noqa: E402
from conftest import method_config, perturb, tiny_model  # noqa: E402

import softprompt as sp  # noqa: E402
from softprompt import _hf  # noqa: E402
from softprompt.model import PrefixState  # noqa: E402

IDS = torch.tensor([[0, 0, 5, 6, 7, 8], [0, 0, 0, 11, 12, 13], [9, 14, 15, 16, 17, 3]])
MASK = (IDS != 0).long()
ROWS = ["pre", "deep", None]


def bank(device: str) -> sp.SoftPromptModel:
    torch.manual_seed(0)
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("pre", method_config("prefix"))
    model.add_adapter("deep", method_config("deep"))
    model.add_adapter("p", method_config("prompt"))
    perturb(model)
    return model.to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    failures = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
        if not ok:
            failures.append(name)

    cpu, gpu = bank("cpu").eval(), bank(args.device).eval()
    ids, mask = IDS.to(dev), MASK.to(dev)
    with torch.no_grad():
        a = cpu(input_ids=IDS, attention_mask=MASK, adapter_names=ROWS).logits
        b = gpu(input_ids=ids, attention_mask=mask, adapter_names=ROWS).logits.cpu()
    err = float((a - b)[MASK.bool()].abs().max())
    check("mixed forward, device == CPU", err < 1e-4, f"max |diff| {err:.2e}")

    built = []
    orig_table = PrefixState._table
    PrefixState._table = lambda self, *x: built.append(1) or orig_table(self, *x)
    kw = dict(
        input_ids=ids,
        attention_mask=mask,
        adapter_names=ROWS,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_scores=True,
        return_dict_in_generate=True,
    )
    calls = []
    orig_decode, orig_ok = _hf._decode_attention, _hf._decode_ok
    _hf._decode_attention = lambda *x: calls.append(1) or orig_decode(*x)
    try:
        fast = gpu.generate(**kw)
        n_built = len(built)
        fast2 = gpu.generate(**kw)
        check("prefix tables kept across calls", len(built) == n_built, f"{n_built} built")
        check("decode path taken", bool(calls), f"{len(calls)} calls")
        _hf._decode_ok = lambda *x: False
        slow = gpu.generate(**kw)
    finally:
        _hf._decode_attention, _hf._decode_ok = orig_decode, orig_ok
        PrefixState._table = orig_table
    same = torch.equal(fast.sequences, slow.sequences) and torch.equal(
        fast.sequences, fast2.sequences
    )
    err = max(float((x - y).abs().max()) for x, y in zip(fast.scores, slow.scores, strict=True))
    check("generate: decode path == joined cache", same and err < 1e-4, f"scores {err:.2e}")

    gpu.train()
    gpu.set_active("p")
    out = {}
    for mode in ("auto", "always"):
        gpu.zero_grad()
        with C.sharing(gpu, mode):
            logits = gpu(input_ids=ids, attention_mask=mask).logits
            loss = (logits * mask[..., None]).square().mean()
            loss.backward()
        out[mode] = (float(loss.detach()), gpu.adapters["p"].embedding.grad.detach().clone())
    shares = C.auto_shares(gpu, {"input_ids": ids})
    check("auto splices under autograd here", shares == (dev.type == "cpu"))
    dl = abs(out["auto"][0] - out["always"][0])
    dg = float((out["auto"][1] - out["always"][1]).abs().max())
    check("training: spliced == shared", dl < 1e-5 and dg < 1e-5, f"loss {dl:.1e}, grad {dg:.1e}")
    if failures:
        sys.exit(f"{len(failures)} check(s) failed: {failures}")
    print("all checks passed")


if __name__ == "__main__":
    main()
