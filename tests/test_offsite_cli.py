"""`tandem offsite` end to end on a tiny Llama: keys, a sealed bundle, tuning, a sealed adapter, plug-in with the
table, ONNX export and `infer`; and the command line refusing a bundle that is not from the expected cloud."""
from __future__ import annotations

import json

import pytest

from emulator.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """keygen, build, tune, plug on tiny-llama; returns the working folder."""
    d = tmp_path_factory.mktemp("cli")
    (d / "mine.tsv").write_text("sentence\tlabel\n" + "".join(f"film {i}\t{i % 2}\n" for i in range(24)))
    for name in ("cloud", "owner", "mallory"):
        main(["keygen", "--keys", str(d / "keys"), "--name", name])
    main(["build", "--model", "tiny-llama", "--bottom", "1", "--top", "1", "--drop", "0.5", "--distill-steps", "2",
          "--distill-batch", "2", "--distill-seq", "16", "--no-progress", "--out", str(d / "cloud"),
          "--keys", str(d / "keys"), "--me", "cloud", "--to", "owner"])
    data = ["--train-file", str(d / "mine.tsv"), "--dev-file", str(d / "mine.tsv")]
    main(["tune", "--sealed", str(d / "cloud" / "bundle.sealed"), "--keys", str(d / "keys"), "--me", "owner",
          "--from", "cloud", "--out", str(d / "owner"), "--mode", "lora", "--steps", "2", "--batch-size", "4",
          "--eval-examples", "8", "--no-progress", "--onnx", str(d / "owner" / "onnx"), *data])
    return d


def test_end_to_end(run, capsys):
    d = run
    assert (d / "cloud" / "bundle" / "manifest.json").is_file() and (d / "owner" / "adapter.sealed").is_file()
    metrics = json.loads((d / "owner" / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 2 and "emulator_fine_tuned" in metrics
    main(["plug", "--bundle", str(d / "cloud" / "bundle"), "--sealed", str(d / "owner" / "adapter.sealed"),
          "--keys", str(d / "keys"), "--me", "cloud", "--from", "owner", "--reference-steps", "1",
          "--eval-examples", "8", "--no-progress", "--out", str(d / "plug"), "--onnx", str(d / "plug" / "onnx")])
    out = capsys.readouterr().out
    for row in ("full model zero-shot", "emulator zero-shot", "emulator fine-tuned", "plug-in", "full fine-tuning"):
        assert row in out
    table = json.loads((d / "plug" / "table.json").read_text())
    assert table["mode"] == "lora" and table["distillation"]["steps"] == 2
    for which in ("owner", "plug"):
        main(["infer", "--onnx", str(d / which / "onnx" / "model.onnx"), "--task", "sst2", "--text", "a fine film"])
        line = capsys.readouterr().out.strip()
        assert line.split("\t")[0] in ("negative", "positive") and line.endswith("a fine film")


def test_refuses_a_bundle_from_someone_else(run, tmp_path):
    d = run
    main(["build", "--model", "tiny-llama", "--bottom", "1", "--top", "1", "--no-progress", "--out",
          str(tmp_path / "fake"), "--keys", str(d / "keys"), "--me", "mallory", "--to", "owner"])
    with pytest.raises(SystemExit, match="signature does not verify"):
        main(["tune", "--sealed", str(tmp_path / "fake" / "bundle.sealed"), "--keys", str(d / "keys"), "--me",
              "owner", "--from", "cloud", "--out", str(tmp_path / "owner"), "--steps", "1", "--no-progress"])
    with pytest.raises(SystemExit, match="addressed to another recipient"):
        main(["tune", "--sealed", str(d / "cloud" / "bundle.sealed"), "--keys", str(d / "keys"), "--me", "mallory",
              "--from", "cloud", "--out", str(tmp_path / "m"), "--steps", "1", "--no-progress"])
    with pytest.raises(SystemExit, match="--sealed"):
        main(["tune", "--bundle", str(d / "cloud" / "bundle"), "--out", str(tmp_path / "u"), "--steps", "1"])
