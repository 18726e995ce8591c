"""ALFWorld, offline: games from ``../shared/data/alfworld`` played through ``textworld.gym``.

- **Games.** ``<split>.tar.xz`` (``train``, ``valid_seen``, ``valid_unseen``) holds
  ``json_2.1.1/<split>/<task>/<trial>/game.tw-pddl``. A split is unpacked once into the cache
  (``$MEMGEN_CACHE`` or ``~/.cache/memgen``, under ``alfworld/``; never into the repository),
  into a scratch directory renamed into place, so an interrupted unpack is never mistaken
  for a complete one. A corrupt or truncated archive is refused with its path.
- **Playing.** Each game runs in its own child process (:class:`~memgen.agents.env.ProcessEnv`),
  so every reset and step has a timeout. The game files carry the ALFRED PDDL domain and
  grammar (the same as ``alfred.pddl`` / ``alfred.twl2`` beside the archives); they are loaded
  with alfworld's own ``AlfredDemangler`` and ``AlfredInfos`` wrappers.
- **Expert.** ``AlfredTWEnv`` and alfworld's hand-coded expert need ``traj_data.json``, which
  is absent offline. Two experts remain: ``walkthrough`` (the default), the expert plan stored
  in every game file (ALFRED's demonstration, as textworld's ``extra.walkthrough``), followed
  open-loop from the reset state, valid while the agent follows it; and ``planner``,
  textworld's ``policy_commands``, a Fast Downward plan recomputed from the current state
  after every step, which works from any state but took over a minute per step on some
  ``clean`` games here.
- **Task types** (success is reported per type): pick, examine, clean, heat, cool, pick-two,
  read from the game directory's name.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from ..data import DataError
from .env import EnvError, ProcessEnv

SPLITS = ("train", "valid_seen", "valid_unseen")
TASK_TYPES = {
    "pick_and_place_simple": "pick",
    "look_at_obj_in_light": "examine",
    "pick_clean_then_place_in_recep": "clean",
    "pick_heat_then_place_in_recep": "heat",
    "pick_cool_then_place_in_recep": "cool",
    "pick_two_obj_and_place": "pick-two",
}
GAME_FILE = "game.tw-pddl"
EXPERTS = ("walkthrough", "planner", None)
_GAME_KEYS = ("pddl_domain", "grammar", "pddl_problem")


def cache_dir() -> Path:
    base = os.environ.get("MEMGEN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "memgen"
    )
    return Path(base) / "alfworld"


def task_type(game: str | Path) -> str:
    """The task type of a game, from its directory name (``pick_clean_then_place_in_recep-...``)."""
    folder = Path(game).parent.parent.name
    for prefix, short in TASK_TYPES.items():
        if folder.startswith(prefix):
            return short
    return "unknown"


def unpack_split(data_dir: str | Path, split: str) -> Path:
    """The directory of ``split``'s games, unpacking ``<data_dir>/<split>.tar.xz`` into the cache on first use."""
    if split not in SPLITS:
        raise DataError(f"unknown ALFWorld split {split!r}; choose one of {', '.join(SPLITS)}")
    archive = Path(data_dir) / f"{split}.tar.xz"
    if not archive.is_file():
        raise DataError(f"{archive}: no such file (expected the ALFWorld games in {data_dir})")
    stat = archive.stat()
    target = cache_dir() / f"{split}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / ".complete").is_file():
        return target / "json_2.1.1" / split
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=target.parent))
    try:
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(scratch, filter="data")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise DataError(
            f"{archive}: cannot unpack the ALFWorld games ({type(exc).__name__}: {exc}); "
            "the archive is corrupt or truncated"
        ) from None
    if not (scratch / "json_2.1.1" / split).is_dir():
        shutil.rmtree(scratch, ignore_errors=True)
        raise DataError(f"{archive}: holds no json_2.1.1/{split}/ directory")
    (scratch / ".complete").touch()
    try:
        scratch.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(scratch, ignore_errors=True)
    return target / "json_2.1.1" / split


def list_games(data_dir: str | Path, split: str) -> list[Path]:
    """Every game of a split, sorted by path."""
    root = unpack_split(data_dir, split)
    games = sorted(root.glob(f"*/*/{GAME_FILE}"))
    if not games:
        raise DataError(f"{root}: no {GAME_FILE} files")
    return games


