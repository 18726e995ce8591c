"""Pluggable text embedders and the lexical retriever for an experience store.

- :class:`ReasonerEmbedder` (the default): mean-pooled hidden states of the frozen reasoner
  itself, so retrieval needs no model beyond the one MemGen already holds. Its name carries a
  fingerprint of the reasoner's weights: a store embedded by one reasoner refuses another.
- :class:`SentenceTransformerEmbedder`: a sentence-transformers model from a local directory
  (e.g. all-MiniLM-L6-v2 for users who have one), for better semantic matching.
- :class:`BM25Retriever`: lexical BM25 from ``bm25s``, for exact-word matching (names, entities)
  where dense embeddings of a small reasoner blur them.

Every embedder returns L2-normalised float32 rows, so exact cosine search is one matrix product.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from .records import ExperienceError


class Embedder(Protocol):
    name: str
    """identifies the embedding space: a store embedded under one name refuses another"""
    dim: int

    def embed(self, texts: list[str]) -> torch.Tensor:
        """``[len(texts), dim]`` float32, L2-normalised."""


class ReasonerEmbedder:
    """Mean-pooled hidden states (of ``layer``) of a causal LM: the frozen reasoner by default."""

    def __init__(self, model, tokenizer, layer: int = -1, max_tokens: int = 256, batch_size: int = 32):
        from ..checkpoint import weights_fingerprint

        self.model, self.tokenizer = model, tokenizer
        self.layer, self.max_tokens, self.batch_size = layer, max_tokens, batch_size
        self.dim = int(model.config.hidden_size)
        self.name = f"reasoner:{weights_fingerprint(model)[:16]}:layer{layer}:max{max_tokens}"

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = [t if t else " " for t in texts[start : start + self.batch_size]]
            # Right padding with an explicit mask: pooling only needs which positions are real.
            enc = self.tokenizer(
                chunk,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                padding_side="right",
            ).to(device)
            hidden = self.model(**enc, output_hidden_states=True).hidden_states[self.layer].float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


class SentenceTransformerEmbedder:
    """A sentence-transformers encoder loaded from a local directory (no hub access needed)."""

    def __init__(self, path: str | Path, batch_size: int = 64):
        path = Path(path)
        if not path.is_dir():
            raise ExperienceError(f"sentence-transformers model directory not found: {path}")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ExperienceError(
                "the sentence-transformers embedder needs `pip install sentence-transformers`"
            ) from err
        self.model = SentenceTransformer(str(path), device="cpu")
        self.batch_size = batch_size
        self.dim = int(self.model.get_sentence_embedding_dimension())
        self.name = f"sentence-transformers:{path.name}"

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        vectors = self.model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return vectors.float().cpu()


class BM25Retriever:
    """Lexical BM25 scores over a store's search texts (``bm25s``), rebuilt lazily after additions.

    BM25 keeps no vectors, so nothing of it is persisted: the index is derived from the records on open.
    """

    name = "bm25"

    def __init__(self):
        try:
            import bm25s
        except ImportError as err:
            raise ExperienceError("the BM25 retriever needs `pip install bm25s`") from err
        self._bm25s = bm25s
        self._texts: list[str] = []
        # bm25s's default pattern drops one-character words; numbers and names of one letter matter here.
        self._tokenize = lambda texts, **kw: bm25s.tokenize(
            texts, stopwords=None, show_progress=False, token_pattern=r"(?u)\b\w+\b", **kw
        )
        self._index = None

    def reset(self, texts: list[str]) -> None:
        self._texts = list(texts)
        self._index = None

    def set(self, row: int, text: str) -> None:
        if row == len(self._texts):
            self._texts.append(text)
        else:
            self._texts[row] = text
        self._index = None

    def scores(self, query: str) -> torch.Tensor:
        """A BM25 score per row (0 where no query term occurs)."""
        n = len(self._texts)
        if n == 0:
            return torch.zeros(0)
        if self._index is None:
            self._index = self._bm25s.BM25()
            self._index.index(self._tokenize(self._texts), show_progress=False)
        tokens = self._tokenize([query], return_ids=False)[0]
        return torch.from_numpy(self._index.get_scores(tokens)).float()


EMBEDDERS_HELP = "reasoner (mean-pooled states of --model) | bm25 (lexical) | st:DIR (sentence-transformers model dir)"


def embedder_for(spec: str, reasoner) -> tuple[Embedder | None, str]:
    """(embedder or None, retriever) for an embedder spec (see ``EMBEDDERS_HELP``).

    ``reasoner()`` gives the (model, tokenizer) the ``reasoner`` spec embeds with; it is called only then.
    """
    if spec == "bm25":
        return None, "bm25"
    if spec.startswith("st:"):
        return SentenceTransformerEmbedder(spec[3:]), "dense"
    if spec == "reasoner":
        return ReasonerEmbedder(*reasoner()), "dense"
    raise ExperienceError(f"--embedder must be {EMBEDDERS_HELP}; got {spec!r}")
