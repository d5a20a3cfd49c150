"""The emulator's second compression: keep every kept block's attention, but only part of its MLP's neurons.

Layer drop (emulator/build.py) removes whole middle blocks. Here attention, which routes information between tokens,
is kept whole in every kept block, and each MLP keeps the `keep` share of its hidden neurons. Measured on SmolLM2
(README row "MLP pruning instead of (or with) layer drop", `bench/offsite_sweep.py --sweep 1.0 --mlp-keep 0.25`): all
26 middle blocks at keep 0.25 plug in 7.5 pt better than 10 whole blocks at about the same weights, but not every
mix does (20 blocks at 0.35 is worse), so it is an option, not the default.

For a gated MLP  y = D (act(G x) * (U x)),  with a = act(G x) * (U x) its hidden activations:

- which neurons: the largest  E[a_j^2] * |D[:, j]|^2  (the energy each neuron puts into the block's output), over
  public text (WikiText-2) run through the full model;
- refit: the kept neurons' down projection is re-solved by least squares so that it reproduces the whole MLP's
  output on that text:  D_S = argmin |A_S D_S^T - A D^T|^2 = (A_S^T A_S + lam I)^-1 A_S^T A D^T.  Only the Gram
  matrix A^T A of each block is needed (A D^T is the MLP's own output), so it is accumulated once per block.
  Nothing else is trained; torch has no structured-pruning routine for this, so these twenty lines are written here.

Pruning needs a gated MLP (`gate_proj`, `up_proj`, `down_proj`, `act_fn`: Llama, Mistral, Qwen2...).
"""
from __future__ import annotations

import torch

RIDGE = 1e-4  # lam, relative to the mean diagonal of the kept neurons' Gram matrix


def gated_mlp(block):
    """The block's gated MLP, or a ValueError naming the fix."""
    mlp = getattr(block, "mlp", None)
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        raise ValueError("--mlp-keep needs a gated MLP (gate_proj, up_proj, down_proj: the Llama family); "
                         "use --mlp-keep 1.0 for this model")
    return mlp


@torch.no_grad()
def activation_grams(model, blocks: list, batches) -> dict[int, torch.Tensor]:
    """Per block index in `blocks`: A^T A (float64) of its MLP's hidden activations over real tokens of `batches`,
    run through `model` as it is (the full model: each block sees the inputs it sees in use)."""
    grams: dict[int, torch.Tensor] = {}
    mask_now: list[torch.Tensor] = []

    def hook(i):
        def fn(mod, inp):  # down_proj's input is the hidden activations a, as the model's forward made them
            a = inp[0][mask_now[0].bool()].double()  # real tokens only
            grams[i] = grams.get(i, 0) + a.T @ a
        return fn

    handles = [gated_mlp(b).down_proj.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        for batch in batches:
            mask_now[:] = [batch.attention_mask]
            model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return grams


def choose_neurons(gram: torch.Tensor, down: torch.Tensor, keep: float) -> torch.Tensor:
    """Indices (sorted) of the round(keep * width) neurons with the most output energy."""
    n = max(1, round(keep * down.shape[1]))
    energy = torch.diagonal(gram) * down.double().pow(2).sum(0)
    return torch.topk(energy, n).indices.sort().values


def refit_down(gram: torch.Tensor, down: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The least-squares down projection of the kept neurons (see the module docstring), as down's dtype."""
    g = gram[kept][:, kept]
    lam = RIDGE * torch.diagonal(g).mean().clamp_min(1e-12)
    rhs = gram[kept] @ down.double().T  # A_S^T (A D^T)
    return torch.linalg.solve(g + lam * torch.eye(len(kept), dtype=g.dtype), rhs).T.to(down.dtype).contiguous()


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
    lin.weight = torch.nn.Parameter(weight.detach().clone().contiguous())
    return lin


@torch.no_grad()
def prune_mlp(block, gram: torch.Tensor, keep: float, refit: bool = True) -> int:
    """Replace the block's MLP projections by those of its kept neurons, in place. Returns the new width."""
    mlp = gated_mlp(block)
    down = mlp.down_proj.weight
    kept = choose_neurons(gram, down, keep)
    new_down = refit_down(gram, down, kept) if refit else down[:, kept]
    mlp.gate_proj = _linear(mlp.gate_proj.weight[kept])
    mlp.up_proj = _linear(mlp.up_proj.weight[kept])
    mlp.down_proj = _linear(new_down)
    return len(kept)


def fit_linears_to(model, state: dict[str, torch.Tensor]) -> None:
    """Before loading `state` into a freshly built `model`: give each bias-free Linear whose weight `state` holds in
    another shape (a pruned MLP of a bundle) a Linear of that shape. Other mismatches are left for load_state_dict
    to report."""
    modules = dict(model.named_modules())
    for name, t in state.items():
        owner = modules.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if isinstance(owner, torch.nn.Linear) and owner.bias is None and owner.weight.shape != t.shape:
            parent, _, child = name.removesuffix(".weight").rpartition(".")
            setattr(modules[parent], child, _linear(torch.empty(t.shape, dtype=owner.weight.dtype)))
