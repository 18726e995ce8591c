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

Switching the adapter: peft's public ``enable_adapters``/``disable_adapter()`` also rewrites
``requires_grad`` and walks the whole module tree (about 7 ms per toggle on an 8M model,
more than a decode step). We flip each LoRA layer's ``_disable_adapters`` flag directly
(about 0.1 ms); ``tests/test_weaver.py`` checks that this flag still governs peft's forward.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from .config import MemGenConfig
from .reasoner import Reasoner, drop_last_slots

ADAPTER_NAME = "weaver"
PROMPT, INFERENCE = "prompt", "inference"


class Weaver(nn.Module):
    """Interface: ``weave`` returns latents (B, K, d) in the reasoner's dtype for the rows flagged in ``rows``."""

    def num_latents(self, kind: str) -> int:
        raise NotImplementedError

    def weave(self, reasoner: Reasoner, cache, attention_mask: torch.Tensor, next_positions: torch.Tensor,
              rows: torch.Tensor, kind: str) -> torch.Tensor:
        raise NotImplementedError

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters living inside the reasoner (none for a separate-model weaver)."""
        return []


class LoraQueryWeaver(Weaver):
    """K learnable queries through the reasoner's layers with a LoRA active only on the query slots."""

    def __init__(self, reasoner: Reasoner, config: MemGenConfig) -> None:
        super().__init__()
        d = reasoner.hidden_size
        embed_std = float(reasoner.embed_tokens.weight.detach().float().std())
        self.prompt_queries = nn.Parameter(torch.randn(config.prompt_latents, d) * embed_std)
        self.inference_queries = nn.Parameter(torch.randn(config.inference_latents, d) * embed_std)
        self.projection = nn.Linear(d, d)
        with torch.no_grad():
            self.projection.weight.copy_(torch.eye(d))
            self.projection.bias.zero_()
        self.register_buffer("target_norm", torch.tensor(reasoner.embedding_norm()), persistent=False)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(config.lora_target_modules), bias="none")
        inject_adapter_in_model(lora, reasoner.model, adapter_name=ADAPTER_NAME)
        self.lora_config = lora
        # Kept outside the module tree: they belong to the reasoner, which MemGen registers once.
        self._lora_layers = [m for m in reasoner.model.modules() if isinstance(m, LoraLayer)]
        if not self._lora_layers:
            raise ValueError(f"no reasoner layer matched lora_target_modules={config.lora_target_modules}")
        for name, param in reasoner.model.named_parameters():
            param.requires_grad_(f"lora_" in name and f".{ADAPTER_NAME}." in name)
        self._set_lora(False)

    def _set_lora(self, enabled: bool) -> None:
        for layer in self._lora_layers:
            layer._disable_adapters = not enabled

    @contextmanager
    def lora_active(self):
        """Run the reasoner with the weaver adapter on (only ever around the query slots)."""
        self._set_lora(True)
        try:
            yield
        finally:
            self._set_lora(False)

    def adapter_parameters(self) -> list[nn.Parameter]:
        params = []
        for layer in self._lora_layers:
            params += list(layer.lora_A[ADAPTER_NAME].parameters()) + list(layer.lora_B[ADAPTER_NAME].parameters())
        return params

    def lora_dropout_modules(self) -> list[nn.Module]:
        return [layer.lora_dropout[ADAPTER_NAME] for layer in self._lora_layers]

    def num_latents(self, kind: str) -> int:
        return self.queries(kind).shape[0]

    def queries(self, kind: str) -> nn.Parameter:
        return self.prompt_queries if kind == PROMPT else self.inference_queries

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map weaver states into the input-embedding space at token-embedding scale."""
        z = self.projection(hidden.to(self.projection.weight.dtype))
        return z * (self.target_norm / z.norm(dim=-1, keepdim=True).clamp_min(1e-6))

    def weave(self, reasoner: Reasoner, cache, attention_mask: torch.Tensor, next_positions: torch.Tensor,
              rows: torch.Tensor, kind: str) -> torch.Tensor:
        queries = self.queries(kind)
        batch, k = attention_mask.shape[0], queries.shape[0]
        slots = rows.to(attention_mask.dtype)[:, None].expand(batch, k)
        mask = torch.cat([attention_mask, slots], dim=1)
        positions = next_positions[:, None] + torch.arange(k, device=next_positions.device)
        inputs = queries.to(reasoner.dtype)[None].expand(batch, k, -1)
        with self.lora_active():
            hidden = reasoner.hidden(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, cache=cache)
        drop_last_slots(cache, k)
        return self.project(hidden).to(reasoner.dtype)
