# Over 300 lines on purpose: one file runs every compose profile as local processes (cloud, edges, SuperLink, SuperNodes).
"""docker-compose.yml (+ the override `tandem deploy` writes) is valid for every profile, and both topologies run as
local processes with the same commands, environment and secrets.

No Docker engine runs here, so `docker-compose config` (Debian's docker-compose) resolves the files, and each
service's resolved command runs as a process on loopback, through the image's entrypoint (deploy/entrypoint.sh):
every container path is mapped to the host folder its volume names (a tmpfs to a fresh folder), service names to
127.0.0.1. Each process therefore sees exactly the files its container would: an edge its own secrets only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

import tasks
from cli.deploy import EDGES_FILE, write_deployment
from tests.conftest import environ_of, free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENTRY = ["sh", str(ROOT / "deploy" / "entrypoint.sh")]
MARK = "TANDEM_COMPOSE_TEST"  # in every process a test starts (and their children): all are ended at the end
HAVE_COMPOSE = shutil.which("docker-compose") is not None
needs_compose = pytest.mark.skipif(not HAVE_COMPOSE, reason="Debian's docker-compose is not installed (`make test` "
                                   "installs it)")


def compose(env: dict, override: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "-f", str(override), *args],
                          env=env, capture_output=True, text=True, cwd=ROOT)


def resolved(env: dict, override: Path, profile: str | None = None) -> dict:
    r = compose(env, override, *(["--profile", profile] if profile else []), "config")
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def deployment(tmp_path: Path, edges: int = 2, nodes: int | None = None) -> tuple[Path, dict]:
    out = tmp_path / "deploy"
    write_deployment(out, edges, nodes, project_dir=ROOT)
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**os.environ, "TANDEM_SECRETS": str(out / "secrets"), "TANDEM_RUNS_DIR": str(runs),
           "TANDEM_DATA_DIR": str(tasks.data_root()), "PYTHONPATH": str(ROOT),
           "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]), "TANDEM_EXE": str(BIN / "tandem")}
    return out / EDGES_FILE, env


def test_deploy_refuses_no_edges_and_existing_files(tmp_path):
    with pytest.raises(ValueError, match="at least one edge"):
        write_deployment(tmp_path / "d", 0)
    write_deployment(tmp_path / "d", 1)
    with pytest.raises(ValueError, match="--overwrite"):
        write_deployment(tmp_path / "d", 2)
    write_deployment(tmp_path / "d", 2, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "d" / "secrets").iterdir() if p.name.startswith("edge-")) == \
        ["edge-0", "edge-1"]


@needs_compose
def test_compose_config_is_valid_for_every_profile(tmp_path):
    override, env = deployment(tmp_path, edges=3)
    for args in ([], ["--profile", "federation"]):  # each profile, and the base file alone
        r = compose(env, override, *args, "config", "--quiet")
        assert r.returncode == 0, r.stderr
    r = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"], env=env,
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    default = resolved(env, override)
    profiles = {n: tuple(s.get("profiles") or ()) for n, s in default["services"].items()}
    assert {n for n, p in profiles.items() if not p} == {"cloud", "edge-0", "edge-1", "edge-2"}  # `up`
    assert {n for n, p in profiles.items() if p == ("federation",)} == {"superlink", "cloud-federation",
                                                                        "supernode-0", "supernode-1", "supernode-2"}
    shards = []
    for i in range(3):  # each edge: its own shard of 3, its own secrets folder, nobody else's
        spec = default["services"][f"edge-{i}"]
        words = spec["command"].split()
        shards.append((words[words.index("--shard") + 1], words[words.index("--num-shards") + 1]))
        secret_mounts = [v for v in spec["volumes"] if "/run/secrets" in str(v)]
        assert len(secret_mounts) == 1 and str(secret_mounts[0]).split(":")[0].endswith(f"secrets/edge-{i}")
        assert sorted(p.name for p in Path(str(secret_mounts[0]).split(":")[0]).iterdir()) == \
            ["ca.pem", f"edge-{i}.key", f"edge-{i}.pem", "token"]
    assert shards == [("0", "3"), ("1", "3"), ("2", "3")]
    cloud = default["services"]["cloud"]
    assert "--require-client-cert" in cloud["command"] and "--tls-dir" in cloud["healthcheck"]["test"]
    assert cloud["user"] != "0" and cloud["read_only"] is True


# ---- the topologies as local processes ------------------------------------------------------------------------------

class Topology:
    """The resolved services, started as local processes with their container paths mapped to host folders."""

    def __init__(self, spec: dict, env: dict, tmp: Path):
        self.spec, self.env, self.tmp = spec, {**env, MARK: uuid.uuid4().hex}, tmp
        self.procs: list[subprocess.Popen] = []

    def paths(self, service: str) -> dict[str, str]:
        s = self.spec["services"][service]
        out = {}
        for v in s.get("volumes") or []:
            src, dst = (v["source"], v["target"]) if isinstance(v, dict) else str(v).split(":")[:2]
            Path(src).mkdir(parents=True, exist_ok=True)
            out[dst] = src
        for t in s.get("tmpfs") or []:
            out[t] = str(self.tmp / service / t.strip("/").replace("/", "-"))
            Path(out[t]).mkdir(parents=True, exist_ok=True)
        return dict(sorted(out.items(), key=lambda kv: -len(kv[0])))  # the longest container path first

    def local(self, service: str, words) -> list[str]:
        paths = self.paths(service)
        text = words if isinstance(words, str) else " ".join(words)
        if paths:  # one pass: a host path is never mapped again
            pattern = "|".join(re.escape(c) for c in paths)
            text = re.sub(rf"(?<![\w./-])({pattern})(?=[/\s:\"]|$)", lambda m: paths[m.group(1)], text)
        for name in ("cloud-federation:", "superlink:", "cloud:"):
            text = text.replace(name, "127.0.0.1:")
        return text.replace("0.0.0.0", "127.0.0.1").split()

    def environment(self, service: str) -> dict:
        paths = self.paths(service)
        env = dict(self.env)
        for k, v in (self.spec["services"][service].get("environment") or {}).items():
            env[k] = " ".join(self.local(service, str(v))) if v else ""
        env["TANDEM_SECRETS_DIR"] = paths.get("/run/secrets/tandem", "")
        return env

    def command(self, service: str) -> list[str]:
        s = self.spec["services"][service]
        entry = s.get("entrypoint")
        if entry is None:
            entry = ENTRY
        elif entry[0] == "sh":  # a script of the image: ours, in deploy/
            entry = ["sh", str(ROOT / "deploy" / Path(entry[1]).name)]
        else:
            entry = [str(BIN / entry[0])]
        return entry + self.local(service, s.get("command") or [])

    def start(self, service: str, cmd: list[str] | None = None, log: str | None = None) -> subprocess.Popen:
        out = open(self.tmp / f"{log or service}.log", "w")
        p = subprocess.Popen(cmd or self.command(service), env=self.environment(service), cwd=self.tmp,
                             stdout=out, stderr=subprocess.STDOUT, text=True)
        out.close()
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def healthcheck(self, service: str) -> subprocess.CompletedProcess:
        test = self.spec["services"][service]["healthcheck"]["test"][1:]  # after "CMD"
        cmd = ["sh", str(ROOT / "deploy" / Path(test[0]).name)] + self.local(service, test[1:])
        return subprocess.run(cmd, env=self.environment(service), cwd=self.tmp, capture_output=True, text=True)

    def close(self) -> None:
        mine = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) != os.getpid()
                and environ_of(int(p.name)).get(MARK) == self.env[MARK]]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in mine:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2 if sig == signal.SIGTERM else 0)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass


def wait_healthy(top: Topology, cloud: subprocess.Popen, service: str) -> subprocess.CompletedProcess:
    for _ in range(240):  # the healthcheck, as compose runs it
        r = top.healthcheck(service)
        if r.returncode == 0:
            return r
        assert cloud.poll() is None, top.log(service)
        time.sleep(0.5)
    pytest.fail(f"{service} never became healthy: {r.stdout} {r.stderr}")


@needs_compose
def test_default_topology_with_tls_one_secret_per_edge(tmp_path):
    override, env = deployment(tmp_path)
    env.update(TANDEM_MODEL="tiny-llama", TANDEM_PORT=str(free_port()), TANDEM_STEPS="3", TANDEM_EVAL_EXAMPLES="16")
    top = Topology(resolved(env, override), env, tmp_path)
    try:
        cloud = top.start("cloud")
        health = wait_healthy(top, cloud, "cloud")
        assert health.stdout.strip().endswith(": SERVING")
        edges = [top.start(e) for e in ("edge-0", "edge-1")]
        # edge-0's own certificate with edge-1's token: token and certificate name different clients
        secrets = Path(env["TANDEM_SECRETS"])
        cmd = top.command("edge-0")
        cmd[cmd.index("--token-file") + 1] = str(secrets / "edge-1" / "token")
        cmd[cmd.index("--out-dir") + 1] = str(tmp_path / "impostor")
        cmd[cmd.index("--metrics-out") + 1] = str(tmp_path / "impostor.json")
        impostor = top.start("edge-0", cmd, log="impostor")
        assert impostor.wait(300) != 0, top.log("impostor")
        assert "UNAUTHENTICATED" in top.log("impostor"), top.log("impostor")
        assert not (tmp_path / "impostor.json").exists()
        for e, name in zip(edges, ("edge-0", "edge-1")):
            assert e.wait(300) == 0, top.log(name)
        cloud.send_signal(signal.SIGTERM)
        assert cloud.wait(60) == 0, top.log("cloud")
    finally:
        top.close()
    assert "WARNING" not in top.log("cloud")  # TLS on: no plaintext warning
    for name in ("edge-0", "edge-1"):
        metrics = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())
        assert len(metrics["steps"]) == 3 and metrics["eval_after"]["examples"] == 16
        assert (tmp_path / "runs" / name / "run" / "adapter" / "adapter_model.safetensors").exists()
        others = [n for n in ("edge-0", "edge-1") if n != name]
        mine = {p.name: p.read_bytes() for p in (secrets / name).iterdir()}
        for other in others:  # nothing of the other edge's in this edge's folder
            assert f"{other}.key" not in mine and (secrets / other / "token").read_bytes() not in mine.values()


def test_plaintext_by_one_setting_warns(tmp_path):
    env = {**os.environ, "TANDEM_TLS": "off", "TANDEM_EXE": "echo"}
    r = subprocess.run(ENTRY + ["cloud", "serve", "--tls-dir", "/x", "--require-client-cert", "--port", "1"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["cloud", "serve", "--port", "1"]
    assert "WARNING" in r.stderr and "plaintext" in r.stderr
    r = subprocess.run(ENTRY + ["cloud", "serve", "--tls-dir", "/x"], env={**env, "TANDEM_TLS": "on"},
                       capture_output=True, text=True)
    assert r.stdout.split() == ["cloud", "serve", "--tls-dir", "/x"] and r.stderr == ""


@needs_compose
@pytest.mark.timeout(900)
def test_federation_profile_as_local_processes(tmp_path):
    override, env = deployment(tmp_path)
    link, fed = free_port(), free_port()
    env.update(TANDEM_MODEL="tiny-llama", TANDEM_SUPERLINK_PORT=str(link), TANDEM_FEDERATION_PORT=str(fed))
    top = Topology(resolved(env, override, "federation"), env, tmp_path)
    try:
        cloud = top.start("cloud-federation")
        superlink = top.start("superlink")
        for i in range(2):
            cmd = top.command(f"supernode-{i}")
            cmd[cmd.index("--port") + 1] = str(free_port())
            top.start(f"supernode-{i}", cmd)
        deadline = time.time() + 240
        while True:  # the SuperLink listens, the cloud serves
            assert superlink.poll() is None, top.log("superlink")
            assert cloud.poll() is None, top.log("cloud-federation")
            try:
                with socket.create_connection(("127.0.0.1", link), timeout=1), \
                        socket.create_connection(("127.0.0.1", fed), timeout=1):
                    break
            except OSError:
                assert time.time() < deadline, top.log("superlink") + top.log("cloud-federation")
                time.sleep(0.5)
        assert "TANDEM_TLS=off" not in top.log("cloud-federation")  # the device->cloud leg is TLS too
        assert "--tls-dir" in top.command("cloud-federation")
        home = tmp_path / "flwr-cli"
        home.mkdir()
        ca = Path(env["TANDEM_SECRETS"]) / "superlink" / "ca.pem"
        (home / "config.toml").write_text(f'[superlink]\ndefault = "tandem"\n\n[superlink.tandem]\n'
                                          f'address = "127.0.0.1:{link}"\nroot-certificates = "{ca}"\n')
        out = tmp_path / "fedrun"
        config = (f'model="tiny-llama" num-server-rounds=1 local-steps=2 batch-size=4 eval-examples=12 '
                  f'cloud-lora="none" min-nodes=2 device-timeout=300.0 cloud-address="127.0.0.1:{fed}" '
                  f'out-dir="{out}"')
        run = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "tandem", "--stream", "--run-config", config],
                             cwd=ROOT, env={**top.env, "FLWR_HOME": str(home),
                                            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"},
                             capture_output=True, text=True, timeout=700)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        for _ in range(120):
            if (out / "report.json").exists():
                break
            time.sleep(0.5)
        rep = json.loads((out / "report.json").read_text())
    finally:
        top.close()
    assert rep["nodes"] == 2
    r = rep["rounds"][1]
    assert r["devices"] == 2 and sorted(c["partition"] for c in r["clients"]) == [0, 1]
    assert r["split_steps"] == 4 and r["train_loss"] > 0
