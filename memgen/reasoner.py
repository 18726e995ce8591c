"""A thin view of the frozen reasoner: embeddings, a cached backbone forward, logits, and KV-cache surgery.

memgen drives the decoder stack (``model.get_decoder()``) directly with explicit 2-D
attention masks and per-row position ids, so latent vectors can be spliced in mid-decode
while the KV cache keeps everything already computed. Cache surgery (dropping the weaver's
query slots, compacting masked pad slots) relies on keys being stored after RoPE, which
holds for every full-attention decoder in transformers; sliding-window and linear-attention
layers are refused at construction because their caches cannot be edited this way.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .errors import UnsupportedModelError


class Reasoner:
    """The frozen causal LM that memgen decodes with."""

    def __init__(self, model) -> None:
        self.model = model
        self.config = model.config
        self.backbone = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.embed_tokens = model.get_input_embeddings()
        if self.backbone is None or self.lm_head is None or self.embed_tokens is None:
            raise UnsupportedModelError(f"{type(model).__name__} does not expose a decoder, input embeddings "
                                        "and an LM head; memgen needs a decoder-only causal LM")
        text_config = self.config.get_text_config(decoder=True)
        self.hidden_size = int(text_config.hidden_size)
        self.vocab_size = int(text_config.vocab_size)
        self.context_length = int(getattr(text_config, "max_position_embeddings", 0) or 0) or None
        self.logit_softcap = getattr(text_config, "final_logit_softcapping", None)
        probe = self.new_cache()
        kinds = {type(layer).__name__ for layer in probe.layers if type(layer) is not DynamicLayer}
        if kinds:
            raise UnsupportedModelError(
                f"{type(model).__name__} uses {sorted(kinds)} cache layers; memgen splices latents into "
                "full-attention KV caches only (sliding-window / linear-attention layers cannot be edited)")

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def embedding_norm(self) -> float:
        """Mean L2 norm of the input-token embeddings: the scale latents are given."""
        with torch.no_grad():
            return float(self.embed_tokens.weight.float().norm(dim=-1).mean())

    def hidden(self, *, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache,
               input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Last-layer (post-norm) hidden states (B, q, d) of the new slots; appends them to ``cache``."""
        out = self.backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            position_ids=position_ids, past_key_values=cache, use_cache=True)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 next-token logits for hidden states (..., d)."""
        logits = self.lm_head(hidden).float()
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


def drop_last_slots(cache: DynamicCache, count: int) -> None:
    """Remove the newest ``count`` slots from every layer (the weaver's query slots)."""
    if count > 0:
        cache.crop(-count)


def compact_cache(cache: DynamicCache, attention_mask: torch.Tensor) -> torch.Tensor:
    """Squeeze masked slots out of the cache, keeping each row's order; return the new 2-D mask.

    Rows are left-padded to the longest row's number of valid slots. Attention only sees keys
    through the mask and positions are already baked into the cached keys, so this leaves
    every later logit unchanged while bounding the growth from other rows' latent slots.
    """
    valid = attention_mask.bool()
    counts = valid.sum(dim=1)
    new_len = int(counts.max())
    if new_len == attention_mask.shape[1]:
        return attention_mask
    batch = attention_mask.shape[0]
    # Stable sort puts masked slots first, valid slots last in their original order.
    order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices[:, -new_len:]
    new_mask = torch.gather(attention_mask, 1, order)
    index = order[:, None, :, None]
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        heads = layer.keys.shape[1]
        layer.keys = torch.gather(layer.keys, 2, index.expand(batch, heads, new_len, layer.keys.shape[3]))
        layer.values = torch.gather(layer.values, 2, index.expand(batch, heads, new_len, layer.values.shape[3]))
    return new_mask


def select_rows(cache: DynamicCache, rows: torch.Tensor, config) -> DynamicCache:
    """A new cache holding only ``rows`` (an index tensor) of ``cache``."""
    data = [(layer.keys.index_select(0, rows), layer.values.index_select(0, rows)) for layer in cache.layers]
    return DynamicCache(ddp_cache_data=data, config=config)


def append_rows_slots(cache: DynamicCache, sub: DynamicCache, rows: torch.Tensor, count: int) -> None:
    """Append ``count`` slots to every row of ``cache``: the newest slots of ``sub`` for ``rows``, zeros elsewhere.

    The zero slots are masked out by the caller; they keep the batch rectangular.
    """
    for layer, sub_layer in zip(cache.layers, sub.layers):
        for name in ("keys", "values"):
            full, new = getattr(layer, name), getattr(sub_layer, name)[:, :, -count:]
            grown = full.new_zeros(full.shape[0], full.shape[1], full.shape[2] + count, full.shape[3])
            grown[:, :, : full.shape[2]] = full
            grown[rows, :, full.shape[2]:] = new
            setattr(layer, name, grown)
