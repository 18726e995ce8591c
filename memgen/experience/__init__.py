"""Experience memory: a persistent store of trajectories, insights and workflows, and its retrievers.

The store feeds the external-memory baselines (ExpeL, AWM) and MemGen's retrieval-augmented
weaving (paper App. E). See :mod:`memgen.experience.store` for the on-disk format.
"""

from .embedders import BM25Retriever, Embedder, ReasonerEmbedder, SentenceTransformerEmbedder
from .records import ExperienceError, ExperienceRecord
from .store import ExperienceStore, Hit
from .weaving import ExperienceReader, RetrievalConfig, Retrieved

__all__ = [
    "BM25Retriever",
    "Embedder",
    "ExperienceError",
    "ExperienceReader",
    "ExperienceRecord",
    "ExperienceStore",
    "Hit",
    "ReasonerEmbedder",
    "RetrievalConfig",
    "Retrieved",
    "SentenceTransformerEmbedder",
]
