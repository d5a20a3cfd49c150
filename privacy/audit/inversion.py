"""Inversion audit: how many of the edge's tokens an honest-but-curious cloud reads back from the hidden states.

In split training the edge runs the embedding and the first k blocks and sends the hidden state h_k [B, T, H] to the
cloud. The cloud follows the protocol but is curious, and it owns the full backbone (every weight, including the
embedding and the first k blocks it never runs). Three attacks, from naive to strong, each guessing every token:

  nearest      the token whose input embedding is most cosine-similar to h_k at that position. Uses no blocks:
               the classic check, exact at k = 0, and the one that makes small k look safe.
  dictionary   the cloud runs the known first k blocks once over the vocabulary (each token right after a short
               public prefix) and keeps D_k[v], token v's hidden state after k blocks. Guess: the token whose D_k
               row is most cosine-similar to h_k. A one-off cost per model, independent of the victim's data. The
               vocabulary may be all of it, or the attacker's prior: the tokens of public text from the same domain
               (`vocab_of`), which is cheaper and loses only the victim's tokens outside it.
  in-context   refine the dictionary's guesses where they were made: take its top-C candidates per position, run the
               k blocks on [the guessed sentence so far + candidate] (all candidates of a sentence in one forward, a
               custom attention mask keeps them from seeing each other), and keep the candidate whose hidden state
               is nearest (L2) to the observed one. Repeating this (`rounds`) lets better context fix later positions.

Recovery rate = fraction of the data owner's own tokens (the `private` positions, e.g. the review inside the SST-2
prompt; the template around it is public) guessed exactly. Noise (privacy/defences/noise.py) is added to h_k before the
attack, with sigma given relative to the RMS of h_k over real tokens.

Works for Llama-style decoders (model.model.layers, SmolLM2 included). The observed hidden state comes from
transformers' own `hidden_states[k]`; the attacker's runs use the same forward with a 4D attention mask.
"""
from __future__ import annotations

import contextlib
import string
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from privacy.defences.noise import add_gaussian_noise, rms

ATTACKS = ("nearest", "dictionary", "in-context")


@dataclass
class Probe:
    """The victim's batch: what the edge feeds its model, and which positions hold the data owner's text."""
    input_ids: torch.Tensor  # [B, T] long, right-padded
    attention_mask: torch.Tensor  # [B, T] long
    private: torch.Tensor  # [B, T] bool: tokens that overlap the data owner's text (a subset of the real tokens)

    @property
    def n_private(self) -> int:
        return int(self.private.sum())


def make_probe(template: str, examples: list[dict], tokenizer) -> Probe:
    """Tokenize `template.format(**ex)` per example (as tasks.encode does) and mark tokens overlapping a field."""
    prompts, spans = [], []
    for ex in examples:
        text, fields = "", []
        for literal, field, _, _ in string.Formatter().parse(template):
            text += literal
            if field is not None:
                value = str(ex[field])
                fields.append((len(text), len(text) + len(value)))
                text += value
        prompts.append(text)
        spans.append(fields)
    enc = tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=True, padding=True,
                    return_tensors="pt")
    offsets, mask = enc["offset_mapping"], enc["attention_mask"]
    private = torch.zeros_like(mask, dtype=torch.bool)
    for i, fields in enumerate(spans):
        for a, b in fields:
            private[i] |= (offsets[i, :, 0] < b) & (offsets[i, :, 1] > a)
    return Probe(enc["input_ids"], mask, private & mask.bool())


def vocab_of(tokenizer, texts: list[str]) -> torch.Tensor:
    """Sorted ids of every token in `texts`, each tokenized as it appears mid-prompt (after a space)."""
    ids = tokenizer([" " + t for t in texts], add_special_tokens=False)["input_ids"]
    return torch.tensor(sorted({i for row in ids for i in row}))


# ---------------------------------------------------------------------------------------------- running k blocks

@contextlib.contextmanager
def _only_first_blocks(model, n: int):
    """Make the decoder run only its first n blocks (Llama-style models loop over layers[:num_hidden_layers])."""
    cfg = model.config
    full = cfg.num_hidden_layers
    cfg.num_hidden_layers = min(n, full)
    try:
        yield
    finally:
        cfg.num_hidden_layers = full


