"""The adaptive attacker's shadow run (privacy/audit/shadow.py) on the tiny model: its k blocks send what the edge's
trained blocks send, its public data leaves out exactly what the victim drew, and a recipe that differs is refused."""
from __future__ import annotations

import json

import pytest
import torch

import tasks as T
from model.load import load_model
from privacy.audit import inversion as A
from privacy.audit.capture import exchanges, read_capture
from privacy.audit.shadow import Shadow, drawn_examples, write_public_file
from privacy.audit.truth import RunData, run_config
from protocol.tensors import decode
from tests.cli_helpers import refused
from tests.test_audit_cli import BATCH, STEPS, audit, by_attack, train_run, tsv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def victim(tiny, tmp_path_factory):
    """A frozen-split run at k = 2 whose edge LoRA trained 6 steps at lr 0.01, through a capturing cloud."""
    return train_run(tiny, tmp_path_factory.mktemp("victim"), "none", "--k", "2")


@pytest.fixture(scope="module")
def attacker():
    loaded = load_model("tiny-llama")
    return loaded.model.eval(), loaded.tokenizer or T.tiny_tokenizer()


def test_the_shadow_of_a_run_sends_what_that_run_sent_after_training(victim, attacker):
    """Known answer: a run standing as its own shadow. The evaluation after training ran the final adapter, so the
    shadow's k blocks reproduce its forward-only exchanges; the base weights do not (the LoRA moved them)."""
    capture, run = victim
    model, tok = attacker
    cfg = run_config(run)
    exs = exchanges(read_capture(capture))
    truth = RunData(cfg, tok).match(exs)
    last_train = max(i for i, ex in enumerate(exs) if ex.train)
    after = [i for i in truth.batches if i > last_train]
    assert after  # the evaluation after training
    shadow = Shadow(run, model, tok, victim=cfg)
    for i in after:
        b = truth.batches[i]
        sent = decode(exs[i].begin.hidden).float()
        real = b.attention_mask.bool()
        mine = shadow.states(b.input_ids, b.attention_mask).float()
        base = A.hidden_after(model, b.input_ids, b.attention_mask, [2])[2].float()
        assert torch.allclose(mine[real], sent[real], atol=1e-5, rtol=1e-4)
        assert (base[real] - sent[real]).abs().max() > 1e-3
    # the hooks came off: the attacker's model is the base weights again
    again = A.hidden_after(model, b.input_ids, b.attention_mask, [2])[2].float()
    assert torch.equal(again, base)


def test_the_public_file_leaves_out_exactly_what_the_victim_drew(victim, attacker, tmp_path):
    capture, run = victim
    model, tok = attacker
    cfg = run_config(run)
    exs = exchanges(read_capture(capture))
    truth = RunData(cfg, tok).match(exs)
    data = RunData(cfg, tok)
    sent = [data.text_of[tuple(row[:int(n)].tolist())] for i in sorted(truth.batches) if exs[i].train
            for row, n in zip(truth.batches[i].input_ids, truth.batches[i].attention_mask.sum(1))]
    assert drawn_examples(cfg, tok) == sent  # the trainer's order, every training step's rows
    more = T.load_split("sst2", "train")[:40]  # a larger file: 6 steps of 4 draw 24 of its 40
    cfg.data.train_file = tsv(tmp_path / "more.tsv", more)
    drawn = drawn_examples(cfg, tok)
    assert len(drawn) == STEPS * BATCH
    n = write_public_file(cfg, tok, tmp_path / "public.jsonl")
    public = [json.loads(line) for line in (tmp_path / "public.jsonl").read_text().splitlines()]
    key = lambda ex: (ex["sentence"], ex["label"])  # noqa: E731
    assert n == len(public) == 40 - len({key(e) for e in drawn})
    assert not {key(e) for e in public} & {key(e) for e in drawn}
    assert {key(e) for e in public} | {key(e) for e in drawn} == {key(e) for e in more}
    assert (tmp_path / "public.jsonl").stat().st_mode & 0o777 == 0o600


def test_audit_with_a_shadow_and_a_shadow_of_another_recipe(victim, tiny, tmp_path, capsys):
    capture, run = victim
    _, figures = audit(capsys, capture, "--run", run, "--shadow", run, "--attacks", "learned,bag",
                       "--token-steps-at", "last")
    r = by_attack(figures)
    assert r[("learned", None)]["positions"] > 0 and 0 <= r[("learned", None)]["recovered"] <= 1
    assert r[("bag", None)]["distinct"] > 0
    _, other = train_run(tiny, tmp_path, "none", "--k", "1")  # the recipe at another cut
    refused(capsys, ["audit", str(capture), "--model", "tiny-llama", "--run", str(run), "--shadow", str(other),
                     "--attacks", "learned"], r"does not share the victim's recipe \(k: 2 vs 1\).*victim's flags")
