"""Collect the woven latents of an evaluation run, with the context of every insertion.

Each woven insertion's K latents are mean-pooled into one vector (paper App. G). A
:class:`Collection` keeps the pooled vectors (``latents.safetensors``), one JSON line of
context per insertion (``insertions.jsonl``: example, task id, kind, position, which woven
insertion of its answer it is (``ordinal``, from 1), the text before and after it, the
trigger's probability, the answer's outcome), the evaluation rows (``examples.jsonl``) and
what produced them (``collection.json``). Written atomically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import atomic_directory
from ..data import DataError
from ..evaluate import evaluate_task
from ..weaver import INFERENCE, PROMPT
from .evaluation import outcome

LATENTS_FILE = "latents.safetensors"
INSERTIONS_FILE = "insertions.jsonl"
EXAMPLES_FILE = "examples.jsonl"
META_FILE = "collection.json"


@dataclass
class Collection:
    """Pooled latents (n, d) and, per row, the insertion they came from."""

    pooled: torch.Tensor
    insertions: list[dict]
    examples: list[dict]
    summary: dict
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pooled.ndim != 2 or self.pooled.shape[0] != len(self.insertions):
            raise DataError(
                f"a collection needs one pooled latent per insertion: {tuple(self.pooled.shape)} "
                f"latents for {len(self.insertions)} insertions"
            )

    def __len__(self) -> int:
        return len(self.insertions)

    def select(self, kinds: tuple[str, ...]) -> list[int]:
        """Indices of the insertions of these kinds (``prompt``, ``inference``)."""
        return [i for i, ins in enumerate(self.insertions) if ins["kind"] in kinds]

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        with atomic_directory(directory) as scratch:
            save_file({"pooled": self.pooled.contiguous()}, str(scratch / LATENTS_FILE))
            for name, rows in ((INSERTIONS_FILE, self.insertions), (EXAMPLES_FILE, self.examples)):
                (scratch / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
            (scratch / META_FILE).write_text(json.dumps({"summary": self.summary, "meta": self.meta}, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Collection:
        directory = Path(directory)
        files = (LATENTS_FILE, INSERTIONS_FILE, EXAMPLES_FILE, META_FILE)
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise DataError(
                f"{directory} is not a latent collection: missing {missing} (write one with memgen analyze)"
            )
        rows = {}
        for name in (INSERTIONS_FILE, EXAMPLES_FILE):
            rows[name] = []
            for number, line in enumerate((directory / name).read_text().splitlines(), 1):
                try:
                    rows[name].append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{directory / name}:{number}: not JSON ({exc.msg})") from None
        head = json.loads((directory / META_FILE).read_text())
        pooled = load_file(str(directory / LATENTS_FILE))["pooled"]
        return cls(pooled, rows[INSERTIONS_FILE], rows[EXAMPLES_FILE], head["summary"], head["meta"])


def collect(model, task, config, describe: dict | None = None) -> Collection:
    """Evaluate ``model`` on ``task`` under ``config`` (an EvalConfig) and keep every woven latent.

    ``task`` is a single-turn task or an agent task (then each episode is one example, its turns'
    insertions carry ``turn``, and a turn start counts as a prompt-end insertion). ``describe`` is
    stored in the collection's metadata (e.g. the model and adapter paths).
    """
    tokenizer = model.tokenizer
    pooled: list[torch.Tensor] = []
    insertions: list[dict] = []
    group_by = getattr(config, "group_by", "")
    chars = getattr(config, "context_chars", 60)
    examples_seen: list[dict] = []

    def observe(records, outputs, rows):
        for record, output, row in zip(records, outputs, rows):
            example = len(examples_seen)
            examples_seen.append(row)
            if group_by:
                row["group"] = str(record.columns.get(group_by, ""))
            ordinal = 0
            for turn, fed, completion in task.decoded_spans(record, output, tokenizer):
                ids = completion.token_ids
                for ins in completion.insertions:
                    if not ins.inserted or ins.latents is None:
                        continue
                    ordinal += 1
                    before = fed + tokenizer.decode(ids[: ins.position], skip_special_tokens=True)
                    pooled.append(ins.latents.float().mean(dim=0))
                    insertions.append(
                        {
                            "example": example,
                            "task_id": record.source or f"{task.name}:{example}",
                            "kind": PROMPT if ins.position == 0 else INFERENCE,
                            "position": ins.position,
                            "ordinal": ordinal,
                            **({"turn": turn} if turn is not None else {}),
                            "preceding": before[-chars:],
                            "following": tokenizer.decode(
                                ids[ins.position : ins.position + 4], skip_special_tokens=True
                            ),
                            "next_token": tokenizer.decode(
                                ids[ins.position : ins.position + 1], skip_special_tokens=True
                            ),
                            "probability": ins.probability,
                            "reward": outcome(row),
                            "failure": row.get("failure"),
                            "group": row.get("group", ""),
                        }
                    )

    summary = evaluate_task(model, task, config, observe=observe)
    if not pooled:
        raise DataError(
            f"no latents were woven on {task.name} under memory {config.memory!r}: nothing to analyse "
            "(a trigger that never fires? try --memory always)"
        )
    meta = {
        "task": task.name,
        "memory": config.memory,
        "num_examples": len(examples_seen),
        "hidden_size": int(pooled[0].shape[-1]),
        "config": asdict(config),
        "describe": describe or {},
    }
    return Collection(torch.stack(pooled), insertions, examples_seen, summary, meta)
