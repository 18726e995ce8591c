"""Memory sources: what a memory adds to the prompt (ExpeL, AWM) and what the weaver reads (retrieval).

:func:`memory_source` turns an evaluation config's ``--memory-source`` into one
:class:`PromptMemory`, the :class:`memgen.tasks.protocol.MemorySource` that every task's
``evaluate`` receives: tasks never ask which memory they were given.

| ``--memory-source`` | prompt | weaver reads |
| --- | --- | --- |
| ``weaver`` | unchanged | nothing (latents only) |
| ``weaver+retrieval`` | unchanged | records retrieved from ``--experience`` at each insertion (paper App. E) |
| ``expel`` | insights + similar successes from ``--experience`` | nothing |
| ``awm`` | workflows from ``--experience`` | nothing |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..data import Record


@dataclass
class PromptMemory:
    name: str
    """the ``--memory-source`` it stands for"""
    reader: object | None = None
    """the :class:`~memgen.experience.weaving.ExperienceReader` the weaver reads, or None"""
    rewrite_prompt: Callable[[str], str] | None = None
    """prompt text -> the prompt with the memory in it, or None (unchanged)"""

    def rewrite(self, record: Record) -> Record:
        """The record with its prompt (or its last user message) passed through ``rewrite_prompt``."""
        if self.rewrite_prompt is None:
            return record
        if record.messages:
            messages = [dict(m) for m in record.messages]
            last = max(i for i, m in enumerate(messages) if m.get("role") == "user")
            messages[last]["content"] = self.rewrite_prompt(messages[last]["content"])
            return replace(record, messages=messages)
        return replace(record, prompt=self.rewrite_prompt(record.prompt))


def memory_source(config, model, task_name: str, experience=None) -> PromptMemory:
    """The memory an :class:`~memgen.evaluate.EvalConfig` asks for; ``experience`` (an ExperienceReader)
    overrides ``config.experience``."""
    if experience is None and config.memory_source != "weaver":
        from .weaving import open_reader

        experience = open_reader(config, model)
    if config.memory_source not in ("expel", "awm"):
        return PromptMemory(config.memory_source, experience)
    template = Path(config.experience_template).read_text() if config.experience_template else ""
    task = config.experience_task or task_name
    store = experience.store  # the store feeds the prompt, not the weaver
    if config.memory_source == "expel":
        from .expel import ExpeLConfig, expel_prompt

        expel = ExpeLConfig(top_k=config.experience_top_k, task_template=template)
        return PromptMemory("expel", None, lambda prompt: expel_prompt(store, task, prompt, expel))
    from .awm import AWMConfig, awm_prompt

    awm = AWMConfig(task_template=template)
    return PromptMemory("awm", None, lambda prompt: awm_prompt(store, task, prompt, awm))
