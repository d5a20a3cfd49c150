"""DLoRA Kill & Revive: a killed module sends nothing and is not updated; the policy kills and revives."""
from __future__ import annotations

import pytest
import torch

from edge.killrevive import KillRevive, KRConfig
from tests.conftest import make_edge, randomize_lora_b, sst2_batches
from tests.test_bytes import expected_payload


def site_weights(em, b):
    return [p.detach().clone() for t in em.lora.cfg.targets for p in em.lora.site(b, t).parameters()]


def test_killed_module_costs_no_bytes_and_is_not_updated(cloud, tiny, tmp_path):
    em, _, link = make_edge(cloud, tiny, cloud_lora="edge")
    randomize_lora_b(em.lora)
    assert em.cloud.lora_blocks == [1, 2, 3, 4]
    em.cloud.killed = {2, 3}
    before = {b: site_weights(em, b) for b in em.cloud.lora_blocks}
    opt = torch.optim.AdamW(em.lora.parameters(), lr=1e-2)
    for batch in sst2_batches(2):
        opt.zero_grad(set_to_none=True)
        loss, _ = em.loss(batch)
        loss.backward()
        opt.step()
        tr = em.cloud.last_traffic
        B, T = batch.input_ids.shape
        assert (tr.payload_up, tr.payload_down) == expected_payload(B, T, "edge", "fp32", "fp32", [1, 4])
        assert tr.messages_down == 2 + 2 * 2
    em.cloud.killed = {1, 2, 3, 4}  # all killed: the step is a frozen-cloud step, no LoRA traffic at all
    batch = sst2_batches(1)[0]
    loss, _ = em.loss(batch)
    loss.backward()
    B, T = batch.input_ids.shape
    assert (em.cloud.last_traffic.payload_up, em.cloud.last_traffic.payload_down) == \
        expected_payload(B, T, "edge", "fp32", "fp32", [])
    assert em.cloud.last_traffic.messages_down == 2
    for b in (2, 3):  # killed: untouched
        assert all(torch.equal(x, y) for x, y in zip(before[b], site_weights(em, b)))
    for b in (1, 4):  # active: trained
        assert not all(torch.equal(x, y) for x, y in zip(before[b], site_weights(em, b)))
    # killed modules stay in the saved adapter, with their weights
    em.lora.save_peft(tmp_path / "a")
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"
    assert torch.equal(saved[key], em.lora.site(2, "q_proj").lora_B.weight.detach())
    link.close()


class FakeEdge:
    """Just enough of an EdgeModel for the policy: LoRA weights we move by hand, and a RemoteCloud.killed slot."""

    def __init__(self, cloud, tiny):
        self.em, _, self.link = make_edge(cloud, tiny, cloud_lora="edge")
        self.lora, self.cloud = self.em.lora, self.em.cloud


def test_policy_kills_slow_modules_keeps_a_floor_and_revives(cloud, tiny):
    fake = FakeEdge(cloud, tiny)
    kr = KillRevive([1, 2, 3, 4], KRConfig(warmup=3, threshold=0.5, min_active=0.5, revive_every=10, probe_steps=1,
                                           signal="update"))
    speeds = {1: 1.0, 2: 0.01, 3: 0.02, 4: 0.9}  # blocks 2 and 3 barely learn
    for step in range(12):
        kr.before_step(fake, step, last_loss=1.0)
        with torch.no_grad():
            for b in [1, 2, 3, 4]:
                if b not in kr.killed:
                    for p in fake.lora.site(b, "q_proj").parameters():
                        p.add_(speeds[b] * 0.01 * torch.ones_like(p))
        if step in (5, 9, 11):
            assert kr.killed == {2, 3}, (step, kr.killed, kr.score)
            assert fake.cloud.killed == {2, 3}
    assert kr.history[10] == [1, 2, 3, 4]  # step 10: revived to be measured again
    assert kr.history[2] == [1, 2, 3, 4]  # warmup: nobody killed
    assert 0.5 < kr.active_fraction() < 1


def test_grad_signal_kills_the_modules_with_small_gradients(cloud, tiny):
    """The grad signal: a block's score is its LoRA gradient norm, read while active; killed blocks keep theirs."""
    fake = FakeEdge(cloud, tiny)
    kr = KillRevive([1, 2, 3, 4], KRConfig(warmup=2, threshold=1.0, min_active=0.5, revive_every=100, ema=0.0,
                                           signal="grad"))
    grads = {1: 2.0, 2: 0.1, 3: 0.05, 4: 1.0}
    for step in range(5):
        kr.before_step(fake, step, last_loss=1.0)
        for b in [1, 2, 3, 4]:  # what a step's backward leaves: gradients on the active blocks only
            for p in fake.lora.site(b, "q_proj").parameters():
                p.grad = None if b in kr.killed else torch.full_like(p, grads[b])
    q = fake.lora.site(1, "q_proj")
    per_unit = sum(p.numel() for p in q.parameters()) ** 0.5
    assert abs(kr.score[1] - 2.0 * per_unit) < 1e-3 * per_unit
    assert kr.killed == {2, 3} and fake.cloud.killed == {2, 3}
    assert kr.history[1] == [1, 2, 3, 4] and kr.history[2] == [1, 4]
    with pytest.raises(ValueError, match="signal"):
        KillRevive([1], KRConfig(signal="loss"))


def test_loss_rise_revives_everything(cloud, tiny):
    fake = FakeEdge(cloud, tiny)
    kr = KillRevive([1, 2, 3, 4], KRConfig(warmup=0, threshold=10.0, min_active=0.25, revive_every=1000,
                                           probe_steps=0, ema=0.0, loss_ema=0.0, signal="update"))
    for step in range(3):
        kr.before_step(fake, step, last_loss=1.0)
        with torch.no_grad():
            for b in [1, 2, 3, 4]:
                for p in fake.lora.site(b, "v_proj").parameters():
                    p.add_(b * 0.01)
    assert len(kr.killed) == 3  # threshold 10x the mean kills all but the floor of one
    kr.before_step(fake, 3, last_loss=2.0)  # the loss jumps: the killed modules are missed
    assert kr.killed == set()


def test_training_with_kr_and_int8_wire(cloud, tiny, tmp_path):
    from edge.trainer import EdgeConfig, train
    from tests.conftest import TOKENS
    import copy
    cfg = EdgeConfig.of(cloud=cloud.address, token=TOKENS["alice"], model="tiny-llama", cloud_lora="edge", kr=True,
                        kr_warmup=2, kr_revive_every=5, steps=12, batch_size=4, eval_examples=8, lr=1e-2,
                        wire_up="int8", wire_down="int8", progress=False, out_dir=str(tmp_path))
    m = train(cfg, loaded=copy.deepcopy(tiny)).metrics
    actives = [len(r["active_blocks"]) for r in m["steps"]]
    assert actives[0] == 4 and min(actives) < 4  # some modules were killed after warmup
    assert m["summary"]["active_fraction"] < 1
    for r in m["steps"]:  # each step's traffic follows from its own active set: 2 messages per active block
        assert r["messages_down"] == 2 + 2 * len(r["active_blocks"])
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in m["steps"]])))
