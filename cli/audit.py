"""`tandem audit CAPTURE --model M`: every attack that applies to a capture, as a table (attack, target, recovery) and
a JSON line of the figures.

A capture (privacy/audit/capture.py, `tandem cloud serve --capture-dir`) holds what the cloud received and sent;
the attacks (privacy/audit/) run on it, session by session, with the base weights of `--model`:

  dictionary, in-context    tokens from `begin.hidden` of the first (`--token-steps-at last`: the last)
                            `--token-steps` training steps (needs the cut k: `--k`, or the run's settings with `--run`)
  learned                   the same, by a decoder trained on public WikiText-2 through the base weights' k blocks
                            (privacy/audit/learned.py); with `--run`, adaptive: trained under the run's noise recipe;
                            with `--shadow SHADOW` (the attacker's own run of the recipe on public data,
                            privacy/audit/shadow.py), on what that run's trained k blocks send (bag too)
  bag, bag-prior            the text's words as a set from the positions sent on those steps (all real ones, or with
                            --noise-template-only the template's), by a decoder trained on public sentences in the
                            run's template (privacy/audit/bag.py); bag-prior: the corpus's commonest words (needs
                            --run)
  label-norm, label-cosine, labels from `output_grad` at the answer position (training steps); label-lines
  label-lines               is blind to each gradient's sign and norm (the attack on --noise-label-mask)
  adapter                   each DLoRA cloud block's ΔW from `lora_request` / `lora_reply`, after 1, 2 and 10 steps;
                            in the carried mode, the A and B that every `begin` carries

Scoring needs what only the edge knew: with `--run DIR` (the edge's `--out-dir`) the batches are rebuilt from the
run's settings and matched to the exchanges (privacy/audit/truth.py), and the adapter's final ΔW is compared with the
fit on the forward-only exchanges after training (the evaluation, which used it). Without `--run` the table gives
what the attacker can tell alone: the share of tokens it confirms by re-running the k blocks on its guesses, over
every real position (the capture cannot tell which are private), and whether the rows determine each ΔW.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from privacy.audit import bag as BAG, labels as L, tokens as TK
from privacy.audit.rows import Row, Setup, audit_session

ATTACKS = (*TK.ATTACKS, *BAG.ATTACKS, *L.ATTACKS, "adapter")
LEGEND = ("confirmed: guesses the attacker verifies alone, re-running the k blocks on them (a lower bound); exact: "
          "guesses equal to what the edge sent (needs --run).\none known label: the first example's, as Li et al. "
          "assume; either labelling: the better of the two. rank r/w: w = the input width; rank w determines ΔW.")


def add_parser(sub, help="run every attack on a capture of what the cloud received (cloud serve --capture-dir)"):
    p = sub.add_parser("audit", help=help)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("capture", help="a capture file, or the folder of `tandem cloud serve --capture-dir`")
    p.add_argument("--model", default="smollm2", help="the cloud's backbone, as `--model` elsewhere (default smollm2)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, of {', '.join(ATTACKS)} "
                   "(default: all that apply)")
    p.add_argument("--run", default=None, help="the edge's run folder (`edge train --out-dir`): what it sent, to "
                   "score the attacks against; also gives the cut k")
    p.add_argument("--k", type=int, default=None, help="blocks the edge ran below the cut (default: the run's)")
    p.add_argument("--token-steps", type=int, default=2, help="training steps the token attacks run on")
    p.add_argument("--token-steps-at", choices=("first", "last"), default="first", help="the first or the last "
                   "training steps: the last show what the edge's trained weights send (a learned defence's)")
    p.add_argument("--candidates", type=int, default=4, help="dictionary candidates the in-context attack re-checks")
    p.add_argument("--inverter-steps", type=int, default=400, help="training steps of the learned attack's decoder "
                   "(8 public windows of 64 tokens each)")
    p.add_argument("--shadow", default=None, help="the attacker's own run of the victim's recipe on public data "
                   "(privacy/audit/shadow.py): the learned and bag decoders train on what its k blocks send")
    p.add_argument("--out", default=None, help="also write the JSON figures to this file")


def parse_attacks(text: str) -> list[str]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        what = f"unknown attack {unknown[0]!r}" if unknown else "no attack given"
        raise ValueError(f"{what}; --attacks takes {', '.join(ATTACKS)}")
    return names


def make_setup(args, exs: list) -> Setup:
    """Load the attacker's model; check it against the capture; the cut and the dictionary."""
    import torch
    import tasks as T
    from model.load import load_model
    from privacy.audit import inversion as A
    from protocol.tensors import decode
    cfg = None
    if args.run:
        from privacy.audit.truth import run_config
        cfg = run_config(args.run)
    loaded = load_model(args.model)
    model, tok = loaded.model.eval(), loaded.tokenizer or T.tiny_tokenizer()
    width = decode(exs[0].begin.hidden).shape[-1]
    if width != model.config.hidden_size:
        raise ValueError(f"the capture's hidden states are {width} wide but --model {args.model} has hidden size "
                         f"{model.config.hidden_size}: give the cloud's backbone")
    k = args.k if args.k is not None else (cfg.k if cfg is not None else None)
    if k is None:  # the cut the session was opened with, as the cloud recorded it
        from privacy.audit.capture import session_settings
        k = (session_settings(args.capture, exs[0].session) or {}).get("k")
    setup = Setup(model, tok, k, args.run, cfg)
    if cfg is not None:
        from privacy.audit.truth import RunData
        setup.run_data = RunData(cfg, tok)
    if k is not None and any(a in ("dictionary", "in-context") for a in args.attack_list):
        text = T.resolve_task(cfg.data.task, cfg.data.task_file).template.split("{")[0].rstrip() if cfg else "Text:"
        prefix = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
        setup.dictionary = A.build_dictionary(model, prefix, [k])
    shadow = None
    if args.shadow and k is not None and any(a in ("learned", *BAG.ATTACKS) for a in args.attack_list):
        from privacy.audit.shadow import Shadow
        shadow = Shadow(args.shadow, model, tok, victim=cfg)
        if shadow.k != k:
            raise ValueError(f"the shadow run {args.shadow} cuts at k={shadow.k}, the capture at k={k}: rerun it at {k}")
    if k is not None and "learned" in args.attack_list:
        from privacy.audit.learned import InverterSettings, train_inverter
        noise = cfg.noise if cfg is not None else None  # the adaptive attacker knows the run's recipe
        settings = InverterSettings(steps=args.inverter_steps, sigma=noise.sigma if noise else 0.0,
                                    clip=noise.clip if noise else None)
        setup.inverter = train_inverter(model, tok, k, settings, log=lambda m: print(m, flush=True), shadow=shadow)
    if k is not None and cfg is not None and any(a in BAG.ATTACKS for a in args.attack_list):
        task = T.resolve_task(cfg.data.task, cfg.data.task_file)  # the adaptive attacker knows the template recipe
        setup.bag = BAG.train_bag(model, tok, task, k, cfg.noise.template_only, steps=args.inverter_steps,
                                  log=lambda m: print(m, flush=True), shadow=shadow)
    return setup


