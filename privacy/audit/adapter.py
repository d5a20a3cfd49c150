"""The LoRA of DLoRA's cloud blocks, read back from the exchange the cloud takes part in (a capture's records).

In DLoRA the cloud sends each active block's LoRA input x (`lora_request.x`, [B, T, in]) and receives one output
per target of that input group (`lora_reply.outputs`, scaling * B A x, [B, T, out]). Every row is one equation
y = ΔW x of the linear map ΔW = scaling * B A (out x in), so least squares over the rows gives ΔŴ per block, group
and target (`Key`: block, group, the target's place in the group, as the session's targets order them).

The map changes at every optimizer step, so a fit uses the fewest most recent exchanges whose rows reach the input
width (`window`): one exchange when it has enough rows. `fit` reports the rows' numerical rank: rank = width means the
rows determine ΔW (one solution); below it, least squares gives the minimum-norm one, blind to the inputs' null space.
Scored by relative error |ΔŴ - ΔW| / |ΔW| (Frobenius, over all keys), the true ΔW taken from the edge's LoRA.

In the carried mode (--cloud-lora carried) there is nothing to fit: every step's `begin.lora_weights` holds A and B
of each active block's targets. `carried_attack` reads them and scores them against the edge's own A and B.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from privacy.audit.capture import Exchange
from protocol.tensors import decode

Key = tuple[int, str, int]  # (block, input group, index of the target in the group)


def lora_rows(ex: Exchange) -> dict[tuple[int, str], tuple[torch.Tensor, list[torch.Tensor]]]:
    """(block, group) -> (X [N, in], [Y_j [N, out_j] per target]) of one exchange, N = B * T rows, as float64."""
    requests = {(m.block, m.group): m for m in ex.of_kind("lora_request")}
    out = {}
    for reply in ex.of_kind("lora_reply"):
        req = requests.get((reply.block, reply.group))
        if req is None:
            continue
        x = decode(req.x).double()
        out[(reply.block, reply.group)] = (x.reshape(-1, x.shape[-1]),
                                           [(y := decode(t).double()).reshape(-1, y.shape[-1]) for t in reply.outputs])
    return out


@dataclass
class Fit:
    delta: dict[Key, torch.Tensor]  # ΔŴ, out x in
    rows: int  # equations per (block, group)
    width: int  # the input width of the (block, group) whose rows fall shortest of determining it ...
    rank: int  # ... and its rows' numerical rank

    @property
    def determined(self) -> bool:
        """Every (block, group)'s rows have full column rank: each ΔW is the one solution."""
        return self.rank >= self.width


def fit(exchanges: list[Exchange]) -> Fit:
    """Least squares for every (block, group) over the rows of `exchanges` together."""
    stacked: dict[tuple[int, str], tuple[list, list]] = {}
    for ex in exchanges:
        for key, (x, ys) in lora_rows(ex).items():
            xs, yss = stacked.setdefault(key, ([], [[] for _ in ys]))
            xs.append(x)
            for acc, y in zip(yss, ys):
                acc.append(y)
    delta, rows, worst = {}, 0, (0, 0)  # worst: (width, rank) with the largest width - rank
    for (block, group), (xs, yss) in stacked.items():
        X = torch.cat(xs)
        Y = torch.cat([torch.cat(ys) for ys in yss], dim=1)
        sol = torch.linalg.lstsq(X, Y, driver="gelsd").solution.T  # [sum out_j, in]
        widths = [ys[0].shape[1] for ys in yss]
        for j, part in enumerate(sol.split(widths)):
            delta[(block, group, j)] = part.float()
        here = (X.shape[1], int(torch.linalg.matrix_rank(X)))
        rows, worst = X.shape[0], max(worst, here, key=lambda wr: (wr[0] - wr[1], wr[0]))
    return Fit(delta, rows, *worst)


def window(exchanges: list[Exchange], end: int, margin: float = 1.0) -> list[Exchange]:
    """The fewest exchanges ending at index `end` (inclusive) whose LoRA rows reach `margin` times the widest
    input (all of them up to `end` when even that is too few)."""
    rows, start, width = 0, end, 0
    for i in range(end, -1, -1):
        pairs = lora_rows(exchanges[i])
        if not pairs:
            continue
        n, w = max((x.shape[0], x.shape[1]) for x, _ in pairs.values())
        rows, width, start = rows + n, max(width, w), i
        if rows >= margin * width:
            break
    return exchanges[start:end + 1]


