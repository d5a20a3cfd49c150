"""The cloud segment as one autograd-aware module on the edge, so the training loop is ordinary PyTorch:

    h = bottom(input_ids, mask); h = cloud(h, mask); h = top(h, mask); loss(...).backward(); opt.step()

Forward opens a `Step` stream, sends the hidden state, answers the cloud's LoRA requests (DLoRA: the edge computes
the LoRA of cloud-resident blocks with its own weights) and returns the cloud's output. Backward sends dL/d output,
answers the LoRA gradient requests (accumulating the LoRA weight gradients here, on the edge) and returns dL/d input.
"""
from __future__ import annotations

import torch
from torch import nn

from edge.link import CloudLink, StepFailed, Traffic
from model.lora import LoRASet
from protocol import pb
from protocol.tensors import WireError, decode, encode


class _CloudFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, mask, remote: "RemoteCloud", train: bool):
        stream = remote.link.stream()
        remote.last_traffic = stream.traffic
        stream.send(begin=pb.Begin(session_id=remote.link.session.session_id, step=remote.step, train=train,
                                   hidden=encode(hidden, remote.wire_up), attention_mask=encode(mask.bool(), pb.BOOL),
                                   active_blocks=remote.active_blocks()))
        saved = {}  # block -> (x, outputs) for the LoRA backward
        while True:
            kind, msg = stream.recv("lora_request", "hidden")
            if kind == "hidden":
                out = remote.decode(msg.hidden, list(hidden.shape), hidden)
                break
            if msg.block not in remote.active_blocks() or msg.group not in remote.groups:
                stream.close()
                raise StepFailed(None, f"the cloud asked for LoRA {msg.block}/{msg.group}, which is not active here")
            sites = [remote.lora.site(msg.block, t) for t in remote.groups[msg.group]]
            x_shape = list(hidden.shape[:-1]) + [sites[0].lora_A.in_features]  # mlp_out's input is [B, T, I]
            x = remote.decode(msg.x, x_shape, hidden).requires_grad_(train)
            with torch.set_grad_enabled(train):
                outs = [site(x) for site in sites]
            if train:
                saved[(msg.block, msg.group)] = (x, outs)
            stream.send(lora_reply=pb.LoraReply(block=msg.block, group=msg.group,
                                                outputs=[encode(o, remote.wire_up) for o in outs]))
        if train:
            ctx.stream, ctx.saved, ctx.remote, ctx.like = stream, saved, remote, hidden
        else:
            stream.finish()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        stream, remote = ctx.stream, ctx.remote
        try:
            stream.send(output_grad=pb.OutputGrad(grad=encode(grad_out, remote.wire_up)))
            while True:
                kind, msg = stream.recv("lora_grad_request", "input_grad")
                if kind == "input_grad":
                    grad_in = remote.decode(msg.grad, list(grad_out.shape), grad_out)
                    break
                x, outs = ctx.saved.pop((msg.block, msg.group))
                grads = [remote.decode(g, list(o.shape), o) for g, o in zip(msg.grads, outs)]
                with torch.enable_grad():
                    torch.autograd.backward(outs, grads)  # LoRA weight grads accumulate here, on the edge
                stream.send(lora_grad_reply=pb.LoraGradReply(block=msg.block, group=msg.group,
                                                             grad=encode(x.grad, remote.wire_up)))
            stream.finish()
        finally:
            stream.close()
            ctx.saved = None
        return grad_in, None, None, None


class RemoteCloud(nn.Module):
    """Stands in for the cloud blocks in the edge's model. `lora` holds the LoRA of cloud blocks (DLoRA) or None."""

    def __init__(self, link: CloudLink, wire_up: int, wire_down: int, lora: LoRASet | None = None,
                 lora_blocks=(), targets=()):
        super().__init__()
        self.link, self.wire_up, self.wire_down = link, wire_up, wire_down
        self.lora_blocks = list(lora_blocks)
        self.targets = list(targets)
        self.groups: dict[str, list[str]] = {}  # input group -> its targets, in target order (as the cloud groups them)
        if lora is not None:
            for t in self.targets:
                self.groups.setdefault(lora.family.input_groups[t], []).append(t)
        self.lora = lora
        self.killed: set[int] = set()  # Kill & Revive: blocks whose LoRA is off this step
        self.step = 0
        self.last_traffic = Traffic()

    def active_blocks(self) -> list[int]:
        return [b for b in self.lora_blocks if b not in self.killed]

    def decode(self, msg, shape, like: torch.Tensor) -> torch.Tensor:
        try:
            return decode(msg, shape=shape, dtypes=[self.wire_down], out_dtype=like.dtype, device=like.device,
                          what="cloud tensor")
        except WireError as e:
            raise StepFailed(e.code, f"the cloud sent a bad tensor: {e}") from None

    def forward(self, hidden, attention_mask):
        # Train when autograd is on and something upstream or inside (DLoRA) needs gradients.
        train = torch.is_grad_enabled() and (hidden.requires_grad or (self.lora is not None and bool(self.active_blocks())))
        if train and not hidden.requires_grad:
            hidden = hidden.detach().requires_grad_(True)  # the Function must be on the graph for its backward
        return _CloudFn.apply(hidden, attention_mask, self, train)
