"""The ledger world: a tiny offline multi-turn environment in the demo's character vocabulary.

An episode keeps one running count over several turns. Each turn the environment states the
count and a few events in the demo's problem format (``Q: Jon has 3 eggs. finds 1. drops 2.
\\nA:``) and the agent answers with its worked steps ending ``so N.``; a right count opens the
next turn from it, a wrong one ends the episode. Success is every turn right. The verbs come
from one of the demo's domains, so an episode in domain B needs the meaning of ``finds`` and
``drops``, which the demo's reasoner never learnt and MemGen's weaver supplies: the skill memory
carries into every turn. Turns are separated the way the reasoner's pretraining rows separate
problems (EOS, then BOS), so a reasoner pretrained by the demo can succeed without any agent
training. The expert reply is the worked solution, for episode SFT.
"""

from __future__ import annotations

import random
import re

from ..tasks.domains import ITEMS, NAMES, VERBS
from .dialogue import TranscriptFormat
from .env import ActionError

_ANSWER = re.compile(r"so (\d+)\.")


class LedgerEnv:
    """Keep a count over ``turns`` turns of ``steps`` events each, with the verbs of demo domain ``domain``."""

    def __init__(self, domain: str = "B", turns: int = 2, steps: int = 2) -> None:
        if domain not in VERBS:
            raise ValueError(f"unknown ledger domain {domain!r}; choose one of {sorted(VERBS)}")
        self.domain, self.turns, self.steps = domain, turns, steps
        self.name = f"ledger-{domain}"
        self.person, self.item, self.value, self.turn = "", "", 0, 0
        self._plan: list[list[tuple[str, int]]] = []

    def reset(self, seed: int | None = None):
        rng = random.Random(f"ledger:{self.domain}:{seed}")
        verbs = VERBS[self.domain]
        self.person, self.item = rng.choice(NAMES), rng.choice(ITEMS)
        self.value = rng.randint(1, 9)
        self.turn = 0
        self._plan, value = [], self.value
        for _ in range(self.turns):
            events = []
            for _ in range(self.steps):
                choices = [v for v, sign in verbs.items() if (9 - value if sign > 0 else value) >= 1]
                verb = rng.choice(choices)
                sign = verbs[verb]
                amount = rng.randint(1, 9 - value if sign > 0 else value)
                value += sign * amount
                events.append((verb, amount))
            self._plan.append(events)
        self.name = f"ledger-{self.domain}-{seed}"
        return self._observation(), self._info(False)

    def _events(self) -> list[tuple[str, int, int]]:
        """This turn's (verb, amount, value after) steps from the current count."""
        out, value = [], self.value
        for verb, amount in self._plan[self.turn]:
            value += VERBS[self.domain][verb] * amount
            out.append((verb, amount, value))
        return out

    def _observation(self) -> str:
        events = " ".join(f"{verb} {amount}." for verb, amount, _ in self._events())
        return f"Q: {self.person} has {self.value} {self.item}. {events}\nA:"

    def expert_reply(self) -> str:
        """The worked solution of this turn, in the demo's solution format."""
        steps, value = [], self.value
        for verb, amount, after in self._events():
            steps.append(f"{'+' if VERBS[self.domain][verb] > 0 else '-'}{amount}={after}")
            value = after
        return f" {self.value}," + ",".join(steps) + f",so {value}.\n"

    def _info(self, won: bool) -> dict:
        info = {"task_type": self.domain, "won": won}
        if self.turn < self.turns:
            info["expert"] = self.expert_reply()
        return info

    def parse_action(self, text: str) -> str:
        match = _ANSWER.search(text)
        if not match:
            raise ActionError("Invalid answer: end the steps with 'so N.'")
        return match.group(1)

    def step(self, action: str):
        truth = self._events()[-1][2]
        if action.strip() != str(truth):
            self.turn = self.turns
            return f"Wrong: {self.person} has {truth} {self.item}.", 0.0, True, self._info(False)
        self.value, self.turn = truth, self.turn + 1
        if self.turn == self.turns:
            return "Right.", 1.0, True, self._info(True)
        return self._observation(), 0.0, False, self._info(False)


def ledger_format(tokenizer) -> TranscriptFormat:
    """Turns end at the reasoner's EOS; the next problem opens with BOS, as in the demo's pretraining rows."""
    return TranscriptFormat(
        preamble="",
        action_prompt="",
        show_admissible=False,
        observation_end="",
        turn_separator=tokenizer.bos_token or "",
        stop=[],
    )
