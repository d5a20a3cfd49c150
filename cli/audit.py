"""`tandem audit CAPTURE --model M`: every attack that applies to a capture, as a table (attack, target, recovery) and
a JSON line of the figures.

A capture (privacy/audit/capture.py, `tandem cloud serve --capture-dir`) holds what the cloud received and sent;
the attacks (privacy/audit/) run on it, session by session, with the base weights of `--model`:

  dictionary, in-context    tokens from `begin.hidden` of the first (`--token-steps-at last`: the last)
                            `--token-steps` training steps (needs the cut k: `--k`, or the run's settings with `--run`)
  learned                   the same, by a decoder trained on public WikiText-2 through the base weights' k blocks
                            (privacy/audit/learned.py); with `--run`, adaptive: trained under the run's noise recipe
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
from dataclasses import dataclass, field
from pathlib import Path

from privacy.audit import bag as BAG, labels as L, tokens as TK

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
    p.add_argument("--out", default=None, help="also write the JSON figures to this file")


def parse_attacks(text: str) -> list[str]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        what = f"unknown attack {unknown[0]!r}" if unknown else "no attack given"
        raise ValueError(f"{what}; --attacks takes {', '.join(ATTACKS)}")
    return names


@dataclass
class Row:
    session: str
    attack: str
    target: str
    recovery: str
    figures: dict = field(default_factory=dict)


@dataclass
class Setup:
    """What every session's attacks share: the attacker's model, the cut, the dictionary, the run's truth."""
    model: object
    tokenizer: object
    k: int | None
    run: str | None
    cfg: object = None  # the run's EdgeConfig
    dictionary: object = None
    run_data: object = None  # privacy.audit.truth.RunData of the run
    inverter: object = None  # privacy.audit.learned.Inverter, for the learned attack
    bag: tuple | None = None  # privacy.audit.bag's (decoder, prior), for the bag attacks


def token_steps(exs: list, args, truth) -> list[int]:
    """The exchanges of the training steps the token attacks read (the first or last --token-steps, matched)."""
    train = [i for i, ex in enumerate(exs) if ex.train]
    train = train[:args.token_steps] if args.token_steps_at == "first" else train[-args.token_steps:]
    return train if truth is None else [i for i in train if i in truth.batches]


def bag_rows(setup: Setup, sid: str, exs: list, attacks: list[str], args, truth) -> list[Row]:
    names = [a for a in attacks if a in BAG.ATTACKS]
    if not names or setup.bag is None or truth is None:
        return [Row(sid, a, "words of the text", "skipped: needs the cut and the run (--run)") for a in names]
    train = token_steps(exs, args, truth)
    found = BAG.capture_attack(*setup.bag, [exs[i] for i in train], [truth.batches[i].input_ids for i in train],
                               [truth.private[i] for i in train])
    sent = "template" if setup.cfg.noise.template_only else "all real"
    return [Row(sid, a, f"words of the text (as a set) at k={setup.k}, {len(train)} {args.token_steps_at} training "
                f"steps, from the {sent} positions", f"{found[a][0] / max(1, found[a][1]):.1%} of {found[a][1]}",
                {"recovered": found[a][0] / max(1, found[a][1]), "distinct": found[a][1]}) for a in names]


def token_rows(setup: Setup, sid: str, exs: list, attacks: list[str], args, truth) -> list[Row]:
    names = [a for a in attacks if a in TK.ATTACKS]
    if not names:
        return []
    if setup.k is None:
        return [Row(sid, a, "tokens", "skipped: the capture does not record the cut; give --k or --run") for a in names]
    train, at = token_steps(exs, args, truth), args.token_steps_at
    chosen = [exs[i] for i in train]
    ids = [truth.batches[i].input_ids for i in train] if truth is not None else None
    private = [truth.private[i] for i in train] if truth is not None else None
    results = TK.token_attack(setup.model, chosen, setup.k, setup.dictionary, names, ids, private, args.candidates,
                              inverter=setup.inverter)
    known = truth is not None and truth.private_known
    where = "private" if known else "real (which are private: unknown)"
    rows = []
    for r in results:
        target = f"tokens at k={setup.k}, {len(chosen)} {at} training steps, {r.positions} {where} positions"
        text = f"confirmed {r.confirmed_rate:.1%}" + (f"; exact {r.rate:.1%}" if r.rate is not None else
                                                      " (a lower bound; --run scores against the truth)")
        rows.append(Row(sid, r.attack, target, text, {"positions": r.positions, "confirmed": r.confirmed_rate,
                                                      "recovered": r.rate, "private_known": known}))
    return rows


def label_rows(sid: str, exs: list, attacks: list[str], truth) -> list[Row]:
    import torch
    names = [a for a in attacks if a in L.ATTACKS]
    train = [i for i, ex in enumerate(exs) if ex.of_kind("output_grad") and (truth is None or i in truth.batches)]
    if not names or not train:
        return []
    labels = None
    if truth is not None and all(truth.batches[i].label is not None for i in train):
        labels = torch.cat([truth.batches[i].label for i in train])
    rows = []
    for r in L.label_attack([exs[i] for i in train], labels, names):
        text = ("needs the true labels: give --run" if r.balanced_accuracy is None else
                f"balanced {r.balanced_accuracy:.1%} (one known label); either labelling {r.separation:.1%}; "
                "chance 50%")
        rows.append(Row(sid, r.attack, f"labels of {r.examples} training examples", text,
                        {"examples": r.examples, "balanced_accuracy": r.balanced_accuracy,
                         "separation": r.separation}))
    return rows


