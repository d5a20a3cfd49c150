"""Bytes and accuracy of each training path on SST-2, in one run, against DLoRA all-active fp32.

    python bench/dlora_bytes.py [--steps 150] [--eval-examples 500] [--model smollm2]

Rows: frozen-only split, DLoRA all-active fp32, DLoRA + Kill & Revive, DLoRA + int8 wire (both directions),
DLoRA + KR + int8, DLoRA + KR scoring modules by gradient norm instead of relative update, and local PEFT (q,v LoRA
on every block, no wire) as the accuracy reference. Each row trains a fresh adapter from the same seed on the same
batches through one cloud on loopback, then evaluates on the dev set.
Goals (issue #3): KR <= 0.5 of the bytes, int8 <= 0.26, each within 0.5 pt of all-active fp32 accuracy.
Writes runs/bench/dlora_bytes.json and .png; ends with one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tasks as T  # noqa: E402
from cloud.rpc import BackboneService, make_server  # noqa: E402
from edge.trainer import EdgeConfig, train  # noqa: E402
from model.load import load_model  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
ROWS = [("split (frozen cloud)", dict(cloud_lora="none")),
        ("DLoRA fp32", dict(cloud_lora="edge")),
        ("DLoRA + KR", dict(cloud_lora="edge", kr=True)),
        ("DLoRA + int8", dict(cloud_lora="edge", wire_up="int8", wire_down="int8")),
        ("DLoRA + KR + int8", dict(cloud_lora="edge", kr=True, wire_up="int8", wire_down="int8")),
        ("DLoRA + KR (grad signal)", dict(cloud_lora="edge", kr=True, kr_signal="grad"))]


def local_peft_accuracy(loaded, args) -> tuple[float, float]:
    """Reference: PEFT LoRA q,v on all blocks, trained locally on the same batches; (dev accuracy, seconds)."""
    from tests.reference import peft_local as ref
    from model.tuners.lora import LoRAConfig, LoRASet
    t0 = time.perf_counter()
    model = copy.deepcopy(loaded.model)
    lora = LoRASet(model, LoRAConfig(blocks=list(range(model.config.num_hidden_layers))))
    pm = ref.peft_model(model, lora)
    tok, task = loaded.tokenizer or T.tiny_tokenizer(), T.TASKS["sst2"]
    cfg = EdgeConfig.of(steps=args.steps, batch_size=args.batch_size).optim
    items = T.encode(task, T.load_split("sst2", "train"), tok)
    from model.training import endless_batches
    gen = endless_batches(task, items, cfg.batch_size, tok.pad_token_id or 0, cfg.seed)
    ref.train_steps(pm, task, [next(gen) for _ in range(args.steps)], cfg.lr)
    dev = T.encode(task, T.load_split("sst2", "dev"), tok)[:args.eval_examples]
    acc = ref.evaluate(pm, task, dev, tok.pad_token_id or 0, T.label_token_ids(task, tok))
    return acc, time.perf_counter() - t0


def plot(results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in results if "bytes_per_step" in results[n]]
    fig, ax = plt.subplots(figsize=(8, 4))
    mb = [results[n]["bytes_per_step"] / 1e6 for n in names]
    bars = ax.bar(names, mb, color="#4a7ab0")
    for bar, n in zip(bars, names):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{100 * results[n]['accuracy']:.1f}%",
                ha="center", va="bottom")
    ax.margins(y=0.12)  # room for the labels on top
    ax.set_ylabel("MB per step (up + down)")
    ax.set_title("SST-2 through the cloud: bytes per step, dev accuracy on top")
    plt.setp(ax.get_xticklabels(), rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-examples", type=int, default=500)
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--rows", default="all", help="comma-separated row numbers 0-5 to run (DLoRA fp32, row 1, is "
                    "always run: it is the baseline), or 'all'")
    ap.add_argument("--no-reference", action="store_true", help="skip the local PEFT reference row")
    return ap.parse_args()


def run_rows(loaded, args) -> tuple[dict, float | None]:
    """Each wanted row trained and evaluated through one cloud on loopback; (results by row name, zero-shot accuracy,
    measured once, by the first row)."""
    svc = BackboneService(copy.deepcopy(loaded.model), {TOKEN: "bench"})
    server, port = make_server(svc, "127.0.0.1:0")
    server.start()
    results = {}
    zero_shot = None
    wanted = set(range(len(ROWS))) if args.rows == "all" else {int(r) for r in args.rows.split(",")} | {1}
    for name, opts in [r for i, r in enumerate(ROWS) if i in wanted]:
        t0 = time.perf_counter()
        cfg = EdgeConfig.of(cloud=f"127.0.0.1:{port}", token=TOKEN, model=args.model, steps=args.steps,
                            batch_size=args.batch_size, eval_examples=args.eval_examples, eval_before=zero_shot is None,
                            name=name, **opts)
        m = train(cfg, loaded=copy.deepcopy(loaded)).metrics
        zero_shot = zero_shot if zero_shot is not None else m["eval_before"]["accuracy"]
        s = m["summary"]
        results[name] = {"bytes_up_per_step": s["bytes_up_per_step"], "bytes_down_per_step": s["bytes_down_per_step"],
                         "bytes_per_step": s["bytes_up_per_step"] + s["bytes_down_per_step"],
                         "accuracy": m["eval_after"]["accuracy"], "active_fraction": s.get("active_fraction", 0.0),
                         "step_seconds": s["step_seconds"], "wall_seconds": time.perf_counter() - t0}
        print(f"{name}: acc {100 * results[name]['accuracy']:.1f}%  {results[name]['bytes_per_step'] / 1e6:.1f} MB/step",
              flush=True)
    server.stop(0)
    return results, zero_shot


def print_table(results: dict, base: dict) -> None:
    """One row per path: bytes per step, their ratio to `base` (DLoRA fp32), dev accuracy and its difference."""
    print(f"{'path':<26}{'up MB/step':>11}{'down MB/step':>13}{'bytes ratio':>12}{'active':>8}{'dev acc':>9}"
          f"{'d acc pt':>9}{'step s':>8}{'min':>6}")
    for name, r in results.items():
        if "bytes_per_step" not in r:
            print(f"{name:<26}{'-':>11}{'-':>13}{'-':>12}{'-':>8}{100 * r['accuracy']:>8.1f}%"
                  f"{100 * (r['accuracy'] - base['accuracy']):>+9.1f}{'-':>8}{r['wall_seconds'] / 60:>6.1f}")
            continue
        print(f"{name:<26}{r['bytes_up_per_step'] / 1e6:>11.2f}{r['bytes_down_per_step'] / 1e6:>13.2f}"
              f"{r['bytes_per_step'] / base['bytes_per_step']:>12.3f}{r['active_fraction']:>8.2f}"
              f"{100 * r['accuracy']:>8.1f}%{100 * (r['accuracy'] - base['accuracy']):>+9.1f}{r['step_seconds']:>8.2f}"
              f"{r['wall_seconds'] / 60:>6.1f}")


def headline(results: dict, zero_shot: float, acc_ref: float | None) -> dict:
    """The final JSON line: accuracies, and each row's bytes ratio to DLoRA fp32."""
    base = results["DLoRA fp32"]
    head = {"zero_shot": round(zero_shot, 4), "dlora_fp32_acc": round(base["accuracy"], 4),
            "local_peft_acc": None if acc_ref is None else round(acc_ref, 4),
            "dlora_fp32_minutes": round(base["wall_seconds"] / 60, 2)}  # train + dev eval, one client, this machine
    for name in [n for n, _ in ROWS if n in results and n != "DLoRA fp32"]:
        key = name.lower().replace(" + ", "_").replace(" ", "_").replace("(", "").replace(")", "")
        head[f"{key}_bytes_ratio"] = round(results[name]["bytes_per_step"] / base["bytes_per_step"], 4)
        head[f"{key}_acc"] = round(results[name]["accuracy"], 4)
    return head


def main():
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model)
    results, zero_shot = run_rows(loaded, args)
    acc_ref = None
    if not args.no_reference:
        acc_ref, secs = local_peft_accuracy(loaded, args)
        results["local PEFT (reference)"] = {"accuracy": acc_ref, "wall_seconds": secs}
    base = results["DLoRA fp32"]
    print(f"\nSST-2, {args.steps} steps of batch {args.batch_size}, dev {args.eval_examples}; zero-shot "
          f"{100 * zero_shot:.1f}%")
    print_table(results, base)
    (out / "dlora_bytes.json").write_text(json.dumps({"args": vars(args), "zero_shot": zero_shot,
                                                      "results": results}, indent=1))
    plot(results, out / "dlora_bytes.png")
    print(json.dumps(headline(results, zero_shot, acc_ref)))


if __name__ == "__main__":
    main()
