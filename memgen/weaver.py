"""Memory weavers: turn the reasoner's current state into K latent vectors.

:class:`Weaver` is the interface the engine and teacher-forced forward call; anything that
maps (reasoner, KV cache, mask, positions) to latents fits, so a weaver that re-encodes the
context with its own adapter, or a separate smaller model with projections, can be added.

:class:`LoraQueryWeaver` is the default and follows the paper's design on one copy of the
base weights: K learnable query embeddings (one set for the prompt end, one for in-reasoning
insertions) are run through the reasoner's own layers with a LoRA adapter that is switched
on only for those query slots. The slots attend to the reasoner's KV cache of everything so
far (earlier latents included); their last-layer states are projected into the input
embedding space and rescaled to the mean token-embedding norm. The slots' own KV entries
are cropped from the cache right after, so the reasoner never sees them.

Departure from the authors' code: with ``anchor_context`` (default on) a linear map of the
reasoner's own last-layer state at the insertion point (the delimiter, or the last prompt
token; the state the trigger reads) is added to every slot state before the projection.
It starts at zero, so an untrained weaver is unchanged. Without it, small weavers we
trained by SFT collapsed to one context-free latent (the same vector at every insertion):
context then has to reach the latents only through attention patterns the LoRA must
discover, while this map makes "what the reasoner is about to do" one matrix away.

Switching the adapter: peft's wrapped layers cost about 15 us each per forward even when
disabled (over 1 ms per decode step on a 12-layer model), and its public toggles rewrite
``requires_grad`` and walk the whole module tree (about 7 ms per toggle on an 8M model,
more than a decode step). So after injecting the adapter with peft, the weaver puts the
original linear layers (``base_layer``) back in the reasoner and installs the LoRA layers
only for the duration of a weaver pass (a few microseconds per layer). Between weaver
passes the reasoner is exactly the plain Hugging Face model. The LoRA layers stay
registered under the weaver (``lora_layers``), so optimizers, DDP and ``.to()`` see them.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from .config import MemGenConfig
from .errors import ConfigError
from .reasoner import Reasoner, drop_last_slots

ADAPTER_NAME = "weaver"
PROMPT, INFERENCE = "prompt", "inference"


def pack_context(rows: dict[int, list[int]], batch: int, pad_id: int, device) -> tuple | None:
    """``weave``'s ``context``: rows' token lists (row -> ids), left-aligned in (ids, valid) (B, S); None
    when every list is empty. Rows not in ``rows`` get only pad slots."""
    width = max((len(ids) for ids in rows.values()), default=0)
    if width == 0:
        return None
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    valid = torch.zeros((batch, width), dtype=torch.long)
    for r, tokens in rows.items():
        ids[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        valid[r, : len(tokens)] = 1
    return ids.to(device), valid.to(device)


class Weaver(nn.Module):
    """Interface: ``weave`` returns latents (B, K, d) in the reasoner's dtype for the rows flagged in ``rows``."""

    def num_latents(self, kind: str) -> int:
        raise NotImplementedError

    def weave(
        self,
        reasoner: Reasoner,
        cache,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        kind: str,
        anchor: torch.Tensor,
        context=None,
    ) -> torch.Tensor:
        """``positions`` (B, K) are the position ids the latents will take; ``anchor`` (B, d) is the
        reasoner's last-layer state at the insertion point; ``context`` is None or (token ids (B, S),
        valid (B, S)): retrieved text the weaver reads before weaving (left-aligned, pads invalid)."""
        raise NotImplementedError

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters living inside the reasoner (none for a separate-model weaver)."""
        return []

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything weaver training updates."""
        raise NotImplementedError


