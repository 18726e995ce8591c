"""An episode's record, and its form for teacher forcing: one long completion per context span.

The engine's token stream for an episode is ``prompt, a_1, o_2, a_2, ..., a_T``: ``a_t`` the
tokens of assistant turn ``t`` and ``o_t`` the transition before it (observation and turn
header, context only). Teacher forcing treats ``a_1 o_2 a_2 ... a_T`` as one completion with a
loss mask on the assistant tokens, a prompt-query insertion at the start of each turn that wove
one, and in-reasoning insertions at their offsets inside each turn (:func:`training_rows`). A
history restart (old turns truncated) starts a new span with its own prompt, so an episode is
one row per span; without truncation it is one row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..engine import Completion
from ..weaver import INFERENCE, PROMPT


@dataclass
class Turn:
    """One assistant turn: what the agent read, wrote, did and got back."""

    observation: str
    """the observation the turn answered (the first one holds the task)"""
    segment_ids: list[int]
    """the tokens fed before this turn: the prompt (turn 1 or a restart), else the transition"""
    completion: Completion
    action: str | None
    """the parsed action, None when the reply held none"""
    feedback: str
    """the environment's answer (or the parser's failure message)"""
    reward: float
    restarted: bool = False
    """this turn's history was rebuilt without the oldest turns (context budget)"""

    def as_log(self) -> dict:
        c = self.completion
        return {
            "observation": self.observation,
            "reply": c.text,
            "action": self.action,
            "feedback": self.feedback,
            "reward": self.reward,
            "finish_reason": c.finish_reason,
            "tokens": len(c.token_ids),
            "restarted": self.restarted,
            "insertions": [
                {"position": i.position, "inserted": i.inserted, "probability": i.probability} for i in c.insertions
            ],
        }


@dataclass
class Episode:
    """A played episode. ``success`` is the environment's verdict (``won``), ``reward`` the summed rewards."""

    env_id: str
    task_type: str | None
    turns: list[Turn] = field(default_factory=list)
    success: bool = False
    reward: float = 0.0
    end_reason: str = ""
    """done (the environment ended it), max_turns, context (no room for the next turn) or timeout/error"""

    @property
    def num_insertions(self) -> int:
        return sum(t.completion.num_insertions for t in self.turns)

    def as_log(self) -> dict:
        return {
            "env_id": self.env_id,
            "task_type": self.task_type,
            "success": self.success,
            "reward": self.reward,
            "end_reason": self.end_reason,
            "turns": len(self.turns),
            "insertions": self.num_insertions,
            "log": [t.as_log() for t in self.turns],
        }


@dataclass
class EpisodeRow:
    """One context span of an episode in :meth:`MemGen.teacher_forced`'s terms."""

    prompt_ids: list[int]
    completion_ids: list[int]
    loss_mask: list[bool]
    """True on assistant tokens, False on observations"""
    insertions: list[int]
    kinds: list[str]
    contexts: list[list[int]]
    decisions: list[tuple[int, bool, str]]
    """(position, inserted, kind) of every trigger decision, in completion coordinates"""
    logprobs: list[float] | None
    """the rollout's log-prob of each completion token (0 on observations), when it kept them"""

    def to_dict(self) -> dict:
        return asdict(self)


def training_rows(episode: Episode) -> list[EpisodeRow]:
    """The teacher-forcing rows of an episode: one per context span (see the module docstring)."""
    rows: list[EpisodeRow] = []
    for t, turn in enumerate(episode.turns):
        c = turn.completion
        if t == 0 or turn.restarted:
            row = EpisodeRow(list(turn.segment_ids), [], [], [], [], [], [], [] if c.logprobs is not None else None)
            rows.append(row)
        else:
            # The transition's first token is the previous turn's last token, already in the completion.
            observation = turn.segment_ids[1:]
            row.completion_ids += observation
            row.loss_mask += [False] * len(observation)
            if row.logprobs is not None:
                row.logprobs += [0.0] * len(observation)
        offset = len(row.completion_ids)
        for ins in c.insertions:
            kind = PROMPT if ins.position == 0 else INFERENCE
            if ins.probability is not None:
                row.decisions.append((offset + ins.position, ins.inserted, kind))
            if ins.inserted:
                row.insertions.append(offset + ins.position)
                row.kinds.append(kind)
                row.contexts.append(list(ins.context_ids or []))
        row.completion_ids += c.token_ids
        row.loss_mask += [True] * len(c.token_ids)
        if row.logprobs is not None:
            row.logprobs += list(c.logprobs or [0.0] * len(c.token_ids))
    return rows
