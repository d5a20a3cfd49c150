"""The error each `--quantize` recipe puts into the cloud blocks' output: int8, and int4 by group size.

    python bench/quantize_error.py [--model smollm2] [--sentences 8]

The cloud's middle blocks (1 .. n-2 of SmolLM2's 30) are quantized with cloud/quantize.py's linears (optimum-quanto)
by recipe (int8 per output row; int4 in groups of 32, GGUF Q4_1's block and the default, or of more input
features), and run on the hidden state of --sentences SST-2 train sentences after block 0. Per recipe: the blocks' weight bytes as a fraction of fp32 and the
relative error of their output over real tokens, ||out - out_fp32|| / ||out_fp32||. No training: this picks the
recipe; bench/quantized_cloud.py measures what it costs in accuracy. One thread; about a minute on a CPU.
Prints a table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tasks as T  # noqa: E402
from cli.report import table  # noqa: E402
from cloud.quantize import INT4_GROUP, quantize_blocks  # noqa: E402
from model.families import family_of  # noqa: E402
from model.load import load_model  # noqa: E402
from model.segments import BlockRun  # noqa: E402

RECIPES = {  # name -> (mode, int4 group); the groups divide SmolLM2's 576 and 1536 input features
    "int8 (per row)": ("int8", None),
    "int4, groups of 32 (--quantize int4)": ("int4", 32),
    "int4, groups of 64": ("int4", 64),
    "int4, groups of 96": ("int4", 96),
    "int4, groups of 192": ("int4", 192),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sentences", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    model, tok = loaded.model.eval(), loaded.tokenizer or T.tiny_tokenizer()
    task = T.TASKS["sst2"]
    items = T.encode(task, T.load_split("sst2", "train")[:args.sentences], tok)
    batch = next(T.batches(task, items, args.sentences, getattr(tok, "pad_token_id", None) or 0))
    n = len(family_of(model).blocks(model))
    ids = range(1, n - 1)
    with torch.no_grad():
        h = model(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True).hidden_states[1]
    real = batch.attention_mask.bool()

    def output(m):
        with torch.no_grad():
            return BlockRun(m, ids)(h, batch.attention_mask)[real]
    ref = output(model)
    rows = []
    for name, (mode, group) in RECIPES.items():
        m = copy.deepcopy(model)
        ratio = quantize_blocks(m, mode, ids, int4_group=group or INT4_GROUP).ratio
        err = ((output(m) - ref).norm() / ref.norm()).item()
        rows.append({"recipe": name, "weights_vs_fp32": round(ratio, 4), "output_error": round(err, 4)})
        print(f"{name}: weights {ratio:.3f} of fp32, output error {err:.3f}", flush=True)
    print(table(["recipe", "weights / fp32", "output error"],
                [[r["recipe"], f"{r['weights_vs_fp32']:.3f}", f"{r['output_error']:.3f}"] for r in rows]))
    print(json.dumps({"bench": "quantize_error", "model": args.model, "blocks": f"{ids.start}..{ids.stop - 1}",
                      "sentences": args.sentences, "recipes": rows}))


if __name__ == "__main__":
    main()