def adapter_rows(setup: Setup, sid: str, exs: list) -> list[Row]:
    from privacy.audit import adapter as AD
    rows = []
    for r in AD.adapter_attack(exs, after=(1, 2, 10)):
        state = "determined" if r.rank >= r.width else "not determined"
        rows.append(Row(sid, "adapter", f"ΔW of the cloud blocks after {r.after} step{'s' * (r.after > 1)}",
                        f"rank {r.rank}/{r.width} over {r.rows} rows of {r.exchanges} exchange(s): {state}",
                        {"after": r.after, "rank": r.rank, "width": r.width, "rows": r.rows}))
    last_train = max((i for i, ex in enumerate(exs) if ex.train), default=-1)
    after = [ex for ex in exs[last_train + 1:] if ex.of_kind("lora_reply")]
    if setup.cfg is not None and after:
        from privacy.audit.truth import final_deltas
        after = AD.window(after, len(after) - 1, margin=4.0)  # one adapter throughout: rows to spare, not all
        f = AD.fit(after)
        err = AD.relative_error(f.delta, final_deltas(setup.run, setup.cfg, setup.model))
        text = "the run's adapter is zero" if err is None else f"relative error {err:.1e} (rank {f.rank}/{f.width})"
        rows.append(Row(sid, "adapter", f"ΔW of the run's adapter, from {len(after)} forward-only exchange(s) "
                        "after training", text, {"relative_error": err, "rank": f.rank, "width": f.width}))
    return rows


def carried_rows(setup: Setup, sid: str, exs: list) -> list[Row]:
    """The carried mode: the cloud blocks' LoRA weights ride every begin, so they are read, not fitted."""
    from privacy.audit import adapter as AD
    rows = [Row(sid, "adapter", f"A, B of the cloud blocks after {r['after']} step{'s' * (r['after'] > 1)}",
                f"read from begin (carried mode): {r['blocks']} blocks x {r['targets']} targets, exactly as sent",
                {k: v for k, v in r.items() if k != "relative_error"})
            for r in AD.carried_attack(exs, after=(1, 2, 10))]
    last_train = max((i for i, ex in enumerate(exs) if ex.train), default=-1)
    after = [ex for ex in exs[last_train + 1:] if ex.begin.lora_weights]
    if setup.cfg is not None and after:
        from privacy.audit.truth import final_weights
        err = AD.weights_error(AD.carried_weights(after[-1]), final_weights(setup.run, setup.cfg, setup.model))
        rows.append(Row(sid, "adapter", "A, B of the run's adapter, from the last forward-only exchange after "
                        "training", "none in common" if err is None else f"relative error {err:.1e}",
                        {"relative_error": err, "carried": True}))
    return rows


def audit_session(setup: Setup, sid: str, exs: list, attacks: list[str], args) -> list[Row]:
    truth = None
    if setup.run_data is not None:
        truth = setup.run_data.match(exs)
        if not truth.batches:
            truth = None  # another edge's session, or a run other than this capture's
    rows = token_rows(setup, sid, exs, attacks, args, truth) + bag_rows(setup, sid, exs, attacks, args, truth)
    rows += label_rows(sid, exs, attacks, truth)
    if any(a in L.ATTACKS for a in attacks) and not any(ex.of_kind("output_grad") for ex in exs):
        rows.append(Row(sid, "labels", "labels", "does not apply: no training step in this session"))
    scored = setup if truth is not None else Setup(setup.model, setup.tokenizer, setup.k, None)
    if "adapter" in attacks and any(ex.of_kind("lora_reply") for ex in exs):
        rows += adapter_rows(scored, sid, exs)
    elif "adapter" in attacks and any(ex.begin.lora_weights for ex in exs):
        rows += carried_rows(scored, sid, exs)
    elif "adapter" in attacks:
        rows.append(Row(sid, "adapter", "ΔW", "does not apply: no LoRA exchange in this session (split mode)"))
    if setup.cfg is not None:
        matched = 0 if truth is None else len(truth.batches)
        rows.append(Row(sid, "-", f"the run's batches matched to {matched} of {len(exs)} exchanges", "",
                        {"matched": matched, "exchanges": len(exs)}))
    return rows


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
    if k is not None and "learned" in args.attack_list:
        from privacy.audit.learned import InverterSettings, train_inverter
        noise = cfg.noise if cfg is not None else None  # the adaptive attacker knows the run's recipe
        settings = InverterSettings(steps=args.inverter_steps, sigma=noise.sigma if noise else 0.0,
                                    clip=noise.clip if noise else None)
        setup.inverter = train_inverter(model, tok, k, settings, log=lambda m: print(m, flush=True))
    if k is not None and cfg is not None and any(a in BAG.ATTACKS for a in args.attack_list):
        task = T.resolve_task(cfg.data.task, cfg.data.task_file)  # the adaptive attacker knows the template recipe
        setup.bag = BAG.train_bag(model, tok, task, k, cfg.noise.template_only, steps=args.inverter_steps,
                                  log=lambda m: print(m, flush=True))
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
