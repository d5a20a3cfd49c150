"""The network testbed: namespaces joined by tbf-limited veths deliver the rate we set, leave nothing behind, and carry
real Tandem training (cloud and edge as separate processes) whose bytes the simulator predicts exactly.

These need root and iproute2; where namespaces are not permitted they skip and say why."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sim.profiles import LinkProfile
from sim.testbed import Testbed, TestbedConfig, permitted

OK, WHY = permitted()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not OK, reason=f"network testbed not permitted here: {WHY}")]
EFFICIENCY = LinkProfile("x", 1, 1, 0, "").efficiency  # TCP payload per byte of link rate (MTU 1500)


def namespaces() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


def assert_delivers(measure, rate_bps: float, what) -> None:
    """The shaper never lets more than the set rate through (5 % for measurement error), and on a quiet moment it
    delivers it: the best of three transfers (a busy machine only makes a transfer slower) is within 5 % too."""
    want = rate_bps * EFFICIENCY
    runs = []
    for _ in range(3):
        runs.append(measure())  # about 1.2 s each
        assert runs[-1] <= want * 1.05, (what, runs)
        if runs[-1] >= want * 0.95:
            return
    raise AssertionError(f"{what}: best of {runs} is below 95 % of {want:.0f} bit/s")


def test_links_deliver_the_set_rate_both_ways_and_vanish_afterwards():
    cfg = TestbedConfig(edges=2, rate_mbit=20, prefix="tandem-t1")
    with Testbed(cfg) as tb:
        assert {"tandem-t1-cloud", "tandem-t1-edge0", "tandem-t1-edge1"} <= namespaces()
        assert "rate 20Mbit" in tb.qdiscs()
        for edge in (0, 1):
            for direction in ("up", "down"):
                assert_delivers(lambda: tb.measure_throughput(3_000_000, direction, edge=edge), 20e6, (edge, direction))
        tb.set_rate(60)
        assert_delivers(lambda: tb.measure_throughput(9_000_000, "up"), 60e6, "60 Mbit/s")
    assert not {n for n in namespaces() if n.startswith("tandem-t1-")}


def test_real_training_through_the_testbed_moves_exactly_the_predicted_bytes(tmp_path):
    """`tandem cloud serve` in the cloud namespace, `tandem edge train` in the edge namespace (tiny random Llama)."""
    import tasks as T
    from edge.data import load_items
    from edge.trainer import EdgeConfig
    from sim.wire import WireSetup, step_traffic
    from tests.test_sim_wire import TINY

    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"edge-0": "edge-0-token-0123456789abcdef"}))
    metrics = tmp_path / "metrics.json"
    steps, batch = 3, 4
    with Testbed(TestbedConfig(edges=1, rate_mbit=5, prefix="tandem-t2")) as tb:
        cloud = tb.popen(tb.cloud_ns, [sys.executable, "-m", "cli.main", "cloud", "serve", "--model", "tiny-llama",
                                       "--host", "0.0.0.0", "--port", "50061", "--tokens", str(tokens)])
        tb.wait_port(0, 50061, proc=cloud)
        run = tb.run(tb.edge_ns[0], [
            sys.executable, "-m", "cli.main", "edge", "train", "--cloud", f"{tb.cloud_ip(0)}:50061",
            "--token", "edge-0-token-0123456789abcdef", "--model", "tiny-llama", "--task", "sst2",
            "--steps", str(steps), "--batch-size", str(batch), "--cloud-lora", "none", "--no-eval-before",
            "--no-eval-after", "--no-progress", "--metrics-out", str(metrics)], timeout=600, capture_output=True,
            text=True)
        assert run.returncode == 0, run.stderr[-2000:]
    records = json.loads(metrics.read_text())["steps"]
    # The batches the edge trained on (the trainer's first epoch: shuffled with its seed, full batches only).
    cfg = EdgeConfig.of(task="sst2", batch_size=batch)
    items = load_items(cfg, T.tiny_tokenizer(), "train")
    seqs = [b.input_ids.shape[1]
            for b in T.batches(T.TASKS["sst2"], items, batch, 0, seed=cfg.optim.seed, drop_last=True)]
    for rec, seq in zip(records, seqs):
        sim = step_traffic(TINY, WireSetup(), batch, seq, step=rec["step"])
        assert (sim.bytes_up, sim.bytes_down) == (rec["bytes_up"], rec["bytes_down"])
        # 5 Mbit/s really limits the step: it takes at least the transfer time of its bytes
        link = LinkProfile("tb", 5e6, 5e6, 0.0, "")
        floor = sum(link.transfer_seconds(m.wire_bytes, m.direction) for m in sim.messages)
        assert rec["step_seconds"] > 0.9 * floor
