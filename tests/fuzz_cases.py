"""tests/test_fuzz.py's seeded case generator: each case makes exactly one thing wrong, and its expected status is
derived from what it made wrong (the table in tests/test_fuzz.py's docstring), never from what the server answers."""
from __future__ import annotations

import random

from protocol import AUTH_HEADER, pb
from protocol.step import UP, UP_KINDS, StepPlan
from tests.conftest import TOKENS
from tests.fuzz_messages import (CANCELLED, DENIED, EXHAUSTED, INVALID, LORA_BLOCKS, MAX_MESSAGE_MB, MAX_TOKENS,
                                 NOT_FOUND, OK, PER_DIM, PRECONDITION, UNAUTH, WIRES, Case, Ctx, Dims, bad_tensor,
                                 garbage, good_tensor, open_session_fields, proto_field, step_cost, tensor_defects)


class Generator:
    def __init__(self, seed: int, dims: Dims, block_params: int, bob_session: str, fingerprint: str):
        self.rng = random.Random(seed)
        self.dims, self.block_params = dims, block_params
        self.bob_session, self.fingerprint = bob_session, fingerprint

    def cases(self, n: int) -> list[Case]:
        weights = {"Begin": 20, "LoraReply": 17, "OutputGrad": 10, "LoraGradReply": 14, "EdgeMessage bytes": 9,
                   "out of order": 9, "early end": 3, "Step auth": 3, "OpenSessionRequest": 9,
                   "OpenSessionRequest bytes": 4, "SessionRef": 4, "SessionRef bytes": 3}
        kinds = list(weights)
        out = [self.case(k) for k in kinds]  # every kind at least once
        # every tensor defect, for each wire dtype and each tensor the edge sends (each dimension where it matters)
        for wire_name, wire in WIRES.items():
            for kind, role in [("Begin", "hidden"), ("Begin", "mask"), ("LoraReply", "float"),
                               ("OutputGrad", "float"), ("LoraGradReply", "float")]:
                rank = 2 if role == "mask" else 3
                for how in tensor_defects(pb.BOOL if role == "mask" else wire, role):
                    for dim in (range(rank) if how in PER_DIM else [None]):
                        force = dict(how=how, dim=dim, session=wire_name)
                        out.append(self.case(kind, what=role, **force) if kind == "Begin" else self.case(kind, **force))
        while len(out) < n:
            out.append(self.case(self.rng.choices(kinds, [weights[k] for k in kinds])[0]))
        return out

    def case(self, kind: str, **force) -> Case:
        rng = random.Random(self.rng.randrange(2**63))  # each case its own stream of randomness
        make = {"Begin": self._begin, "LoraReply": self._lora_reply, "OutputGrad": self._output_grad,
                "LoraGradReply": self._lora_grad_reply, "EdgeMessage bytes": self._edge_message_bytes,
                "out of order": self._out_of_order, "early end": self._early_end, "Step auth": self._step_auth,
                "OpenSessionRequest": self._open_session_request,
                "OpenSessionRequest bytes": self._open_session_request_bytes, "SessionRef": self._session_ref,
                "SessionRef bytes": self._session_ref_bytes}[kind]
        return make(rng, kind, **force)

    # -- the step's shape and where a bad message can go --
    def _plan(self, rng, kind_at: str | None, **kw) -> Case:
        session = kw.pop("session", rng.choice(list(WIRES)))
        needs_lora = kind_at in ("lora_reply", "lora_grad_reply")
        train = kw.pop("train", True if kind_at in ("output_grad", "lora_grad_reply") else rng.random() < 0.8)
        active = kw.pop("active", None)
        if active is None:
            k = rng.randint(1 if needs_lora else 0, len(LORA_BLOCKS))
            active = tuple(sorted(rng.sample(LORA_BLOCKS, k)))
        plan = StepPlan(train, active, self.dims.groups).messages()
        ups = [m.kind for m in plan if m.direction == UP]
        where = [i for i, k in enumerate(ups) if kind_at is None or k == kind_at]
        return Case(kind="", expect=OK, label="", session=session, train=train, active=active,
                    batch=rng.randint(1, 3), seq=rng.randint(1, 6), at=rng.choice(where), **kw)

    def _begin(self, rng, kind, what=None, how=None, dim=None, session=None):
        c = self._plan(rng, "begin", **({"session": session} if session else {}))
        H, wire = self.dims.H, WIRES[c.session]
        what = what or rng.choice(["session", "session", "hidden", "hidden", "hidden", "mask", "mask", "missing",
                                   "active blocks", "too many tokens", "oversized"])
        begin = pb.Begin(session_id="", step=rng.randrange(2**64), train=c.train, active_blocks=c.active,
                         hidden=good_tensor(rng, [c.batch, c.seq, H], wire),
                         attention_mask=good_tensor(rng, [c.batch, c.seq], rng.choice([pb.BOOL, pb.INT64])))
        sid = None  # the worker's own session
        if what == "session":
            how = rng.choice(["unknown", "empty", "huge", "junk", "another client's"])
            sid = {"unknown": lambda: "%032x" % rng.getrandbits(128), "empty": lambda: "",
                   "huge": lambda: "s" * rng.choice([1000, 100_000, 1_000_000]),
                   "junk": lambda: "".join(chr(rng.choice([0, 0x7f, 0x2028, 0xfeff, 0x1f600, 0x10ffff]))
                                           for _ in range(rng.randint(1, 50))),
                   "another client's": lambda: self.bob_session}[how]()
            c.expect, c.label = (DENIED if how == "another client's" else NOT_FOUND), f"session id {how}"
        elif what == "hidden":
            t, c.expect, c.label = bad_tensor(rng, [c.batch, c.seq, H], wire, "hidden", how, dim)
            begin.hidden.CopyFrom(t)
        elif what == "mask":
            t, c.expect, c.label = bad_tensor(rng, [c.batch, c.seq], begin.attention_mask.dtype, "mask", how, dim)
            begin.attention_mask.CopyFrom(t)
        elif what == "missing":
            field_ = rng.choice(["hidden", "attention_mask"])
            begin.ClearField(field_)
            c.expect, c.label = INVALID, f"no {field_}"
        elif what == "active blocks":
            if rng.random() < 0.3:  # a session with no LoRA sites at all
                c.session, wire = "plain", pb.FLOAT32
                begin.hidden.CopyFrom(good_tensor(rng, [c.batch, c.seq, H], wire))
                bad = list(rng.sample(LORA_BLOCKS, rng.randint(1, 4)))
            else:
                bad = list(c.active) + [rng.choice([0, 5, 6, 7, 2**16, 2**32 - 1])]
            del begin.active_blocks[:]
            begin.active_blocks.extend(rng.sample(bad, len(bad)))
            c.active = ()  # the step never starts
            c.expect, c.label = INVALID, f"active blocks {bad[:6]} without LoRA sites"
        elif what == "too many tokens":  # well-formed, real bytes: the token or the cost limit refuses it
            B, T = rng.choice([(1, MAX_TOKENS + 1), (2, 2100), (1, 3000), (5000, 1), (20, 300), (1, 9000)])
            begin.hidden.CopyFrom(good_tensor(rng, [B, T, H], wire))
            begin.attention_mask.CopyFrom(good_tensor(rng, [B, T], pb.BOOL))
            ref = 512
            over_cost = step_cost(B, T, self.block_params, H) > step_cost(MAX_TOKENS // ref, ref,
                                                                          self.block_params, H)
            assert B * T > MAX_TOKENS or over_cost  # the generator's own check
            c.expect, c.label = EXHAUSTED, f"{B} x {T} tokens"
        else:  # over the gRPC message limit: gRPC refuses it before the service sees it
            begin.hidden.data = b"\0" * (MAX_MESSAGE_MB * 2**20 + rng.randint(1, 2**20))
            c.expect, c.label = EXHAUSTED, "message over the size limit"
        c.kind = kind
        c.payload = lambda ctx, b=begin, s=sid: _with_session(b, ctx, s)
        return c

    def _lora_reply(self, rng, kind, session=None, **tensor):
        c = self._plan(rng, "lora_reply", **({"session": session} if session else {}))
        c.kind = kind
        c.payload, c.expect, c.label = self._bad_lora(rng, "lora_reply", **tensor)
        return c

    def _lora_grad_reply(self, rng, kind, session=None, **tensor):
        c = self._plan(rng, "lora_grad_reply", **({"session": session} if session else {}))
        c.kind = kind
        c.payload, c.expect, c.label = self._bad_lora(rng, "lora_grad_reply", **tensor)
        return c

    def _bad_lora(self, rng, kind, how=None, dim=None):
        """A LoRA reply (outputs) or LoRA grad reply (input grad) with one defect, built once the driver knows
        which block and group it answers. With `how`, the defect is that one, in a tensor."""
        what = "tensor" if how else rng.choice(["block", "group", "tensor", "tensor", "tensor",
                                                "count" if kind == "lora_reply" else "tensor"])
        groups = [g for g, _ in self.dims.groups]
        seed = rng.randrange(2**63)
        if what == "block":
            delta = rng.choice([1, -1, 2, 10, 2**31, 2**32 - 1])
            label = f"{kind} for the wrong block (+{delta})"
        elif what == "group":
            wrong = rng.choice(["other", "unknown", "empty", "huge"])
            label = f"{kind} for the wrong group ({wrong})"
        elif what == "count":
            label = "lora_reply with the wrong number of outputs"
        else:
            label = f"{kind} tensor"

        def build(ctx: Ctx) -> tuple[bytes, str]:
            r = random.Random(seed)
            block, group, detail = ctx.block, ctx.group, ""
            if what == "block":
                block = (block + delta) % 2**32
            elif what == "group":
                group = {"other": lambda: next(g for g in groups if g != ctx.group),
                         "unknown": lambda: r.choice(["mlp_in", "attn_out", "ATTN_IN", "attn_in ", "q_proj"]),
                         "empty": lambda: "", "huge": lambda: "g" * r.choice([1000, 1_000_000])}[wrong]()
            if kind == "lora_reply":
                shapes = [[ctx.batch, ctx.seq, self.dims.widths[t]] for t in dict(self.dims.groups)[ctx.group]]
                outs = [good_tensor(r, s, ctx.wire) for s in shapes]
                if what == "count":
                    n = len(outs)
                    k = r.choice([k for k in (0, n - 1, n + 1, n + 5) if k != n])
                    outs = (outs + [good_tensor(r, shapes[0], ctx.wire) for _ in range(max(0, k - n))])[:k]
                elif what == "tensor":
                    i = r.randrange(len(outs))
                    outs[i], _, detail = bad_tensor(r, shapes[i], ctx.wire, "float", how, dim)
                msg = pb.EdgeMessage(lora_reply=pb.LoraReply(block=block, group=group, outputs=outs))
            else:
                shape = [ctx.batch, ctx.seq, self.dims.x_width[ctx.group]]
                grad = good_tensor(r, shape, ctx.wire)
                if what == "tensor":
                    grad, _, detail = bad_tensor(r, shape, ctx.wire, "float", how, dim)
                msg = pb.EdgeMessage(lora_grad_reply=pb.LoraGradReply(block=block, group=group, grad=grad))
            return msg.SerializeToString(), detail
        return build, INVALID, label

    def _output_grad(self, rng, kind, session=None, how=None, dim=None):
        c = self._plan(rng, "output_grad", **({"session": session} if session else {}))
        c.kind = kind
        seed = rng.randrange(2**63)
        missing = not how and rng.random() < 0.08
        c.expect, c.label = INVALID, "output_grad without grad" if missing else "output_grad tensor"

        def build(ctx: Ctx) -> bytes:
            r = random.Random(seed)
            if missing:
                return pb.EdgeMessage(output_grad=pb.OutputGrad()).SerializeToString()
            grad, _, detail = bad_tensor(r, [ctx.batch, ctx.seq, self.dims.H], ctx.wire, "float", how, dim)
            return pb.EdgeMessage(output_grad=pb.OutputGrad(grad=grad)).SerializeToString(), detail
        c.payload = build
        return c

    def _edge_message_bytes(self, rng, kind):
        c = self._plan(rng, None)
        data, c.label = garbage(rng, pb.EdgeMessage, [(1, 1), (2, 3), (4, 3)])  # session_id, group strings
        c.kind, c.expect, c.payload = kind, INVALID, data
        return c

    def _out_of_order(self, rng, kind):
        c = self._plan(rng, None)
        c.kind = kind
        seed = rng.randrange(2**63)
        empty = rng.random() < 0.15

        def build(ctx: Ctx) -> bytes:
            r = random.Random(seed)
            if empty:  # no kind at all (or one this protocol does not know): malformed, not out of order
                return b"" if r.random() < 0.5 else proto_field(9, b"\x08\x01")
            wrong = r.choice([k for k in UP_KINDS if k != ctx.kind])
            block, group = ctx.block or 1, ctx.group or "attn_in"
            t = good_tensor(r, [ctx.batch, ctx.seq, self.dims.H], ctx.wire)
            msg = {"begin": lambda: pb.EdgeMessage(begin=pb.Begin(session_id=ctx.session_id, hidden=t,
                                                                  attention_mask=good_tensor(r, [ctx.batch, ctx.seq],
                                                                                             pb.BOOL))),
                   "lora_reply": lambda: pb.EdgeMessage(lora_reply=pb.LoraReply(block=block, group=group,
                                                                                 outputs=[t])),
                   "output_grad": lambda: pb.EdgeMessage(output_grad=pb.OutputGrad(grad=t)),
                   "lora_grad_reply": lambda: pb.EdgeMessage(lora_grad_reply=pb.LoraGradReply(
                       block=block, group=group, grad=t))}[wrong]()
            return msg.SerializeToString()
        c.payload = build
        c.expect, c.label = (INVALID, "EdgeMessage of no kind") if empty else (PRECONDITION, "wrong kind")
        return c

    def _early_end(self, rng, kind):
        c = self._plan(rng, None)
        c.kind, c.expect, c.payload, c.label = kind, CANCELLED, None, "stream ended early"
        return c

    def _step_auth(self, rng, kind):
        c = self._plan(rng, "begin")
        c.kind, c.expect = kind, UNAUTH
        c.metadata = rng.choice([[], [(AUTH_HEADER, "Bearer " + rng.randbytes(16).hex())],
                                 [(AUTH_HEADER, TOKENS["alice"])], [(AUTH_HEADER, "Basic " + TOKENS["alice"])]])
        c.label = f"token {str(c.metadata)[:30]}"
        c.payload = lambda ctx: _good_begin(rng, ctx, self.dims.H, c)
        return c

    def _open_session_request_bytes(self, rng, kind):
        data, label = garbage(rng, pb.OpenSessionRequest, [(2,), (7,)])  # model_fingerprint, lora_targets
        return Case(kind=kind, expect=INVALID, label=label, rpc="OpenSession", payload=data)

    def _session_ref_bytes(self, rng, kind):
        data, label = garbage(rng, pb.SessionRef, [(1,)])
        return Case(kind=kind, expect=INVALID, label=label, rpc="CloseSession", payload=data)

    def _session_ref(self, rng, kind):
        how = rng.choice(["unknown", "empty", "huge", "another client's", "no token"])
        sid = {"unknown": "%032x" % rng.getrandbits(128), "empty": "", "huge": "x" * rng.choice([1000, 1_000_000]),
               "another client's": self.bob_session, "no token": "%032x" % rng.getrandbits(128)}[how]
        expect = {"another client's": DENIED, "no token": UNAUTH}.get(how, NOT_FOUND)
        return Case(kind=kind, expect=expect, label=f"session id {how}", rpc="CloseSession",
                    payload=pb.SessionRef(session_id=sid).SerializeToString(),
                    metadata=[] if how == "no token" else "alice")

    def _open_session_request(self, rng, kind):
        data, expect, what, metadata = open_session_fields(rng, self.dims.L, self.fingerprint)
        return Case(kind=kind, expect=expect, label=f"OpenSession {what}", rpc="OpenSession", payload=data,
                    metadata=metadata)


def _with_session(begin: pb.Begin, ctx: Ctx, sid: str | None) -> bytes:
    b = pb.Begin()
    b.CopyFrom(begin)
    b.session_id = ctx.session_id if sid is None else sid
    return pb.EdgeMessage(begin=b).SerializeToString()


def _good_begin(rng, ctx: Ctx, H: int, c: Case) -> bytes:
    return pb.EdgeMessage(begin=pb.Begin(session_id=ctx.session_id, train=c.train, active_blocks=c.active,
                                         hidden=good_tensor(rng, [c.batch, c.seq, H], ctx.wire),
                                         attention_mask=good_tensor(rng, [c.batch, c.seq], pb.BOOL))
                          ).SerializeToString()

