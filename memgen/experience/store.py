"""A persistent experience store: an append-only record log plus a derived search index.

Layout of a store directory:

- ``records.jsonl``: the truth. Every add, edit and removal appends one JSON line, flushed and
  fsynced before the call returns, so an acknowledged write survives a kill. A kill *during*
  a write can leave only a torn last line (no newline); opening the store moves those bytes to
  ``torn-<time>.txt`` and cuts them off, so nothing is silently dropped. A malformed line
  anywhere else is corruption: opening fails with ``file:line`` and changes nothing.
- ``store.json``: format version and the embedder the vectors were made with (name, dimension),
  written atomically. Opening a store with another embedder is refused with the reason.
- ``embeddings.safetensors``: the dense vectors, a cache of the log: written atomically on
  :meth:`ExperienceStore.flush` (and on close), and re-derived on open for any record it lacks.

Search is exact cosine over L2-normalised vectors (one matrix product; latency per query at 1k
and 100k records: ``benchmarks/retrieval.py``), or BM25 with ``retriever="bm25"``. One
process writes a store at a time (an advisory lock); any number may open it ``read_only``.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text
from .embedders import BM25Retriever, Embedder
from .records import ExperienceError, ExperienceRecord

FORMAT = 1
RETRIEVERS = ("dense", "bm25")


@dataclass
class Hit:
    record: ExperienceRecord
    score: float


class ExperienceStore:
    """Open (or create) the store at ``path``.

    ``embedder`` is needed for dense search (``retriever="dense"``) and for adding records to a
    dense store; reading and BM25 search need none.
    """

    def __init__(
        self,
        path: str | Path,
        embedder: Embedder | None = None,
        retriever: str = "dense",
        create: bool = True,
        read_only: bool = False,
    ):
        if retriever not in RETRIEVERS:
            raise ExperienceError(f"retriever must be one of {', '.join(RETRIEVERS)}, got {retriever!r}")
        self.path = Path(path)
        self.embedder, self.retriever, self.read_only = embedder, retriever, read_only
        self._check_path(create)
        self._lock = None if read_only else self._acquire_lock()
        try:
            self._log = self.path / "records.jsonl"
            self._meta = self._load_meta()
            self._records: dict[str, ExperienceRecord] = {}
            self._row: dict[str, int] = {}  # id -> row of the vectors / BM25 texts
            self._ids: list[str] = []
            self._replay()
            self._vectors = torch.zeros(0, embedder.dim if embedder else 0)
            self._bm25 = BM25Retriever() if retriever == "bm25" else None
            self._dirty = False
            self._build_index()
        except BaseException:
            if self._lock is not None:  # a refused open must not keep the store locked
                self._lock.close()
            raise

    # -- opening ------------------------------------------------------------------------------

    def _check_path(self, create: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ExperienceError(f"experience store path {self.path} is a file, not a store directory")
        if not self.path.exists():
            if not create or self.read_only:
                raise ExperienceError(f"no experience store at {self.path}")
            try:
                self.path.mkdir(parents=True)
            except OSError as err:
                raise ExperienceError(f"cannot create experience store at {self.path}: {err.strerror}") from err
        elif not (self.path / "store.json").is_file() and any(self.path.iterdir()):
            raise ExperienceError(f"{self.path} is a non-empty directory without store.json: not an experience store")

    def _acquire_lock(self):
        try:
            handle = open(self.path / ".lock", "a")
        except OSError as err:
            raise ExperienceError(f"cannot write the experience store at {self.path}: {err.strerror}") from err
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ExperienceError(
                f"experience store {self.path} is open for writing in another process "
                "(open it with read_only=True to search it)"
            ) from None
        return handle

    def _load_meta(self) -> dict:
        meta_path = self.path / "store.json"
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError as err:
                raise ExperienceError(f"{meta_path}: corrupt store metadata ({err.msg})") from None
            if meta.get("format") != FORMAT:
                raise ExperienceError(f"{meta_path}: store format {meta.get('format')!r}, this memgen reads {FORMAT}")
        else:
            meta = {"format": FORMAT, "embedder": None, "dim": None}
        if self.embedder is not None:
            if meta["embedder"] is None:
                meta.update(embedder=self.embedder.name, dim=self.embedder.dim)
            elif meta["dim"] != self.embedder.dim:
                raise ExperienceError(
                    f"embedding dimension mismatch: {self.path} holds {meta['dim']}-dim vectors from "
                    f"{meta['embedder']}, the embedder given makes {self.embedder.dim}-dim ones ({self.embedder.name})"
                )
            elif meta["embedder"] != self.embedder.name:
                raise ExperienceError(
                    f"{self.path} was embedded with {meta['embedder']}, not {self.embedder.name}: open it with "
                    "that embedder, or re-embed it into a new store with `memgen experience build --from`"
                )
        if not self.read_only and not meta_path.is_file():
            atomic_write_json(meta_path, meta)
        return meta

    def _replay(self) -> None:
        """Read the log; the newest version of each id wins; a torn final line is set aside."""
        if not self._log.is_file():
            return
        data = self._log.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            self._set_aside_torn_tail(data, complete)
            data = data[:complete]
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = ExperienceRecord.from_json(json.loads(line))
            except (json.JSONDecodeError, TypeError, ExperienceError) as err:
                reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
                raise ExperienceError(
                    f"{self._log}:{number}: corrupt experience record ({reason}); the store was left as it is"
                ) from None
            self._apply(record)

    def _set_aside_torn_tail(self, data: bytes, complete: int) -> None:
        if self.read_only:
            return  # a reader ignores it; the next writer sets it aside
        torn = self.path / f"torn-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
        torn.write_bytes(data[complete:])
        with open(self._log, "r+b") as handle:
            handle.truncate(complete)
            os.fsync(handle.fileno())

    def _apply(self, record: ExperienceRecord) -> None:
        if record.id not in self._row:
            self._row[record.id] = len(self._ids)
            self._ids.append(record.id)
        self._records[record.id] = record

    # -- the index ------------------------------------------------------------------------------

    def _build_index(self) -> None:
        texts = [self._records[i].search_text for i in self._ids]
        if self._bm25 is not None:
            self._bm25.reset(texts)
        if self.embedder is None:
            return
        vectors = torch.zeros(len(self._ids), self.embedder.dim)
        have = torch.zeros(len(self._ids), dtype=torch.bool)
        cached = self.path / "embeddings.safetensors"
        if cached.is_file():
            from safetensors import safe_open

            with safe_open(str(cached), framework="pt") as handle:
                meta = handle.metadata() or {}
                stored = handle.get_tensor("vectors")
            if meta.get("embedder") == self.embedder.name and stored.shape[-1] == self.embedder.dim:
                for row, (rid, text_hash) in enumerate(json.loads(meta.get("rows", "[]"))):
                    own = self._row.get(rid)
                    if own is not None and text_hash == _text_hash(texts[own]):
                        vectors[own] = stored[row]
                        have[own] = True
        missing = (~have).nonzero().flatten().tolist()
        if missing:
            vectors[missing] = self.embedder.embed([texts[i] for i in missing])
            self._dirty = True
        self._vectors = vectors

    def _index(self, records: list[ExperienceRecord]) -> None:
        """Index newly appended versions; new texts are embedded in one batch."""
        latest = {r.id: r for r in records}  # a batch may hold two versions of one id: the newest wins
        rows = [self._row[i] for i in latest]
        if self._bm25 is not None:
            for row, record in sorted(zip(rows, latest.values()), key=lambda x: x[0]):
                self._bm25.set(row, record.search_text)
        if self.embedder is not None:
            vectors = self.embedder.embed([r.search_text for r in latest.values()])
            grow = max(rows) + 1 - self._vectors.shape[0]
            if grow > 0:
                self._vectors = torch.cat([self._vectors, self._vectors.new_zeros(grow, self._vectors.shape[1])])
            self._vectors[torch.tensor(rows)] = vectors
            self._dirty = True

    # -- writing --------------------------------------------------------------------------------

    def _append(self, records: list[ExperienceRecord]) -> None:
        if self.read_only:
            raise ExperienceError(f"experience store {self.path} is open read-only")
        if self.retriever == "dense" and self.embedder is None:
            raise ExperienceError("adding to a dense experience store needs an embedder")
        lines = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)
        with open(self._log, "a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())
        for record in records:
            self._apply(record)
        self._index(records)

    def add(self, record: ExperienceRecord) -> bool:
        """Append ``record``; False (and nothing written) when a live record with its id exists."""
        return self.add_many([record]) == 1

    def add_many(self, records: Iterable[ExperienceRecord]) -> int:
        """Append the records that are new (deduplicated by content id, also within the batch); returns how many."""
        fresh, seen = [], set()
        for record in records:
            if record.id in seen or (record.id in self._records and not self._records[record.id].deleted):
                continue
            seen.add(record.id)
            fresh.append(record)
        if fresh:
            self._append(fresh)
        return len(fresh)

    def update(self, record: ExperienceRecord) -> None:
        """Write a new version of an existing record (e.g. an edited or re-voted insight)."""
        if record.id not in self._records or self._records[record.id].deleted:
            raise ExperienceError(f"no experience record {record.id} to update in {self.path}")
        self._append([record])

    def remove(self, record_id: str) -> None:
        """Append a tombstone for ``record_id``; it no longer appears in searches or listings."""
        current = self.get(record_id)
        tomb = ExperienceRecord.from_json({**current.to_json(), "deleted": True})
        self._append([tomb])

    def flush(self) -> None:
        """Persist the vectors (atomically); the log itself is always on disk."""
        if self.read_only or self.embedder is None or not self._dirty:
            return
        from safetensors.torch import save

        texts = [self._records[i].search_text for i in self._ids]
        rows = json.dumps([[rid, _text_hash(text)] for rid, text in zip(self._ids, texts)])
        data = save({"vectors": self._vectors.contiguous()}, metadata={"embedder": self.embedder.name, "rows": rows})
        atomic_write_bytes(self.path / "embeddings.safetensors", data)
        self._dirty = False

    def close(self) -> None:
        self.flush()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> ExperienceStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------------

    def get(self, record_id: str) -> ExperienceRecord:
        record = self._records.get(record_id)
        if record is None or record.deleted:
            raise ExperienceError(f"no experience record {record_id} in {self.path}")
        return record

    def records(
        self, kind: str | None = None, success: bool | None = None, task: str | None = None
    ) -> list[ExperienceRecord]:
        """Live records in insertion order, optionally filtered."""
        return [r for r in (self._records[i] for i in self._ids) if _keep(r, kind, success, task)]

    def __len__(self) -> int:
        return sum(not r.deleted for r in self._records.values())

    def __iter__(self) -> Iterator[ExperienceRecord]:
        return iter(self.records())

    def search(
        self, query: str, k: int = 4, kind: str | None = None, success: bool | None = None, task: str | None = None
    ) -> list[Hit]:
        """The ``k`` live records most similar to ``query`` (cosine or BM25), best first, optionally filtered."""
        return self.search_many([query], k, kind, success, task)[0]

    def search_many(
        self,
        queries: list[str],
        k: int = 4,
        kind: str | None = None,
        success: bool | None = None,
        task: str | None = None,
    ) -> list[list[Hit]]:
        """:meth:`search` for several queries at once (one matrix product for dense search)."""
        if not self._ids or k <= 0:
            return [[] for _ in queries]
        if self.retriever == "dense":
            if self.embedder is None:
                raise ExperienceError(
                    f"dense search needs the store's embedder ({self._meta['embedder'] or 'none recorded'})"
                )
            scores = self.embedder.embed(queries) @ self._vectors.T
        else:
            scores = torch.stack([self._bm25.scores(q) for q in queries])
        keep = torch.tensor([_keep(self._records[i], kind, success, task) for i in self._ids])
        scores = scores.masked_fill(~keep, float("-inf"))
        top = scores.topk(min(k, int(keep.sum())), dim=-1) if keep.any() else None
        if top is None:
            return [[] for _ in queries]
        return [
            [Hit(self._records[self._ids[j]], float(s)) for s, j in zip(vals.tolist(), idx.tolist())]
            for vals, idx in zip(top.values, top.indices)
        ]

    def export(self, path: str | Path) -> int:
        """Write the live records as JSONL to ``path`` (atomically); returns how many."""
        live = self.records()
        atomic_write_text(path, "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in live))
        return len(live)

    @property
    def embedder_name(self) -> str | None:
        return self._meta.get("embedder")


def _keep(record: ExperienceRecord, kind, success, task) -> bool:
    return (
        not record.deleted
        and (kind is None or record.kind == kind)
        and (success is None or record.success == success)
        and (task is None or record.task == task)
    )


def _text_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]
