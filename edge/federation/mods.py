"""Client-side mods for the privacy options, switched on by what the server sends (nothing to configure on devices).

  secaggplus_when_asked  Flower's `secaggplus_mod` when the message carries SecAgg+ stage configs; otherwise a no-op.
                         Flower's mod expects the legacy FitRes layout of the reply, so the train reply is put into
                         that layout here; the mod then empties its arrays and sends the masked vector instead.
  clip_when_asked        Flower's `fixedclipping_mod` (client-side clipping for central DP, paired with the
                         server's `DifferentialPrivacyClientSideFixedClipping`) when the config has a clipping norm.

Order in the ClientApp: SecAgg+ outside, clipping inside, so an update is clipped before it is masked.
"""
from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

WEIGHT_KEY = "num-examples"


def as_fitres(reply: Message) -> Message:
    """Put a train reply {"arrays", "metrics"} into the legacy FitRes layout `secaggplus_mod` reads. Legacy metrics
    are scalars, so list metrics (per-step traffic) travel as JSON text."""
    if reply.has_error():
        return reply
    metrics = next(iter(reply.content.metric_records.values()))
    arrays = next(iter(reply.content.array_records.values()))
    reply.content = RecordDict({
        "fitres.parameters": arrays,
        "fitres.num_examples": MetricRecord({"num_examples": int(metrics[WEIGHT_KEY])}),
        "fitres.metrics": ConfigRecord({k: json.dumps(v) if isinstance(v, list) else v for k, v in metrics.items()}),
        "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
    })
    return reply


def secaggplus_when_asked(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctx)

    def train_then_fitres(inner: Message, inner_ctx: Context) -> Message:
        del inner.content[RECORD_KEY_CONFIGS]  # the app (and clipping) see an ordinary train message
        return as_fitres(call_next(inner, inner_ctx))

    return secaggplus_mod(msg, ctx, train_then_fitres)


def clip_when_asked(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    configs = msg.content.config_records
    if not any(KEY_CLIPPING_NORM in c for c in configs.values()):
        return call_next(msg, ctx)
    return fixedclipping_mod(msg, ctx, call_next)
