"""Multi-turn agents: text environments, the batched episode runner, ALFWorld offline, and episode training.

- :mod:`~memgen.agents.env`: the environment protocol, the strict action parser, per-step timeouts.
- :mod:`~memgen.agents.dialogue`: episodes as plain transcripts or chat-template turns.
- :mod:`~memgen.agents.runner`: :func:`run_episodes`, N environments through one MemGen engine.
- :mod:`~memgen.agents.episode`: the episode record and its teacher-forcing rows.
- :mod:`~memgen.agents.alfworld`: ALFWorld games from the local archives through ``textworld.gym``.
- :mod:`~memgen.agents.ledger`: the demo's tiny multi-turn world.
- :mod:`~memgen.agents.tasks`, :mod:`~memgen.agents.training`, :mod:`~memgen.agents.evaluate`: the
  ``alfworld`` / ``ledger`` tasks for ``memgen train`` and ``memgen eval``.
"""

from .alfworld import alfworld_env, list_games, replay_expert, unpack_split
from .dialogue import ChatFormat, TranscriptFormat
from .env import ActionError, EnvError, EnvTimeout, ProcessEnv, TextEnv, parse_action
from .episode import Episode, EpisodeRow, Turn, training_rows
from .ledger import LedgerEnv, ledger_format
from .runner import AgentConfig, run_episodes
from .tasks import EnvTask, load_env_task

__all__ = [
    "AgentConfig",
    "run_episodes",
    "Episode",
    "Turn",
    "EpisodeRow",
    "training_rows",
    "TextEnv",
    "ProcessEnv",
    "parse_action",
    "ActionError",
    "EnvError",
    "EnvTimeout",
    "TranscriptFormat",
    "ChatFormat",
    "LedgerEnv",
    "ledger_format",
    "alfworld_env",
    "list_games",
    "replay_expert",
    "unpack_split",
    "EnvTask",
    "load_env_task",
]
