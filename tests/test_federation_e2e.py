"""A small federation end to end on the tiny model: `tandem federate` (simulation driver) and `flwr run .` (Flower's
own local SuperLink), both running the apps of cloud/federation and edge/federation through one shared cloud."""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import peft
import pytest
from safetensors.numpy import load_file

import tasks as T

from cloud.federation.server_app import FederationConfig, initial_adapter
from sim.federation.cli import main as federate_main
from tests.reference import peft_local as ref

ROOT = Path(__file__).resolve().parent.parent
ADAPTER = 2 * (8 * (64 + 64) + 8 * (64 + 32)) * 4  # tiny-llama, split (blocks 0 and 5), q and v, r 8, float32


def check_round_traffic(rep: dict, devices: int, steps: int) -> None:
    assert rep["adapter"]["bytes"] == ADAPTER
    for r in rep["rounds"][1:]:
        assert r["devices"] == len(r["clients"]) == devices
        for c in r["clients"]:
            # Flower: the adapter goes down and comes back at exactly its size in its wire dtype
            assert c["adapter_bytes_down"] == c["adapter_bytes_up"] == ADAPTER
            assert c["flower_bytes_down"] > ADAPTER and c["flower_bytes_up"] > ADAPTER
            # split: the device's per-step counts add up to its total, which is the cloud's own count
            assert c["split_steps"] == steps == len(c["split_step_bytes_up"])
            assert c["split_bytes_up"] == sum(c["split_step_bytes_up"]) == c["cloud_bytes_received"]
            assert c["split_bytes_down"] == sum(c["split_step_bytes_down"]) == c["cloud_bytes_sent"]
        assert r["adapter_bytes_down"] == r["adapter_bytes_up"] == devices * ADAPTER
        assert r["flower_bytes_down"] == sum(c["flower_bytes_down"] for c in r["clients"])
        assert r["split_bytes_up"] == sum(sum(c["split_step_bytes_up"]) for c in r["clients"])
        assert r["split_bytes_down"] == sum(sum(c["split_step_bytes_down"]) for c in r["clients"])
        assert r["split_steps"] == devices * steps
        assert r["split_bytes_per_step"] == pytest.approx((r["split_bytes_up"] + r["split_bytes_down"]) / r["split_steps"])
        # a round's accuracy is the share of the 12 dev examples its evaluating devices got right; which share
        # follows only from the round's adapter, which is not kept (the last one is: see dev_accuracy_of)
        correct = r["dev_accuracy"] * 12
        assert r["dev_examples"] == 12 and correct == pytest.approx(round(correct))


def dev_accuracy_of(tiny, adapter: Path, examples: int = 12) -> tuple[float, float]:
    """(accuracy with the saved global adapter, accuracy of the base model) on the first dev examples, by PEFT
    locally: the known answers of the last round's and round 0's federated evaluation through the cloud."""
    task, tok = T.TASKS["sst2"], T.tiny_tokenizer()
    dev = T.encode(task, T.load_split("sst2", "dev"), tok)[:examples]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tiny.model), str(adapter))
    label_ids = T.label_token_ids(task, tok)
    trained = ref.evaluate(pm, task, dev, tok.pad_token_id or 0, label_ids)
    with pm.disable_adapter():
        return trained, ref.evaluate(pm, task, dev, tok.pad_token_id or 0, label_ids)


