"""The inversion audit on the tiny random Llama: exact where it must be exact, near chance under huge noise."""
from __future__ import annotations

import pytest
import torch

from model.load import load_model
from privacy.audit import inversion as A

VOCAB = 320


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama").model


@pytest.fixture(scope="module")
def probe():
    """8 random 'sentences' of 12..24 tokens, right-padded; the first 2 tokens play the public template."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (8, 24), generator=g)
    lengths = torch.tensor([24, 20, 12, 24, 17, 22, 13, 24])
    mask = (torch.arange(24)[None] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0
    private = mask.bool().clone()
    private[:, :2] = False
    return A.Probe(ids, mask, private)


def test_hidden_after_is_transformers_hidden_states(tiny, probe):
    full = tiny.model(input_ids=probe.input_ids, attention_mask=probe.attention_mask, output_hidden_states=True)
    got = A.hidden_after(tiny, probe.input_ids, probe.attention_mask, [0, 1, 3])
    for k in (0, 1, 3):
        torch.testing.assert_close(got[k], full.hidden_states[k])
    assert tiny.config.num_hidden_layers == 6  # restored after the truncated run
    torch.testing.assert_close(got[0], tiny.get_input_embeddings()(probe.input_ids))


def test_candidates_see_only_their_context(tiny, probe):
    """Token t placed at position t after the true context[:t] gets exactly the hidden state the plain forward gave."""
    obs = A.observed_hidden(tiny, probe, [1, 3])
    b, T = 1, int(probe.attention_mask[1].sum())
    positions = torch.arange(T).flip(0)  # order does not matter: candidates do not see each other
    got = A.candidate_hidden(tiny, probe.input_ids[b, :T], positions, probe.input_ids[b, positions], [1, 3])
    for k in (1, 3):
        torch.testing.assert_close(got[k], obs[k][b, positions], atol=1e-5, rtol=1e-5)
    # a wrong token at one position changes that candidate's hidden state, and only that one
    wrong = probe.input_ids[b, positions].clone()
    wrong[4] = (wrong[4] + 1) % VOCAB
    moved = A.candidate_hidden(tiny, probe.input_ids[b, :T], positions, wrong, [3])[3]
    changed = (moved - got[3]).abs().amax(-1) > 1e-4
    assert changed.tolist() == [j == 4 for j in range(T)]


def test_dictionary_at_k0_is_the_embedding_table(tiny):
    d = A.build_dictionary(tiny, torch.tensor([5, 6, 7]), [0, 2], chunk=100)
    torch.testing.assert_close(d.table[0], tiny.get_input_embeddings().weight)
    assert d.table[2].shape == (VOCAB, 64)
    sub = A.build_dictionary(tiny, torch.tensor([5, 6, 7]), [2], vocab=torch.tensor([9, 40, 300]))
    torch.testing.assert_close(sub.table[2], d.table[2][[9, 40, 300]], atol=1e-5, rtol=1e-5)


def test_raw_embeddings_are_recovered_exactly_and_huge_noise_leaves_chance(tiny, probe):
    res = A.run_audit(tiny, probe, ks=[0], sigmas=[0.0, 1000.0], attacks=("nearest",))
    clean, noisy = res
    assert (clean.k, clean.sigma_rel, clean.attack) == (0, 0.0, "nearest")
    assert clean.total == probe.n_private == 140
    assert clean.recovered == clean.total  # 100 %
    assert noisy.rate < 0.05  # chance is 1/320; 140 guesses at chance give 7+ hits with probability < 1e-5


def test_in_context_attack_is_exact_when_the_truth_is_shortlisted(tiny, probe):
    """With the true token among the candidates and enough rounds, verification by running the blocks finds it."""
    k = 2
    obs = A.observed_hidden(tiny, probe, [k])[k]
    truth = probe.input_ids[probe.private]
    g = torch.Generator().manual_seed(1)
    shortlist = torch.randint(3, VOCAB, (truth.numel(), 6), generator=g)
    slot = torch.randint(1, 6, (truth.numel(),), generator=g)  # never first: the start guess is wrong
    shortlist[torch.arange(truth.numel()), slot] = truth
    shortlist[:, 0] = torch.where(shortlist[:, 0] == truth, (truth + 1) % VOCAB, shortlist[:, 0])
    one = A.in_context_attack(tiny, probe, obs, k, shortlist, rounds=1)
    exact = A.in_context_attack(tiny, probe, obs, k, shortlist, rounds=int(probe.private.sum(1).max()))
    assert (exact == truth).all()
    assert (one == truth).float().mean() > 0.5  # most positions are found in the first round already


def test_run_audit_reports_every_combination(tiny, probe):
    d = A.build_dictionary(tiny, torch.tensor([5]), [1, 2])
    res = A.run_audit(tiny, probe, ks=[1, 2], sigmas=[0.0, 0.5], attacks=A.ATTACKS, dictionary=d, candidates=4)
    assert [(r.k, r.sigma_rel, r.attack) for r in res] == [
        (k, s, a) for k in (1, 2) for s in (0.0, 0.5) for a in A.ATTACKS]
    for r in res:
        assert r.total == 140 and 0 <= r.recovered <= r.total
    with pytest.raises(ValueError, match="need a dictionary"):
        A.run_audit(tiny, probe, ks=[1], sigmas=[0.0], attacks=("dictionary",))
    with pytest.raises(ValueError, match="unknown attacks"):
        A.run_audit(tiny, probe, ks=[1], sigmas=[0.0], attacks=("magic",))


def test_vocab_of_tokenizes_mid_prompt():
    assert A.vocab_of(CharTokenizer(), ["ba", "ab c"]).tolist() == [ord(" "), ord("a"), ord("b"), ord("c")]


class CharTokenizer:
    """Characters as tokens, with offsets and right padding: enough of a HF tokenizer for make_probe."""

    def __call__(self, texts, add_special_tokens=False, return_offsets_mapping=False, padding=False,
                 return_tensors=None):
        if return_tensors is None:
            return {"input_ids": [[ord(c) for c in t] for t in texts]}
        T = max(len(t) for t in texts)
        ids = torch.zeros(len(texts), T, dtype=torch.long)
        mask = torch.zeros(len(texts), T, dtype=torch.long)
        offsets = torch.zeros(len(texts), T, 2, dtype=torch.long)
        for i, t in enumerate(texts):
            ids[i, :len(t)] = torch.tensor([ord(c) for c in t])
            mask[i, :len(t)] = 1
            offsets[i, :len(t), 0] = torch.arange(len(t))
            offsets[i, :len(t), 1] = torch.arange(len(t)) + 1
        return {"input_ids": ids, "attention_mask": mask, "offset_mapping": offsets}


def test_make_probe_marks_exactly_the_fields():
    p = A.make_probe("Q: {a} / {b}!", [{"a": "xy", "b": "z"}, {"a": "hello", "b": "w"}], CharTokenizer())
    text = "Q: hello / w!"
    assert "".join(chr(c) for c in p.input_ids[1].tolist()) == text
    assert "".join(text[i] for i in p.private[1].nonzero().flatten().tolist()) == "hellow"
    assert "".join("Q: xy / z!"[i] for i in p.private[0].nonzero().flatten().tolist()) == "xyz"
    assert not p.private[0, 10:].any()  # padding is never private
    assert p.n_private == 9
