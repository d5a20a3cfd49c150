"""The privacy switches without a simulation: client-side clipping only when asked, SecAgg+ only when asked, and
central DP noise of the right size on the aggregate."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from cloud.federation.server_app import FederationConfig, make_strategy
from cloud.federation.strategies.base import arrays_to_record, record_to_arrays
from edge.federation.mods import as_fitres, clip_when_asked, secaggplus_when_asked

A, B = "m.layers.0.q_proj.lora_A.weight", "m.layers.0.q_proj.lora_B.weight"


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


class FakeGrid:
    def get_node_ids(self):
        return [1, 2, 3, 4]


def train_message(adapter, **config) -> Message:
    return Message(RecordDict({"arrays": arrays_to_record(adapter), "config": ConfigRecord(config)}),
                   dst_node_id=1, message_type=MessageType.TRAIN)


def context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def trainer_moving_by(delta):
    """A stand-in ClientApp that adds `delta` to every weight it is sent."""
    def app(msg, ctx):
        start = record_to_arrays(msg.content["arrays"])
        out = {k: v + delta for k, v in start.items()}
        return Message(RecordDict({"arrays": arrays_to_record(out), "metrics": MetricRecord({"num-examples": 5})}),
                       reply_to=msg)
    return app


START = {A: np.zeros((2, 3)), B: np.zeros((4, 2))}  # 14 weights


def test_clipping_only_when_the_server_asks():
    plain = clip_when_asked(train_message(START), context(), trainer_moving_by(1.0))
    assert all(np.all(v == 1.0) for v in record_to_arrays(plain.content["arrays"]).values())
    clipped = clip_when_asked(train_message(START, **{KEY_CLIPPING_NORM: 0.5}), context(), trainer_moving_by(1.0))
    update = np.concatenate([v.ravel() for v in record_to_arrays(clipped.content["arrays"]).values()])
    assert np.linalg.norm(update) == pytest.approx(0.5, rel=1e-6)  # one flat clip over the whole adapter
    assert np.allclose(update, update[0])


def test_secaggplus_mod_only_runs_when_the_message_carries_its_stage():
    out = secaggplus_when_asked(train_message(START), context(), trainer_moving_by(1.0))
    assert set(out.content.keys()) == {"arrays", "metrics"}  # untouched: no SecAgg+ this round


def test_fitres_layout_carries_lists_as_text():
    msg = train_message(START)
    reply = Message(RecordDict({"arrays": arrays_to_record(START), "metrics": MetricRecord(
        {"num-examples": 7, "split-step-bytes-up": [1, 2]})}), reply_to=msg)
    fit = as_fitres(reply).content
    assert fit["fitres.num_examples"]["num_examples"] == 7
    assert fit["fitres.metrics"]["split-step-bytes-up"] == "[1, 2]"
    assert list(fit["fitres.parameters"].keys()) == [A, B]


def test_central_dp_adds_noise_of_the_configured_size_to_the_aggregate():
    sigma, clip, n = 0.8, 2.0, 4
    strategy, inner = make_strategy(FederationConfig(strategy="fedavg", dp=True, dp_noise_multiplier=sigma,
                                                     dp_clipping_norm=clip), n)
    assert isinstance(strategy, DifferentialPrivacyClientSideFixedClipping)
    rng = np.random.default_rng(0)
    start = {A: rng.normal(size=(8, 400)), B: rng.normal(size=(400, 8))}
    msgs = list(strategy.configure_train(1, arrays_to_record(start), ConfigRecord({}), FakeGrid()))
    assert all(m.content["config"][KEY_CLIPPING_NORM] == clip for m in msgs)  # the devices clip
    replies = [Message(RecordDict({"arrays": arrays_to_record(start), "metrics": MetricRecord({"num-examples": 3})}),
                       reply_to=m) for m in msgs]
    arrays, _ = strategy.aggregate_train(1, replies)
    noise = np.concatenate([(record_to_arrays(arrays)[k] - start[k].astype(np.float32)).ravel() for k in (A, B)])
    assert noise.std() == pytest.approx(sigma * clip / n, rel=0.05)  # Flower's central DP: sigma * C / clients
    assert abs(noise.mean()) < 0.02
