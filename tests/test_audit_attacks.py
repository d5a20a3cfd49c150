"""Each attack on a capture recovers a known answer from a real tiny-model gRPC run with no defence: the labels from
the gradients, every cloud block's ΔW from the DLoRA exchange, the tokens from the hidden state (k = 1)."""
from __future__ import annotations

import pytest
import torch

import tasks as T
from cloud.sessions import CloudConfig
from privacy.audit import adapter as AD, inversion as A, labels as L, tokens as TK
from privacy.audit.capture import exchanges, read_capture
from tasks.builtin import TASKS, Task
from tests.conftest import CloudHandle, make_edge, randomize_lora_b

pytestmark = pytest.mark.usefixtures("one_thread")

# SST-2's prompt with label words whose first characters differ: the test tokenizer reads characters, so SST-2's own
# words (" negative", " positive") would share their answer token and the label would not reach the loss
TASK = Task("sst2-chars", "classify", TASKS["sst2"].template, ["negative", "positive"], max_len=96)
STEPS = 10


def char_batches(n: int, size: int = 8) -> list[T.Batch]:
    items = T.encode(TASK, T.load_split("sst2", "train")[:n * size], T.tiny_tokenizer())
    return list(T.batches(TASK, items, size, 0, seed=0))[:n]


def short_batch() -> T.Batch:
    """2 rows of 16 tokens: 32 LoRA rows, fewer than the 64 of the input width."""
    items = T.encode(TASK, T.load_split("sst2", "train")[:2], T.tiny_tokenizer())
    return T.collate(TASK, [{**it, "ids": it["ids"][-16:]} for it in items], 0)


def run_session(handle, tiny, mode: str, batches, **kw):
    """Train through the capturing cloud, AdamW lr 1e-2; the session's exchanges and the true ΔW each step used."""
    em, _, link = make_edge(handle, tiny, cloud_lora=mode, **kw)
    if mode != "none":
        randomize_lora_b(em.lora)  # B starts at zero: ΔW = 0 would be trivially "recovered"
    opt = torch.optim.AdamW(em.lora.parameters(), lr=1e-2)
    truth = []
    for step, b in enumerate(batches):
        em.cloud.step = step
        truth.append(AD.true_weights(em.lora, em.cloud.targets, em.cloud.lora_blocks) if mode == "carried" else
                     AD.true_deltas(em.lora, em.cloud.groups, em.cloud.lora_blocks))
        loss, _ = em.loss(b)
        loss.backward()
        opt.step()
        opt.zero_grad()
    sid = link.session.session_id
    link.close()
    return [ex for ex in exchanges(read_capture(handle.service.config.capture_dir)) if ex.session == sid], truth


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    handle = CloudHandle(tiny.model, CloudConfig(max_tokens_per_step=8192, step_timeout=5.0,
                                                 capture_dir=str(tmp_path_factory.mktemp("capture"))))
    batches = char_batches(STEPS)
    try:
        out = {mode: run_session(handle, tiny, mode, batches + [short_batch()] * (mode == "edge"))
               for mode in ("none", "edge", "carried")}
        out["noised"] = run_session(handle, tiny, "none", batches[:1], noise_sigma=0.1)
    finally:
        handle.stop()
    return out, batches


@pytest.mark.parametrize("mode", ["none", "edge", "carried"])
def test_labels_come_back_from_the_gradients_the_cloud_receives(runs, mode):
    out, batches = runs
    ex = out[mode][0][:STEPS]
    truth = torch.cat([b.label for b in batches])
    assert 0.2 < truth.float().mean() < 0.8  # both classes, so balanced accuracy means something
    norm, cos, lines = L.label_attack(ex, truth)
    assert (norm.attack, cos.attack, lines.attack) == L.ATTACKS and cos.examples == lines.examples == truth.numel()
    assert cos.balanced_accuracy >= 0.95 and cos.separation == cos.balanced_accuracy
    assert norm.separation >= 0.7  # as Li et al. find: norms alone separate the classes, if less cleanly
    assert norm.balanced_accuracy in (norm.separation, pytest.approx(1 - norm.separation))
    blind = L.label_attack(ex, None, ["label-cosine"])[0]
    assert blind.balanced_accuracy is None and torch.equal(blind.predicted == blind.predicted[0],
                                                           cos.predicted == cos.predicted[0])
    with pytest.raises(ValueError, match="unknown label attacks"):
        L.label_attack(ex, truth, ["label-magic"])


def test_the_lines_attack_reads_labels_through_a_sign_and_scale_mask():
    """Two classes on two lines (a shared part plus or minus a label part, as p - onehot(y) gives), each gradient
    times a random sign and scale: the cosine attack is at chance, the sign-blind lines attack reads every label."""
    from privacy.defences.labels import mask_factors, per_row
    g = torch.Generator().manual_seed(0)
    n, width = 400, 32
    label = torch.randint(0, 2, (n,), generator=g)
    shared, part = torch.randn(width, generator=g), torch.randn(width, generator=g)
    grads = shared + (2 * label - 1)[:, None] * part + 0.05 * torch.randn(n, width, generator=g)
    masked = grads * per_row(mask_factors(n, 4.0, g), grads)
    cos = L.split(L.cosine_scores([masked]), 0.0, int(label[0]))
    assert abs(L.balanced_accuracy(cos, label) - 0.5) < 0.1
    lines = L.split(L.lines_scores([masked]), 0.0, int(label[0]))
    assert L.balanced_accuracy(lines, label) == 1.0


