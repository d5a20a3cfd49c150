"""Which linears of a block to keep in int8 under `--quantize int4`: the error each recipe puts into the blocks' output.

    python bench/quantize_error.py [--model smollm2] [--sentences 8]

The cloud's middle blocks (1 .. n-2 of SmolLM2's 30) are quantized with cloud/quantize.py's bitsandbytes linears by
recipe (every linear NF4; int8 for some, NF4 for the rest; every linear int8), and run on the hidden state of
--sentences SST-2 train sentences after block 0. Per recipe: the blocks' weight bytes as a fraction of fp32 and the
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
from cloud.quantize import quantize_blocks  # noqa: E402
from model.families import family_of  # noqa: E402
from model.load import load_model  # noqa: E402
from model.segments import BlockRun  # noqa: E402

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
RECIPES = {  # name -> the linears held in int8 (the rest NF4); "int8": all of them
    "int4 (all NF4)": (),
    "int4, down_proj int8 (--quantize int4)": ("down_proj",),
    "int4, v_proj + down_proj int8": ("v_proj", "down_proj"),
    "int4, k_proj + v_proj + down_proj int8": ("k_proj", "v_proj", "down_proj"),
    "int4, v_proj + o_proj + down_proj int8": ("v_proj", "o_proj", "down_proj"),
    "int4, attention + down_proj int8": (*ATTENTION, "down_proj"),
    "int8 (all)": None,
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
    for name, int8 in RECIPES.items():
        m = copy.deepcopy(model)
        ratio = quantize_blocks(m, "int8", ids).ratio if int8 is None else quantize_blocks(m, "int4", ids, int8).ratio
        err = ((output(m) - ref).norm() / ref.norm()).item()
        rows.append({"recipe": name, "weights_vs_fp32": round(ratio, 4), "output_error": round(err, 4)})
        print(f"{name}: weights {ratio:.3f} of fp32, output error {err:.3f}", flush=True)
    print(table(["recipe", "weights / fp32", "output error"],
                [[r["recipe"], f"{r['weights_vs_fp32']:.3f}", f"{r['output_error']:.3f}"] for r in rows]))
    print(json.dumps({"bench": "quantize_error", "model": args.model, "blocks": f"{ids.start}..{ids.stop - 1}",
                      "sentences": args.sentences, "recipes": rows}))


if __name__ == "__main__":
    main()