def check_game(path: str | Path) -> Path:
    """``path`` if it is a readable ALFWorld game file, else a :class:`DataError` saying why."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such ALFWorld game file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not an ALFWorld game file (not JSON: {exc})") from None
    missing = [k for k in _GAME_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise DataError(f"{path}: not an ALFWorld game file (missing {missing})")
    return path


class AlfWorldGame:
    """One ALFWorld game through ``textworld.gym`` (in-process; :func:`alfworld_env` runs it in a child)."""

    def __init__(self, game: str, max_steps: int = 50, expert: str | None = "walkthrough") -> None:
        import textworld
        import textworld.gym
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

        if expert not in EXPERTS:
            raise ValueError(f"unknown ALFWorld expert {expert!r}; choose one of {EXPERTS}")
        self.game, self.expert = str(game), expert
        self.plan: list[str] = []
        self.on_plan = True
        infos = textworld.EnvInfos(
            won=True, admissible_commands=True, policy_commands=expert == "planner", extras=["gamefile", "walkthrough"]
        )
        env_id = textworld.gym.register_game(
            self.game,
            infos,
            batch_size=1,
            asynchronous=False,
            max_episode_steps=max_steps,
            wrappers=[AlfredDemangler(shuffle=False), AlfredInfos],
        )
        self.env = textworld.gym.make(env_id)
        self.task_type = task_type(self.game)

    def _info(self, info: dict) -> dict:
        out = {
            "task_type": self.task_type,
            "won": bool(info["won"][0]),
            "admissible": [a for a in info["admissible_commands"][0] if a != "help"],
        }
        if self.expert == "planner" and info.get("policy_commands") and info["policy_commands"][0]:
            out["expert"] = info["policy_commands"][0][0]
        elif self.expert == "walkthrough" and self.on_plan and self.plan:
            out["expert"] = self.plan[0]
        return out

    def reset(self, seed: int | None = None):
        obs, info = self.env.reset()
        self.plan, self.on_plan = list(info["extra.walkthrough"][0] or []), True
        return obs[0], self._info(info)

    def step(self, action: str):
        if self.plan and action == self.plan[0]:
            self.plan.pop(0)
        else:  # off the stored plan: the walkthrough no longer applies
            self.on_plan = False
        obs, _, done, info = self.env.step([action])
        info = self._info(info)
        return obs[0], float(info["won"]), bool(done[0]), info


def alfworld_env(
    game: str | Path, max_steps: int = 50, timeout: float = 30.0, expert: str | None = "walkthrough"
) -> ProcessEnv:
    """An ALFWorld game in a child process, each reset/step limited to ``timeout`` seconds."""
    path = check_game(game)
    try:
        import alfworld  # noqa: F401  (fail here, with the install hint, not in the child)
        import textworld  # noqa: F401
    except ImportError:
        raise EnvError("ALFWorld needs the optional extra: pip install -e '.[agents]'") from None
    return ProcessEnv(
        functools.partial(AlfWorldGame, str(path), max_steps, expert),
        timeout=timeout,
        name=f"{path.parent.parent.name}/{path.parent.name}",
    )


def replay_expert(game: str | Path, max_steps: int = 50, timeout: float = 60.0, expert: str = "walkthrough") -> dict:
    """Play the expert on one game: ``{"game", "task_type", "won", "steps", "reason"}``."""
    env = alfworld_env(game, max_steps, timeout, expert)
    steps, reason, won = 0, "", False
    try:
        _, info = env.reset()
        done = False
        while not done and steps < max_steps:
            action = info.get("expert")
            if not action:
                reason = f"the {expert} expert has no next action"
                break
            _, _, done, info = env.step(action)
            steps += 1
        won = bool(info.get("won"))
        if not won and not reason:
            reason = "not won within the step limit" if steps >= max_steps else "the game ended unwon"
    except EnvError as exc:
        reason = str(exc)
    finally:
        env.close()
    return {"game": str(game), "task_type": task_type(game), "won": won, "steps": steps, "reason": reason}
