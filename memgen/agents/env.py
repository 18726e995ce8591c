"""The text-environment protocol agents play, the strict action parser, and per-step timeouts.

An environment is gymnasium-shaped, with text on both sides:

- ``reset(seed) -> (observation, info)``;
- ``step(action) -> (observation, reward, done, info)``;
- ``info`` may carry ``"admissible"`` (the commands the environment accepts now), ``"won"``
  and ``"task_type"``; an environment may define ``parse_action(text) -> str``, which raises
  :class:`ActionError` for a reply that holds no action.

:class:`ProcessEnv` runs any environment in a child process so that every ``reset`` and
``step`` has a wall-clock timeout: a step that hangs (a game engine stuck in a loop) kills the
child and comes back as :class:`EnvTimeout`, which the runner turns into a failed episode,
never a hang. In-process environments (the demo's :class:`~memgen.agents.ledger.LedgerEnv`)
are pure Python with bounded work per step and skip that cost.
"""

from __future__ import annotations

import multiprocessing as mp
import re
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import MemGenError

MAX_ACTION_CHARS = 200
_TAGGED = re.compile(r"<action>(.*?)</action>", re.DOTALL)


class EnvError(MemGenError):
    """An environment could not be built or failed (unknown game, corrupt archive, dead process)."""


class EnvTimeout(EnvError):
    """An environment call took longer than its timeout; its process was killed."""


class ActionError(MemGenError):
    """A reply holds no valid action; the message is shown to the agent as its observation."""


class TextEnv(Protocol):
    def reset(self, seed: int | None = None) -> tuple[str, dict]: ...

    def step(self, action: str) -> tuple[str, float, bool, dict]: ...


def parse_action(text: str, max_chars: int = MAX_ACTION_CHARS) -> str:
    """The action in a reply: the last ``<action>...</action>`` if there is one, else the first non-empty line.

    Raises :class:`ActionError` (with the observation the agent will read) for an empty reply or an
    action longer than ``max_chars``: nothing is guessed.
    """
    tagged = _TAGGED.findall(text)
    if tagged:
        action = " ".join(tagged[-1].split())
    else:
        action = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not action:
        raise ActionError("Invalid action: the reply is empty. Reply with one command on one line.")
    if len(action) > max_chars:
        raise ActionError(
            f"Invalid action: {len(action)} characters, the limit is {max_chars}. Reply with one short command."
        )
    return action


def action_parser(env) -> Callable[[str], str]:
    """The environment's own ``parse_action`` if it has one, else :func:`parse_action`."""
    return getattr(env, "parse_action", None) or parse_action


def _serve(factory: Callable[[], Any], conn) -> None:
    try:
        env = factory()
    except Exception as exc:  # reported to the parent, which raises EnvError
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", None))
    while True:
        try:
            method, args = conn.recv()
        except EOFError:
            return
        if method == "close":
            return
        try:
            conn.send(("ok", getattr(env, method)(*args)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ProcessEnv:
    """An environment in a child process; every call has a timeout (seconds).

    The child is forked where the platform can (``spawn`` elsewhere, where ``factory`` must be
    picklable): spawn re-imports the caller's main script, which breaks scripts without a
    ``__main__`` guard, and the child only runs the environment, never torch.
    """

    def __init__(
        self, factory: Callable[[], Any], timeout: float = 30.0, start_timeout: float = 120.0, name: str = "env"
    ) -> None:
        self.timeout, self.name = timeout, name
        context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(factory, child), daemon=True)
        self._process.start()
        child.close()
        # The start-up handshake is read at the first call, so several environments start at once.
        self._start_timeout, self._started = start_timeout, False

    def _receive(self, timeout: float, what: str):
        if not self._conn.poll(timeout):
            self.close()
            raise EnvTimeout(f"{self.name}: {what} took longer than {timeout:g} s; the environment was stopped")
        try:
            status, value = self._conn.recv()
        except EOFError:
            self.close()
            raise EnvError(f"{self.name}: the environment process died during {what}") from None
        if status == "error":
            raise EnvError(f"{self.name}: {what} failed: {value}")
        return value

    def _call(self, method: str, *args):
        if not self._started:
            self._receive(self._start_timeout, "start")
            self._started = True
        if not self._process.is_alive():
            raise EnvError(f"{self.name}: the environment process is not running")
        self._conn.send((method, args))
        return self._receive(self.timeout, method)

    def reset(self, seed: int | None = None):
        return self._call("reset", seed)

    def step(self, action: str):
        return self._call("step", action)

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(("close", ()))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(1.0)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5.0)
        self._conn.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid
