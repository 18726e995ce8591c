"""``memgen agent play`` (watch one episode turn by turn) and ``memgen agent expert`` (replay the expert)."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..dataclass_cli import check_ranges, help_field
from ..errors import ConfigError
from .runner import run_episodes
from .tasks import load_env_task


@dataclass
class PlayConfig:
    """One episode, shown turn by turn."""

    task: str = help_field("alfworld", "agent task: alfworld | ledger")
    data: str = help_field("", "alfworld: the directory of the game archives; ledger: a demo domain, e.g. B")
    split: str = help_field("valid_seen", "train | valid_seen | valid_unseen (ledger: train or any held-out name)")
    index: int = help_field(0, "which episode of the split", ge=0)
    memory: str = help_field("trigger", "insertion policy: off | always | trigger | random:P")
    max_turns: int = help_field(0, "turns before the episode ends unfinished (0: the task's default)", ge=0)
    max_turn_tokens: int = help_field(64, "most tokens per turn", ge=1)
    use_chat_template: bool = help_field(False, "talk through the tokenizer's chat template")
    seed: int = help_field(0, "seed (trigger decisions, sampling)", ge=0)

    def __post_init__(self) -> None:
        check_ranges(self)


def play(model, config: PlayConfig, out=sys.stdout) -> dict:
    task = load_env_task(config.task, config.data, config.split, max_turns=config.max_turns or None)
    if config.index >= len(task.records):
        raise ConfigError(f"--index {config.index}: the {config.split} split has {len(task.records)} episodes")
    record = task.records[config.index]
    env = task.make_env(record)
    agent = task.agent_config(memory=config.memory, max_turn_tokens=config.max_turn_tokens, seed=config.seed)

    def show(_row, turn) -> None:
        marks = "".join("*" if i.inserted else "." for i in turn.completion.insertions)
        print(f"--- turn {len(episode_turns) + 1}  [memory {marks or '-'}]", file=out)
        print(turn.observation.strip(), file=out)
        print(f"> {turn.completion.text.strip()}", file=out)
        if turn.action is None:
            print(f"  ({turn.feedback})", file=out)
        episode_turns.append(turn)

    episode_turns: list = []
    try:
        episode = run_episodes(
            model,
            [env],
            task.make_format(model.tokenizer, config.use_chat_template),
            agent,
            seeds=[task.seed_of(record)],
            env_ids=[record.source],
            on_turn=show,
        )[0]
    finally:
        getattr(env, "close", lambda: None)()
    print(
        f"=== {'success' if episode.success else 'failure'} ({episode.end_reason}) after {len(episode.turns)} "
        f"turns, {episode.num_insertions} insertions",
        file=out,
    )
    return episode.as_log()


@dataclass
class ExpertConfig:
    """Replay an ALFWorld expert on every game of a split."""

    data: str = help_field("", "the directory of the ALFWorld game archives")
    split: str = help_field("valid_seen", "train | valid_seen | valid_unseen")
    limit: int | None = help_field(None, "replay only the first N games", ge=1)
    per_type: int | None = help_field(None, "replay the first N games of each task type (a quick check)", ge=1)
    workers: int = help_field(2, "games replayed at once (each in its own process)", ge=1)
    max_steps: int = help_field(50, "steps before a replay counts as failed", ge=1)
    expert: str = help_field(
        "walkthrough",
        "walkthrough (the plan stored in each game) | planner (Fast Downward from the current state, slow)",
    )
    step_timeout: float = help_field(60.0, "seconds a step may take", gt=0)


def replay_split(config: ExpertConfig) -> dict:
    from .alfworld import list_games, replay_expert, task_type

    games = list_games(config.data, config.split)
    if config.per_type is not None:
        kept: dict[str, list] = {}
        for game in games:
            kept.setdefault(task_type(game), []).append(game)
        games = [game for group in kept.values() for game in group[: config.per_type]]
    games = games[: config.limit]
    with ThreadPoolExecutor(config.workers) as pool:
        results = list(
            pool.map(lambda g: replay_expert(g, config.max_steps, config.step_timeout, config.expert), games)
        )
    failed = [r for r in results if not r["won"]]
    return {
        "split": config.split,
        "games": len(results),
        "task_types": sorted({r["task_type"] for r in results}),
        "won": len(results) - len(failed),
        "success": (len(results) - len(failed)) / len(results),
        "mean_steps": sum(r["steps"] for r in results) / len(results),
        "failed": failed,
    }


def format_replay(summary: dict) -> str:
    return json.dumps(summary, indent=1)
