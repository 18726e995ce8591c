"""How an episode's history is written as text: a plain transcript or the tokenizer's chat template.

An episode is one token stream: the first prompt, then per turn the assistant's tokens and
the *transition* that follows them (the observation, rendered, plus the next turn's header).
The engine feeds transitions incrementally, so a format only ever renders a first prompt and
transitions; a history restart (context truncation) is the first prompt followed by the kept
turns' own text and transitions, i.e. the same transcript with old turns cut out.

- :class:`TranscriptFormat`: the classic ALFWorld text-game transcript (the observation, the
  admissible commands, then ``> `` and the action on one line) for base models, and, with other
  settings, the demo's ledger world.
- :class:`ChatFormat`: every observation is a user message and every action an assistant
  message of the tokenizer's own chat template. The template's separators are read once by
  rendering a probe conversation with sentinel contents, so any template that renders a
  conversation as its messages' contents between fixed separators works (Qwen, Llama,
  SmolLM); one that rewrites contents is refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

ALFWORLD_INSTRUCTIONS = "You are an agent in a household. Solve the task by sending one admissible command per turn."


def _admissible_line(admissible: list[str] | None) -> str:
    return "\nAdmissible commands: " + ", ".join(admissible) if admissible else ""


@dataclass
class TranscriptFormat:
    """A plain transcript: ``preamble``, then per turn ``observation [admissible] action_prompt action``."""

    preamble: str = field(default=ALFWORLD_INSTRUCTIONS + "\n", metadata={"help": "text before the first observation"})
    action_prompt: str = field(default="> ", metadata={"help": "text that opens every action"})
    show_admissible: bool = field(
        default=True, metadata={"help": "list the admissible commands after each observation"}
    )
    observation_end: str = field(default="\n", metadata={"help": "text between an observation and the action prompt"})
    turn_separator: str = field(default="", metadata={"help": "text between an action and the next observation"})
    stop: list[str] = field(default_factory=lambda: ["\n"], metadata={"help": "stop strings that end a turn"})

    def _observation(self, observation: str, admissible) -> str:
        body = observation.strip() if self.observation_end else observation
        listed = _admissible_line(admissible) if self.show_admissible else ""
        return body + listed + self.observation_end + self.action_prompt

    def first_prompt(self, observation: str, admissible: list[str] | None = None) -> str:
        return self.preamble + self._observation(observation, admissible)

    def transition(
        self, turn_text: str, finish_reason: str, observation: str, admissible: list[str] | None = None
    ) -> str:
        """Text after a turn whose decoded text is ``turn_text``: a newline if the turn did not end one."""
        newline = "" if turn_text.endswith("\n") or finish_reason == "eos" or not self.observation_end else "\n"
        return newline + self.turn_separator + self._observation(observation, admissible)


class ChatFormat:
    """Turns as chat messages through ``tokenizer.apply_chat_template``; the reply ends at the template's EOS."""

    USER, REPLY, NEXT = "\x01User\x01", "\x01Reply\x01", "\x01Next\x01"  # mixed case: catches case rewrites

    def __init__(self, tokenizer, system: str | None = ALFWORLD_INSTRUCTIONS, show_admissible: bool = True) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "this tokenizer has no chat template; use the transcript format (--agent-format transcript)"
            )
        self.tokenizer, self.system, self.show_admissible = tokenizer, system, show_admissible
        self.stop: list[str] = []
        head = self._messages(self.USER)
        probe = self.tokenizer.apply_chat_template(
            head + [{"role": "assistant", "content": self.REPLY}, {"role": "user", "content": self.NEXT}],
            tokenize=False,
            add_generation_prompt=True,
        )
        if any(probe.count(s) != 1 for s in (self.USER, self.REPLY, self.NEXT)):
            raise ConfigError("the chat template rewrites message contents; use the transcript format")
        after_reply = probe.split(self.REPLY, 1)[1]
        self.close_and_open = after_reply.split(self.NEXT, 1)[0]
        """text from the end of a reply to the start of the next user message"""
        self.after_user = after_reply.split(self.NEXT, 1)[1]
        """text from the end of a user message to the start of the reply (the generation prompt)"""
        self.eos_text = tokenizer.eos_token or ""

    def _messages(self, user: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": user}]

    def _observation(self, observation: str, admissible) -> str:
        return observation.strip() + (_admissible_line(admissible) if self.show_admissible else "")

    def first_prompt(self, observation: str, admissible: list[str] | None = None) -> str:
        return self.tokenizer.apply_chat_template(
            self._messages(self._observation(observation, admissible)), tokenize=False, add_generation_prompt=True
        )

    def transition(
        self, turn_text: str, finish_reason: str, observation: str, admissible: list[str] | None = None
    ) -> str:
        close = self.close_and_open
        # The reply's own EOS (e.g. <|im_end|>) was generated and is already in the stream.
        if finish_reason == "eos" and self.eos_text and close.startswith(self.eos_text):
            close = close[len(self.eos_text) :]
        return close + self._observation(observation, admissible) + self.after_user
