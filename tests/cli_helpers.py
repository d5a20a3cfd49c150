"""The `tandem edge ...` command lines the CLI tests run (tests/test_edge_commands.py, tests/test_edge_runs.py)."""
from __future__ import annotations

import re

import pytest

from cli.main import main
from tests.conftest import TOKENS


def refused(capsys, argv, pattern: str) -> None:
    """The command fails as a user error: exit status 2 and one stderr line matching `pattern`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and re.search(pattern, err[0]), err


def edge_args(cloud, *more: str) -> list[str]:
    return ["--cloud", cloud.address, "--token", TOKENS["alice"], "--model", "tiny-llama", "--no-progress", *more]


def train_args(cloud, out, *more: str) -> list[str]:
    return ["edge", "train", *edge_args(cloud, "--steps", "3", "--batch-size", "4", "--lr", "0.01",
                                        "--eval-examples", "16", "--out-dir", str(out), *more)]
