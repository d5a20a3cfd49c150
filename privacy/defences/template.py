"""A defence for the activations the edge sends: the cloud gets the prompt template's positions only.

A classification prompt is a public template around the example's own text ("Review: {sentence}\nIs the sentiment
... ?\nAnswer:"). With this defence on, the hidden states of the example's own tokens never leave the edge: their
rows are sent as zeros and masked out of the attention mask the cloud gets, so the cloud's blocks attend only to the
template's positions, and the edge's top blocks do too. What the task needs of the text must reach the template's
positions inside the edge's own k blocks (their attention reads the whole prompt), which the edge's trainable
weights there learn; the cloud then reads those positions' states, which summarise the text. The per-position token
attacks have nothing to read; what a summary of the text gives away is what `privacy/audit/bag.py` measures (the
words of the text read back from the template positions). Like noise.py, no guarantee follows: quote the measured
attacks (bench/privacy_frontier.py).

Which positions are the template's is found from the token ids, not guessed: the longest run at the start of each
row equal to the template's literal prefix, and at the end of its real tokens equal to its literal suffix; a token
where the text and the template merge (" \n") counts as the text's, so nothing of the text is sent by mistake. A
template with text fields in its middle (MRPC's two sentences) keeps only its outer literals public.
"""
from __future__ import annotations

import string

import torch


def template_literals(template: str) -> tuple[str, str]:
    """The template's literal text before its first field and after its last (ValueError: it has no field)."""
    parts = list(string.Formatter().parse(template))
    fields = [i for i, (_, f, _, _) in enumerate(parts) if f is not None]
    if not fields:
        raise ValueError("the task's template has no {field}: there is no private text to keep on the edge")
    return parts[0][0], "".join(lit for lit, _, _, _ in parts[fields[-1] + 1:])


def template_ids(template: str, tokenizer) -> tuple[list[int], list[int]]:
    """The token ids of the template's literal text before its first field and after its last."""
    def ids(text):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
    return tuple(ids(text) for text in template_literals(template))


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def public_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: list[int],
                     suffix: list[int]) -> torch.Tensor:
    """[B, T] bool: the real positions that hold the template's prefix or suffix tokens (right-padded rows)."""
    public = torch.zeros_like(attention_mask, dtype=torch.bool)
    for i, (row, n) in enumerate(zip(input_ids.tolist(), attention_mask.sum(-1).tolist())):
        row = row[:n]
        head = _common(row, prefix)
        tail = min(_common(row[::-1], suffix[::-1]), n - head)
        public[i, :head] = True
        public[i, n - tail:n] = True
    return public


def keep_public(hidden: torch.Tensor, attention_mask: torch.Tensor,
                public: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden with every non-public row zeroed, the mask with them masked out). `public` covers the last
    public.shape[1] positions (any virtual tokens in front of them stay as they are)."""
    keep = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    keep[:, hidden.shape[1] - public.shape[1]:] = public.to(hidden.device)
    return hidden * keep.unsqueeze(-1).to(hidden.dtype), attention_mask * keep.to(attention_mask.dtype)
