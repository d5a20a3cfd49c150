"""`tandem edge eval` / `generate`, --init-adapter, one identity (--client-name from --name) and a fast
`tandem --help`; all on the tiny model through the tiny cloud. Run folders and the training knobs:
tests/test_edge_runs.py."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import tasks as T
from cli.main import main
from edge.config import EdgeConfig
from edge.trainer import train
from tests.cli_helpers import edge_args, refused, train_args
from tests.conftest import TOKENS

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------- edge eval

def test_eval_of_the_saved_adapter_reproduces_the_accuracy_training_printed(cloud, tiny, tmp_path, capsys):
    out = tmp_path / "run"
    main(train_args(cloud, out, "--cloud-lora", "edge", "--no-eval-before"))
    printed = capsys.readouterr().out
    trained = json.loads((out / "metrics.json").read_text())["eval_after"]
    assert f"adapter (PEFT): {out / 'adapter'}" in printed and str(out / "metrics.json") in printed
    assert f"{100 * trained['accuracy']:.1f}%" in printed  # what the run printed ...
    saved = json.loads((out / "config.json").read_text())  # the run's settings, without the token
    assert saved["lora"]["cloud"] == "edge" and "token" not in saved["link"]
    assert TOKENS["alice"] not in (out / "config.json").read_text()

    dev_file = str(T.data_root() / "sst2" / "dev.tsv")  # ... is what eval says of the SST-2 dev file
    scores = tmp_path / "eval.json"
    main(["edge", "eval", "--adapter", str(out / "adapter"), "--dev-file", dev_file, "--metrics-out", str(scores),
          *edge_args(cloud)])
    line = capsys.readouterr().out
    got = json.loads(scores.read_text())["eval"]
    assert got == trained  # accuracy and examples, exactly
    assert f"{100 * trained['accuracy']:.1f}% on 16 examples" in line and "through" in line
    # locally, with the full model (no cloud, no token): the same accuracy
    main(["edge", "eval", "--adapter", str(out / "adapter"), "--local", "--no-progress", "--metrics-out",
          str(scores)])
    local = json.loads(scores.read_text())
    assert local["eval"] == trained and local["where"] == "locally"

    # --init-adapter: a new run starts from it (its "before" is the first run's "after")
    again = tmp_path / "again"
    main(train_args(cloud, again, "--cloud-lora", "edge", "--init-adapter", str(out / "adapter"), "--steps", "1",
                    "--no-eval-after"))
    assert json.loads((again / "metrics.json").read_text())["eval_before"] == trained
    refused(capsys, train_args(cloud, tmp_path / "r4", "--cloud-lora", "edge", "--init-adapter",
                               str(out / "adapter"), "--lora-r", "4"), r"--lora-r 8 \(here 4\)")  # says what differs


def test_eval_of_a_split_adapter_without_its_run_folder_picks_the_cut_from_the_adapter(cloud, tiny, tmp_path):
    from edge.inference import open_model, score
    cfg = EdgeConfig.of(cloud=cloud.address, token=TOKENS["alice"], model="tiny-llama", steps=2, batch_size=4,
                        eval_examples=8, eval_before=False, progress=False, lora_targets=("q_proj",),
                        out_dir=str(tmp_path / "run"))
    trained = train(cfg, loaded=copy.deepcopy(tiny)).metrics["eval_after"]
    lone = tmp_path / "lone"  # the adapter alone: no config.json next to it
    (tmp_path / "run" / "adapter").rename(lone)
    from edge.runs import config_for_adapter
    ecfg, found = config_for_adapter(str(lone), {"cloud": cloud.address, "token": TOKENS["alice"],
                                                 "model": "tiny-llama", "eval_examples": 8, "progress": False,
                                                 "cloud_lora": "edge"})
    assert not found and ecfg.lora.targets == ("q_proj",)
    with pytest.raises(ValueError, match="does not fit"):  # DLoRA has LoRA on every block: this adapter lacks some
        open_model(ecfg, str(lone), loaded=copy.deepcopy(tiny))
    ecfg, _ = config_for_adapter(str(lone), {"cloud": cloud.address, "token": TOKENS["alice"], "model": "tiny-llama",
                                             "eval_examples": 8, "progress": False})
    tuned = open_model(ecfg, str(lone), loaded=copy.deepcopy(tiny), infer_cloud_lora=True)
    try:
        assert tuned.cfg.lora.cloud == "none" and score(tuned) == trained
    finally:
        tuned.close()


# ------------------------------------------------------------------------------------------------ edge generate

def test_sampling_rules():
    from edge.inference import SampleOptions, next_token
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert next_token(logits, SampleOptions(temperature=0)) == 1  # greedy
    g = torch.Generator().manual_seed(0)
    assert {next_token(logits, SampleOptions(temperature=1.0, top_k=1), g) for _ in range(20)} == {1}
    assert {next_token(logits, SampleOptions(temperature=1.0, top_p=0.01), g) for _ in range(20)} == {1}
    assert {next_token(logits, SampleOptions(temperature=1.0, top_k=2), g) for _ in range(50)} == {1, 2}


def test_generate_through_the_cloud_equals_local_and_is_seeded(cloud, tiny, tmp_path, capsys):
    from edge.inference import SampleOptions, generate, open_model
    out = tmp_path / "run"
    main(train_args(cloud, out, "--cloud-lora", "edge", "--steps", "1", "--no-eval-before", "--no-eval-after"))
    capsys.readouterr()
    main(["edge", "generate", "--adapter", str(out / "adapter"), "--prompt", "Review: fine.\nAnswer:",
          "--max-new-tokens", "4", *edge_args(cloud)])
    cli_out = capsys.readouterr()
    assert "4 tokens in 4 forward passes through" in cli_out.err
    ids = T.tiny_tokenizer()("Review: fine.\nAnswer:")["input_ids"]

    def run(local: bool, **opts) -> list[int]:
        cfg = EdgeConfig.of(cloud=cloud.address, token=TOKENS["alice"], model="tiny-llama", cloud_lora="edge",
                            progress=False)
        tuned = open_model(cfg, str(out / "adapter"), local=local, loaded=copy.deepcopy(tiny))
        try:
            return generate(tuned, ids, SampleOptions(max_new_tokens=4, **opts))["ids"]
        finally:
            tuned.close()

    greedy = run(False)
    assert cli_out.out.split() == [str(i) for i in greedy]  # the tiny tokenizer has no decode: ids
    assert run(True) == greedy
    assert run(False, temperature=1.0, seed=3) == run(True, temperature=1.0, seed=3)


# --------------------------------------------------------------------------------------------- identity, help

def test_client_name_defaults_to_name_when_its_certificate_is_there(tmp_path):
    from edge.trainer import link_config
    (tmp_path / "edge-3.pem").write_text("x")
    assert link_config(EdgeConfig.of(name="edge-3", tls_dir=str(tmp_path))).client_name == "edge-3"
    assert link_config(EdgeConfig.of(name="edge-4", tls_dir=str(tmp_path))).client_name is None  # no cert: plain TLS
    assert link_config(EdgeConfig.of(name="edge-3", tls_dir=str(tmp_path), client_name="x")).client_name == "x"
    assert link_config(EdgeConfig.of(name="edge-3")).client_name is None  # no TLS


def test_tandem_help_builds_no_command_and_every_edge_flag_is_documented():
    code = ("import sys; from cli.main import build_parser; build_parser(only='').format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'grpc') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
    from cli.main import build_parser

    def listed(parser):
        sub = next(a for a in parser._actions if a.dest == "command")
        return {a.dest: a.help for a in sub._choices_actions}, sub.choices

    full, choices = listed(build_parser())
    assert listed(build_parser(only=""))[0] == full  # the stubs say what the commands say
    edge = next(a for a in choices["edge"]._actions if a.dest == "action").choices
    assert {"train", "eval", "generate"} <= set(edge)
    cloud = next(a for a in choices["cloud"]._actions if a.dest == "action").choices
    leaves = {"models": choices["models"], "certs": choices["certs"], "tokens": choices["tokens"],
              "demo": choices["demo"], **{f"cloud {k}": v for k, v in cloud.items()},
              **{f"edge {k}": v for k, v in edge.items()}}
    for name, parser in leaves.items():
        for action in parser._actions:
            assert action.help, (name, action.dest)
            if action.choices and action.option_strings:  # choices are listed: {a,b} in the help
                assert "{" + ",".join(map(str, action.choices)) + "}" in parser.format_help(), (name, action.dest)
    train_flags = {s for a in edge["train"]._actions for s in a.option_strings}
    assert {"--warmup-steps", "--schedule", "--max-grad-norm", "--grad-accum-steps", "--init-adapter",
            "--tensorboard", "--resume", "--overwrite"} <= train_flags
    assert EdgeConfig().eval.examples == 100  # short runs by default; the demo and benches pass 500


def test_quiet_loading_silences_transformers_and_restores_it():
    from transformers.utils import logging as hf_logging
    from model.quiet import quiet_loading
    level = hf_logging.get_verbosity()
    with quiet_loading(verbose=False):
        assert not hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.ERROR
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == level
    with quiet_loading(verbose=True):
        assert hf_logging.is_progress_bar_enabled()
