"""The privacy frontier on the real model: for each defence, what the cloud reads back and what accuracy it costs.

    python bench/privacy_frontier.py [--steps 160] [--batch-size 8] [--eval-examples 500]
                                     [--rows none,label-mask,label-free,...] [--no-in-context]
                                     [--token-steps-at first|last] [--adaptive] [--out runs/privacy_frontier]

One cloud (`tandem cloud serve --capture-dir`, its own process) serves every row in turn and records everything it
receives (privacy/audit/capture.py). Each row is one edge run of `edge.trainer.train` on SST-2 in the frozen split
(the defences on gradients take no other mode), seed 0, the same batches and budget for every row (--steps x
--batch-size examples, lr 1e-3), evaluated on the first --eval-examples dev examples. Then `tandem audit` runs on that
row's session of the capture, scored against the row's run folder:
  tokens  the dictionary, in-context and learned inversions of `begin.hidden` of the first 2 training steps (every
          private token position of 16 sentences; --token-steps-at last: the last 2, what the trained edge sends,
          where a learned defence such as --noise-nopeek shows: at the first step the edge's LoRA is PEFT's start,
          B = 0, and sends what the base weights send), with the cloud's copy of the base weights; the learned decoder
          (privacy/audit/learned.py) is trained on public WikiText-2 under the row's own noise recipe: the adaptive
          attacker, who knows the defence and its settings but not the edge's LoRA; and the bag attack
          (privacy/audit/bag.py), the text's words as a set from the positions sent on those steps (with
          --noise-template-only the template's only), beside bag-prior, what naming the commonest words gets;
          with --adaptive the attacker first runs the row's recipe itself (seed 1, on the SST-2 training examples
          the row never drew: privacy/audit/shadow.py) and both decoders train on what that shadow run's trained k
          blocks send for its public examples instead of the base weights' (the attacker adapted to a learned defence);
  labels  label-norm, label-cosine and the sign-blind label-lines on `output_grad` of every training step, reported
          as the best balanced accuracy over the attacks and either labelling (the attacker's best case; chance 50 %).
Rows: see ROWS (k = blocks on the edge below the cut, m = 1 above it; k + m <= 8, a quarter of SmolLM2's 30).
A defence's accuracy drop is against the undefended row at the same cut (none, k4, k7). Prints a table, writes
OUT/privacy_frontier.json and OUT/privacy_frontier.png (token recovery and label inference against dev accuracy),
and ends with one JSON line naming the best points for the issue's two goals (`--report` prints them again from the
JSON file).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.split_overhead import TOKEN, start_cloud  # noqa: E402
from cli.report import table  # noqa: E402

ROWS = {  # name -> the edge's flags (on top of the frozen split, k = m = 1)
    "none": {},
    "label-mask": dict(noise_label_mask=4.0),
    "label-free": dict(noise_label_free=True),
    "k4": dict(k=4),
    "k4-noise1": dict(k=4, noise_sigma=1.0),
    "k4-noise3": dict(k=4, noise_sigma=3.0),
    "k4-nopeek1": dict(k=4, noise_nopeek=1.0),
    "k4-nopeek10": dict(k=4, noise_nopeek=10.0),
    "k4-template": dict(k=4, noise_template_only=True),
    "k7": dict(k=7),
    "k7-noise1": dict(k=7, noise_sigma=1.0),
    "k7-noise1-label-free": dict(k=7, noise_sigma=1.0, noise_label_free=True),
}
TOKEN_ATTACKS, LABEL_ATTACKS = ("dictionary", "learned", "in-context"), ("label-norm", "label-cosine", "label-lines")
BAG_ATTACKS = ("bag", "bag-prior")  # the text's words as a set (privacy/audit/bag.py); the prior reads nothing sent


def row_config(row: str, args, port: int, run_dir: Path, **more):
    from edge.config import EdgeConfig
    flags = dict(cloud=f"127.0.0.1:{port}", token=TOKEN, model=args.model, task="sst2", lr=1e-3, steps=args.steps,
                 batch_size=args.batch_size, eval_examples=args.eval_examples, eval_before=False, seed=0,
                 checkpoint_every=0, out_dir=str(run_dir), name=row, progress=False)
    return EdgeConfig.of(**{**flags, **ROWS[row], **more})


def shadow_run(name: str, args, loaded, port: int, capture: Path, victim: Path) -> Path:
    """The adaptive attacker's own run of the row's recipe (privacy/audit/shadow.py): seed 1, on the SST-2 training
    examples the row never drew, not evaluated; the cloud's capture of it is the attacker's own and is deleted."""
    import tasks as T
    from edge.trainer import train
    from privacy.audit.capture import SUFFIX
    from privacy.audit.shadow import write_public_file
    from privacy.audit.truth import run_config
    public = Path(args.out) / "public" / f"{name}.jsonl"
    write_public_file(run_config(victim), loaded.tokenizer or T.tiny_tokenizer(), public)
    run_dir, before = Path(args.out) / "runs" / f"{name}-shadow", set(capture.glob(f"*{SUFFIX}"))
    train(row_config(name, args, port, run_dir, seed=1, train_file=str(public), eval_after=False,
                     name=f"{name}-shadow"), loaded=copy.deepcopy(loaded), existing="overwrite")
    for f in set(capture.glob(f"*{SUFFIX}")) - before:
        f.unlink()
    return run_dir


def run_row(name: str, args, loaded, port: int, capture: Path) -> dict:
    from cli import audit
    from edge.trainer import train
    from privacy.audit.capture import SUFFIX
    before = set(capture.glob(f"*{SUFFIX}"))
    run_dir = Path(args.out) / "runs" / name
    cfg, t0 = row_config(name, args, port, run_dir), time.perf_counter()
    m = train(cfg, loaded=copy.deepcopy(loaded), existing="overwrite").metrics
    train_min = (time.perf_counter() - t0) / 60
    new = sorted(set(capture.glob(f"*{SUFFIX}")) - before)
    if len(new) != 1:
        raise SystemExit(f"row {name}: expected one new capture file, found {len(new)}")
    shadow = shadow_run(name, args, loaded, port, capture, run_dir) if args.adaptive else None
    attacks = [*TOKEN_ATTACKS[:2 + args.in_context], *BAG_ATTACKS, *LABEL_ATTACKS]
    t1 = time.perf_counter()
    figures = audit.run(argparse.Namespace(capture=str(new[0]), model=args.model, attacks=",".join(attacks),
                                           run=str(run_dir), k=None, token_steps=2, candidates=4, out=None,
                                           token_steps_at=args.token_steps_at, inverter_steps=args.inverter_steps,
                                           shadow=None if shadow is None else str(shadow)))
    res = {r["attack"]: r for r in figures["results"]}
    tokens = {a: res[a]["recovered"] for a in attacks if a in (*TOKEN_ATTACKS, "bag")}
    labels = {a: res[a]["separation"] for a in attacks if a in LABEL_ATTACKS}
    new[0].unlink()  # a capture holds the private data's hidden states: kept no longer than the audit needs
    return {"row": name, "flags": ROWS[name], "k": cfg.k, "m": cfg.m, "accuracy": m["eval_after"]["accuracy"],
            "token_recovery": tokens, "token_positions": res["dictionary"]["positions"],
            "strongest_token_attack": max(tokens, key=tokens.get), "tokens": max(tokens.values()),
            "bag_prior": res["bag-prior"]["recovered"],
            "label_inference": labels, "label_examples": res["label-norm"]["examples"],
            "strongest_label_attack": max(labels, key=labels.get), "labels": max(labels.values()),
            "bytes_up_per_step": m["summary"]["bytes_up_per_step"], "train_minutes": train_min, "adaptive": args.adaptive,
            "audit_minutes": (time.perf_counter() - t1) / 60}


def baseline(results: list[dict], row: dict) -> dict | None:
    """The undefended row at the same cut (its flags only k), the one a defence's accuracy drop is measured against."""
    same = {} if row["k"] == 1 else {"k": row["k"]}
    return next((r for r in results if r["flags"] == same and r["m"] == row["m"]), None)


