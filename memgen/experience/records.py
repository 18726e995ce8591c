"""What an experience store holds: solved (and failed) trajectories, and what was derived from them.

One record type covers the three kinds the paper's baselines need:

- ``trajectory``: an agent's attempt at a task input, with its reward and success (ExpeL's
  experience pool; AWM's source of workflows; MemGen's retrieval corpus, paper App. E);
- ``insight``: a rule ExpeL extracted by comparing attempts, with its vote count;
- ``workflow``: a reusable routine AWM induced from successful trajectories.

A record's ``id`` is a hash of its kind and content, so adding the same experience twice is
detected (dedupe). Insights change after they are written (ExpeL's EDIT / UPVOTE / DOWNVOTE):
the store keeps an append-only log and the newest version of an id wins.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

from ..errors import MemGenError

KINDS = ("trajectory", "insight", "workflow")


class ExperienceError(MemGenError):
    """An experience store or record is unusable: bad path, corrupt log, mismatched embeddings."""


@dataclass
class ExperienceRecord:
    kind: str = "trajectory"
    """trajectory | insight | workflow"""
    task: str = ""
    """the task (benchmark or skill) the experience comes from"""
    input: str = ""
    """the task input (prompt, question, goal): what a new input is matched against"""
    trajectory: str = ""
    """the attempt: reasoning, actions and observations as text"""
    reward: float = 0.0
    """the task reward the attempt earned"""
    success: bool = False
    """whether the attempt solved the task"""
    text: str = ""
    """an insight's or workflow's content (empty for trajectories)"""
    votes: int = 0
    """ExpeL's importance count of an insight (UPVOTE +1, DOWNVOTE -1; removed at 0 or below)"""
    provenance: dict = field(default_factory=dict)
    """where it came from: run, step, source ids of the trajectories an insight or workflow was derived from"""
    id: str = ""
    """content hash of kind, task, input, trajectory and text (set on creation; kept across edits of an insight)"""
    deleted: bool = False
    """a tombstone: the newest version of this id was removed"""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ExperienceError(f"experience kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.id:
            self.id = self.content_hash()

    def content_hash(self) -> str:
        body = json.dumps([self.kind, self.task, self.input, self.trajectory, self.text], ensure_ascii=False)
        return hashlib.sha256(body.encode()).hexdigest()[:20]

    @property
    def search_text(self) -> str:
        """What retrieval compares a query against: a trajectory's input, else the insight or workflow text."""
        return self.input if self.kind == "trajectory" else self.text

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> ExperienceRecord:
        known = {f.name for f in fields(cls)}
        unknown = set(obj) - known
        if unknown:
            raise ExperienceError(f"unknown experience field(s): {', '.join(sorted(unknown))}")
        return cls(**obj)