def relative_error(est: dict[Key, torch.Tensor], truth: dict[Key, torch.Tensor]) -> float | None:
    """|ΔŴ - ΔW| / |ΔW| over the keys both hold (None when the true ΔW is zero: B still at its zero init)."""
    keys = [k for k in est if k in truth]
    num = sum(float((est[k].double() - truth[k].double()).pow(2).sum()) for k in keys)
    den = sum(float(truth[k].double().pow(2).sum()) for k in keys)
    return (num / den) ** 0.5 if den > 0 else None


def true_deltas(lora, groups, blocks) -> dict[Key, torch.Tensor]:
    """ΔW = scaling * B A of the LoRA sites of `lora` (a model.tuners.lora.LoRASet) in `blocks` and `groups` (the
    session's input groups, StepPlan.groups): what the attack is scored against."""
    out = {}
    for key, site in lora.sites.items():
        block = int(key.split(":")[0])
        for g, targets in groups if block in blocks else ():
            for j, t in enumerate(targets):
                if lora.site(block, t) is site:
                    out[(block, g, j)] = (site.scaling * site.lora_B.weight @ site.lora_A.weight).detach().float()
    return out


@dataclass
class AdapterResult:
    after: int  # training steps of traffic seen
    exchanges: int  # of which the fit used the last ones
    rows: int
    width: int
    rank: int
    relative_error: float | None  # None: no truth given, or the true ΔW is zero


def adapter_attack(exchanges: list[Exchange], after=(1, 2, 10), truth: list[dict] | None = None) -> list[AdapterResult]:
    """ΔŴ after the first n training exchanges of a session, for each n in `after` that the capture reaches,
    scored against `truth[n - 1]` (ΔW as the n-th training step used it; `true_deltas`) when given."""
    train = [ex for ex in exchanges if ex.train and ex.of_kind("lora_reply")]
    out = []
    for n in after:
        if n > len(train):
            break
        used = window(train, n - 1)
        f = fit(used)
        err = relative_error(f.delta, truth[n - 1]) if truth is not None else None
        out.append(AdapterResult(n, len(used), f.rows, f.width, f.rank, err))
    return out


def carried_weights(ex: Exchange) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(block, target) -> (A, B) as an exchange's begin carried them (empty outside the carried mode)."""
    return {(w.block, w.target): (decode(w.a), decode(w.b)) for w in ex.begin.lora_weights}


def weights_error(read: dict, truth: dict) -> float | None:
    """|(Â, B̂) - (A, B)| / |(A, B)| over the (block, target)s both hold (None when they share none)."""
    keys = [k for k in read if k in truth]
    num = sum(float((r.double() - t.double()).pow(2).sum()) for k in keys for r, t in zip(read[k], truth[k]))
    den = sum(float(t.double().pow(2).sum()) for k in keys for t in truth[k])
    return (num / den) ** 0.5 if den > 0 else None


def true_weights(lora, targets, blocks) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(block, target) -> copies of (A, B) of `lora`'s sites in `blocks`: what the carried mode sends."""
    return {(b, t): tuple(lin.weight.detach().float().clone() for lin in (lora.site(b, t).lora_A,
                                                                           lora.site(b, t).lora_B))
            for b in blocks for t in targets}


def carried_attack(exchanges: list[Exchange], after=(1, 2, 10), truth: list[dict] | None = None) -> list[dict]:
    """The weights the n-th training exchange carried, for each n in `after` the capture reaches: {after, blocks,
    targets, relative_error (against `truth[n - 1]`, `true_weights` as the n-th step used them; None without)}."""
    train = [ex for ex in exchanges if ex.train and ex.begin.lora_weights]
    out = []
    for n in after:
        if n > len(train):
            break
        read = carried_weights(train[n - 1])
        out.append({"after": n, "blocks": len({b for b, _ in read}), "targets": len({t for _, t in read}),
                    "relative_error": weights_error(read, truth[n - 1]) if truth is not None else None})
    return out


__all__ = ["AdapterResult", "Fit", "Key", "adapter_attack", "carried_attack", "carried_weights", "fit", "lora_rows",
           "relative_error", "true_deltas", "true_weights", "weights_error", "window"]
