"""Training and evaluation records from JSONL files or ``datasets`` objects, in TRL's conventions.

A record is either standard (``{"prompt": str, "completion": str}``) or conversational
(``{"messages": [...]}`` whose last assistant turn is the completion, or ``prompt`` /
``completion`` given as message lists). Conversational records are rendered with the
tokenizer's chat template when asked and available, otherwise as ``role: content`` lines.
Any other fields (``answer``, ``aliases``, ...) are kept and passed to reward functions as
keyword columns, as TRL does. Malformed lines are reported as ``file:line: reason``; with
``skip_malformed`` they are collected and skipped, otherwise loading stops at the first.
"""

from __future__ import annotations

import gzip
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MemGenError


class DataError(MemGenError):
    """A data file or record cannot be used; the message starts with ``file:line``."""


@dataclass
class Record:
    prompt: str
    completion: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    """Where it came from, as ``file:line`` (for error messages)."""
    messages: list[dict] | None = None
    """The prompt as chat messages, for conversational records (rendered with a chat template on request)."""


@dataclass
class LoadReport:
    records: list[Record]
    skipped: list[str] = field(default_factory=list)


def skip_or_raise(message: str, skip_malformed: bool, skipped: list[str]) -> None:
    """A malformed line (``file:line: reason``): stop with it, or record it in ``skipped`` and go on."""
    if not skip_malformed:
        raise DataError(message) from None
    skipped.append(message)


def read_jsonl(
    path: str | Path, skip_malformed: bool = False, validate=None
) -> tuple[list[tuple[int, dict]], list[str]]:
    """Parse a JSONL file (``.gz`` too) into (line number, object) pairs; blank lines are ignored.

    ``validate(obj)`` may raise ``ValueError`` (or ``SyntaxError``) to reject a line, so errors
    come in file order; it may also normalise fields of ``obj`` in place.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows, skipped = [], []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                if validate is not None:
                    validate(obj)
            except (ValueError, SyntaxError) as exc:
                reason = f"not JSON ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else exc
                message = f"{path}:{lineno}: {reason}"
                skip_or_raise(message, skip_malformed, skipped)
                continue
            rows.append((lineno, obj))
    return rows, skipped


def _render_messages(messages: list[dict], tokenizer, use_chat_template: bool, add_generation_prompt: bool) -> str:
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError("each message needs 'role' and 'content'")
    if use_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant:" if add_generation_prompt else "")


def to_record(
    obj: dict, source: str, tokenizer=None, use_chat_template: bool = False, require_completion: bool = True
) -> Record:
    """One TRL-style row -> :class:`Record`; raises ``ValueError`` with the reason."""
    columns = {k: v for k, v in obj.items() if k not in ("prompt", "completion", "messages")}
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        if messages[-1].get("role") != "assistant":
            if require_completion:
                raise ValueError("the last message must be the assistant's (the completion)")
            return Record(
                _render_messages(messages, tokenizer, use_chat_template, True), None, columns, source, messages
            )
        prompt = _render_messages(messages[:-1], tokenizer, use_chat_template, True)
        completion = str(messages[-1]["content"])
        return Record(prompt, completion, columns, source, messages[:-1])
    if "prompt" not in obj:
        raise ValueError("needs 'prompt' (and 'completion') or 'messages'")
    prompt, completion = obj["prompt"], obj.get("completion")
    messages = None
    if isinstance(prompt, list):
        messages = prompt
        prompt = _render_messages(prompt, tokenizer, use_chat_template, True)
    if isinstance(completion, list):
        completion = "".join(str(m.get("content", "")) for m in completion)
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("'prompt' must be a non-empty string or message list")
    if completion is None and require_completion:
        raise ValueError("missing 'completion'")
    if completion is not None and not isinstance(completion, str):
        raise ValueError("'completion' must be a string or message list")
    return Record(prompt, completion, columns, source, messages)


def render_prompt(record: Record, tokenizer, use_chat_template: bool) -> str:
    """The prompt text a model sees: as written, or through the tokenizer's chat template.

    With the template, a plain-text prompt becomes one user message and conversational
    records keep their own turns; the generation prompt (the assistant's turn) is appended.
    """
    if not use_chat_template:
        return record.prompt
    if not getattr(tokenizer, "chat_template", None):
        raise MemGenError(
            "--use-chat-template: this tokenizer has no chat template (set tokenizer.chat_template, or drop the flag)"
        )
    messages = record.messages or [{"role": "user", "content": record.prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_token_ids(record: Record, tokenizer, use_chat_template: bool) -> list[int]:
    """Token ids of :func:`render_prompt`; a chat template writes its own special tokens, so none are added."""
    text = render_prompt(record, tokenizer, use_chat_template)
    return tokenizer(text, add_special_tokens=not use_chat_template)["input_ids"]


def report_skipped(source, skipped: list[str]) -> None:
    """Warn once per skipped line (``file:line: reason``), then with the count."""
    for message in skipped:
        warnings.warn(f"skipped malformed record {message}", stacklevel=3)
    if skipped:
        warnings.warn(f"{source}: skipped {len(skipped)} malformed record(s)", stacklevel=3)


def load_records(
    source: str | Path | Iterable[dict],
    tokenizer=None,
    use_chat_template: bool = False,
    require_completion: bool = True,
    skip_malformed: bool = False,
    report: bool = True,
) -> LoadReport:
    """Records from a JSONL path, or from any iterable of dicts (e.g. a ``datasets.Dataset``).

    ``report``: warn about skipped lines here (callers that report them themselves pass False).
    """
    if isinstance(source, (str, Path)):
        rows, skipped = read_jsonl(source, skip_malformed)
        named = [(f"{source}:{lineno}", obj) for lineno, obj in rows]
    else:
        named, skipped = [(f"<dataset>:{i}", dict(obj)) for i, obj in enumerate(source)], []
    records = []
    for where, obj in named:
        try:
            records.append(to_record(obj, where, tokenizer, use_chat_template, require_completion))
        except (ValueError, AttributeError, TypeError) as exc:
            message = f"{where}: {exc}"
            skip_or_raise(message, skip_malformed, skipped)
    if report:
        report_skipped(source, skipped)
    if not records:
        raise DataError(f"{source}: no usable records")
    return LoadReport(records, skipped)
