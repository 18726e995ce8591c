"""Tasks: benchmark files to records, rewards in TRL's signature, and the sandbox code tasks run in.

| module | what |
| --- | --- |
| :mod:`~memgen.tasks.registry` | :class:`Task`, :func:`load_task` and the names: gsm8k, math, math500, gpqa, qa, jsonl, kodcode, bigcodebench |
| :mod:`~memgen.tasks.answers` | answer-matched tasks (maths, multiple choice, QA, generic JSONL) |
| :mod:`~memgen.tasks.rewards` | reward functions ``f(prompts, completions, **columns) -> list[float]`` |
| :mod:`~memgen.tasks.code` | KodCode and BigCodeBench: prompts, programs, :class:`CodeReward` |
| :mod:`~memgen.tasks.code_extract` | which code of a completion runs |
| :mod:`~memgen.tasks.sandbox` | :class:`Sandbox`: kernel-enforced isolation for untrusted programs |

Agent tasks (alfworld, ledger) live in :mod:`memgen.agents`.
"""

from .answers import gsm8k_records, math_records
from .registry import TASKS, Task, TaskOptions, load_task
from .sandbox import CodeExecutionFields, Program, Sandbox, SandboxConfig, SandboxError, SandboxResult

__all__ = ["Task", "TaskOptions", "TASKS", "load_task", "gsm8k_records", "math_records", "Sandbox",
           "SandboxConfig", "CodeExecutionFields", "SandboxError", "SandboxResult", "Program"]
