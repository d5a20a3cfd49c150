"""One definition of every option: the edge's nested config and its flags, the federation's run config, the
instructions the devices read, and pyproject.toml's [tool.flwr.app.config]."""
from __future__ import annotations

import argparse
import json
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from cli.main import build_parser, main
from cloud.federation.server_app import FederationConfig
from edge.config import EdgeConfig
from protocol.federation import DeviceSettings, Instructions, kebab
from edge.flags import add_flags, build, flags_of
from tests.conftest import TOKENS

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_run_config_is_exactly_the_federation_config():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = FederationConfig()
    assert table == {kebab(f.name): getattr(defaults, f.name) for f in fields(FederationConfig)}


def test_devices_read_back_every_setting_the_server_sends():
    cfg = FederationConfig(model="tiny-llama", cut_top=2, lora_targets="q_proj", local_steps=7, lr=0.5,
                           emulator_devices="0,3", num_server_rounds=9)
    record = cfg.instructions("10.0.0.1:1", "secret")
    assert set(record) == {kebab(f.name) for f in fields(DeviceSettings)}  # no server-only setting goes out
    ins = Instructions.read(record, {"partition-id": 3, "unrelated": 1})
    for f in fields(DeviceSettings):
        expected = {"cloud_address": "10.0.0.1:1", "cloud_token": "secret"}.get(f.name, getattr(cfg, f.name))
        assert getattr(ins, f.name) == expected
    assert ins.partition_id == 3 and ins.on_emulator and ins.targets == ("q_proj",)
    with pytest.raises(ValueError, match="unknown federation setting 'rounds'"):
        FederationConfig.from_run_config({"rounds": 2})


def test_edge_flags_keep_their_names_and_land_in_their_groups():
    args = build_parser().parse_args([
        "edge", "train", "--cloud", "h:1", "--token", "t", "--name", "edge-3", "--task", "mrpc", "--cloud-lora",
        "edge", "--steps", "5", "--out-dir", "o", "--k", "2", "--m", "3", "--lora-r", "4", "--lora-targets",
        "q_proj,k_proj", "--wire-up", "int8", "--wire-down", "bf16", "--kr", "--kr-warmup", "3", "--kr-signal",
        "grad", "--noise-sigma", "0.5", "--noise-clip", "2", "--device", "cpu", "--dtype", "float16",
        "--train-file", "a.jsonl", "--dev-file", "b.jsonl", "--lr", "0.1", "--batch-size", "2",
        "--eval-examples", "9", "--no-eval-before", "--patience", "1", "--metrics-out", "m.json"])
    cfg = build(EdgeConfig, vars(args))
    assert (cfg.link.address, cfg.link.token, cfg.link.patience, cfg.name) == ("h:1", "t", 1.0, "edge-3")
    assert (cfg.data.task, cfg.data.train_file, cfg.data.dev_file) == ("mrpc", "a.jsonl", "b.jsonl")
    assert (cfg.lora.cloud, cfg.lora.r, cfg.lora.targets) == ("edge", 4, ("q_proj", "k_proj"))
    assert (cfg.kr.enabled, cfg.kr.warmup, cfg.kr.signal) == (True, 3, "grad")
    assert (cfg.noise.sigma, cfg.noise.clip, cfg.k, cfg.m) == (0.5, 2.0, 2, 3)
    assert (cfg.wire_up, cfg.wire_down, cfg.out_dir, cfg.dtype) == ("int8", "bf16", "o", "float16")
    assert (cfg.optim.lr, cfg.optim.steps, cfg.optim.batch_size) == (0.1, 5, 2)
    assert (cfg.eval.examples, cfg.eval.before, cfg.eval.after) == (9, False, True)
    assert cfg == EdgeConfig.of(cloud="h:1", token="t", name="edge-3", task="mrpc", cloud_lora="edge", steps=5,
                                out_dir="o", k=2, m=3, lora_r=4, lora_targets=("q_proj", "k_proj"), wire_up="int8",
                                wire_down="bf16", kr=True, kr_warmup=3, kr_signal="grad", noise_sigma=0.5,
                                noise_clip=2.0, dtype="float16", train_file="a.jsonl", dev_file="b.jsonl", lr=0.1,
                                batch_size=2, eval_examples=9, eval_before=False, patience=1)
    with pytest.raises(TypeError, match="no option lora_rank"):
        EdgeConfig.of(lora_rank=4)
    with pytest.raises(SystemExit):  # choices are enforced
        build_parser().parse_args(["edge", "train", "--cloud-lora", "cloud"])


@pytest.mark.parametrize("cls", [EdgeConfig, FederationConfig])
def test_every_flag_has_help_and_a_unique_name(cls):
    table = flags_of(cls)
    assert len({fl.dest for fl in table}) == len(table)
    assert [fl.dest for fl in table if not fl.help] == []
    parser = argparse.ArgumentParser()
    add_flags(parser, cls)
    assert all(a.help for a in parser._actions if a.dest != "help")


def test_edge_train_writes_no_token(cloud, tmp_path, capsys):
    metrics = tmp_path / "metrics-out.json"
    main(["edge", "train", "--cloud", cloud.address, "--token", TOKENS["alice"], "--model", "tiny-llama",
          "--steps", "2", "--batch-size", "2", "--eval-examples", "4", "--no-eval-before", "--no-progress",
          "--out-dir", str(tmp_path / "run"), "--metrics-out", str(metrics)])
    assert "edge" in capsys.readouterr().out  # the client table
    written = [metrics, tmp_path / "run" / "metrics.json"]
    assert [len(json.loads(p.read_text())["steps"]) for p in written] == [2, 2]
    for path in [*written, *(tmp_path / "run").rglob("*")]:
        if path.is_file():
            assert TOKENS["alice"].encode() not in path.read_bytes()
