"""--noise-template-only (privacy/defences/template.py): the cloud gets the template's positions only; and the bag
attack (privacy/audit/bag.py) that reads the text's words from what it does get."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import tasks as T
from edge.config import EdgeConfig
from edge.methods import check_task_defences
from privacy.audit import bag as BAG
from privacy.audit.inversion import make_probe
from privacy.defences.template import keep_public, public_positions, template_ids
from tests.conftest import make_edge, randomize_lora_b, sst2_batches

SST2 = T.TASKS["sst2"]


def test_the_public_positions_are_the_template_literals():
    tok = T.tiny_tokenizer()  # one token per character
    prefix, suffix = template_ids(SST2.template, tok)
    assert len(prefix) == len("Review: ") and len(suffix) == len(SST2.template.split("}")[1])
    examples = T.load_split("sst2", "train")[:6]
    batch = T.collate(SST2, T.encode(SST2, examples, tok), 0)  # max_len 96: some prompts lose their start
    public = public_positions(batch.input_ids, batch.attention_mask, prefix, suffix)
    cut = [len(SST2.prompt(ex)) > SST2.max_len for ex in examples]
    assert 0 < sum(cut) < len(cut)
    for row, n, was_cut in zip(public, batch.attention_mask.sum(1).tolist(), cut):
        want = torch.zeros_like(row)
        want[:0 if was_cut else len(prefix)] = True  # a cut prompt has no template prefix left to send
        want[n - len(suffix):n] = True
        assert torch.equal(row, want)
    # a token where the text and the template merge counts as the text's
    ids = torch.tensor([[7, 8, 99, 5, 6, 0], [7, 3, 4, 6, 0, 0]])
    got = public_positions(ids, (ids > 0).long(), [7, 8, 9], [5, 6])
    assert got.tolist() == [[True, True, False, True, True, False], [True, False, False, True, False, False]]


@pytest.mark.slow
def test_on_smollm2_the_public_positions_are_exactly_the_non_private_ones():
    """With SmolLM2's tokenizer the positions sent are the complement of the review's tokens as the audit finds
    them from character offsets (inversion.make_probe), on 200 dev examples."""
    from model.load import load_tokenizer
    tok = load_tokenizer("smollm2")
    examples = T.load_split("sst2", "dev")[:200]
    batch = T.collate(SST2, T.encode(SST2, examples, tok), tok.pad_token_id)
    public = public_positions(batch.input_ids, batch.attention_mask, *template_ids(SST2.template, tok))
    probe = make_probe(SST2.template, examples, tok)
    assert torch.equal(probe.input_ids, batch.input_ids[:, :probe.input_ids.shape[1]])
    real = batch.attention_mask.bool()
    assert torch.equal(public | probe.private, real) and not (public & probe.private).any()
    assert public[torch.arange(len(examples)), batch.answer_pos].all()
    # prompts cut to max_len keep their end: the audit's truth finds the private positions of what was kept
    from privacy.audit.truth import _private
    short = dataclasses.replace(SST2, max_len=24)
    items = T.encode(short, examples[:32], tok)
    batch = T.collate(short, items, tok.pad_token_id)
    private, known = _private(short, tok, batch, {tuple(it["ids"]): ex for it, ex in zip(items, examples)})
    public = public_positions(batch.input_ids, batch.attention_mask, *template_ids(SST2.template, tok))
    assert known and (batch.attention_mask.sum(1) == 24).sum() > 8
    assert torch.equal(private, batch.attention_mask.bool() & ~public)


def test_keep_public_zeroes_and_masks_the_text_and_leaves_virtual_tokens():
    h = torch.randn(2, 5, 3)
    mask = torch.ones(2, 5, dtype=torch.long)
    public = torch.tensor([[True, False, True], [False, True, True]])
    out, m = keep_public(h, mask, public)  # 2 virtual tokens in front of 3 real positions
    keep = torch.tensor([[1, 1, 1, 0, 1], [1, 1, 0, 1, 1]])
    assert torch.equal(m, keep) and torch.equal(out, h * keep.unsqueeze(-1))


def test_the_edge_sends_the_template_rows_only(cloud, tiny, monkeypatch):
    """The cloud gets the same hidden state at the template's positions as without the defence, zeros at the
    text's, and a mask without them; the edge's top masks them too; the loss still reaches the bottom's LoRA."""
    em, _, link = make_edge(cloud, tiny, k=2, m=1, noise_template_only=True)
    randomize_lora_b(em.lora)
    batch = sst2_batches(1, batch_size=4)[0]
    sent = []
    real_forward = type(em.cloud).forward

    def spy(self, hidden, mask, *rest):
        sent.append((hidden.detach().clone(), mask.clone()))
        return real_forward(self, hidden, mask, *rest)
    monkeypatch.setattr(type(em.cloud), "forward", spy)
    loss, _ = em.loss(batch)
    loss.backward()
    template, em.template = em.template, None
    with torch.no_grad():
        em.hidden(batch)
    (h, mask), (plain, plain_mask) = sent
    public = public_positions(batch.input_ids, batch.attention_mask, *template)
    assert torch.equal(mask, batch.attention_mask * public) and torch.equal(plain_mask, batch.attention_mask)
    assert torch.equal(h[public], plain[public]) and h[~public].abs().max() == 0
    assert all(p.grad is not None and p.grad.abs().max() > 0 for n, p in em.lora.named_parameters()
               if ".0." in n and "lora_A" in n)
    link.close()


