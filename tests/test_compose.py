"""docker-compose.yml is valid, and its topology runs as local processes with the same commands and environment.

No Docker engine runs here, so `docker-compose config` (Debian's docker-compose) resolves the file with our
environment, and this test starts each service's resolved command as a process on loopback: container paths
(secrets, volumes) map to local folders, service names to 127.0.0.1.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import tasks
from privacy.security.tokens import make_tokens

ROOT = Path(__file__).resolve().parents[1]
TANDEM = [sys.executable, "-m", "cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve(env: dict) -> dict:
    """The compose file with ${VAR:-default} resolved, by docker-compose itself when it is installed."""
    if shutil.which("docker-compose"):
        out = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"], env=env,
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
        return yaml.safe_load(out)
    text = (ROOT / "docker-compose.yml").read_text()
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), text)
    return yaml.safe_load(text)


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="Debian's docker-compose is not installed "
                    "(.ci/run installs it)")
def test_compose_config_is_valid(tmp_path):
    env = {**os.environ, "TANDEM_TOKENS_FILE": str(tmp_path / "t.json")}
    (tmp_path / "t.json").write_text("{}")
    r = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"], env=env,
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert set(resolve(env)["services"]) == {"cloud", "edge-0", "edge-1"}


def test_compose_topology_as_local_processes(tmp_path):
    port = free_port()
    tokens_file = tmp_path / "tokens.json"
    make_tokens(tokens_file, ["edge-0", "edge-1"])
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**os.environ, "TANDEM_MODEL": "tiny-llama", "TANDEM_PORT": str(port), "TANDEM_STEPS": "3",
           "TANDEM_EVAL_EXAMPLES": "16", "TANDEM_TOKENS_FILE": str(tokens_file),
           "TANDEM_DATA_DIR": str(tasks.data_root()), "TANDEM_RUNS_DIR": str(runs), "PYTHONPATH": str(ROOT)}
    compose = resolve(env)
    paths = {"/run/secrets/tandem_tokens": str(tokens_file), "/runs": str(runs), "/data": str(tasks.data_root())}

    def local(service: str) -> tuple[list[str], dict]:
        spec = compose["services"][service]
        cmd = spec["command"] if isinstance(spec["command"], str) else " ".join(spec["command"])
        for container, host in paths.items():
            cmd = cmd.replace(container, host)
        cmd = cmd.replace("0.0.0.0", "127.0.0.1").replace("cloud:", "127.0.0.1:")
        senv = {**env, **{k: paths.get(v, v) for k, v in (spec.get("environment") or {}).items()}}
        return TANDEM + cmd.split(), senv

    cmd, senv = local("cloud")
    cloud = subprocess.Popen(cmd, env=senv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = compose["services"]["cloud"]["healthcheck"]["test"][2:]  # after "CMD", "tandem"
        for _ in range(120):  # the healthcheck, as compose would run it
            if subprocess.run(TANDEM + health, env=env, cwd=ROOT, capture_output=True).returncode == 0:
                break
            assert cloud.poll() is None, cloud.stdout.read()
            time.sleep(0.5)
        else:
            pytest.fail("cloud never became healthy")
        edges = [subprocess.Popen(local(s)[0], env=local(s)[1], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for s in ("edge-0", "edge-1")]
        for e in edges:
            out, _ = e.communicate(timeout=300)
            assert e.returncode == 0, out
    finally:
        cloud.send_signal(signal.SIGTERM)  # graceful shutdown
        out, _ = cloud.communicate(timeout=60)
    assert cloud.returncode == 0, out
    assert "shutting down" in out
    import json
    for name in ("edge-0", "edge-1"):
        metrics = json.loads((runs / f"{name}.json").read_text())
        assert len(metrics["steps"]) == 3 and metrics["eval_after"]["examples"] == 16
        assert (runs / name / "adapter" / "adapter_model.safetensors").exists()