def test_tandem_federate_runs_fedavg_and_ffa_on_the_same_partitions(tmp_path, capsys, tiny):
    out = tmp_path / "fed"
    rc = federate_main(["--devices", "3", "--model", "tiny-llama", "--rounds", "2", "--local-steps", "2",
                        "--batch-size", "4", "--lr", "0.01", "--eval-examples", "12", "--partitioner", "dirichlet",
                        "--alpha", "0.5", "--strategies", "fedavg,ffa", "--cloud-lora", "none", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "comparison" in printed and "[ffa] per device" in printed
    summary = json.loads((out / "federation.json").read_text())
    assert (out / "federation.png").stat().st_size > 10_000
    assert sum(p["examples"] for p in summary["partitions"]) == len(T.load_split("sst2", "train"))  # all, once
    fedavg, ffa = summary["runs"]["fedavg"], summary["runs"]["ffa"]
    for rep in (fedavg, ffa):
        check_round_traffic(rep, devices=3, steps=2)
    assert fedavg["rounds"][0]["dev_accuracy"] is not None
    assert ffa["rounds"][0]["dev_accuracy"] == fedavg["rounds"][0]["dev_accuracy"]  # one zero-shot evaluation
    for name, rep in (("fedavg", fedavg), ("ffa", ffa)):
        trained, zero_shot = dev_accuracy_of(tiny, out / name / "adapter")
        assert rep["rounds"][-1]["dev_accuracy"] == pytest.approx(trained)
        assert rep["rounds"][0]["dev_accuracy"] == pytest.approx(zero_shot)
    # exactness: FFA-LoRA merges the updates exactly, FedAvg of A and B does not
    assert all(r["deviation"] < 1e-6 for r in ffa["rounds"][1:])
    assert all(r["deviation"] > 1e-4 for r in fedavg["rounds"][1:])
    # FFA-LoRA never moved A: the final global adapter (PEFT format) has the initial A and a trained B
    start = initial_adapter(tiny.model, FederationConfig(model="tiny-llama", cloud_lora="none"))
    final = load_file(str(out / "ffa" / "adapter" / "adapter_model.safetensors"))
    for key, value in start.items():
        if ".lora_A." in key:
            np.testing.assert_array_equal(final[key], value)
        else:
            assert np.abs(final[key]).max() > 0
    assert summary["comparison"]["ffa"]["mean_deviation"] < 1e-6 < summary["comparison"]["fedavg"]["mean_deviation"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return [p for p in pids if p != os.getpid()]


def test_flwr_run_dot_runs_the_app_with_secaggplus_and_central_dp(tmp_path, tiny):
    """`flwr run .` builds the app from pyproject.toml, starts a local SuperLink and runs one round with both privacy
    options on; the ServerApp hosts the backbone itself. Our own ports and FLWR_HOME, and no runtime dependency
    install (Flower would otherwise `uv sync` the project's dependencies into a fresh env; the venv has them all)."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n\n'
                                      '[superlink.local.options]\nnum-supernodes = 2\n\n'
                                      '[superlink.local.options.backend.client-resources]\nnum-cpus = 1\n')
    http_port, control_port = _free_port(), _free_port()
    # `flwr run` spawns `flower-superlink` by name: the venv's bin must be on PATH even when the venv is not activated
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=os.pathsep.join([bindir, os.environ.get("PATH", "")]), FLWR_HOME=str(home), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
               FLWR_LOCAL_CONTROL_API_PORT=str(control_port), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    out = tmp_path / "run"
    overrides = (f'model="tiny-llama" num-server-rounds=1 local-steps=2 batch-size=4 eval-examples=12 '
                 f'cloud-lora="none" secagg=true dp=true dp-noise-multiplier=0.01 dp-clipping-norm=10.0 '
                 f'out-dir="{out}"')
    flwr = str(Path(bindir) / "flwr")
    try:
        proc = subprocess.run([flwr, "run", ".", "--stream", "--run-config", overrides], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        deadline = time.time() + 60  # the stream may end just before the report is written
        while not (out / "report.json").exists() and time.time() < deadline:
            time.sleep(1)
        rep = json.loads((out / "report.json").read_text())
    finally:  # stop the SuperLink `flwr run` started for us (and its SuperExec), found by our port numbers
        for pid in _processes_mentioning(str(control_port)) + _processes_mentioning(f"127.0.0.1:{http_port}"):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    assert rep["nodes"] == 2 and rep["config"]["secagg"] is True and rep["config"]["dp"] is True
    assert [r["round"] for r in rep["rounds"]] == [0, 1]
    r = rep["rounds"][1]
    assert r["devices"] == 2 and r["split_steps"] == 4
    assert r["adapter_bytes_down"] == 2 * ADAPTER and r["adapter_bytes_up"] == 0  # masked vectors only
    assert r["deviation"] is None  # under SecAgg+ the server never sees one device's adapter
    trained, zero_shot = dev_accuracy_of(tiny, out / "adapter")  # the noised, securely summed global adapter
    assert r["dev_accuracy"] == pytest.approx(trained) and r["dev_examples"] == 12
    assert rep["rounds"][0]["dev_accuracy"] == pytest.approx(zero_shot)
