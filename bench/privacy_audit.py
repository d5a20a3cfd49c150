"""Inversion audit on the real model: how many of the edge's own tokens an honest-but-curious cloud reads back
from the hidden state the edge sends after its first k blocks, with and without noise.

    python bench/privacy_audit.py [--model smollm2] [--sentences 64] [--ks 1,2,4,8] [--sigmas 0,0.3,1,3,10]
                                  [--full-vocab] [--in-context] [--in-context-sigmas 0,1]
                                  [--utility-sigmas 0,3,10 --utility-steps 80]

Victims: SST-2 dev sentences of at least --min-words words (a seeded sample), in the task's prompt; only the
tokens of the review count (the template around it is public). Attacks (privacy/audit/inversion.py): `nearest` (input
embedding), `dictionary` (every candidate token run through the known first k blocks after the public prompt
prefix), and with --in-context the dictionary's top candidates re-checked in the guessed sentence. By default the
dictionary covers the attacker's prior, the tokens of 20,000 public SST-2 *train* sentences (cheap; the coverage
line says what share of the victims' tokens it can reach at all); --full-vocab runs all 49,152 tokens instead.
Noise sigma is relative to the RMS of h_k over real tokens (privacy/defences/noise.py; a heuristic, not DP).

Cost on 2 CPU cores: the default run takes about 1 minute of CPU (100 s wall at load average 5); --full-vocab
--in-context about 6 CPU-minutes. Prints a table, writes runs/bench/privacy_audit.json, and ends with one JSON
line of the headline figures.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tasks as T  # noqa: E402
from model.load import load_model  # noqa: E402
from privacy.audit import inversion as A  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def victims(n: int, min_words: int, seed: int) -> list[dict]:
    dev = [ex for ex in T.load_split("sst2", "dev") if len(ex["sentence"].split()) >= min_words]
    return random.Random(seed).sample(dev, min(n, len(dev)))


def table(results: list[A.Result], ks: list[int], sigmas: list[float], attacks: list[str]) -> str:
    cell = {(r.k, r.sigma_rel, r.attack): f"{r.rate:6.1%}" for r in results}
    head = f"{'k':>3}  {'attack':<11}" + "".join(f"{f'σ={s:g}·RMS':>11}" for s in sigmas)
    lines = [head, "-" * len(head)]
    for k in ks:
        for a in attacks:
            lines.append(f"{k:>3}  {a:<11}" + "".join(f"{cell.get((k, s, a), '–'):>11}" for s in sigmas))
    return "\n".join(lines)


def train_with_noise(loaded, sigma: float, args) -> float:
    """Dev accuracy after DLoRA training whose edge noises what it sends (the audit's sigma, relative to the RMS)."""
    from cloud.rpc import BackboneService, make_server
    from edge.trainer import EdgeConfig, train
    token = "audit-token-0123456789abcdef"
    server, port = make_server(BackboneService(copy.deepcopy(loaded.model), {token: "audit"}), "127.0.0.1:0")
    server.start()
    try:
        cfg = EdgeConfig.of(cloud=f"127.0.0.1:{port}", token=token, model=args.model, cloud_lora="edge",
                            k=args.utility_k,
                            steps=args.utility_steps, eval_examples=args.utility_eval, eval_before=False,
                            noise_sigma=sigma, seed=args.seed, name=f"sigma={sigma:g}")
        return train(cfg, loaded=copy.deepcopy(loaded)).metrics["eval_after"]["accuracy"]
    finally:
        server.stop(0)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--min-words", type=int, default=8)
    ap.add_argument("--ks", type=ints, default=[1, 2, 4, 8])
    ap.add_argument("--sigmas", type=floats, default=[0.0, 0.3, 1.0, 3.0, 10.0])
    ap.add_argument("--full-vocab", action="store_true", help="dictionary over the whole vocabulary (slower)")
    ap.add_argument("--prior-sentences", type=int, default=20000, help="public SST-2 train sentences for the prior")
    ap.add_argument("--in-context", action="store_true", help="also run the in-context attack (slow on CPU)")
    ap.add_argument("--in-context-sigmas", type=floats, default=[0.0, 1.0])
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--utility-sigmas", type=floats, default=[],
                    help="also train at these sigmas (edge --noise-sigma, DLoRA through a loopback cloud) and "
                         "report dev accuracy beside the recovery rate: the price of the defence")
    ap.add_argument("--utility-steps", type=int, default=80)
    ap.add_argument("--utility-k", type=int, default=1, help="edge blocks below the cut in the utility runs")
    ap.add_argument("--utility-eval", type=int, default=500)
    ap.add_argument("--out", default="runs/bench/privacy_audit.json")
    return ap.parse_args()


def attacker_vocab(tok, model, probe, args):
    """The attacker's candidate tokens (None: the whole vocabulary), their description, count and coverage of the
    victims' private tokens."""
    truth = probe.input_ids[probe.private]
    if args.full_vocab:
        vocab, vocab_name = None, "full vocabulary"
    else:
        public = [ex["sentence"] for ex in T.load_split("sst2", "train")[:args.prior_sentences]]
        vocab = A.vocab_of(tok, public)
        vocab_name = f"prior: tokens of {len(public)} SST-2 train sentences"
    n_vocab = model.get_input_embeddings().weight.shape[0] if vocab is None else len(vocab)
    coverage = 1.0 if vocab is None else torch.isin(truth, vocab).float().mean().item()
    return vocab, vocab_name, n_vocab, coverage


