"""``memgen experience build|show|search|insights|workflows``: the config, loaders and command handlers.

``insights`` runs ExpeL's insight extraction and ``workflows`` AWM's offline induction over the
store's trajectories of ``--task``, with the ``--model`` reasoner as the LLM.

``build --from FILE`` reads JSONL lines of either shape:

- experience records (the fields of :class:`ExperienceRecord`, e.g. a store's ``export``), or
- the per-answer lines ``memgen eval --output`` writes (``prompt``, ``completion``, ``reward``): each
  becomes a trajectory, a success when its reward reaches ``success_reward``.

A malformed line is reported with ``file:line`` (by :func:`memgen.data.read_jsonl`, as for every
data file); nothing is added from a file with one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..dataclass_cli import check_ranges, help_field
from .embedders import EMBEDDERS_HELP
from .records import ExperienceError, ExperienceRecord


@dataclass
class ExperienceConfig:
    store: str = help_field("", "experience store directory (created by build)")
    embedder: str = help_field("reasoner", EMBEDDERS_HELP)
    model: str = help_field("", "reasoner directory for the reasoner embedder")
    source: str = help_field("", "build: JSONL of experience records or of `memgen eval --output` answers")
    task: str = help_field("", "build: task name for answers that carry none; show/search: only this task")
    success_reward: float = help_field(1.0, "build: an answer whose reward reaches this is a success")
    kind: str = help_field("", "show/search: only this kind (trajectory | insight | workflow)")
    query: str = help_field("", "search: the text to match")
    top_k: int = help_field(4, "search: records to return", ge=1)
    limit: int = help_field(10, "show: records to list", ge=0)
    llm_max_new_tokens: int = help_field(
        256, "insights/workflows: longest answer of the LLM (the --model reasoner)", ge=1
    )

    def __post_init__(self) -> None:
        check_ranges(self)


def open_embedder(config: ExperienceConfig):
    """(embedder or None, retriever) for the config's ``--embedder``."""
    from .embedders import embedder_for

    def reasoner():
        if not config.model:
            raise ExperienceError("the reasoner embedder needs --model (the reasoner's directory)")
        from ..loading import load_base

        model, tokenizer = load_base(config.model)
        return model.eval(), tokenizer

    return embedder_for(config.embedder, reasoner)


def records_from_jsonl(path: str | Path, task: str = "", success_reward: float = 1.0) -> list[ExperienceRecord]:
    """Experience records from ``path`` (see the module docstring); raises on the first bad line with file:line."""
    from ..data import DataError, read_jsonl

    out = []
    for number, obj in read_jsonl(path)[0]:
        where = f"{path}:{number}"
        try:
            if "prompt" in obj and "completion" in obj:
                reward = float(obj.get("reward", 0.0))
                out.append(
                    ExperienceRecord(
                        task=obj.get("task") or task,
                        input=obj["prompt"],
                        trajectory=obj["completion"],
                        reward=reward,
                        success=reward >= success_reward,
                        provenance={"file": where, **({"source": obj["source"]} if obj.get("source") else {})},
                    )
                )
            else:
                obj.pop("id", None)  # re-derived from the content, so an edited line cannot keep a stale id
                record = ExperienceRecord.from_json(obj)
                if not record.task:
                    record.task = task
                    record.id = record.content_hash()
                out.append(record)
        except (TypeError, ValueError) as err:  # ExperienceError is a ValueError
            raise DataError(f"{where}: {err}; nothing was added") from None
    return out


def run_experience(command: str, config: ExperienceConfig) -> str:
    """Run ``build``, ``show`` or ``search``; returns the text to print."""
    from ..tables import format_table
    from .store import ExperienceStore

    if not config.store:
        raise ExperienceError("--store is required")
    if command in ("insights", "workflows"):
        return _derive(command, config)
    if command == "build":  # the file is read before any model loads: a bad line fails fast
        if not config.source:
            raise ExperienceError("build needs --source FILE.jsonl")
        records = records_from_jsonl(config.source, config.task, config.success_reward)
    embedder, retriever = open_embedder(config) if command != "show" else (None, "bm25")
    kind, task = config.kind or None, config.task or None
    if command == "build":
        with ExperienceStore(config.store, embedder, retriever) as store:
            added = store.add_many(records)
            total = len(store)
        return (
            f"added {added} of {len(records)} records from {config.source} "
            f"({len(records) - added} duplicates); {config.store} holds {total}"
        )
    store = ExperienceStore(config.store, embedder, retriever, create=False, read_only=True)
    if command == "show":
        live = store.records(kind=kind, task=task)
        counts = {}
        for r in live:
            counts[(r.task, r.kind, r.success)] = counts.get((r.task, r.kind, r.success), 0) + 1
        summary = [{"task": t, "kind": k, "success": s, "records": n} for (t, k, s), n in sorted(counts.items())]
        lines = [f"{config.store}: {len(live)} records, embedder {store.embedder_name or 'none (bm25 only)'}"]
        if summary:
            lines.append(format_table(summary, list(summary[0])))
        if config.limit and live:
            rows = [_row(r) for r in live[: config.limit]]
            lines.append(format_table(rows, list(rows[0])))
        return "\n\n".join(lines)
    if command == "search":
        if not config.query:
            raise ExperienceError("search needs --query TEXT")
        hits = store.search(config.query, config.top_k, kind=kind, task=task)
        if not hits:
            return "no records match"
        rows = [{"score": round(h.score, 4), **_row(h.record)} for h in hits]
        return format_table(rows, list(rows[0]))
    raise ExperienceError(f"unknown experience command {command!r}")


def _derive(command: str, config: ExperienceConfig) -> str:
    """``insights`` (ExpeL) or ``workflows`` (AWM, offline) over the store's trajectories of ``--task``."""
    from ..loading import load_base
    from ..model import MemGen
    from .awm import AWMConfig, induce_workflows
    from .expel import ExpeLConfig, extract_insights, reasoner_llm
    from .store import ExperienceStore

    if not config.model or not config.task:
        raise ExperienceError(f"{command} needs --model (the LLM that writes them) and --task")
    base, tokenizer = load_base(config.model)
    llm = reasoner_llm(MemGen(base.eval(), tokenizer), config.llm_max_new_tokens)
    embedder, retriever = open_embedder(config)
    with ExperienceStore(config.store, embedder, retriever, create=False) as store:
        if command == "insights":
            got = extract_insights(store, config.task, llm, ExpeLConfig(llm_max_new_tokens=config.llm_max_new_tokens))
        else:
            got = induce_workflows(store, config.task, llm, AWMConfig(llm_max_new_tokens=config.llm_max_new_tokens))
    return " ".join(f"{k}={v}" for k, v in got.items())


def _row(record: ExperienceRecord) -> dict:
    def clip(text: str, n: int = 60) -> str:
        text = text.replace("\n", " ")
        return text if len(text) <= n else text[: n - 3] + "..."

    return {
        "id": record.id,
        "task": record.task,
        "kind": record.kind,
        "success": record.success,
        "text": clip(record.search_text),
        "trajectory": clip(record.trajectory),
    }
