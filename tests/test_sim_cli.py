"""`tandem sim ...` from the command line: predict as JSON, compare with its plots, registration in `tandem`."""
from __future__ import annotations

import json

from sim.cli import main


def test_predict_json_for_llama_7b(capsys):
    main(["predict", "--model", "llama-7b", "--edge", "rtx-4090", "--cloud", "h100-sxm", "--links", "100mbit,1gbit",
          "--batch", "8", "--seq", "256", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 12
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
    assert {s["path"] for s in result["saturation"]} == {"split", "dlora"}


def test_tandem_cli_registers_sim():
    from cli.main import build_parser
    args = build_parser().parse_args(["sim", "predict", "--model", "llama-70b", "--edge", "h100-sxm",
                                      "--cloud", "h100-sxm", "--paths", "split"])
    assert args.func.__name__ == "cmd_predict" and args.paths == ("split",)