@torch.no_grad()
def hidden_after(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, ks: list[int],
                 position_ids: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """{k: hidden state after the first k blocks} = transformers' `hidden_states[k]`, running max(ks)+1 blocks only.

    One block more than needed, because transformers replaces the last entry of `hidden_states` by the normed one."""
    with _only_first_blocks(model, max(ks) + 1):
        out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=True, use_cache=False)
    return {k: out.hidden_states[k] for k in ks}


def candidate_mask(positions: torch.Tensor, context_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask for [context (causal)] + [candidates]: candidate j sees context[:positions[j]] and itself."""
    n = positions.numel()
    size = context_len + n
    allowed = torch.zeros(size, size, dtype=torch.bool)
    allowed[:context_len, :context_len] = torch.ones(context_len, context_len, dtype=torch.bool).tril()
    allowed[context_len:, :context_len] = torch.arange(context_len)[None, :] < positions[:, None]
    allowed[context_len:, context_len:] = torch.eye(n, dtype=torch.bool)
    mask = torch.zeros(size, size, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


@torch.no_grad()
def candidate_hidden(model, context: torch.Tensor, positions: torch.Tensor, candidates: torch.Tensor,
                     ks: list[int]) -> dict[int, torch.Tensor]:
    """{k: [N, H]}: hidden state after k blocks of token candidates[j], placed at positions[j] right after the
    tokens context[:positions[j]].

    All N candidates go through one forward with `context`; none of them sees another."""
    T = context.numel()
    ids = torch.cat([context, candidates]).unsqueeze(0)
    pos = torch.cat([torch.arange(T), positions]).unsqueeze(0)
    mask = candidate_mask(positions, T, model.dtype)
    hs = hidden_after(model, ids, mask, ks, position_ids=pos)
    return {k: h[0, T:] for k, h in hs.items()}


@dataclass
class Dictionary:
    """The attacker's table: row i is token vocab[i]'s hidden state after k blocks, placed right after `prefix`."""
    vocab: torch.Tensor  # [V'] token ids (all of the vocabulary, or the attacker's prior)
    prefix: torch.Tensor  # [P] public tokens before each candidate
    table: dict[int, torch.Tensor]  # k -> [V', H] float32


@torch.no_grad()
def build_dictionary(attacker, prefix: torch.Tensor, ks: list[int], vocab: torch.Tensor | None = None,
                     chunk: int = 512) -> Dictionary:
    """Run every token of `vocab` (default: all) through the first max(ks) blocks after the public `prefix`.

    The prefix keeps candidates off position 0, where Llama-style models park huge "attention sink" activations that
    look nothing like a token in the middle of a sentence."""
    if vocab is None:
        vocab = torch.arange(attacker.get_input_embeddings().weight.shape[0])
    parts: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for cand in vocab.split(chunk):
        pos = torch.full_like(cand, prefix.numel())
        for k, h in candidate_hidden(attacker, prefix, pos, cand, ks).items():
            parts[k].append(h.float())
    return Dictionary(vocab, prefix, {k: torch.cat(p) for k, p in parts.items()})


# -------------------------------------------------------------------------------------------------------- attacks

@torch.no_grad()
def nearest(queries: torch.Tensor, table: torch.Tensor, topk: int = 1, chunk: int = 512) -> torch.Tensor:
    """[N, topk] indices of the rows of `table` most cosine-similar to each query, best first.

    The search over all rows runs in bfloat16 (fast on CPUs with AMX/AVX-512) and keeps a few extra rows, which are
    then re-ranked in float32, so near-ties come out as exact float32 cosine similarity would order them."""
    t32 = F.normalize(table.float(), dim=-1)
    t16 = t32.to(torch.bfloat16)
    extra = min(topk + 16, t32.shape[0])
    out = []
    for q in F.normalize(queries.float(), dim=-1).split(chunk):
        short = (q.to(torch.bfloat16) @ t16.T).topk(extra, dim=-1).indices  # [n, extra]
        exact = torch.einsum("nh,nch->nc", q, t32[short])
        order = exact.topk(topk, dim=-1).indices
        out.append(short.gather(1, order))
    return torch.cat(out)


@torch.no_grad()
def in_context_attack(model, probe: Probe, observed: torch.Tensor, k: int, shortlist: torch.Tensor,
                      rounds: int = 1) -> torch.Tensor:
    """Pick, per private position, the shortlisted token whose k-block hidden state (in the guessed context) is
    nearest in L2 to `observed` [B, T, H]. `shortlist` [n_private, C] holds candidates, best first. Returns the
    guesses for the private positions [n_private] (in `probe.private` order)."""
    guess = probe.input_ids.clone()  # public template tokens are known; private ones start as the top candidates
    guess[probe.private] = shortlist[:, 0]
    C = shortlist.shape[1]
    rows = torch.arange(len(guess)).repeat_interleave(probe.private.sum(1))  # sentence of each private token
    for _ in range(rounds):
        new = guess.clone()
        for b in range(len(guess)):
            pos = probe.private[b].nonzero().flatten()
            if pos.numel() == 0:
                continue
            T = int(probe.attention_mask[b].nonzero().max()) + 1  # the last real position (a mask may have holes)
            cand = shortlist[rows == b]  # [P, C]
            h = candidate_hidden(model, guess[b, :T], pos.repeat_interleave(C), cand.flatten(), [k])[k]
            dist = (h.float().view(len(pos), C, -1) - observed[b, pos].float()[:, None]).pow(2).sum(-1)
            new[b, pos] = cand.gather(1, dist.argmin(1, keepdim=True)).squeeze(1)
        if torch.equal(new, guess):  # a fixed point: more rounds would change nothing
            break
        guess = new
    return guess[probe.private]


# ---------------------------------------------------------------------------------------------------------- audit

@dataclass
class Result:
    k: int
    sigma_rel: float  # noise std / RMS of h_k over real tokens
    attack: str
    recovered: int
    total: int

    @property
    def rate(self) -> float:
        return self.recovered / max(self.total, 1)


def observed_hidden(model, probe: Probe, ks: list[int]) -> dict[int, torch.Tensor]:
    """What the edge sends for each cut k: transformers' hidden_states[k] of the victim's batch."""
    return {k: h.float() for k, h in hidden_after(model, probe.input_ids, probe.attention_mask, ks).items()}


def run_audit(model, probe: Probe, ks: list[int], sigmas: list[float], attacks=("nearest", "dictionary"),
              dictionary: Dictionary | None = None, attacker=None, candidates: int = 4, rounds: int = 1,
              seed: int = 0, observed: dict[int, torch.Tensor] | None = None, log=None) -> list[Result]:
    """Run each attack for each cut k and noise level (sigma relative to the RMS of h_k); one `Result` per triple.

    The victim's hidden states come from `model`. `dictionary` (from `build_dictionary`) is needed by the dictionary
    and in-context attacks; `attacker` is the cloud's copy of the weights that runs the in-context candidates (e.g.
    in bfloat16 for speed; default `model`), with the `candidates` best dictionary guesses per position."""
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        raise ValueError(f"unknown attacks {sorted(unknown)}; known: {ATTACKS}")
    if dictionary is None and set(attacks) & {"dictionary", "in-context"}:
        raise ValueError("the dictionary and in-context attacks need a dictionary (privacy.audit.inversion.build_dictionary)")
    attacker = attacker if attacker is not None else model
    observed = observed if observed is not None else observed_hidden(model, probe, ks)
    truth = probe.input_ids[probe.private]
    embed = model.get_input_embeddings().weight
    results = []
    for k in ks:
        scale = rms(observed[k], probe.attention_mask)
        for s in sigmas:
            h = add_gaussian_noise(observed[k], s * scale, torch.Generator().manual_seed(seed))
            seen = h[probe.private]
            guesses = {}
            if "nearest" in attacks:
                guesses["nearest"] = nearest(seen, embed)[:, 0]
            if dictionary is not None:
                short = dictionary.vocab[nearest(seen, dictionary.table[k], topk=candidates)]
                guesses["dictionary"] = short[:, 0]
                if "in-context" in attacks:
                    guesses["in-context"] = in_context_attack(attacker, probe, h, k, short, rounds)
            for a in attacks:
                results.append(Result(k, s, a, int((guesses[a] == truth).sum()), truth.numel()))
                if log:
                    log(f"k={k} sigma={s:g}xRMS {a}: {results[-1].rate:.1%}")
    return results
