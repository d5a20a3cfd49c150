"""The cloud segment as one autograd-aware module on the edge, so the training loop is ordinary PyTorch:

    h = bottom(input_ids, mask); h = cloud(h, mask); h = top(h, mask); loss(...).backward(); opt.step()

Forward opens a `Step` stream, sends the hidden state, answers the cloud's LoRA requests (DLoRA: the edge computes
the LoRA of cloud-resident blocks with its own weights) and returns the cloud's output. Backward sends dL/d output,
answers the LoRA gradient requests (accumulating the LoRA weight gradients here, on the edge) and returns dL/d input.
In the carried mode the forward's `begin` carries the active blocks' LoRA weights (or prefix tuning's keys and
values) instead; they are inputs of the autograd Function, whose backward returns the gradients the cloud sent with
dL/d input, so autograd puts them in the weights' `.grad` (or carries them on into the prefix encoder).

Retries live inside the Function, as in Petals' client: a forward that fails for a transient reason is run again;
a backward that fails is run again on a fresh stream, which first replays the forward (the cloud kept no graph),
after putting the cloud-block LoRA gradients back to what they were before the failed attempt. Every caller —
training, evaluation, generation — gets the same retries from the link's policy.
"""
from __future__ import annotations

import torch
from torch import nn

from edge.link import CloudLink, StepFailed
from model.sites import site_groups
from privacy.defences.labels import mask_factors, per_row
from protocol import pb
from protocol.step import CARRIED_PARAMS, Traffic, carried_sites
from protocol.tensors import WireError, decode, encode


