"""The rows of `tandem audit`'s table, one session of a capture at a time: each attack that applies to what the session
sent (tokens, the text's words as a set, labels, the adapter), scored against the run's truth where it is known.

`Setup` holds what every session's attacks share (the attacker's model, the cut, the dictionary, the trained decoders,
the run's rebuilt batches); `audit_session` gives one session's rows. cli/audit.py builds the setup and prints them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from privacy.audit import bag as BAG, labels as L, tokens as TK


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


__all__ = ["Row", "Setup", "audit_session", "token_steps"]
