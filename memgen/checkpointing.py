"""Gradient checkpointing for memgen's training passes, which feed the reasoner through a live KV cache.

Activation memory in weaver training grows with layers x sequence x batch: every decoder
layer's intermediate activations for the whole teacher-forced sequence (prompt, completion,
and 2K slots per insertion) are kept for the backward pass. Checkpointing keeps only each
layer's inputs and recomputes the layer in the backward pass.

transformers' own switch (``gradient_checkpointing_enable``) cannot be used here: it turns
the cache off inside checkpointed layers (a recomputed layer would append its keys twice), and
memgen's teacher forcing and weaver passes read and extend one cache round after round. So
memgen checkpoints each decoder layer itself: inside the checkpoint the layer sees a stand-in
cache holding that layer's past keys and values (inputs of the checkpoint, so gradients reach
whatever produced them, latents included) and hands back the keys and values it appends;
the live cache is extended outside the checkpoint, once. The recomputation is non-reentrant
(``torch.utils.checkpoint``, ``use_reentrant=False``), which sends gradients to the weaver's
LoRA on the frozen base without unfreezing anything, restores the RNG state (LoRA dropout
draws the same mask), and works under DDP.

Keys and values are kept once. A cache grows by concatenation, so each round's past is a new
tensor; a checkpoint that saved the past it read would keep every round's copy alive. Each
layer instead keeps the pieces it appended (one tensor per round) and hands those to its
checkpoints; the past is concatenated from them inside the checkpoint, and again on replay.

The weaver's LoRA layers are swapped into the reasoner only around its query passes, so the
backward pass may replay a layer while they are out. Each checkpoint therefore records whether
they were in (``swap``: a getter and a setter) and replays the layer in that state.

Layers are checkpointed only while gradients are being recorded: decoding and rollouts run
as before.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .errors import UnsupportedModelError


class _LayerCache:
    """The cache a checkpointed layer sees: its own past keys/values; it records what the layer appends."""

    def __init__(self, cache, past_keys, past_values) -> None:
        self._cache = cache
        self._past = (past_keys, past_values)
        self.appended = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.appended is not None:
            raise RuntimeError("a checkpointed layer appended to its cache twice")
        self.appended = (key_states, value_states)
        keys, values = self._past
        if keys is None:
            return key_states, value_states
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # The backward pass recomputes this layer after the live cache has grown: its length is the past's.
        keys = self._past[0]
        return 0 if keys is None else int(keys.shape[-2])

    def __getattr__(self, name):  # anything else a layer asks of its cache is the live cache's
        return getattr(self._cache, name)


def decoder_layers(backbone) -> list[torch.nn.Module]:
    """The backbone's decoder layers, in order (``backbone.layers`` in every transformers decoder memgen runs)."""
    layers = getattr(backbone, "layers", None)
    if layers is None or len(layers) == 0:
        raise UnsupportedModelError(
            f"{type(backbone).__name__} has no `layers` list; memgen cannot checkpoint its decoder layers"
        )
    return list(layers)


def install(backbone, swap) -> None:
    """Wrap every decoder layer's forward once; :func:`set_enabled` turns the wrappers on and off.

    ``swap`` is (get, set) of the module state a replay must reproduce (the weaver's LoRA in or out).
    """
    for index, layer in enumerate(decoder_layers(backbone)):
        if getattr(layer, "_memgen_checkpointing", None) is not None:
            continue
        layer._memgen_checkpointing = False
        original = layer.forward
        layer_idx = getattr(getattr(layer, "self_attn", None), "layer_idx", index)
        layer.forward = _checkpointed(layer, original, layer_idx, swap)


def set_enabled(backbone, enabled: bool, swap) -> None:
    install(backbone, swap)
    for layer in decoder_layers(backbone):
        layer._memgen_checkpointing = bool(enabled)


def is_enabled(backbone) -> bool:
    layers = getattr(backbone, "layers", None) or []
    return any(getattr(layer, "_memgen_checkpointing", False) for layer in layers)


class _Pieces:
    """One layer's cached keys and values as the pieces it appended, valid while the live cache is what it left."""

    def __init__(self) -> None:
        self.live = None  # the live keys tensor right after our last append
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def current(self, layer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Pieces whose concatenation is the live past (the live tensors themselves when we cannot tell)."""
        live = layer.keys if layer.is_initialized else None
        if live is None:
            self.keys, self.values = [], []
        elif not (self.live is not None and (live is self.live or live._base is self.live)):
            self.keys, self.values = [live], [layer.values]  # appended or edited elsewhere: start over from it
        else:  # what we left, possibly cropped (the weaver's query slots dropped): trim the newest pieces
            excess = sum(k.shape[-2] for k in self.keys) - live.shape[-2]
            while excess > 0:
                size = self.keys[-1].shape[-2]
                if size <= excess:
                    self.keys.pop(), self.values.pop()
                else:
                    self.keys[-1] = self.keys[-1][..., : size - excess, :]
                    self.values[-1] = self.values[-1][..., : size - excess, :]
                    size = excess
                excess -= size
        return list(self.keys), list(self.values)

    def appended(self, keys: torch.Tensor, values: torch.Tensor, live: torch.Tensor) -> None:
        self.keys.append(keys)
        self.values.append(values)
        self.live = live


def _joined(pieces: tuple) -> torch.Tensor | None:
    return None if not pieces else pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-2)


def _checkpointed(layer, original, layer_idx: int, swap):
    read_state, write_state = swap

    def replayed(function, state):
        """``function`` run with the module state it first ran in (a no-op the first time)."""

        def run(*inputs):
            now = read_state()
            if now == state:
                return function(*inputs)
            write_state(state)
            try:
                return function(*inputs)
            finally:
                write_state(now)

        return run

    def forward(*args, **kwargs):
        if not (layer._memgen_checkpointing and torch.is_grad_enabled()):
            return original(*args, **kwargs)
        state = read_state()
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        cache = kwargs.get("cache")
        if cache is None:
            return checkpoint(replayed(lambda h: original(h, *rest, **kwargs), state), hidden, use_reentrant=False)
        past_keys = past_values = None
        if layer_idx < len(cache.layers) and cache.layers[layer_idx].is_initialized:
            past_keys, past_values = cache.layers[layer_idx].keys, cache.layers[layer_idx].values

        def run(h, keys, values):
            stand_in = _LayerCache(cache, keys, values)
            out = original(h, *rest, **{**kwargs, "cache": stand_in})
            if stand_in.appended is None:
                raise RuntimeError(f"decoder layer {layer_idx} did not use its KV cache")
            return out, *stand_in.appended

        out, new_keys, new_values = checkpoint(
            replayed(run, state), hidden, past_keys, past_values, use_reentrant=False
        )
        cache.update(new_keys, new_values, layer_idx)
        return out

    return forward
