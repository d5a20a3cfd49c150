"""Tandem on Flower's deployment engine, on loopback with TLS: a SuperLink and separate SuperNode processes (one per
edge device), `flwr run` against the SuperLink; the ServerApp hosts the tiny model's backbone service, every device
trains through it. One round completes; and it still completes when a SuperNode is killed in the middle of it, since
min-nodes (2) devices remain.

Every process a test starts (and theirs: SuperExecs, ServerApp and ClientApp processes) carries a marker in its
environment; the fixture kills all of them, even when the test fails. Flower's settings live in a temporary
FLWR_HOME, never in the user's home."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import tasks as T
from privacy.security.certs import make_certs
from tests.conftest import environ_of, free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MARK = "TANDEM_DEPLOYMENT_TEST"  # the test's id, in every process it starts
ROLE = "TANDEM_DEPLOYMENT_ROLE"  # superlink, supernode-<i>, flwr-run: and in their children

pytestmark = pytest.mark.timeout(900)


def marked(mark: str, role: str | None = None) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            env = environ_of(int(proc.name))
            if env.get(MARK) == mark and (role is None or env.get(ROLE) == role):
                pids.append(int(proc.name))
    return pids


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Deployment:
    """A SuperLink with TLS on a free loopback port, SuperNodes pointed at it, and `flwr run` of this project."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.mark = uuid.uuid4().hex
        self.port = free_port()
        self.certs = make_certs(tmp_path / "certs", server_names=("127.0.0.1", "localhost"), clients=())
        home = tmp_path / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "tandem"\n\n[superlink.tandem]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs.ca_cert}"\n')
        # `flwr` and the SuperExecs start Flower's other commands by name: the venv's bin must be on PATH; the
        # apps run from FLWR_HOME, so the devices are told where their data is
        self.env = dict(os.environ, PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
                        FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                        TANDEM_DATA=str(T.data_root()), **{MARK: self.mark})
        self.procs: dict[str, subprocess.Popen] = {}

    def log(self, role: str) -> str:
        path = self.tmp / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _start(self, role: str, cmd: list[str]) -> subprocess.Popen:
        out = open(self.tmp / f"{role}.log", "w")
        proc = subprocess.Popen(cmd, cwd=self.tmp, env=dict(self.env, **{ROLE: role}), stdout=out,
                                stderr=subprocess.STDOUT)
        out.close()
        self.procs[role] = proc
        return proc

    def start_superlink(self, timeout: float = 180) -> None:
        c = self.certs
        proc = self._start("superlink", [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(c.ca_cert),
                                         "--ssl-certfile", str(c.server_cert), "--ssl-keyfile", str(c.server_key),
                                         "--host", "127.0.0.1", "--port", str(self.port),
                                         "--disable-runtime-dependency-installation"])
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"flower-superlink exited with {proc.returncode}:\n{self.log('superlink')[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"flower-superlink did not listen on {self.port} within {timeout}s:\n"
                    f"{self.log('superlink')[-3000:]}")

    def start_supernode(self, i: int, n: int) -> None:
        self._start(f"supernode-{i}", [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                                       "--root-certificates", str(self.certs.ca_cert), "--host", "127.0.0.1",
                                       "--port", str(free_port()),
                                       "--node-config", f"partition-id={i} num-partitions={n}"])

    def kill(self, role: str) -> None:
        """SIGKILL a SuperNode and everything it started: the device is gone, mid-round, without a goodbye."""
        signal_all(marked(self.mark, role), signal.SIGKILL)

    def flwr_run(self, overrides: str) -> "Streamed":
        proc = subprocess.Popen([str(BIN / "flwr"), "run", str(ROOT), "tandem", "--stream", "--run-config", overrides],
                                cwd=ROOT, env=dict(self.env, **{ROLE: "flwr-run"}), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.procs["flwr-run"] = proc
        return Streamed(proc)

    def close(self) -> None:
        signal_all(marked(self.mark), signal.SIGTERM)
        deadline = time.time() + 10
        while marked(self.mark) and time.time() < deadline:
            time.sleep(0.5)
        signal_all(marked(self.mark), signal.SIGKILL)
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


class Streamed:
    """The output of `flwr run --stream`, read as it comes."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc


@pytest.fixture
def deployment(tmp_path):
    d = Deployment(tmp_path)
    try:
        yield d
    finally:
        d.close()
        assert marked(d.mark) == [], "processes left behind"


def overrides(out: Path, **extra) -> str:
    cfg = {"model": '"tiny-llama"', "num-server-rounds": 1, "local-steps": 2, "batch-size": 4, "eval-examples": 12,
           "cloud-lora": '"none"', "min-nodes": 2, "device-timeout": 300.0, "out-dir": f'"{out}"', **extra}
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def wait_for(predicate, timeout: float, what: str, log=lambda: "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            pytest.fail(f"{what} did not happen within {timeout}s:\n{log()[-4000:]}")
        time.sleep(0.5)


def report_of(d: Deployment, run: Streamed, out: Path, timeout: float) -> dict:
    try:
        rc = run.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish within {timeout}s:\n{run.text[-4000:]}")
    assert rc == 0, run.text[-4000:]
    wait_for(lambda: (out / "report.json").exists(), 60, "the report", lambda: run.text)  # the stream may end first
    return json.loads((out / "report.json").read_text())


def start_nodes(d: Deployment, supernodes: int) -> None:
    """The SuperLink, then `supernodes` SuperNodes (partition i of `supernodes` each)."""
    d.start_superlink()
    for i in range(supernodes):
        d.start_supernode(i, supernodes)


def test_a_round_on_the_deployment_engine_with_tls(deployment, tmp_path):
    d = deployment
    start_nodes(d, 2)
    out = tmp_path / "run"
    run = d.flwr_run(overrides(out))
    rep = report_of(d, run, out, timeout=600)
    assert rep["nodes"] == 2
    assert [r["round"] for r in rep["rounds"]] == [0, 1]
    r = rep["rounds"][1]
    assert r["devices"] == 2 and r["split_steps"] == 4 and r["train_loss"] > 0
    assert r["dev_examples"] == 12 and r["dev_accuracy"] is not None
    assert sorted(c["partition"] for c in r["clients"]) == [0, 1]  # each SuperNode's node config
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_the_round_completes_when_a_supernode_is_killed_in_the_middle_of_it(deployment, tmp_path):
    d = deployment
    start_nodes(d, 3)
    out = tmp_path / "run"
    # enough local steps that the victim is still training when it dies
    run = d.flwr_run(overrides(out, **{"local-steps": 20}))
    victim = "supernode-2"

    def victim_got_its_train_message() -> bool:
        return "Receiving: train message" in d.log(victim)

    wait_for(victim_got_its_train_message, 480, "the victim's train message", lambda: run.text)
    d.kill(victim)
    rep = report_of(d, run, out, timeout=600)
    assert rep["nodes"] == 3
    r = rep["rounds"][1]
    # the round went on with the two devices left (min-nodes 2): the killed one never answered
    assert r["devices"] == 2 and sorted(c["partition"] for c in r["clients"]) == [0, 1]
    assert r["split_steps"] == 40 and r["train_loss"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