def test_the_adapter_comes_back_from_the_dlora_exchange(runs):
    ex, truth = runs[0]["edge"]
    res = AD.adapter_attack(ex, after=(1, 2, 10), truth=truth)
    assert [r.after for r in res] == [1, 2, 10]
    for r in res:
        assert (r.exchanges, r.width, r.rank) == (1, 64, 64) and r.rows >= 64  # one step's rows determine ΔW
        assert r.relative_error < 1e-4
    assert len(AD.fit(ex[:1]).delta) == len(truth[0]) == 4 * 2  # q and v of the 4 cloud blocks
    # the map moves at every update: the rows of two steps together fit neither
    assert AD.relative_error(AD.fit(ex[:2]).delta, truth[1]) > 0.1
    # 32 rows for a 64-wide input: the fit is not determined and misses the part of ΔW the rows never saw
    short = AD.fit(ex[STEPS:])
    assert short.rows == 32 and not short.determined and AD.relative_error(short.delta, truth[STEPS]) > 0.1
    assert AD.relative_error(short.delta, {k: torch.zeros_like(v) for k, v in truth[STEPS].items()}) is None


def test_the_carried_mode_hands_the_adapter_over(runs):
    ex, truth = runs[0]["carried"]
    res = AD.carried_attack(ex, after=(1, 2, 10), truth=truth)
    assert [(r["after"], r["blocks"], r["targets"], r["relative_error"]) for r in res] == [
        (n, 4, 2, 0.0) for n in (1, 2, 10)]  # read, not fitted: exactly the edge's A and B of each step
    assert AD.weights_error(AD.carried_weights(ex[1]), truth[0]) > 0.01  # the weights move at every update
    assert AD.adapter_attack(ex) == []  # no LoRA exchange to fit


def test_tokens_come_back_from_the_hidden_state_and_the_attacker_can_check_them(runs, tiny):
    out, batches = runs
    ex = out["none"][0][:1]  # step 0: the edge's LoRA B is still zero, its block 0 is the base model's
    ids = batches[0].input_ids
    prefix = torch.tensor(T.tiny_tokenizer()("Review:")["input_ids"])
    dictionary = A.build_dictionary(tiny.model, prefix, [1])
    dic, ctx = TK.token_attack(tiny.model, ex, 1, dictionary, ["dictionary", "in-context"], truth=[ids])
    real = int(batches[0].attention_mask.sum())
    for r in (dic, ctx):
        assert (r.positions, r.recovered, r.confirmed, r.private_known) == (real, real, real, False)
    blind = TK.token_attack(tiny.model, ex, 1, dictionary, ["dictionary"])[0]
    assert (blind.confirmed, blind.recovered, blind.rate) == (real, None, None)
    private = batches[0].attention_mask.bool().clone()
    private[:, :8] = False  # "Review: " is public
    part = TK.token_attack(tiny.model, ex, 1, dictionary, ["dictionary"], truth=[ids], private=[private])[0]
    assert part.positions == real - 8 * len(ids) == part.recovered and part.private_known
    with pytest.raises(ValueError, match="need the true tokens"):
        TK.token_attack(tiny.model, ex, 1, dictionary, private=[private])


def test_a_decoder_trained_on_public_text_reads_the_tokens_through_the_noise_it_was_trained_under(runs, tiny):
    """The learned attack: 150 steps on WikiText-2 through the base block 0, under the run's recipe (sigma 0.1 x
    RMS, fresh noise each step), then the noised capture's tokens."""
    from privacy.audit.learned import InverterSettings, train_inverter
    out, batches = runs
    inverter = train_inverter(tiny.model, T.tiny_tokenizer(), 1, InverterSettings(steps=150, sigma=0.1))
    r = TK.token_attack(tiny.model, out["noised"][0], 1, None, ["learned"], truth=[batches[0].input_ids],
                        inverter=inverter)[0]
    assert r.attack == "learned" and r.positions == int(batches[0].attention_mask.sum()) and r.rate > 0.8
    with pytest.raises(ValueError, match="needs a trained inverter"):
        TK.token_attack(tiny.model, out["noised"][0], 1, None, ["learned"])


def test_noise_hides_nothing_from_the_dictionary_here_but_defeats_the_check(runs, tiny):
    """sigma = 0.1 x RMS: the guesses stay right, yet no re-encoded guess lands within 1 % of a noised state, so
    `confirmed` says nothing about such a capture."""
    out, batches = runs
    ex = out["noised"][0]
    prefix = torch.tensor(T.tiny_tokenizer()("Review:")["input_ids"])
    r = TK.token_attack(tiny.model, ex, 1, A.build_dictionary(tiny.model, prefix, [1]), ["dictionary"],
                        truth=[batches[0].input_ids])[0]
    assert r.rate > 0.9 and r.confirmed_rate < 0.05
