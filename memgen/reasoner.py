"""A thin view of the frozen reasoner: embeddings, a cached backbone forward, logits, and KV-cache surgery.

memgen drives the decoder stack (``model.get_decoder()``) directly with explicit attention
masks and per-row position ids, so latent vectors can be spliced in mid-decode while the KV
cache keeps everything already computed. Cache surgery (dropping the weaver's query slots,
compacting masked pad slots) relies on keys being stored after RoPE, which holds for every
attention decoder in transformers.

Sliding-window models (Mistral with ``sliding_window``, Gemma 2/3, Qwen2 with
``use_sliding_window``): transformers' sliding cache layers drop slots once the window is
full, counting *slots*, and its masks count slots too. A memgen batch holds masked slots
(left padding, and other rows' latent slots), so a slot count would evict real tokens a row
still needs. memgen therefore keeps every slot (plain ``DynamicLayer`` caches) and builds
the 4-D masks itself: a query sees a key when the key is a real slot no later than it and
fewer than ``sliding_window`` real slots (tokens and latents) separate them, which is the
model's own window for the unpadded sequence with latents spliced in. The cost is memory:
the cache is not trimmed to the window. Linear-attention, chunked and other cache layers
are refused, and sliding-window models need ``attn_implementation`` ``sdpa`` or ``eager``
(those take a 4-D mask).

Logits are derived the way each model's own ``*ForCausalLM.forward`` does (final-logit
softcapping, Granite's ``logits_scaling``, Cohere's ``logit_scale``), and checked once at
construction against the model's own forward on a short probe: a model whose head memgen
does not reproduce is refused with the gap.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import get_layer_types_and_kwargs

from .errors import UnsupportedModelError


class Reasoner:
    """The frozen causal LM that memgen decodes with."""

    def __init__(self, model) -> None:
        self.model = model
        self.config = model.config
        try:
            self.backbone = model.get_decoder()
            self.lm_head = model.get_output_embeddings()
            self.embed_tokens = model.get_input_embeddings()
            text_config = self.config.get_text_config(decoder=True)
            self.hidden_size = int(text_config.hidden_size)
            self.vocab_size = int(text_config.vocab_size)
        except Exception as exc:
            raise UnsupportedModelError(
                f"{type(model).__name__} does not look like a decoder-only causal LM ({type(exc).__name__}: {exc})"
            ) from None
        if self.backbone is None or self.lm_head is None or self.embed_tokens is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} does not expose a decoder, input embeddings "
                "and an LM head; memgen needs a decoder-only causal LM"
            )
        self.context_length = int(getattr(text_config, "max_position_embeddings", 0) or 0) or None
        self.logit_softcap = getattr(text_config, "final_logit_softcapping", None)
        self.logit_divisor = float(getattr(text_config, "logits_scaling", 1.0) or 1.0)  # Granite
        self.logit_multiplier = float(getattr(text_config, "logit_scale", 1.0) or 1.0)  # Cohere
        self.mask_kinds, self.sliding_window = self._attention_layout(model, text_config)
        self._check_against_own_forward()

    @staticmethod
    def _attention_layout(model, text_config):
        """Which masks the decoder's layers need: None (all full attention: 2-D masks, built by the model)
        or the sorted set of kinds ({'full_attention', 'sliding_attention'}) memgen builds as 4-D masks."""
        try:
            layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        except Exception as exc:  # configs transformers itself cannot lay out
            raise UnsupportedModelError(f"{type(model).__name__}: cannot read its attention layout ({exc})") from None
        kinds = set(layer_types)
        unsupported = sorted(kinds - {"full_attention", "sliding_attention"})
        if unsupported:
            raise UnsupportedModelError(
                f"{type(model).__name__} has {unsupported} layers; memgen splices latents into full- and "
                "sliding-window-attention KV caches only (linear-attention, chunked and shared caches cannot be "
                "edited this way)"
            )
        if kinds == {"full_attention"}:
            return None, None
        windows = {
            int(kw.get("sliding_window") or 0) for t, kw in zip(layer_types, layer_kwargs) if t == "sliding_attention"
        }
        if len(windows) != 1 or min(windows) < 1:
            raise UnsupportedModelError(
                f"{type(model).__name__}: sliding layers with windows {sorted(windows)}; "
                "memgen needs one positive sliding_window"
            )
        implementation = getattr(model.config, "_attn_implementation", None) or "eager"
        if implementation not in ("sdpa", "eager"):
            raise UnsupportedModelError(
                f"{type(model).__name__} uses sliding-window attention with attn_implementation={implementation!r}; "
                "memgen builds 4-D masks for sliding windows, which need 'sdpa' or 'eager' (load the model with "
                "attn_implementation='sdpa')"
            )
        return tuple(sorted(kinds)), windows.pop()

    @torch.no_grad()
    def _check_against_own_forward(self) -> None:
        """Refuse models whose own forward computes logits differently from memgen's cached decoding.

        The probe feeds 5 tokens, then 3 more on the same cache, and compares every logit with one
        plain forward of all 8: a different head transform, a bidirectional encoder or a decoder
        that ignores the cache all show up as a gap.
        """
        ids = torch.arange(3, 11, device=self.device).remainder(self.vocab_size)[None]
        mask = torch.ones_like(ids)
        positions = torch.arange(ids.shape[1], device=self.device)[None]
        try:
            expected = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
            ).logits.float()
            cache, split = self.new_cache(), 5
            ours = self.logits(
                torch.cat(
                    [
                        self.hidden(
                            input_ids=ids[:, :split],
                            attention_mask=mask[:, :split],
                            position_ids=positions[:, :split],
                            cache=cache,
                        ),
                        self.hidden(
                            input_ids=ids[:, split:],
                            attention_mask=mask,
                            position_ids=positions[:, split:],
                            cache=cache,
                        ),
                    ],
                    dim=1,
                )
            )
        except Exception as exc:  # the decoder does not take memgen's inputs (e.g. no position ids, no cache)
            raise UnsupportedModelError(
                f"{type(self.model).__name__} cannot be driven the way memgen drives a "
                f"decoder (explicit positions, masks and a KV cache): "
                f"{type(exc).__name__}: {exc}"
            ) from None
        gap = float((ours - expected).abs().max())
        scale = float(expected.abs().max()) + 1e-6
        tolerance = 1e-3 if self.dtype in (torch.float32, torch.float64) else 3e-2  # half types round the head
        if not gap <= tolerance * scale + 1e-4:  # also catches NaN
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: memgen's cached logits differ from the model's own forward by "
                f"{gap:.3g} (logits up to {scale:.3g}): its LM head applies a transform memgen does not reproduce, "
                "or it is not a causal decoder with a KV cache"
            )

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, data=None) -> DynamicCache:
        """An empty cache (or one holding ``data``: per-layer (keys, values)) with a plain layer per decoder layer.

        Sliding-window models get plain layers too: memgen masks the window itself (module docstring).
        """
        if self.mask_kinds is not None:
            return DynamicCache(ddp_cache_data=data)
        return DynamicCache(ddp_cache_data=data, config=self.config)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """What the decoder feeds its first layer for token ``ids`` (Gemma's embedding scale included)."""
        return self.embed_tokens(ids)

    @torch.no_grad()
    def embedding_stats(self, chunk: int = 8192) -> tuple[float, float]:
        """(mean L2 norm, std of entries) of every token's input embedding as the decoder sees it.

        Chunked, so a 150k-token vocabulary is never copied whole in float32.
        """
        rows = self.embed_tokens.weight.shape[0]
        norm_sum, total, square, count = 0.0, 0.0, 0.0, 0
        for start in range(0, rows, chunk):
            block = self.embed(torch.arange(start, min(rows, start + chunk), device=self.device)).double()
            norm_sum += float(block.norm(dim=-1).sum())
            total, square, count = total + float(block.sum()), square + float((block**2).sum()), count + block.numel()
        mean = total / count
        return norm_sum / rows, (
            max(0.0, square - count * mean**2) / max(1, count - 1)
        ) ** 0.5  # unbiased, as torch.std

    def embedding_norm(self) -> float:
        """Mean L2 norm of the input-token embeddings as the decoder sees them: the scale latents are given."""
        return self.embedding_stats()[0]

    def hidden(
        self,
        *,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-layer (post-norm) hidden states (B, q, d) of the new slots; appends them to ``cache``."""
        if self.mask_kinds is not None:
            new = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            attention_mask = self.window_masks(attention_mask, new)
        out = self.backbone(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        return out.last_hidden_state

    def window_masks(self, attention_mask: torch.Tensor, new: int):
        """4-D masks for the ``new`` newest slots of a 2-D slot mask (B, S), per layer kind.

        A real query sees real keys at or before its slot; a sliding layer also needs fewer than
        ``sliding_window`` real slots between them (``rank`` counts real slots). A masked query
        sees only itself, so its output stays finite and no real query ever reads it.
        """
        valid = attention_mask.bool()
        slots = valid.shape[1]
        past = slots - new
        key_index = torch.arange(slots, device=valid.device)
        query_index = key_index[past:]
        causal = key_index[None, :] <= query_index[:, None]
        itself = key_index[None, :] == query_index[:, None]
        real_query = valid[:, past:, None]
        full = (valid[:, None, :] & causal[None] & real_query) | itself[None]
        masks = {"full_attention": full}
        if "sliding_attention" in self.mask_kinds:
            rank = valid.long().cumsum(dim=1)
            near = (rank[:, past:, None] - rank[:, None, :]) < self.sliding_window
            masks["sliding_attention"] = (full & near) | itself[None]
        masks = {kind: self._mask_format(mask[:, None]) for kind, mask in masks.items() if kind in self.mask_kinds}
        # Uniform models (e.g. Mistral, whose forward takes a single mask) get the tensor itself.
        return next(iter(masks.values())) if len(masks) == 1 else masks

    def _mask_format(self, allowed: torch.Tensor) -> torch.Tensor:
        if getattr(self.model.config, "_attn_implementation", None) == "sdpa":
            return allowed
        zero = torch.zeros((), dtype=self.dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 next-token logits for hidden states (..., d), transformed as the model's own forward does."""
        logits = self.lm_head(hidden)
        if self.logit_divisor != 1.0:
            logits = logits / self.logit_divisor
        if self.logit_multiplier != 1.0:
            logits = logits * self.logit_multiplier
        logits = logits.float()
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


def select_rows(cache: DynamicCache, rows: torch.Tensor, reasoner: Reasoner) -> DynamicCache:
    """A new cache holding only ``rows`` (an index tensor) of ``cache``."""
    data = [(layer.keys.index_select(0, rows), layer.values.index_select(0, rows)) for layer in cache.layers]
    return reasoner.new_cache(data)


def append_rows_slots(cache: DynamicCache, sub: DynamicCache, rows: torch.Tensor, count: int) -> None:
    """Append ``count`` slots to every row of ``cache``: the newest slots of ``sub`` for ``rows``, zeros elsewhere.

    The zero slots are masked out by the caller; they keep the batch rectangular.
    """
    for layer, sub_layer in zip(cache.layers, sub.layers):
        for name in ("keys", "values"):
            full, new = getattr(layer, name), getattr(sub_layer, name)[:, :, -count:]
            grown = full.new_zeros(full.shape[0], full.shape[1], full.shape[2] + count, full.shape[3])
            grown[:, :, : full.shape[2]] = full
            grown[rows, :, full.shape[2] :] = new
            setattr(layer, name, grown)


def join_rows(
    reasoner: Reasoner, cache: DynamicCache, mask: torch.Tensor, other: DynamicCache, other_mask: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """One cache holding the rows of ``cache`` then those of ``other``, and its 2-D mask.

    The shorter side is left-padded with zero, masked slots: attention reads keys only through
    the mask and positions are baked into the keys, so every row's later logits are unchanged.
    """
    width = max(mask.shape[1], other_mask.shape[1])

    def padded(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - tensor.shape[dim]
        if missing == 0:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = missing
        return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

    data = [
        (
            torch.cat([padded(a.keys, 2), padded(b.keys, 2)], dim=0),
            torch.cat([padded(a.values, 2), padded(b.values, 2)], dim=0),
        )
        for a, b in zip(cache.layers, other.layers)
    ]
    return reasoner.new_cache(data), torch.cat([padded(mask, 1), padded(other_mask, 1)], dim=0)
