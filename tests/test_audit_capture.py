"""The cloud's capture holds exactly what crossed: every message of a real gRPC session, byte for byte, in order."""
from __future__ import annotations

import logging
import stat
import threading
from pathlib import Path

import pytest
import torch

from cloud.sessions import CloudConfig
from privacy.audit.capture import MAGIC, Capture, exchanges, read_capture, session_settings
from protocol import pb
from protocol.step import StepPlan
from protocol.tensors import decode, encode
from tests.conftest import CloudHandle, make_edge, sst2_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def capturing_cloud(tiny, tmp_path):
    handle = CloudHandle(tiny.model, CloudConfig(max_tokens_per_step=4096, step_timeout=5.0,
                                                 capture_dir=str(tmp_path / "capture")))
    yield handle
    handle.stop()


def train_steps(em, batches):
    """Two training steps the way the trainer numbers them; each step's traffic as the edge counted it."""
    traffic = []
    for step, b in enumerate(batches):
        em.cloud.step = step
        loss, _ = em.loss(b)
        loss.backward()
        traffic.append(em.cloud.last_traffic)
    return traffic


@pytest.mark.parametrize("mode", ["none", "edge", "carried"])
def test_the_capture_holds_every_message_that_crossed(capturing_cloud, tiny, tmp_path, mode):
    em, _, link = make_edge(capturing_cloud, tiny, cloud_lora=mode)
    batches = sst2_batches(2)
    traffic = train_steps(em, batches)
    sid = link.session.session_id
    stats = link.close()
    folder = tmp_path / "capture"
    assert mode_of(folder) == 0o700
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == [f"{sid}.capture", f"{sid}.session.json"]
    assert all(mode_of(f) == 0o600 for f in files)
    settings = session_settings(folder, sid)
    assert (settings["k"], settings["m"], settings["carried"]) == (1, 1, mode == "carried")
    assert settings["lora_blocks"] == em.cloud.lora_blocks
    records = list(read_capture(folder))
    for d, counted in (("up", stats.bytes_received), ("down", stats.bytes_sent)):
        captured = sum(r.wire_bytes for r in records if r.direction == d)
        assert captured == counted == sum(getattr(t, f"bytes_{d}") for t in traffic)
    ex = exchanges(records)
    assert [(e.session, e.step, e.index) for e in ex] == [(sid, 0, 0), (sid, 1, 1)]
    for e, t in zip(ex, traffic):
        plan = StepPlan(True, tuple(em.cloud.active_blocks()), em.cloud.groups).messages()
        assert len(plan) == (2 + 2 * len(em.cloud.lora_blocks) * (mode == "edge")) * 2
        got = [(r.kind, r.direction, getattr(r.inner, "block", None) if r.kind.startswith("lora") else None)
               for r in e.records]
        assert got == [(m.kind, m.direction, m.block) for m in plan]
        assert [r.wire_bytes for r in e.records] == [m.wire_bytes for m in t.messages]
    # the tensors themselves: the hidden state the edge's bottom blocks computed for the second batch
    b = batches[1]
    with torch.no_grad():
        sent = em.bottom(b.input_ids, b.attention_mask)
    torch.testing.assert_close(decode(ex[1].begin.hidden), sent, rtol=0, atol=0)
    assert torch.equal(decode(ex[1].begin.attention_mask, out_dtype=torch.bool), b.attention_mask.bool())
    assert len(ex[1].begin.lora_weights) == (len(em.cloud.lora_blocks) * 2 if mode == "carried" else 0)


def test_no_capture_dir_no_capture(cloud, tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cloud.service.capture is None
    em, _, link = make_edge(cloud, tiny, cloud_lora="edge")
    train_steps(em, sst2_batches(1))
    link.close()
    assert list(tmp_path.rglob("*")) == []


def message(i: int, direction: str = "up"):
    grad = encode(torch.full((2, 3), float(i)))
    if direction == "up":
        return pb.EdgeMessage(output_grad=pb.OutputGrad(grad=grad))
    return pb.CloudMessage(input_grad=pb.InputGrad(grad=grad))


def test_records_from_many_threads_stay_whole_and_in_their_sessions(tmp_path):
    cap = Capture(tmp_path / "c")
    sids = [f"{i:032x}" for i in range(4)]
    begin = pb.EdgeMessage(begin=pb.Begin(session_id=sids[0], step=7))

    def write(t: int):
        sid = sids[t % 4]
        cap.record(sid, 3, "up", begin if t == 0 else message(1000 * t + 999))
        for i in range(50):
            d = "down" if i % 2 else "up"
            cap.record(sid, 3, d, message(1000 * t + i, d))

    threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    records = list(read_capture(tmp_path / "c"))
    assert len(records) == 8 * 51
    for sid in sids:
        mine = [r for r in records if r.session == sid]
        assert len(mine) == 2 * 51
        values = sorted(int(decode(r.inner.grad)[0, 0]) for r in mine if r.kind != "begin")
        threads_of = [t for t in range(8) if t % 4 == sids.index(sid)]
        assert values == sorted([1000 * t + i for t in threads_of for i in range(50)]
                                + [1000 * t + 999 for t in threads_of if t])
    assert [r.exchange for r in records if r.session == sids[0] and r.kind == "begin"] == [0]


def test_an_id_the_cloud_never_issued_names_no_file(tmp_path):
    cap = Capture(tmp_path / "c")
    cap.record("../../escape", 0, "up", pb.EdgeMessage(begin=pb.Begin(session_id="../../escape")))
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["unknown-sessions.capture"]
    assert [r.session for r in read_capture(tmp_path / "c")] == ["../../escape"]


def test_a_cut_short_capture_reads_up_to_the_cut_and_garbage_is_refused(tmp_path, caplog):
    cap = Capture(tmp_path)
    sid = "ab" * 16
    for i in range(3):
        cap.record(sid, i, "up", message(i))
    path = cap.path_of(sid)
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    path.write_bytes(data[:-5])
    with caplog.at_level(logging.WARNING, "tandem.audit"):
        assert [r.step for r in read_capture(path)] == [0, 1]
    assert "cut short" in caplog.text
    (tmp_path / "other.capture").write_bytes(b"not a capture")
    with pytest.raises(ValueError, match="not a Tandem capture"):
        list(read_capture(tmp_path / "other.capture"))
    with pytest.raises(FileNotFoundError, match="no capture"):
        list(read_capture(tmp_path / "missing"))


def test_a_begin_for_another_clients_session_is_refused_and_not_captured(capturing_cloud, tiny, tmp_path):
    import grpc
    from tests.test_service_errors import begin, step_status, stub_for
    em, _, link = make_edge(capturing_cloud, tiny, cloud_lora="none")
    train_steps(em, sst2_batches(1))
    victim = link.session.session_id
    stub, md, channel = stub_for(capturing_cloud, "bob")
    assert step_status(stub, md, begin(victim)) == grpc.StatusCode.PERMISSION_DENIED
    channel.close()
    link.close()
    kinds = [r.kind for r in read_capture(tmp_path / "capture")]
    assert kinds == [m.kind for m in StepPlan(True).messages()]  # alice's one split step, nothing of bob's