def table(rows: list[Row]) -> str:
    head = ("session", "attack", "target", "recovery")
    cells = [(r.session[:8], r.attack, r.target, r.recovery) for r in rows]
    w = [max(len(c[i]) for c in [head, *cells]) for i in range(3)]
    lines = ["  ".join(c[i].ljust(w[i]) for i in range(3)) + "  " + c[3] for c in [head, *cells]]
    lines.insert(1, "-" * max(len(x) for x in lines))
    return "\n".join(lines)


def run(args) -> dict:
    """The audit `tandem audit` runs: the table on stdout, then the JSON line (also to --out)."""
    from privacy.audit.capture import exchanges, read_capture
    args.attack_list = parse_attacks(args.attacks)
    if args.k is not None and args.k < 0 or min(args.token_steps, args.candidates, args.inverter_steps) < 1:
        raise ValueError("--k must be >= 0, --token-steps, --candidates and --inverter-steps >= 1")
    exs = exchanges(read_capture(args.capture))
    if not exs:
        raise ValueError(f"{args.capture} holds no step")
    setup = make_setup(args, exs)
    explicit = args.attacks != ",".join(ATTACKS)
    if explicit and setup.k is None and any(a in TK.ATTACKS for a in args.attack_list):
        raise ValueError("the token attacks need the cut, which this capture does not record: give --k or --run")
    rows = []
    for sid in dict.fromkeys(ex.session for ex in exs):
        rows += audit_session(setup, sid, [ex for ex in exs if ex.session == sid], args.attack_list, args)
    print(table(rows))
    print(LEGEND)
    figures = {"audit": str(args.capture), "model": args.model, "run": args.run, "k": setup.k,
               "sessions": len({r.session for r in rows}),
               "results": [{"session": r.session, "attack": r.attack, "target": r.target, **r.figures} for r in rows]}
    line = json.dumps(figures)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return figures
