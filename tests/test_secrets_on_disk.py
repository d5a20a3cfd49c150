"""What a training run leaves on disk: no bearer token in any file, private files 0600, every file written whole
(temporary file, fsync, rename), and a checkpoint that is not one (a crafted pickle) refused without running it."""
from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from cli.main import main
from edge.trainer import EdgeConfig, train
from model.training import Checkpoint, CheckpointError
from privacy.security.files import atomic_writer, write_atomic, write_private
from tests.conftest import TOKENS

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = TOKENS["alice"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def assert_no_token(paths: list[Path]) -> None:
    assert paths
    holding = [str(p) for p in paths if TOKEN.encode() in p.read_bytes()]
    assert holding == [], f"the bearer token is on disk in {holding}"


def assert_no_temporaries(folder: Path) -> None:
    left = [str(p) for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert left == [], f"temporary files left behind: {left}"


# ------------------------------------------------------------------------------------------- no token on disk


def test_a_training_run_writes_no_token(cloud, tiny, tmp_path):
    """DLoRA through a real cloud, checkpoints every 2 steps: every file under out_dir is free of the token."""
    out = tmp_path / "run"
    cfg = EdgeConfig.of(cloud=cloud.address, token=TOKEN, model="tiny-llama", cloud_lora="edge", steps=4,
                        batch_size=2, checkpoint_every=2, eval_examples=4, eval_before=False, progress=False,
                        out_dir=str(out))
    result = train(cfg, loaded=copy.deepcopy(tiny))
    written = files_under(out)
    names = {p.relative_to(out).as_posix() for p in written}
    assert {"metrics.json", "checkpoint.pt", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors"} <= names
    assert_no_token(written)
    assert TOKEN not in json.dumps(result.metrics)
    assert "token" not in result.metrics["config"]["link"]
    assert mode(out / "checkpoint.pt") == 0o600 and mode(out / "metrics.json") == 0o600
    assert_no_temporaries(out)


def test_edge_train_with_a_token_file_writes_no_token(cloud, tmp_path, capsys):
    """`tandem edge train --token-file`: neither out_dir nor --metrics-out holds the token; both private files 0600."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    token_file = secrets / "tokens.json"
    token_file.write_text(json.dumps({"alice": TOKEN}))
    out, metrics_out = tmp_path / "run", tmp_path / "metrics-out.json"
    main(["edge", "train", "--cloud", cloud.address, "--token-file", str(token_file), "--name", "alice",
          "--model", "tiny-llama", "--cloud-lora", "edge", "--steps", "2", "--batch-size", "2",
          "--eval-examples", "4", "--no-eval-before", "--no-progress", "--out-dir", str(out),
          "--metrics-out", str(metrics_out)])
    assert "alice" in capsys.readouterr().out  # the client table
    assert len(json.loads(metrics_out.read_text())["steps"]) == 2
    assert_no_token([metrics_out, *files_under(out)])
    assert mode(metrics_out) == 0o600 and mode(out / "checkpoint.pt") == 0o600
    assert_no_temporaries(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --------------------------------------------------------------------------------- a crafted checkpoint


class RunsCode:
    """Unpickled without weights_only, this opens (creates) the marker file: code run by loading a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def craft(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weights": {}, "opt": RunsCode(marker), "step": 0, "records": []}, path)


def refusal(path: Path) -> str:
    return f"{path} is not a Tandem checkpoint (refusing to unpickle it): delete it or choose another --out-dir"


def test_the_crafted_pickle_would_run_code(tmp_path):
    """The payload is live: an unsafe load runs it (so the refusals below are what keeps it from running)."""
    marker = tmp_path / "pwned"
    craft(tmp_path / "checkpoint.pt", marker)
    torch.load(tmp_path / "checkpoint.pt", weights_only=False)["opt"].close()
    assert marker.exists()


def test_a_crafted_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    craft(tmp_path / "run" / "checkpoint.pt", marker)
    with pytest.raises(ValueError) as e:
        Checkpoint(tmp_path / "run").load()
    assert str(e.value) == refusal(tmp_path / "run" / "checkpoint.pt")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"not a checkpoint at all", None])
def test_other_files_are_refused_too(tmp_path, content):
    """Garbage, or a weights-only pickle without a checkpoint's fields, gets the same one line."""
    path = tmp_path / "checkpoint.pt"
    if content is None:
        torch.save({"a": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is not a Tandem checkpoint"):
        Checkpoint(tmp_path).load()


def test_resuming_from_a_crafted_checkpoint_is_refused(cloud, tiny, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    craft(out / "checkpoint.pt", marker)
    cfg = EdgeConfig.of(cloud=cloud.address, token=TOKEN, model="tiny-llama", steps=2, batch_size=2,
                        eval_before=False, eval_after=False, progress=False, out_dir=str(out))
    with pytest.raises(ValueError, match="is not a Tandem checkpoint"):
        train(cfg, loaded=copy.deepcopy(tiny))
    assert not marker.exists()


def test_the_cli_prints_the_refusal_in_one_line(cloud, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    craft(out / "checkpoint.pt", marker)
    with pytest.raises(SystemExit) as e:  # a folder holding a run is refused unless --resume: resume the crafted one
        main(["edge", "train", "--cloud", cloud.address, "--token", TOKEN, "--model", "tiny-llama", "--steps", "2",
              "--batch-size", "2", "--no-eval-before", "--no-eval-after", "--no-progress", "--out-dir", str(out),
              "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"tandem: error: {refusal(out / 'checkpoint.pt')}")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ atomicity


def test_write_atomic_replaces_content_keeps_the_mode_asked_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "file.json"
    old_umask = os.umask(0o077)  # the mode asked, not the umask's
    try:
        write_atomic(path, b"one", 0o644)
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"one" and mode(path) == 0o644
    os.chmod(path, 0o666)
    inode = path.stat().st_ino
    write_atomic(path, b"two", 0o600)  # the old file's mode does not carry over
    assert path.read_bytes() == b"two" and mode(path) == 0o600
    assert path.stat().st_ino != inode  # a new file renamed over the old one, not written in place
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "file.json"
    write_atomic(path, b"old")
    with pytest.raises(RuntimeError):
        with atomic_writer(path, 0o600) as f:
            f.write(b"half of the new")
            raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]


def test_write_private_is_0600_and_never_replaces_without_overwrite(tmp_path):
    path = tmp_path / "key.pem"
    write_private(path, b"a", overwrite=False)
    assert mode(path) == 0o600
    with pytest.raises(FileExistsError):
        write_private(path, b"b", overwrite=False)
    os.chmod(path, 0o644)
    write_private(path, b"c", overwrite=True)
    assert path.read_bytes() == b"c" and mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]


def test_certificates_are_written_atomically(tmp_path):
    from privacy.security.certs import make_certs
    make_certs(tmp_path / "certs")
    make_certs(tmp_path / "certs")  # remade over the old ones
    assert_no_temporaries(tmp_path / "certs")
    for p in files_under(tmp_path / "certs"):
        assert mode(p) == (0o600 if p.suffix == ".key" else 0o644), p
