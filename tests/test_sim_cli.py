"""`tandem sim ...` from the command line: predict as JSON, compare with its plots, registration in `tandem`."""
from __future__ import annotations

import json

import pytest

from sim.cli import main


def test_predict_json_for_llama_7b(capsys):
    main(["predict", "--model", "llama-7b", "--edge", "rtx-4090", "--cloud", "h100-sxm", "--links", "100mbit,1gbit",
          "--batch", "8", "--seq", "256", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 14  # 7 paths x 2 links
    split = {r["link"]: r for r in rows if r["path"] == "split"}
    assert split["100mbit"]["bytes_up"] == split["1gbit"]["bytes_up"] > 0
    assert split["100mbit"]["step_s"] > split["1gbit"]["step_s"]
    assert not next(r for r in rows if r["path"] == "local-full")["edge_fits"]


def test_compare_prints_assumptions_and_writes_three_plots(tmp_path, capsys):
    main(["compare", "--model", "llama-7b", "--edge", "apple-m2", "--cloud", "a100-80gb", "--batch", "4",
          "--seq", "128", "--links", "100mbit,1gbit", "--ns", "1,4", "--out-dir", str(tmp_path),
          "--json-out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    for needle in ("Apple M2 press release", "NVIDIA A100 datasheet", "N saturating", "batch 4 x 128"):
        assert needle in out
    for name in ("step_time_vs_bandwidth.png", "bytes_vs_cut.png", "utilisation_vs_edges.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    result = json.loads((tmp_path / "r.json").read_text())
    assert {s["path"] for s in result["saturation"]} == {"split", "dlora", "carried"}


def test_tandem_cli_registers_sim():
    from cli.main import build_parser
    args = build_parser().parse_args(["sim", "predict", "--model", "llama-70b", "--edge", "h100-sxm",
                                      "--cloud", "h100-sxm", "--paths", "split"])
    assert args.func.__name__ == "cmd_predict" and args.paths == ("split",)


def _leaves(parser, name):
    """(command path, parser) of every leaf command under `parser`."""
    import argparse
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield name, parser
    for sub in subs:
        for word, child in sub.choices.items():
            yield from _leaves(child, f"{name} {word}")


@pytest.mark.parametrize("command", ["offsite", "sim"])
def test_every_offsite_and_sim_flag_has_help_and_lists_its_choices(command):
    import argparse
    from cli.main import build_parser
    top = next(a for a in build_parser(only=command)._actions if a.dest == "command").choices[command]
    leaves = dict(_leaves(top, command))
    assert len(leaves) >= 4
    for name, parser in leaves.items():
        text = parser.format_help()  # every %(default)s expands
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), (name, action.option_strings)
            if action.choices:
                assert "{" + ",".join(map(str, action.choices)) + "}" in text, (name, action.option_strings)


def _no_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    monkeypatch.delenv("TANDEM_SIM_CALIBRATION", raising=False)
    from sim.calibrate import calibration_path
    assert not calibration_path().exists()


@pytest.mark.parametrize("model", ["llama-7b", "smollm2-135m", "llama-70b"])
def test_predict_from_documented_profiles_needs_no_calibration(model, tmp_path, monkeypatch, capsys):
    from cli.main import main as tandem
    _no_calibration(tmp_path, monkeypatch)
    tandem(["sim", "predict", "--model", model, "--edge", "rtx-4090", "--cloud", "h100-sxm"])  # default testbed link
    out = capsys.readouterr().out
    assert "assumed gRPC loopback" in out and "split" in out
    tandem(["sim", "predict", "--model", model, "--edge", "apple-m2", "--cloud", "a100-80gb", "--links", "lte",
            "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert {r["path"] for r in rows} == {"local-full", "local-peft", "split", "dlora", "carried", "offsite",
                                         "federated"}
    assert all(r["step_s"] > 0 for r in rows)


@pytest.mark.parametrize("flags", [[], ["--edge", "rtx-4090"], ["--edge", "h100-sxm", "--cloud", "here-matmul"]])
def test_predict_for_here_without_calibration_says_how_in_one_line(flags, tmp_path, monkeypatch, capsys):
    from cli.main import main as tandem
    from sim.profiles import DEVICES
    _no_calibration(tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as e:
        tandem(["sim", "predict", "--model", "llama-7b", *flags])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "`here`" in err and "tandem sim calibrate" in err and all(d in err for d in DEVICES)


def test_bad_profile_or_path_is_a_usage_error_listing_the_choices(capsys):
    from cli.main import main as tandem
    for flags, needle in ((["--edge", "abacus"], "raspberry-pi-5"), (["--paths", "split,teleport"], "federated"),
                          (["--targets", "qq_proj"], "down_proj"), (["--wire-up", "fp8"], "int8")):
        with pytest.raises(SystemExit) as e:
            tandem(["sim", "predict", "--model", "llama-7b", *flags])
        assert e.value.code == 2 and needle in capsys.readouterr().err