def drop_pt(results: list[dict], row: dict) -> float | None:
    base = baseline(results, row)
    return None if base is None else 100 * (base["accuracy"] - row["accuracy"])


def show(results: list[dict]) -> None:
    print(table(["row", "k+m", "dev acc", "drop pt (vs same k)", "tokens (strongest)", "bag prior",
                 "labels (strongest)", "train min", "audit min"],
                [[r["row"], f"{r['k']}+{r['m']}", f"{100 * r['accuracy']:.1f}",
                  "–" if drop_pt(results, r) is None else f"{drop_pt(results, r):+.1f}",
                  f"{100 * r['tokens']:.1f} % ({r['strongest_token_attack']})",
                  "–" if r.get("bag_prior") is None else f"{100 * r['bag_prior']:.1f} %",
                  f"{100 * r['labels']:.1f} % ({r['strongest_label_attack']})",
                  f"{r['train_minutes']:.1f}", f"{r['audit_minutes']:.1f}"] for r in results]), flush=True)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, what in ((axes[0], "tokens", "private tokens recovered (strongest attack, %)"),
                          (axes[1], "labels", "label inference (best balanced accuracy, %)")):
        for r in results:
            ax.scatter(100 * r[key], 100 * r["accuracy"], color="C0")
            ax.annotate(r["row"], (100 * r[key], 100 * r["accuracy"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel(what)
        ax.set_ylabel("SST-2 dev accuracy (%)")
    axes[0].axvline(5, color="grey", ls=":", lw=1)
    axes[1].axvline(60, color="grey", ls=":", lw=1)
    fig.suptitle("what the cloud reads back against what the defence costs (frozen split, SmolLM2)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def best_points(results: list[dict]) -> dict:
    """The issue's two goals: tokens <= 5 % within 2 pt of the undefended run at the same cut (k + m <= 8); labels
    <= 60 % within 1 pt. For each, the row that leaks least within the accuracy budget (goal_met if that is under
    the bound), else the row that leaks least at all."""
    out = {}
    for key, leak, budget in (("tokens", 0.05, 2.0), ("labels", 0.60, 1.0)):
        defended = [r for r in results if drop_pt(results, r) is not None and r["k"] + r["m"] <= 8]
        within = [r for r in defended if drop_pt(results, r) <= budget]
        best = min(within or defended, key=lambda r: r[key])
        out[key] = {"row": best["row"], "flags": best["flags"], key: round(best[key], 4),
                    "attack": best[f"strongest_{'token' if key == 'tokens' else 'label'}_attack"],
                    "accuracy_drop_pt": round(drop_pt(results, best), 1),
                    "goal_met": bool(within) and best[key] <= leak}
    return out


def report(results: list[dict], args, out: Path, minutes: float) -> None:
    """The table, the PNG and the JSON line, from the rows."""
    show(results)
    plot(results, out / "privacy_frontier.png")
    print(f"wrote {out / 'privacy_frontier.json'} and {out / 'privacy_frontier.png'}")
    print(json.dumps({"bench": "privacy_frontier", "model": args.model, "task": "sst2", "steps": args.steps,
                      "batch_size": args.batch_size, "dev_examples": args.eval_examples,
                      "undefended_accuracy": {f"k={r['k']}": r["accuracy"] for r in results if baseline(results, r)
                                              is r},
                      "best": best_points(results),
                      "rows": {r["row"]: {"accuracy": round(r["accuracy"], 4), "tokens": round(r["tokens"], 4),
                                          "labels": round(r["labels"], 4)} for r in results},
                      "minutes": round(minutes, 1)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-examples", type=int, default=500)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--no-in-context", dest="in_context", action="store_false",
                    help="tokens by the dictionary attack only (the in-context attack re-checks its candidates)")
    ap.add_argument("--inverter-steps", type=int, default=400, help="training steps of the learned attack's decoder")
    ap.add_argument("--token-steps-at", choices=("first", "last"), default="first",
                    help="the token attacks read the first or the last 2 training steps (`tandem audit`)")
    ap.add_argument("--adaptive", action="store_true", help="for each row, the attacker's own run of its recipe on "
                    "public SST-2 examples (privacy/audit/shadow.py); the learned and bag decoders train on what that "
                    "run's k blocks send (one more training run per row)")
    ap.add_argument("--out", default="runs/privacy_frontier")
    ap.add_argument("--report", action="store_true", help="only print the table, PNG and JSON line again from "
                    "OUT/privacy_frontier.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report:
        saved = json.loads((out / "privacy_frontier.json").read_text())
        vars(args).update({k: v for k, v in saved["settings"].items() if k not in ("report", "out")})
        return report(saved["rows"], args, out, saved.get("minutes", 0.0))
    rows = args.rows.split(",")
    if bad := [r for r in rows if r not in ROWS]:
        raise SystemExit(f"unknown rows {', '.join(bad)}; rows: {', '.join(ROWS)}")
    if rows[0] != "none":
        raise SystemExit("the first row must be none: drops are measured against the undefended row at each cut")
    from model.load import load_model
    capture = out / "capture"
    capture.mkdir(parents=True, exist_ok=True)
    capture.chmod(0o700)
    loaded = load_model(args.model)
    proc, port = start_cloud(args.model, "--capture-dir", str(capture))
    results: list[dict] = []
    t0 = time.perf_counter()
    try:
        for name in rows:  # the JSON file is rewritten after each row (a cut run keeps them)
            print(f"--- {name}: {ROWS[name]}", flush=True)
            results.append(run_row(name, args, loaded, port, capture))
            show(results)
            minutes = (time.perf_counter() - t0) / 60
            (out / "privacy_frontier.json").write_text(json.dumps({"settings": vars(args), "rows": results,
                                                                   "minutes": minutes}, indent=1))
    finally:
        proc.terminate()
        proc.wait(30)
    report(results, args, out, (time.perf_counter() - t0) / 60)


if __name__ == "__main__":
    main()