def test_a_task_without_literal_text_around_its_fields_is_refused(tmp_path):
    check_task_defences(EdgeConfig.of(noise_template_only=True), SST2)
    with pytest.raises(ValueError, match=r"^--noise-template-only needs a classification prompt that starts and ends "
                                         r"with literal text around its fields, and wikitext2's does not"):
        check_task_defences(EdgeConfig.of(noise_template_only=True), T.TASKS["wikitext2"])
    spec = {"name": "bare", "prompt": "{text} Intent:", "labels": ["a", "b"]}
    (tmp_path / "t.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="and bare's does not: drop --noise-template-only"):
        check_task_defences(EdgeConfig.of(noise_template_only=True), T.load_task_file(str(tmp_path / "t.json")))


def test_the_bag_decoder_names_the_tokens_present_and_the_prior_the_frequent_ones():
    """A known answer: with one-hot embeddings and identity layers every position names its own token (a small bias
    breaks ties toward low ids), so the text's tokens come back exactly where their positions were sent."""
    decoder = BAG.BagDecoder(torch.eye(10))
    decoder.norm, decoder.mlp = torch.nn.Identity(), torch.nn.Identity()
    with torch.no_grad():
        decoder.bias.copy_(-0.01 * torch.arange(10))
    ids = torch.tensor([[1, 2, 3, 3, 0, 0], [6, 7, 0, 0, 0, 0]])
    h = torch.nn.functional.one_hot(ids, 10).float()
    texts = [[torch.tensor([2, 3, 3]), torch.tensor([6, 7])]]  # row 0's token 1 is the template's
    everything = BAG.bag_attack(decoder, torch.tensor([3, 9, 2, 1]), [(h, ids > 0)], texts)
    assert everything == {"bag": (4, 4), "bag-prior": (2, 4)}  # prior: [3, 9, 2] and [3, 9]: 3 and 2 of row 0
    sent = torch.tensor([[1, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]).bool()  # 2 and 7 not sent
    assert BAG.bag_attack(decoder, torch.tensor([3]), [(h, sent)], texts)["bag"] == (2, 4)
    assert BAG.set_recovery([1, 2], torch.tensor([2, 2, 5])) == (1, 2)


def test_the_bag_attacker_trains_on_public_sentences_in_the_template(tiny):
    """The attacker's states are the base weights' after k blocks of public sentences in the task's template, sent
    as the recipe sends them; its prior counts each sentence's distinct tokens."""
    model, tok = tiny.model.eval(), T.tiny_tokenizer()
    sentences = BAG.public_sentences(8, seed=0)
    assert len(sentences) == 8 and all(s == s.lower() and "<unk>" not in s for s in sentences)
    task = dataclasses.replace(SST2, max_len=1000)  # whole prompts (the test tokenizer reads characters)
    h, sent, texts = BAG.sent_states(model, tok, task, 2, sentences[:3], template_only=True)
    prefix, suffix = template_ids(task.template, tok)
    assert sent.sum(1).tolist() == [len(prefix) + len(suffix)] * 3
    assert [t.tolist() for t in texts] == [tok(s, add_special_tokens=False)["input_ids"] for s in sentences[:3]]
    decoder, prior = BAG.train_bag(model, tok, SST2, 2, True, steps=3, batch=4)
    assert prior.numel() > 0 and decoder.bias.abs().max() > 0
    with pytest.raises(ValueError, match="one-field template; mrpc's has 2 fields"):
        BAG.sent_states(model, tok, T.TASKS["mrpc"], 2, sentences[:1], template_only=True)
