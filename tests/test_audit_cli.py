"""`tandem audit`: a real `tandem edge train` run (DLoRA, tiny model) through a capturing cloud, audited from the
command line with and without the run's folder; bad input is one line and exit status 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import tasks as T
from cli.main import main
from cloud.sessions import CloudConfig
from privacy.audit.truth import _Cursor
from tests.cli_helpers import refused
from tests.conftest import TOKENS, CloudHandle

pytestmark = pytest.mark.usefixtures("one_thread")

# label words with different first characters: the test tokenizer reads characters (see test_audit_attacks.py)
TASK = {"name": "sentiment", "prompt": "Review: {sentence}\nAnswer: ", "labels": ["negative", "positive"],
        "max_len": 96}
STEPS, BATCH, DEV = 6, 4, 8


def tsv(path, examples):
    path.write_text("sentence\tlabel\n" + "".join(f"{e['sentence']}\t{e['label']}\n" for e in examples))
    return str(path)


def train_run(tiny, d, mode: str, *extra: str):
    """(capture folder, run folder) of a 6-step run through a capturing cloud, evaluated before and after on 8 dev
    examples."""
    handle = CloudHandle(tiny.model, CloudConfig(max_tokens_per_step=8192, step_timeout=5.0,
                                                 capture_dir=str(d / "capture")))
    (d / "task.json").write_text(json.dumps(TASK))
    sst2 = T.load_split("sst2", "train")
    try:
        main(["edge", "train", "--cloud", handle.address, "--token", TOKENS["alice"], "--model", "tiny-llama",
              "--no-progress", "--cloud-lora", mode, "--steps", str(STEPS), "--batch-size", str(BATCH), "--lr",
              "0.01", "--eval-examples", str(DEV), "--out-dir", str(d / "run"), "--task-file", str(d / "task.json"),
              "--train-file", tsv(d / "train.tsv", sst2[:STEPS * BATCH]), "--dev-file", tsv(d / "dev.tsv",
                                                                                          sst2[100:100 + DEV]), *extra])
    finally:
        handle.stop()
    return d / "capture", d / "run"


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    return train_run(tiny, tmp_path_factory.mktemp("dlora"), "edge")


def audit(capsys, *argv) -> tuple[str, dict]:
    capsys.readouterr()
    main(["audit", *map(str, argv), "--model", "tiny-llama", "--inverter-steps", "50"])
    out = capsys.readouterr().out.strip().splitlines()
    return "\n".join(out[:-1]), json.loads(out[-1])


def by_attack(figures: dict) -> dict:
    return {(r["attack"], r.get("after")): r for r in figures["results"]}


def test_audit_with_the_run_scores_every_attack_against_what_the_edge_sent(trained, capsys, tmp_path):
    capture, run = trained
    table, figures = audit(capsys, capture, "--run", run, "--out", tmp_path / "audit.json")
    assert json.loads((tmp_path / "audit.json").read_text()) == figures
    assert (figures["k"], figures["sessions"]) == (1, 1)
    r = by_attack(figures)
    assert r[("-", None)]["matched"] == r[("-", None)]["exchanges"] == STEPS + 2  # every step and both evaluations
    for a in ("dictionary", "in-context"):  # the first 2 training steps, no defence, k = 1
        # the second step's hidden state came through the edge's own LoRA, updated once: right guesses, some of
        # which the attacker's base-weight check cannot confirm
        assert r[(a, None)]["recovered"] == 1.0 and 0 < r[(a, None)]["confirmed"] < 1.0
        assert r[(a, None)]["private_known"] is False  # the test tokenizer gives no offsets: every real position
    assert r[("bag", None)]["distinct"] == r[("bag-prior", None)]["distinct"] > 0  # the same rows' words, as sets
    assert 0 <= r[("bag-prior", None)]["recovered"] <= 1
    assert r[("label-cosine", None)]["examples"] == STEPS * BATCH
    assert r[("label-cosine", None)]["balanced_accuracy"] >= 0.9
    assert r[("adapter", None)]["relative_error"] < 1e-4  # the evaluation after training used the run's adapter
    assert r[("adapter", 1)]["rank"] == r[("adapter", 1)]["width"] == 64
    lines = table.splitlines()
    assert lines[0].split() == ["session", "attack", "target", "recovery"]
    assert any("dictionary" in ln and "exact 100.0%" in ln and "which are private: unknown" in ln for ln in lines)


def test_audit_of_the_capture_alone_says_what_it_cannot_score(trained, capsys):
    capture, _ = trained
    table, figures = audit(capsys, capture, "--attacks", "dictionary,label-cosine,adapter", "--k", "1")
    r = by_attack(figures)
    assert r[("dictionary", None)]["recovered"] is None and r[("dictionary", None)]["confirmed"] > 0
    assert r[("label-cosine", None)]["balanced_accuracy"] is None and "give --run" in table
    assert ("adapter", None) not in r and r[("adapter", 2)]["rank"] == 64
    default_table, default = audit(capsys, capture)
    assert {x["attack"] for x in default["results"]} == {"dictionary", "in-context", "learned", "bag", "bag-prior",
                                                         "label-norm", "label-cosine", "label-lines", "adapter"}
    assert "skipped: needs the cut and the run (--run)" in default_table
    assert default["k"] == 1  # the cut, from the settings the cloud recorded when the session opened
    assert all(x["positions"] > 0 for x in default["results"] if x["attack"] == "dictionary")


def test_audit_of_a_carried_run_reads_the_adapter_it_was_handed(tiny, tmp_path, capsys):
    capture, run = train_run(tiny, tmp_path, "carried")
    table, figures = audit(capsys, capture, "--run", run, "--attacks", "adapter")
    r = by_attack(figures)
    assert [r[("adapter", n)]["blocks"] for n in (1, 2)] == [4, 4] and "exactly as sent" in table
    assert r[("adapter", None)] == {**r[("adapter", None)], "relative_error": 0.0, "carried": True}


def test_a_template_only_run_is_matched_by_the_mask_it_sent(tiny, tmp_path, capsys):
    """--noise-template-only sends masks with the text's positions out: the audit rebuilds them from the run's
    settings to match every exchange, and the attacks read only the positions sent."""
    capture, run = train_run(tiny, tmp_path, "none", "--noise-template-only", "--k", "2")
    _, figures = audit(capsys, capture, "--run", run, "--attacks", "dictionary,bag,bag-prior", "--token-steps-at",
                       "last")
    r = by_attack(figures)
    assert r[("-", None)]["matched"] == r[("-", None)]["exchanges"] == STEPS + 2
    from privacy.audit.capture import exchanges, read_capture
    from privacy.audit.tokens import observed
    last = [ex for ex in exchanges(read_capture(capture)) if ex.train][-2:]
    sent = [observed(ex)[1] for ex in last]
    assert r[("dictionary", None)]["positions"] == sum(int(m.sum()) for m in sent)  # private unknown: all sent
    assert all((observed(ex)[0][~m.bool()] == 0).all() for ex, m in zip(last, sent))
    assert r[("bag", None)]["distinct"] == r[("bag-prior", None)]["distinct"] > 0


def test_bad_audit_input_is_one_line(trained, capsys, tmp_path):
    capture, _ = trained
    base = ["audit", "--model", "tiny-llama"]
    refused(capsys, [*base, str(tmp_path / "missing")], r"no capture at .*missing")
    refused(capsys, [*base, str(capture), "--attacks", "dictionary,magic"], r"unknown attack 'magic'; --attacks takes")
    bare = tmp_path / "bare"  # a capture without the session's settings (the file next to it removed)
    bare.mkdir()
    for f in Path(capture).glob("*.capture"):
        (bare / f.name).write_bytes(f.read_bytes())
    refused(capsys, [*base, str(bare), "--attacks", "dictionary"], r"need the cut.*--k or --run")
    refused(capsys, [*base, str(capture), "--run", str(tmp_path)], r"holds no run: no config.json")
    (tmp_path / "x.capture").write_bytes(b"garbage")
    refused(capsys, [*base, str(tmp_path)], r"is not a Tandem capture")


def test_exchanges_match_the_next_batch_or_the_last_again():
    """A replayed step carries the last batch again; an exchange no batch explains moves nothing."""
    import torch
    masks = [torch.tensor([[1, 1, 0]]), torch.tensor([[1, 0, 0]]), torch.tensor([[1, 1, 1]])]
    batches = [T.Batch(torch.zeros(1, 3, dtype=torch.long), m) for m in masks]
    cur = _Cursor(lambda: iter(batches))
    seen = [cur.take(m.bool()) for m in (masks[0], masks[0], masks[2], masks[1], masks[2], masks[0])]
    index = [next((i for i, b in enumerate(batches) if b is x), None) for x in seen]
    assert index == [0, 0, None, 1, 2, 0]  # then the dev set again from the top


def test_the_token_attacks_read_the_first_or_the_last_training_steps(trained, capsys):
    """The first step's hidden state is the base weights' (PEFT starts B at zero): every dictionary guess is confirmed
    by re-running them. The last step's came through the edge's LoRA trained 5 times at lr 0.01: the guesses are
    still right, but the base-weight check confirms none of them, the shift a learned defence would make."""
    capture, run = trained
    figures = {}
    for at in ("first", "last"):
        _, f = audit(capsys, capture, "--run", run, "--attacks", "dictionary", "--token-steps", "1",
                     "--token-steps-at", at)
        figures[at] = by_attack(f)[("dictionary", None)]
        assert f"1 {at} training steps" in figures[at]["target"]
    assert figures["first"]["confirmed"] == 1.0 and figures["first"]["recovered"] == 1.0
    assert figures["last"]["confirmed"] < 0.5 and figures["last"]["recovered"] > 0.95
