"""A device that trains locally on an offsite emulator bundle takes part in the federation like one that trains
through the cloud: same LoRA sites, same batches, and, on a lossless bundle (no block dropped), the same adapter."""
from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict

import tasks as T
from cloud.federation.server_app import FederationConfig, initial_adapter
from cloud.federation.strategies.base import arrays_to_record, record_to_arrays
from edge.federation import client_app
from emulator.build import BuildConfig, build

from tests.conftest import TOKENS


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


@pytest.fixture(scope="module")
def lossless_bundle(tmp_path_factory, tiny):
    """tiny-llama with blocks 0 and 5 as the adapter and every middle block kept: the emulator is the model."""
    out = tmp_path_factory.mktemp("bundle") / "b"
    build(BuildConfig(model="tiny-llama", bottom=1, top=1, drop=0.0, distill_steps=0, progress=False), out,
          loaded=tiny)
    return out


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in T.load_split("sst2", "train")[:96]))
    return path


def round_message(adapter, cloud, bundle, freeze_a: bool) -> Message:
    cfg = FederationConfig(model="tiny-llama", cloud_lora="none", local_steps=4, batch_size=8, lr=0.01,
                           emulator_bundle=str(bundle)).instructions(cloud.address, TOKENS["alice"])
    cfg["freeze-a"], cfg["server-round"] = freeze_a, 1
    return Message(RecordDict({"arrays": arrays_to_record(adapter), "config": cfg}), dst_node_id=1,
                   message_type=MessageType.TRAIN)


def device(mode: str, train_file) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1, "train-mode": mode,
                                                     "train-file": str(train_file)},
                   state=RecordDict(), run_config={})


@pytest.mark.parametrize("freeze_a", [False, True])
def test_a_device_on_a_lossless_emulator_trains_like_one_through_the_cloud(cloud, tiny, lossless_bundle,
                                                                           train_file, freeze_a):
    start = initial_adapter(tiny.model, FederationConfig(model="tiny-llama", cloud_lora="none"))
    rng = np.random.default_rng(0)
    start = {k: (v + rng.normal(0, 0.02, v.shape)).astype(np.float32) if ".lora_B." in k else v
             for k, v in start.items()}  # nonzero B: every LoRA path counts from the first step
    replies = {mode: client_app.train(round_message(start, cloud, lossless_bundle, freeze_a), device(mode, train_file))
               for mode in ("emulator", "cloud")}
    local, remote = (record_to_arrays(replies[m].content["arrays"]) for m in ("emulator", "cloud"))
    assert list(local) == list(remote) == list(start)  # the same sites, in the order the server sent
    for key in start:
        np.testing.assert_allclose(local[key], remote[key], atol=2e-5, rtol=1e-4)
        moved = np.abs(local[key] - start[key]).max()
        assert (moved == 0) if (freeze_a and ".lora_A." in key) else (moved > 1e-4)
    m_local, m_remote = (replies[m].content["metrics"] for m in ("emulator", "cloud"))
    assert m_local["on-emulator"] == 1 and m_remote["on-emulator"] == 0
    assert m_local["local-steps"] == m_remote["local-steps"] == m_remote["split-steps"] == 4
    assert m_local["split-steps"] == 0 and m_local["split-bytes-up"] == 0 and m_local["split-step-bytes-up"] == []
    assert m_local["train-loss"] == pytest.approx(m_remote["train-loss"], rel=1e-4)
    assert set(m_local.keys()) == set(m_remote.keys())  # Flower aggregates only replies with the same keys


def test_an_emulator_whose_adapter_blocks_are_not_the_federations_sites_is_refused(cloud, tiny, lossless_bundle,
                                                                                  train_file):
    wider = initial_adapter(tiny.model, FederationConfig(model="tiny-llama", cloud_lora="none", cut_top=2))
    with pytest.raises(ValueError, match="adapter blocks"):
        client_app.train(round_message(wider, cloud, lossless_bundle, False), device("emulator", train_file))


def test_the_server_refuses_emulator_devices_with_dlora():
    with pytest.raises(ValueError, match="emulator"):
        FederationConfig.from_run_config({"emulator-devices": "0", "emulator-bundle": "b", "cloud-lora": "edge"})
