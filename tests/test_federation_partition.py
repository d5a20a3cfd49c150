"""Partitions of local data among devices with flwr-datasets: IID, Dirichlet over labels, pathological k labels."""
from __future__ import annotations

import math
from collections import Counter

import pytest

import tasks as T
from sim.federation.driver import partition, write_partitions


@pytest.fixture(scope="module")
def rows():
    """4 labels, a local file, no hub; `idx` tells rows apart (AG News has duplicate texts)."""
    return [dict(r, idx=i) for i, r in enumerate(T.load_split("agnews", "train")[:4000])]


def ids(part):
    return [r["idx"] for r in part]


def label_entropy(part) -> float:
    counts = Counter(r["label"] for r in part)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def test_every_example_goes_to_exactly_one_device(rows):
    for how in ("iid", "dirichlet", "pathological"):
        parts = partition(rows, 8, how, alpha=0.5, labels_per_device=2)
        assert len(parts) == 8
        flat = [t for p in parts for t in ids(p)]
        assert len(flat) <= len(rows) and len(set(flat)) == len(flat), how
        if how != "pathological":  # pathological drops the classes no device was given, if any
            assert sorted(flat) == sorted(ids(rows)), how


def test_iid_parts_are_equal_and_mixed(rows):
    parts = partition(rows, 8, "iid")
    assert {len(p) for p in parts} == {500}
    assert all(len({r["label"] for r in p}) == 4 for p in parts)


def test_dirichlet_alpha_controls_label_skew(rows):
    skewed = partition(rows, 8, "dirichlet", alpha=0.1, seed=1)
    mild = partition(rows, 8, "dirichlet", alpha=1000.0, seed=1)
    assert min(len(p) for p in skewed) >= 10  # min_partition_size
    mean = lambda parts: sum(label_entropy(p) for p in parts) / len(parts)  # noqa: E731
    assert mean(skewed) < 0.75 * math.log(4) < mean(mild)
    assert mean(mild) > 0.98 * math.log(4)


def test_pathological_gives_each_device_k_labels(rows):
    for k in (1, 2):
        parts = partition(rows, 8, "pathological", labels_per_device=k, seed=3)
        assert all(len({r["label"] for r in p}) == k for p in parts)
        assert {r["label"] for p in parts for r in p} == {0, 1, 2, 3}  # first-deterministic covers every label


def test_partition_files_are_what_the_device_reads(rows, tmp_path):
    parts = partition(rows, 3, "dirichlet", alpha=0.5)
    summary = write_partitions(parts, tmp_path)
    for i, part in enumerate(parts):
        back = T.load_split("agnews", "train", tmp_path / f"client-{i}.jsonl")
        assert [(r["text"], r["label"]) for r in back] == [(r["text"], r["label"]) for r in part]
        assert summary[i]["examples"] == len(part)
        assert summary[i]["labels"] == dict(sorted(Counter(r["label"] for r in part).items()))


def test_unknown_partitioner_is_refused(rows):
    with pytest.raises(ValueError, match="partitioner"):
        partition(rows, 2, "shards")