def run_attacks(model, probe, prefix, vocab, n_vocab: int, args) -> tuple[list[A.Result], list[str]]:
    """Build the dictionary on the cloud's copy of the model, then run every attack at every k and sigma."""
    t_load = time.time()
    observed = A.observed_hidden(model, probe, args.ks)
    attacker = copy.deepcopy(model).to(torch.bfloat16)  # the cloud's copy; bfloat16 is ~4x faster on AMX CPUs
    dictionary = A.build_dictionary(attacker, prefix, args.ks, vocab)
    t_dict = time.time()
    print(f"dictionary: {n_vocab} tokens through {max(args.ks)} blocks in {t_dict - t_load:.0f} s", flush=True)
    attacks = ["nearest", "dictionary"]
    results = A.run_audit(model, probe, args.ks, args.sigmas, attacks, dictionary, attacker,
                          candidates=args.candidates, observed=observed, seed=args.seed)
    if args.in_context:
        attacks.append("in-context")
        results += A.run_audit(model, probe, args.ks, args.in_context_sigmas, ["in-context"], dictionary, attacker,
                               candidates=args.candidates, observed=observed, seed=args.seed,
                               log=lambda m: print(m, flush=True))
    return results, attacks


def utility_runs(loaded, results: list[A.Result], args) -> dict[str, float]:
    """Dev accuracy at each --utility-sigmas, printed beside the dictionary recovery rate at --utility-k."""
    utility = {f"{sigma:g}": train_with_noise(loaded, sigma, args) for sigma in args.utility_sigmas}
    if utility:
        k1 = {r.sigma_rel: r.rate for r in results if r.k == args.utility_k and r.attack == "dictionary"}
        print(f"\nPrice of the defence: DLoRA on SST-2 (k={args.utility_k}, {args.utility_steps} steps of batch 8, dev "
              f"{args.utility_eval}) with the edge's --noise-sigma")
        print(f"{'σ/RMS':>6}  {f'dictionary recovery (k={args.utility_k})':>26}  {'dev accuracy':>12}")
        for sigma in args.utility_sigmas:
            rec = f"{k1[sigma]:.1%}" if sigma in k1 else "–"
            print(f"{sigma:>6g}  {rec:>26}  {utility[f'{sigma:g}']:>12.1%}")
    return utility


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    load_before = os.getloadavg()
    t0 = time.time()

    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    task = T.TASKS["sst2"]
    probe = A.make_probe(task.template, victims(args.sentences, args.min_words, args.seed), tok)
    prefix = tok(task.template.split("{")[0].rstrip(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    vocab, vocab_name, n_vocab, coverage = attacker_vocab(tok, model, probe, args)
    print(f"{probe.input_ids.shape[0]} SST-2 dev sentences, {probe.n_private} private tokens; "
          f"attacker dictionary: {vocab_name} ({n_vocab} tokens, covers {coverage:.1%} of the private tokens); "
          f"prefix {tok.convert_ids_to_tokens(prefix.tolist())}", flush=True)

    results, attacks = run_attacks(model, probe, prefix, vocab, n_vocab, args)
    wall = time.time() - t0

    print(f"\nToken recovery rate, {args.model}, {probe.n_private} private tokens of {probe.input_ids.shape[0]} "
          f"SST-2 dev sentences (chance {1 / model.get_input_embeddings().weight.shape[0]:.4%}); "
          f"k = blocks on the edge, σ = noise std / RMS of h_k")
    print(table(results, args.ks, args.sigmas, attacks))
    print(f"dictionary: {vocab_name}, {n_vocab} tokens (covers {coverage:.1%})." + (
        f" in-context: top-{args.candidates} dictionary candidates re-checked in the guessed sentence."
        if args.in_context else "") + f" Wall {wall:.0f} s (load average {load_before[0]:.1f} at start, "
        f"{os.cpu_count()} CPUs).")

    utility = utility_runs(loaded, results, args)
    if utility:
        wall = time.time() - t0

    recovery = {f"k={k}": {a: {f"{r.sigma_rel:g}": round(r.rate, 4) for r in results if r.k == k and r.attack == a}
                           for a in attacks} for k in args.ks}
    headline = {"bench": "privacy_audit", "model": args.model, "task": "sst2", "sentences": probe.input_ids.shape[0],
                "private_tokens": probe.n_private, "dictionary_vocab": n_vocab,
                "dictionary_coverage": round(coverage, 4),
                "candidates": args.candidates, "sigma_relative_to": "RMS of h_k over real tokens",
                "recovery": recovery, "utility_k": args.utility_k,
                "dev_accuracy_with_noise": {k: round(v, 4) for k, v in utility.items()},
                "wall_seconds": round(wall, 1), "cpus": os.cpu_count(),
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**headline, "results": [r.__dict__ for r in results]}, indent=1))
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