class _Exchange:
    """One attempt at the remote step: its stream and the LoRA inputs/outputs kept for the backward."""

    def __init__(self, remote: "RemoteCloud", train: bool):
        self.remote, self.train = remote, train
        self.stream = remote.link.stream(remote.groups)
        self.saved: dict[tuple[int, str], tuple[torch.Tensor, list[torch.Tensor]]] = {}
        remote.last_traffic = self.stream.traffic

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, carried) -> torch.Tensor:
        r, stream = self.remote, self.stream
        stream.send(begin=pb.Begin(session_id=r.link.session.session_id, step=r.step, train=self.train,
                                   hidden=encode(hidden, r.wire_up), attention_mask=encode(mask.bool(), pb.BOOL),
                                   active_blocks=r.active_blocks(), lora_weights=r.carried_weights(carried)))
        while True:
            kind, msg = stream.recv()
            if kind == "hidden":
                return r.decode(msg.hidden, list(hidden.shape), hidden)
            self._answer_lora(msg, hidden)

    def _answer_lora(self, msg, like: torch.Tensor) -> None:
        r = self.remote
        sites = [r.lora.site(msg.block, t) for t in dict(r.groups)[msg.group]]
        x_shape = list(like.shape[:-1]) + [sites[0].in_features]  # mlp_out's input is [B, T, I]
        x = r.decode(msg.x, x_shape, like).requires_grad_(self.train)
        with torch.set_grad_enabled(self.train):
            outs = [site(x) for site in sites]
        if self.train:
            self.saved[(msg.block, msg.group)] = (x, outs)
        self.stream.send(lora_reply=pb.LoraReply(block=msg.block, group=msg.group,
                                                 outputs=[encode(o, r.wire_up) for o in outs]))

    def backward(self, grad_out: torch.Tensor, carried, true_scale: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """dL/d input and the carried tensors' gradients, in `carried`'s order. `true_scale` [B]: the label defences'
        per-example factor from what the cloud's backward computes to the true gradient (privacy/defences/labels.py);
        DLoRA's LoRA weight gradients take it on the edge, what goes back to the cloud stays in the cloud's scale."""
        r, stream = self.remote, self.stream
        try:
            stream.send(output_grad=pb.OutputGrad(grad=encode(grad_out, r.wire_up)))
            while True:
                kind, msg = stream.recv()
                if kind == "input_grad":
                    grad_in = r.decode(msg.grad, list(grad_out.shape), grad_out)
                    carried_grads = r.carried_grads(msg.lora_grads, carried)
                    break
                x, outs = self.saved.pop((msg.block, msg.group))
                grads = [r.decode(g, list(o.shape), o) for g, o in zip(msg.grads, outs)]
                with torch.enable_grad():
                    if true_scale is None:
                        torch.autograd.backward(outs, grads)  # LoRA weight grads accumulate here, on the edge
                        x_grad = x.grad
                    else:  # the reply in the cloud's scale; the weights' gradients in the true one
                        x_grad, = torch.autograd.grad(outs, x, grads, retain_graph=True)
                        weights = [p for t in dict(r.groups)[msg.group] for p in r.lora.site(msg.block, t).parameters()
                                   if p.requires_grad]
                        if weights:
                            torch.autograd.backward(outs, [g * per_row(true_scale, g) for g in grads], inputs=weights)
                stream.send(lora_grad_reply=pb.LoraGradReply(block=msg.block, group=msg.group,
                                                             grad=encode(x_grad, r.wire_up)))
            stream.finish()
        finally:
            stream.close()
        return grad_in, carried_grads


class _CloudFn(torch.autograd.Function):
    """hidden -> the cloud's output. `carried` lists the carried mode's tensors ((block, target, field -> tensor), the
    wire's order); they are also the Function's trailing inputs, so their gradients flow back through autograd: into
    a LoRA weight's `.grad`, or on through prefix tuning's encoder."""

    @staticmethod
    def forward(ctx, hidden, mask, remote: "RemoteCloud", train: bool, carried, *carried_tensors):
        def attempt():
            ex = _Exchange(remote, train)
            try:
                out = ex.forward(hidden, mask, carried)
            except BaseException:
                ex.stream.close()
                raise
            if not train:
                ex.stream.finish()
            return out, ex

        out, ex = remote.link.call(attempt)
        if train:
            ctx.exchange, ctx.remote, ctx.inputs, ctx.carried = ex, remote, (hidden.detach(), mask), carried
        return out

    @staticmethod
    def backward(ctx, grad_out):
        remote, first = ctx.remote, [True]
        before = remote.lora_grads()
        factors = None if remote.label_mask is None else mask_factors(grad_out.shape[0], remote.label_mask,
                                                                       remote.mask_rng)
        sent = grad_out if factors is None else grad_out * per_row(factors, grad_out)
        scale, remote.grad_scale = remote.grad_scale, None  # --noise-label-free's dL/dmargin, this step's only
        true_scale = None  # per example: what the cloud's backward computes -> the true gradient
        if factors is not None or scale is not None:
            true_scale = (1 if scale is None else scale.double().cpu()) / (1 if factors is None else factors)

        def attempt():
            if not first[0]:  # replay: a fresh stream, the forward again, then this backward
                remote.restore_lora_grads(before)
                ctx.exchange = _Exchange(remote, True)
                try:
                    ctx.exchange.forward(*ctx.inputs, ctx.carried)
                except BaseException:
                    ctx.exchange.stream.close()
                    raise
            first[0] = False
            return ctx.exchange.backward(sent, ctx.carried, true_scale)

        try:
            grad_in, carried_grads = remote.link.call(attempt)
        finally:
            ctx.exchange = None
        if true_scale is not None:  # the cloud's backward is linear and per example: each row to the true scale
            grad_in = grad_in * per_row(true_scale, grad_in)
        return (grad_in, None, None, None, None, *carried_grads)


class RemoteCloud(nn.Module):
    """Stands in for the cloud blocks in the edge's model. `lora` holds the trainable weights of cloud blocks (DLoRA's
    or the carried mode's LoRA, DoRA, (IA)³), or None (frozen)."""

    def __init__(self, link: CloudLink, wire_up: int, wire_down: int, lora=None, lora_blocks=(), targets=(),
                 carried: str | None = None, label_mask: float | None = None, seed: int = 0):
        super().__init__()
        self.link, self.wire_up, self.wire_down = link, wire_up, wire_down
        # privacy/defences/labels.py: the secret per-example factors' range R, or None (gradients sent as they are)
        self.label_mask, self.mask_rng = label_mask, torch.Generator().manual_seed(seed)
        self.grad_scale = None  # --noise-label-free: this step's dL/dmargin per example, applied to what comes back
        self.lora_blocks = list(lora_blocks)
        self.targets = list(targets)
        # the carried method ("lora", "dora", "ia3"): the weights ride the step, no exchange; None: DLoRA or frozen
        self.carried = carried if lora is not None else None
        # DLoRA: input group -> its targets, in execution order, exactly as the cloud and the simulator group them
        self.groups = site_groups(lora.family.name, self.targets) if lora is not None and not self.carried else ()
        self.lora = lora
        self.killed: set[int] = set()  # Kill & Revive: blocks whose LoRA is off this step
        self.step = 0
        self.last_traffic = Traffic()

    def active_blocks(self) -> list[int]:
        return [b for b in self.lora_blocks if b not in self.killed]

    def _carried(self, prefix=None) -> list[tuple[int, str, dict]]:
        """(block, target, SiteWeights field -> tensor) of every carried site, in the wire's order: a site's own
        parameters, or (prefix tuning) the step's prefixes of each active block (model/tuners/prefix.py)."""
        if not self.carried:
            return []
        sites = carried_sites(self.active_blocks(), self.targets)
        if self.carried == "prefix":
            return [(b, t, dict(zip(CARRIED_PARAMS["prefix"], prefix.kv[b]))) for b, t in sites]
        return [(b, t, self.lora.site(b, t).carried()) for b, t in sites]

    def carried_weights(self, carried=None) -> list:
        """Carried mode: what `begin` carries, every target of every active block in that order (by default the
        sites' parameters as they are now)."""
        carried = self._carried() if carried is None else carried
        return [pb.SiteWeights(block=b, target=t, **{k: encode(p, self.wire_up) for k, p in params.items()})
                for b, t, params in carried]

    def carried_grads(self, grads, carried) -> list[torch.Tensor]:
        """Carried mode: the cloud's gradients of what was sent, checked against it, flat in `carried`'s order."""
        if [(g.block, g.target) for g in grads] != [(b, t) for b, t, _ in carried]:
            raise StepFailed(None, f"the cloud returned {len(grads)} site gradients; expected {len(carried)}, "
                                   "one per target of each active block, in order")
        return [self.decode(getattr(g, field), list(p.shape), p)
                for g, (_, _, params) in zip(grads, carried) for field, p in params.items()]

    def lora_grads(self) -> dict:
        """The cloud-block LoRA gradients as they are now (a failed backward may have added to them)."""
        if self.lora is None:
            return {}
        return {p: None if p.grad is None else p.grad.clone() for p in self.lora.parameters()}

    def restore_lora_grads(self, saved: dict) -> None:
        for p, g in saved.items():
            p.grad = g.clone() if g is not None else None

    def decode(self, msg, shape, like: torch.Tensor) -> torch.Tensor:
        try:
            return decode(msg, shape=shape, dtypes=[self.wire_down], out_dtype=like.dtype, device=like.device,
                          what="cloud tensor")
        except WireError as e:
            raise StepFailed(e.code, f"the cloud sent a bad tensor: {e}") from None

    def forward(self, hidden, attention_mask, prefix=None):
        """`prefix`: prefix tuning's LayerPrefixes of this step (its cloud blocks' ride `begin`)."""
        carried = self._carried(prefix)
        tensors = [p for _, _, params in carried for p in params.values()]
        # Train when autograd is on and something upstream or inside (DLoRA) needs gradients.
        train = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in tensors) or (
            self.lora is not None and bool(self.active_blocks())))
        if train and not hidden.requires_grad:
            hidden = hidden.detach().requires_grad_(True)  # the Function must be on the graph for its backward
        return _CloudFn.apply(hidden, attention_mask, self, train, carried, *tensors)
