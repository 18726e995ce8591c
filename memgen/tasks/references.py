"""``memgen sandbox check``: run a code task's reference solutions through its reward path.

A self-check for a machine: every reference that passes shows the loader, the program
builder and the sandbox agree with the benchmark; each failure is listed with its status
and the last line of its error, and items whose libraries are missing are counted as
skipped. The exit status is 1 when any reference fails.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..dataclass_cli import check_ranges, help_field
from .code import program_for
from .registry import load_task
from .sandbox import STATUSES, CodeExecutionFields, SandboxConfig


@dataclass
class ReferenceCheckConfig(CodeExecutionFields):
    task: str = help_field("kodcode", "kodcode | bigcodebench")
    data: str = help_field("", "the task's data file (kodcode: a file or directory)")
    split: str = help_field("", "bigcodebench: complete (default) | instruct")
    limit: int | None = help_field(None, "check the first N items", ge=1)
    code_timeout: float = help_field(60.0, "seconds each program may run (references may be slow)", gt=0)
    output: str | None = help_field(None, "JSONL with every item's status, seconds and output tails")
    progress: bool = help_field(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_ranges(self)


def _last_error(text: str) -> str:
    lines = [line for line in text.splitlines() if re.match(r"^(\w+(Error|Exception)|AssertionError)\b", line)]
    return (lines[-1] if lines else (text.strip().splitlines() or [""])[-1])[:200]


def check_references(config: ReferenceCheckConfig) -> dict:
    task = load_task(config.task, config.data, split=config.split, limit=config.limit, sandbox=config.sandbox_config())
    records = [r for r in task.records if r.completion]
    results = task.reward.sandbox.run_many(
        [program_for(r.completion, r.columns) for r in records], progress=config.progress
    )
    rows = [
        {
            "item": r.columns.get("task_id") or r.source,
            "status": o.status,
            "limit": o.limit,
            "seconds": o.seconds,
            "detail": o.detail,
            "error": _last_error(o.stderr) if not o.passed else "",
            "stdout": o.stdout,
            "stderr": o.stderr,
        }
        for r, o in zip(records, results)
    ]
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        with open(config.output, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    summary = {
        "task": task.name,
        "checked": len(rows),
        **{s: sum(r["status"] == s for r in rows) for s in STATUSES},
        "skipped": len(task.unavailable),
        "without_reference": len(task.records) - len(records),
    }
    return {
        "summary": summary,
        "failures": [r for r in rows if r["status"] != "passed"],
        "skipped": task.unavailable,
        "mechanisms": task.reward.sandbox.mechanisms,
    }


def sandbox_info(config: SandboxConfig | None = None) -> dict[str, str]:
    from .sandbox import Sandbox

    return Sandbox(config or SandboxConfig(allow_weaker=True)).mechanisms
