"""A federation that cannot run fails fast, with one clear line, instead of hanging: `tandem federate` with a
simulation backend that cannot start (Ray not up within --backend-timeout; devices that cannot fit in --cpus) exits
non-zero within a minute and leaves no process behind; the ServerApp gives up after device-timeout, not
round-timeout, when no device answers or too few connect, and stops at once when told to."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from cloud.federation.devices import DevicesTimeout, FederationStopped
from cloud.federation.server_app import FederationConfig, run_federation

ROOT = Path(__file__).resolve().parent.parent
MARK = "TANDEM_FAILFAST_RUN"  # every process a test starts (and theirs: Ray's too) inherits it
RAY_DID_NOT_START = "tandem federate: the simulation backend (Ray) did not start"


def processes_marked(mark: str) -> list[int]:
    """The processes whose environment carries MARK=mark."""
    needle = f"{MARK}={mark}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def kill_marked(mark: str) -> list[str]:
    """Kill what is left of a run; returns "pid command line" of each."""
    left = []
    for pid in processes_marked(mark):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            left.append(f"{pid} {cmdline[:200]}")
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    return left


def tandem_federate(tmp_path: Path, *extra: str) -> tuple[int, str, float, list[str]]:
    """`tandem federate` (cli.main, as the installed command runs it) on the tiny model, as a process of its own:
    (exit code, stderr, seconds, pids it left behind)."""
    mark = uuid.uuid4().hex
    env = dict(os.environ, **{MARK: mark})
    cmd = [sys.executable, "-m", "cli.main", "federate", "--devices", "2", "--model", "tiny-llama", "--rounds", "1",
           "--local-steps", "1", "--batch-size", "4", "--eval-examples", "4", "--strategies", "fedavg",
           "--cloud-lora", "none", "--out", str(tmp_path / "fed"), *extra]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as ex:
        rc, err = None, (ex.stderr or b"").decode(errors="replace") if isinstance(ex.stderr, bytes) else ex.stderr
    seconds = time.monotonic() - t0
    time.sleep(1)  # a child killed with its parent takes a moment to go
    return rc, err or "", seconds, kill_marked(mark)


def failure_lines(text: str) -> list[str]:
    """What `tandem federate` itself said (Flower's and Ray's own logs come before it, or, from a backend abandoned
    while starting, around it)."""
    return [line for line in text.splitlines() if line.startswith("tandem federate:")]


def test_tandem_federate_exits_within_a_minute_when_ray_does_not_start_in_time(tmp_path):
    rc, err, seconds, left = tandem_federate(tmp_path, "--backend-timeout", "0")
    assert rc not in (0, None), err[-3000:]
    assert seconds < 60, f"took {seconds:.0f}s"
    said = failure_lines(err)
    # Ray cannot be up at once; on an overloaded machine it may even fail by itself while stopping (then that is said)
    assert len(said) == 1 and said[0].startswith(RAY_DID_NOT_START), err[-3000:]
    assert "within --backend-timeout 0s; raise --backend-timeout" in said[0] or "retry when" in said[0]
    assert left == [], f"left processes behind: {left}"


def test_tandem_federate_exits_within_a_minute_when_no_device_fits_in_ray(tmp_path):
    """Each device reserves more CPUs than Ray has: Flower's actor pool cannot hold one and the simulation runtime
    crashes; the ServerApp, already waiting for replies, is stopped rather than left for round-timeout."""
    rc, err, seconds, left = tandem_federate(tmp_path, "--cpus", "1", "--cpus-per-device", "2")
    assert rc not in (0, None), err[-3000:]
    assert seconds < 60, f"took {seconds:.0f}s"
    said = failure_lines(err)
    assert len(said) == 1, err[-3000:]
    # (on an overloaded machine Ray's own start may time out first: that is said instead)
    assert said[0] == ("tandem federate: the simulation backend (Ray) cannot host a single device: each one reserves "
                       "--cpus-per-device 2 CPUs of the --cpus 1 Ray may use; lower --cpus-per-device or raise "
                       "--cpus") or said[0].startswith(RAY_DID_NOT_START), err[-3000:]
    assert left == [], f"left processes behind: {left}"


def test_a_broken_backend_leaves_no_thread_waiting_in_the_process(tmp_path):
    """The same failure in-process (as pytest saw it in the issue): the ServerApp thread Flower started is stopped
    instead of waiting for replies, and no non-daemon thread is left to keep the interpreter alive."""
    from sim.federation.cli import main as federate_main

    before = set(threading.enumerate())
    with pytest.raises(SystemExit, match="cannot host a single device|did not start"):
        federate_main(["--devices", "2", "--model", "tiny-llama", "--rounds", "1", "--strategies", "fedavg",
                       "--cloud-lora", "none", "--cpus", "1", "--cpus-per-device", "2", "--out", str(tmp_path)])
    deadline = time.monotonic() + 10

    def waiting():
        return [t for t in threading.enumerate() if t not in before and t.is_alive()
                and (not t.daemon or "server_th" in t.name or t.name.startswith("tandem-simulation"))]

    while waiting() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [(t.name, t.daemon) for t in waiting()] == []


# ---- the ServerApp on a real Flower grid whose devices never came up -----------------------------------------------

@pytest.fixture
def idle_grid():
    """Make a Flower in-memory grid (what the simulation engine gives the ServerApp) with n registered devices and
    nothing behind them: no backend ever picks their messages up."""
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)

    def make(nodes: int):
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
        run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
        run.primary_task_id, run.federation_id = 1, NOOP_FEDERATION_ID
        state = factory.state()
        state.run_ids[run.run_id] = RunRecord(run=run)
        state.task_store[1] = Task(task_id=1, run_id=run.run_id)
        _register_nodes(nodes, factory)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run.run_id, SUPERLINK_NODE_ID, 1
        grid = InMemoryGrid(state_factory=factory)
        grid.set_run(run)
        return grid, run.run_id

    yield make
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def server_context(run_id: int):
    from flwr.app import Context, RecordDict
    return Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})


def config(tmp_path, **kw) -> FederationConfig:
    return FederationConfig(model="tiny-llama", cloud_lora="none", num_server_rounds=1, round_timeout=3600.0,
                            out_dir=str(tmp_path / "run"), **kw)


def test_server_app_gives_up_after_device_timeout_when_no_device_answers(tmp_path, idle_grid):
    grid, run_id = idle_grid(2)
    t0 = time.monotonic()
    with pytest.raises(DevicesTimeout, match="none of the 2 devices asked answered within device-timeout 2s"):
        run_federation(grid, server_context(run_id), config(tmp_path, device_timeout=2.0))
    assert time.monotonic() - t0 < 30  # not round-timeout's hour
    assert not (tmp_path / "run" / "report.json").exists()


def test_server_app_gives_up_after_device_timeout_when_too_few_devices_connect(tmp_path, idle_grid):
    grid, run_id = idle_grid(1)
    t0 = time.monotonic()
    with pytest.raises(DevicesTimeout, match="round 1: only 1 of the 3 devices it needs connected within "
                                             "device-timeout 2s"):
        run_federation(grid, server_context(run_id), config(tmp_path, device_timeout=2.0, min_nodes=3))
    assert time.monotonic() - t0 < 30


def test_server_app_stops_within_a_second_when_told(tmp_path, idle_grid):
    grid, run_id = idle_grid(2)
    stop = threading.Event()
    errors = []

    def serve():
        try:
            run_federation(grid, server_context(run_id), config(tmp_path), stop)
        except BaseException as ex:  # noqa: BLE001 - the test checks which
            errors.append(ex)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    time.sleep(3)  # the ServerApp is waiting for round 0's evaluation replies
    t0 = time.monotonic()
    stop.set()
    th.join(10)
    assert not th.is_alive() and time.monotonic() - t0 < 2
    assert len(errors) == 1 and isinstance(errors[0], FederationStopped)