class LoraQueryWeaver(Weaver):
    """K learnable queries through the reasoner's layers with a LoRA active only on the query slots."""

    def __init__(self, reasoner: Reasoner, config: MemGenConfig) -> None:
        super().__init__()
        d = reasoner.hidden_size
        embed_norm, embed_std = reasoner.embedding_stats()
        self.prompt_queries = nn.Parameter(torch.randn(config.prompt_latents, d) * embed_std)
        self.inference_queries = nn.Parameter(torch.randn(config.inference_latents, d) * embed_std)
        self.projection = nn.Linear(d, d)
        with torch.no_grad():
            self.projection.weight.copy_(torch.eye(d))
            self.projection.bias.zero_()
        # Per-slot offsets added after the projection: zero by default, or token embeddings
        # with ``latent_init_text`` (see init_from_embeddings).
        self.prompt_offsets = nn.Parameter(torch.zeros(config.prompt_latents, d))
        self.inference_offsets = nn.Parameter(torch.zeros(config.inference_latents, d))
        self.anchor_map = nn.Linear(d, d) if config.anchor_context else None
        if self.anchor_map is not None:
            nn.init.zeros_(self.anchor_map.weight)
            nn.init.zeros_(self.anchor_map.bias)
        self.register_buffer("target_norm", torch.tensor(embed_norm), persistent=False)
        self._reasoner_model = [reasoner.model]  # a list: not registered as a submodule here
        targets = list(config.lora_target_modules)
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules="all-linear" if targets == ["all-linear"] else targets,
            bias="none",
        )
        inject_adapter_in_model(lora, reasoner.model, adapter_name=ADAPTER_NAME)
        # peft leaves its config on the model; drop it so several MemGens can share one base,
        # and hand it back only around state-dict I/O (see _peft_io).
        if hasattr(reasoner.model, "peft_config"):
            del reasoner.model.peft_config
        self.lora_config = lora
        self._sites = []  # (parent module, attribute, LoRA layer, original layer)
        for parent in list(reasoner.model.modules()):
            for attr, child in list(parent.named_children()):
                if isinstance(child, LoraLayer):
                    self._sites.append((parent, attr, child, child.get_base_layer()))
        if not self._sites:
            raise ConfigError(
                f"no reasoner layer matched lora_target_modules={config.lora_target_modules}; name "
                "this model's linear layers, or use ['all-linear']"
            )
        self.lora_layers = nn.ModuleList([site[2] for site in self._sites])
        for param in reasoner.model.parameters():
            param.requires_grad_(False)
        # Trainable weights stay float32 on a half-precision base, as peft's get_peft_model does
        # (autocast_adapter_dtype): in bf16 a small update to a weight of size 0.1 rounds away.
        # peft's LoRA forward casts its input to the adapter's dtype and the result back.
        for param in self.adapter_parameters():
            param.data = param.data.float()
            param.requires_grad_(True)
        self._install(False)

    def _install(self, lora: bool) -> None:
        for parent, attr, lora_layer, base_layer in self._sites:
            setattr(parent, attr, lora_layer if lora else base_layer)
        self.lora_is_installed = lora

    def set_lora_installed(self, lora: bool) -> None:
        """Put the LoRA layers in or take them out (gradient checkpointing replays a layer as it ran)."""
        if lora != self.lora_is_installed:
            self._install(lora)

    @contextmanager
    def lora_installed(self):
        """Put the LoRA layers into the reasoner (weaver passes, and peft state-dict I/O)."""
        self._install(True)
        try:
            yield
        finally:
            self._install(False)

    def lora_active(self):
        """Run the reasoner with the weaver adapter on (only ever around the query slots)."""
        return self.lora_installed()

    def adapter_parameters(self) -> list[nn.Parameter]:
        params = []
        for layer in self.lora_layers:
            params += list(layer.lora_A[ADAPTER_NAME].parameters()) + list(layer.lora_B[ADAPTER_NAME].parameters())
        return params

    def trainable_parameters(self) -> list[nn.Parameter]:
        extra = list(self.anchor_map.parameters()) if self.anchor_map is not None else []
        return [
            self.prompt_queries,
            self.inference_queries,
            self.prompt_offsets,
            self.inference_offsets,
            *self.projection.parameters(),
            *extra,
            *self.adapter_parameters(),
        ]

    @torch.no_grad()
    def init_from_embeddings(self, embeddings: torch.Tensor) -> None:
        """Start every latent at a token embedding (rows of ``embeddings``, cycled over the K slots).

        The projection is zeroed, so an untrained weaver emits exactly these embeddings (at
        the target norm) and its context paths, like a LoRA's B matrix, grow from zero. A
        small reasoner is thrown far off course by arbitrary input vectors (on the demo's,
        random latents raise the loss from 0.15 to 2.4) and text it knows is much milder;
        starting there keeps early SFT steps about information, not about repairing damage.
        """
        for offsets in (self.prompt_offsets, self.inference_offsets):
            index = torch.arange(offsets.shape[0], device=embeddings.device) % embeddings.shape[0]
            offsets.copy_(embeddings[index].to(offsets.dtype))
        self.projection.weight.zero_()
        self.projection.bias.zero_()

    @contextmanager
    def _peft_io(self):
        model = self._model()
        with self.lora_installed():
            model.peft_config = {ADAPTER_NAME: self.lora_config}
            try:
                yield model
            finally:
                del model.peft_config

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        with self._peft_io() as model:
            return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]):
        with self._peft_io() as model:
            return set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)

    def _model(self) -> nn.Module:
        return self._reasoner_model[0]

    def lora_dropout_modules(self) -> list[nn.Module]:
        return [layer.lora_dropout[ADAPTER_NAME] for layer in self.lora_layers]

    def num_latents(self, kind: str) -> int:
        return self.queries(kind).shape[0]

    def queries(self, kind: str) -> nn.Parameter:
        return self.prompt_queries if kind == PROMPT else self.inference_queries

    def offsets(self, kind: str) -> nn.Parameter:
        return self.prompt_offsets if kind == PROMPT else self.inference_offsets

    def project(self, hidden: torch.Tensor, kind: str) -> torch.Tensor:
        """Map weaver states (B, K, d) into the input-embedding space at token-embedding scale."""
        z = self.projection(hidden.to(self.projection.weight.dtype)) + self.offsets(kind)
        return z * (self.target_norm / z.norm(dim=-1, keepdim=True).clamp_min(1e-6))

    def weave(
        self,
        reasoner: Reasoner,
        cache,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        kind: str,
        anchor: torch.Tensor,
        context=None,
    ) -> torch.Tensor:
        queries = self.queries(kind)
        batch, k = attention_mask.shape[0], queries.shape[0]
        slots = rows.to(attention_mask.dtype)[:, None].expand(batch, k)
        inputs = queries.to(reasoner.dtype)[None].expand(batch, k, -1)
        extra = 0
        if context is not None and context[0].shape[1] > 0:
            # Retrieved text goes in front of the query slots, at the positions the latents would take;
            # the queries follow it. It is cropped with them, so only the latents carry it on.
            ids, valid = context
            extra = ids.shape[1]
            valid = valid.to(attention_mask.dtype) * rows.to(attention_mask.dtype)[:, None]
            start = positions[:, :1]
            text_positions = start + torch.arange(extra, device=positions.device)
            positions = positions + valid.sum(dim=1, keepdim=True)
            inputs = torch.cat([reasoner.embed(ids).to(reasoner.dtype), inputs], dim=1)
            slots = torch.cat([valid, slots], dim=1)
            positions = torch.cat([text_positions, positions], dim=1)
        mask = torch.cat([attention_mask, slots], dim=1)
        with self.lora_active():
            hidden = reasoner.hidden(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, cache=cache)
        drop_last_slots(cache, extra + k)
        hidden = hidden[:, extra:]
        if self.anchor_map is not None:
            hidden = (
                hidden.to(self.anchor_map.weight.dtype)
                + self.anchor_map(anchor.to(self.anchor_map.weight.dtype))[:, None]
            )
        return self.project(hidden, kind).to(reasoner.dtype)
