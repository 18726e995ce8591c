"""Agent tasks: which environments a task's records stand for, how to build them, and how to talk to them.

| task | ``--data`` | records | format |
| --- | --- | --- | --- |
| ``alfworld`` | the directory with ``<split>.tar.xz`` (e.g. ``../shared/data/alfworld``) | one per game of the split | transcript, or the chat template with ``use_chat_template`` |
| ``ledger`` | the demo domain(s) whose verbs the ledger uses, e.g. ``B`` or ``AB`` | 512 seeded episodes per domain (train: seeds from 0, every other split: from 1,000,000) | the demo's transcript, a 128-token budget, its pretraining row length (each turn restarts from its observation) |

A record's ``columns`` name its environment (``game`` or ``domain`` + ``seed``); the reward
of an episode is the environment's success (``won``), so custom ``--reward-funcs`` do not
apply to agent tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..data import DataError, Record
from ..errors import ConfigError
from .dialogue import ChatFormat, TranscriptFormat
from .ledger import LedgerEnv, ledger_format
from .runner import AgentConfig

ENV_TASKS = ("alfworld", "ledger")
LEDGER_EPISODES = 512
LEDGER_HELD_OUT = 1_000_000
LEDGER_CONTEXT = 128


@dataclass
class EnvTask:
    """A multi-turn task: records are episodes to play, not prompts to answer."""

    name: str
    records: list[Record]
    make_env: Callable[[Record], object]
    """a fresh environment for a record (reset it with ``record.columns.get('seed')``)"""
    make_format: Callable[..., object]
    """``make_format(tokenizer, use_chat_template)``: the episode's text format"""
    max_turns: int
    keep_task: bool = True
    max_context_tokens: int | None = None
    """the episode's context budget (see :mod:`memgen.agents.runner`); None: the model's context"""
    skipped: list[str] = field(default_factory=list)
    episodic: bool = True
    stop: list[str] = field(default_factory=list)

    # ------------------------------------------------ the task protocol (memgen.tasks.protocol)
    def evaluate(self, model, config, memory=None, insertion_filter=None, observe=None) -> dict:
        from .evaluate import evaluate_agent

        if memory is not None and memory.rewrite_prompt is not None:
            raise ConfigError("agent tasks evaluate with --memory-source weaver")
        return evaluate_agent(
            model,
            self,
            config,
            experience=None if memory is None else memory.reader,
            insertion_filter=insertion_filter,
            observe=observe,
        )

    def rollout(self, run, records: list[Record], micro: int, memory: str, **generate_kwargs):
        from .training import episode_rollout

        return episode_rollout(run, records, micro, memory, **generate_kwargs)

    def sft_step(self, run, micro: int):
        from .training import episode_sft_step

        return episode_sft_step(run, micro)

    def reward_function(self, config) -> None:
        """Episodes are rewarded by their environment (``won``), not by a reward function."""
        return None

    def decoded_spans(self, record: Record, episode, tokenizer) -> list[tuple]:
        """One span per turn: the turn's observation segment and the reply decoded after it."""
        return [
            (t + 1, tokenizer.decode(turn.segment_ids, skip_special_tokens=True), turn.completion)
            for t, turn in enumerate(episode.turns)
        ]

    def seed_of(self, record: Record):
        return record.columns.get("seed")

    def agent_config(self, **fields) -> AgentConfig:
        """How this task's episodes are played: its turn limit, truncation rule and budget, plus ``fields``."""
        return AgentConfig(
            max_turns=self.max_turns,
            keep_task=self.keep_task,
            max_context_tokens=self.max_context_tokens,
            progress=False,
            **fields,
        )


def is_env_task(name: str) -> bool:
    return name in ENV_TASKS


def alfworld_format(tokenizer, use_chat_template: bool):
    return ChatFormat(tokenizer) if use_chat_template else TranscriptFormat()


def load_env_task(
    name: str,
    data: str,
    split: str = "train",
    limit: int | None = None,
    max_turns: int | None = None,
    step_timeout: float = 30.0,
) -> EnvTask:
    """The records of agent task ``name`` (see the module table)."""
    if name == "alfworld":
        from .alfworld import alfworld_env, list_games, task_type

        turns = max_turns or 50
        games = list_games(data, split)
        records = [Record(str(g), None, {"game": str(g), "task_type": task_type(g)}, str(g)) for g in games]

        def make_env(record: Record):
            return alfworld_env(record.columns["game"], max_steps=turns, timeout=step_timeout)

        task = EnvTask("alfworld", records, make_env, alfworld_format, turns, keep_task=True)
    elif name == "ledger":
        domains = list(data or "B")
        bad = [d for d in domains if d not in "ABD"]
        if bad:
            raise DataError(f"ledger --data names demo domains (A, B, D), got {data!r}")
        offset = 0 if split == "train" else LEDGER_HELD_OUT
        records = [
            Record(
                f"ledger {d} {offset + i}",
                None,
                {"domain": d, "seed": offset + i, "task_type": d},
                f"ledger:{d}:{offset + i}",
            )
            for i in range(LEDGER_EPISODES)
            for d in domains
        ]

        def make_env(record: Record):
            return LedgerEnv(record.columns["domain"])

        # The demo's reasoner is pretrained on rows of 128 characters, so a second turn stacked on the first
        # (and its latents) would run past every position it knows: the budget makes each turn restart from
        # its own observation (the runner's truncation rule), the way the reasoner saw problems.
        task = EnvTask(
            "ledger",
            records,
            make_env,
            lambda tok, chat=False: ledger_format(tok),
            max_turns or 2,
            keep_task=False,
            max_context_tokens=LEDGER_CONTEXT,
        )
    else:
        raise ConfigError(f"unknown agent task {name!r}; choose one of {list(ENV_TASKS)}")
    if limit is not None:
        task.records = task.records[:limit]
    return task
