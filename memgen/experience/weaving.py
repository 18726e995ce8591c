"""Retrieval-augmented weaving (paper App. E): what the weaver reads from the experience store.

On each invocation the engine asks an :class:`ExperienceReader` for every inserting row: the
query is built from the reasoning so far (``RetrievalConfig.query``), the top-P records are
retrieved and rendered as text, and their tokens, cut to ``max_tokens``, are prefilled in front
of the weaver's query slots with the weaver adapter on. Those slots, and the text, are cropped
from the cache with the query slots, so the reasoner only ever sees the latents.

The paper does not say how the weaver reads retrieved memories; its authors never published the
code. Our choices, stated: the text takes the positions the latents would take and the query
slots follow it (so they read it as the most recent context), and snippets are whole records in
rank order, the last one cut at the token budget.

The insertion log keeps, per insertion, the retrieved record ids and the exact token ids read,
so a teacher-forced forward (training) replays the same context the rollout saw.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..dataclass_cli import check_ranges, help_field
from ..errors import ConfigError
from .records import ExperienceRecord
from .store import ExperienceStore

QUERIES = ("prompt", "context")


@dataclass
class RetrievalConfig:
    """How the weaver's retrieval is built on each invocation."""

    top_p: int = help_field(3, "P: records retrieved per invocation", ge=1)
    max_tokens: int = help_field(128, "most retrieved tokens the weaver reads per invocation", ge=1)
    query: str = help_field("context", "query text: prompt (the task input) | context (prompt plus the answer so far)")
    query_chars: int = help_field(2000, "keep this many trailing characters of the query text", ge=1)
    successes_only: bool = help_field(True, "retrieve only successful trajectories (insights and workflows always)")

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.query not in QUERIES:
            raise ConfigError(f"retrieval query must be one of {', '.join(QUERIES)}, got {self.query!r}")


@dataclass
class RetrievalFields:
    """How the weaver reads ``--experience``: the flags that train, eval and serve configs share."""

    experience_embedder: str = help_field(
        "reasoner", "how --experience is searched: reasoner (the frozen reasoner's pooled states) | bm25 | st:DIR"
    )
    retrieval_top_p: int = help_field(3, "records retrieved per invocation with --experience", ge=1)
    retrieval_max_tokens: int = help_field(128, "most retrieved tokens the weaver reads per invocation", ge=1)
    retrieval_query: str = help_field("context", "retrieval query: prompt | context (prompt plus the answer so far)")


@dataclass
class Retrieved:
    record_ids: list[str]
    token_ids: list[int]


def render(record: ExperienceRecord) -> str:
    """A record as the weaver reads it."""
    if record.kind == "trajectory":
        return f"{record.input}{record.trajectory}\n"
    return f"{record.text}\n"


class ExperienceReader:
    """Queries a store for inserting rows and returns the token ids each row's weaver reads."""

    def __init__(self, store: ExperienceStore, tokenizer, config: RetrievalConfig | None = None):
        self.store, self.tokenizer = store, tokenizer
        self.config = config or RetrievalConfig()

    def query_text(self, prompt: str, answer_so_far: str) -> str:
        text = prompt if self.config.query == "prompt" else prompt + answer_so_far
        return text[-self.config.query_chars :]

    def read(self, queries: list[str]) -> list[Retrieved]:
        top = self.config.top_p
        if self.config.successes_only:  # oversample, then drop failed attempts
            hits = self.store.search_many(queries, 4 * top)
            hits = [[h for h in row if h.record.kind != "trajectory" or h.record.success][:top] for row in hits]
        else:
            hits = self.store.search_many(queries, top)
        out = []
        for row in hits:
            ids, used = [], []
            for hit in row:
                room = self.config.max_tokens - len(ids)
                if room <= 0:
                    break
                ids += self.tokenizer(render(hit.record), add_special_tokens=False)["input_ids"][:room]
                used.append(hit.record.id)
            out.append(Retrieved(used, ids))
        return out


def open_reader(config, model) -> ExperienceReader:
    """A read-only reader of ``config.experience`` for ``model`` (a MemGen).

    ``config`` is any config with the retrieval options (``TrainConfig``, ``EvalConfig``):
    ``experience``, ``experience_embedder`` (``reasoner`` embeds with the model's own frozen
    reasoner, no second copy), ``retrieval_top_p``, ``retrieval_max_tokens``, ``retrieval_query``.
    """
    from .embedders import embedder_for

    embedder, retriever = embedder_for(config.experience_embedder, lambda: (model.reasoner_model, model.tokenizer))
    store = ExperienceStore(config.experience, embedder, retriever, create=False, read_only=True)
    return ExperienceReader(
        store,
        model.tokenizer,
        RetrievalConfig(
            top_p=config.retrieval_top_p, max_tokens=config.retrieval_max_tokens, query=config.retrieval_query
        ),
    )
