"""Delimiter tokens: the reasoning-stream positions where memory may be woven in.

Computed once per tokenizer from its vocabulary: a token is a delimiter when its decoded
text ends with one of the delimiter characters, so merged tokens such as ``".\n"`` count.
The decode loop then tests membership with a tensor lookup on token ids and never decodes
text per step (the authors' code decodes and string-matches every step).
"""

from __future__ import annotations

import torch


def delimiter_token_ids(tokenizer, delimiters: list[str] | tuple[str, ...]) -> list[int]:
    """Ids of every non-special token whose decoded text ends with a delimiter character."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab_size = len(tokenizer)
    ids = [i for i in range(vocab_size) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    ends = tuple(delimiters)
    return [i for i, text in zip(ids, texts) if text and text.endswith(ends)]


def delimiter_mask(token_ids: list[int], size: int) -> torch.Tensor:
    """Bool lookup table of length ``size`` (the model's vocabulary) that is True at delimiter ids."""
    mask = torch.zeros(size, dtype=torch.bool)
    if token_ids:
        mask[torch.tensor(token_ids, dtype=torch.long)] = True
    return mask
