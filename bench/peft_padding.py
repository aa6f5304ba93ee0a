"""How PEFT and softprompt differ on the same PEFT adapter in a left-padded batch.

    PYTHONPATH=src python bench/peft_padding.py [--out bench/results/peft_padding.json]
    # tiny GPT-2 / Llama and SmolLM2, ~1 min

A row's logits (and greedy-generation scores) inside a left-padded batch are compared with the
same row alone. Each PEFT folder is made by peft itself (random init moved away by noise) and
loaded in softprompt with ``softprompt.load_adapter``; on unpadded rows the two agree to
<= 1e-4 (tests/test_peft_compat.py). Prints a markdown table (max abs difference, real tokens)
and writes it, with the rows' lengths, to ``--out``.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
warnings.filterwarnings("ignore")

from conftest import tiny_model  # noqa: E402
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: E402

import softprompt as sp  # noqa: E402
from softprompt.lm import pad_left  # noqa: E402

CONFIGS = {
    "prompt tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
    "prefix tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
}


def folder(base, config) -> str:
    pm = get_peft_model(base, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * p.std())
    path = tempfile.mkdtemp()
    pm.save_pretrained(path)
    return path


def measure(make_base, rows, pad_id) -> dict[str, dict[str, float]]:
    ids, mask = pad_left(rows, pad_id)
    out = {}
    for method, config in CONFIGS.items():
        path = folder(make_base(), config())
        pm = PeftModel.from_pretrained(make_base(), path).eval()
        spm = sp.load_adapter(make_base(), path)
        kw = dict(
            max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        res = {"peft forward": 0.0, "softprompt forward": 0.0, "peft generate": 0.0}
        res["softprompt generate"] = 0.0
        with torch.no_grad():
            pad_p = pm(input_ids=ids, attention_mask=mask).logits
            pad_s = spm(input_ids=ids, attention_mask=mask).logits
            gen_p = torch.stack(pm.generate(input_ids=ids, attention_mask=mask, **kw).scores, 1)
            gen_s = torch.stack(spm.generate(input_ids=ids, attention_mask=mask, **kw).scores, 1)
            for b, row in enumerate(rows):
                one = torch.tensor([row])
                n = len(row)
                alone = pm(input_ids=one).logits[:, -n:]
                res["peft forward"] = max(
                    res["peft forward"], float((pad_p[b : b + 1, -n:] - alone).abs().max())
                )
                res["softprompt forward"] = max(
                    res["softprompt forward"], float((pad_s[b : b + 1, -n:] - alone).abs().max())
                )
                g1 = torch.stack(pm.generate(input_ids=one, **kw).scores, 1)
                res["peft generate"] = max(
                    res["peft generate"], float((gen_p[b : b + 1] - g1).abs().max())
                )
                res["softprompt generate"] = max(
                    res["softprompt generate"], float((gen_s[b : b + 1] - g1).abs().max())
                )
        out[method] = res
    return out


def main(argv=None) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results/peft_padding.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15]]
    cases = {"tiny GPT-2": (lambda: tiny_model("gpt2"), rows, 0)}
    cases["tiny Llama (GQA)"] = (lambda: tiny_model("llama"), rows, 0)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from softprompt.assets import resolve_model

        path = resolve_model("smollm2-135m-instruct")
        tok = AutoTokenizer.from_pretrained(path)
        texts = ["Review: a joy to watch, from start to end.\nSentiment:", "Dull.\nSentiment:"]
        cases["SmolLM2-135M"] = (
            lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            [tok(t).input_ids for t in texts],
            tok.pad_token_id,
        )
    except Exception as e:  # no cached asset: tiny models only
        print(f"(SmolLM2 skipped: {e})", file=sys.stderr)
    print(
        "| model | method | PEFT forward | softprompt forward | PEFT generate | softprompt generate |"
    )
    print("|---|---|---|---|---|---|")
    report = []
    for name, (make, r, pad) in cases.items():
        for method, res in measure(make, r, pad).items():
            cells = " | ".join(
                f"{res[k]:.2g}"
                for k in (
                    "peft forward",
                    "softprompt forward",
                    "peft generate",
                    "softprompt generate",
                )
            )
            print(f"| {name} | {method} | {cells} |")
            report.append(
                {"model": name, "method": method, "row_lengths": [len(x) for x in r], **res}
            )
    args.out.write_text(json.dumps({"section": "peft_padding", "rows": report}, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
