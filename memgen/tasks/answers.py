"""Answer-matched tasks: benchmark files to :class:`~memgen.data.Record` lists, scored by the final answer.

| task | file | prompt | reward |
| --- | --- | --- | --- |
| ``gsm8k`` | ``{"question", "answer"}`` JSONL, answer ends ``#### n`` | ``Question: ...\\nAnswer:`` | numeric / math equivalence |
| ``math`` | MATH ``test.jsonl`` (answer = last ``\\boxed{}`` of ``solution``) | ``Problem: ...\\nSolution:`` | math-verify equivalence |
| ``math500`` | MATH-500 JSONL with ``answer`` | same | same |
| ``gpqa`` | ``gpqa.zip`` (password-protected CSVs, read in memory) | question + options (A)-(D), shuffled with a fixed seed | letter match |
| ``qa`` | TriviaQA official JSON (``{"Data": [...]}``) or JSONL ``{"question", "answers"}`` | ``Question: ...\\nAnswer:`` | normalised exact match (F1 also reported) |
| ``jsonl`` | TRL-style prompt/completion or messages JSONL | as given | normalised match with ``answer`` or ``completion`` |

GPQA's authors ask that the questions never appear in plain text online: the zip is read
in memory and nothing is unpacked to disk.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import zipfile
from pathlib import Path

from ..data import DataError, Record, load_records, read_jsonl, skip_or_raise
from .rewards import gsm8k_final, last_boxed, reference_match_reward

GPQA_PASSWORD = b"deserted-untie-orchid"
_CALCULATOR = re.compile(r"<<[^>]*>>")


def _rows(path: Path, fields: tuple[str, ...], skip_malformed: bool):
    def validate(obj: dict) -> None:
        missing = [f for f in fields if not isinstance(obj.get(f), str) or not obj.get(f)]
        if missing:
            raise ValueError(f"missing or empty field(s) {missing}")

    return read_jsonl(path, skip_malformed, validate)


def gsm8k_records(path: Path, skip_malformed: bool = False) -> tuple[list[Record], list[str]]:
    records = []
    rows, skipped = _rows(path, ("question", "answer"), skip_malformed)
    for lineno, obj in rows:
        final = gsm8k_final(obj["answer"])
        if final is None:
            skip_or_raise(f"{path}:{lineno}: answer has no '#### <number>' line", skip_malformed, skipped)
            continue
        steps = _CALCULATOR.sub("", obj["answer"].split("####")[0]).strip()
        completion = f" {steps}\nThe answer is {final}."
        records.append(
            Record(f"Question: {obj['question']}\nAnswer:", completion, {"answer": final}, f"{path}:{lineno}")
        )
    return records, skipped


def math_records(path: Path, skip_malformed: bool = False) -> tuple[list[Record], list[str]]:
    records = []
    rows, skipped = _rows(path, ("problem", "solution"), skip_malformed)
    for lineno, obj in rows:
        answer = obj.get("answer") or last_boxed(obj["solution"])
        if not answer:
            skip_or_raise(f"{path}:{lineno}: solution has no \\boxed{{}} answer", skip_malformed, skipped)
            continue
        records.append(
            Record(
                f"Problem: {obj['problem']}\nSolution:",
                " " + obj["solution"],
                {"answer": str(answer), "level": obj.get("level"), "subject": obj.get("subject") or obj.get("type")},
                f"{path}:{lineno}",
            )
        )
    return records, skipped


def gpqa_records(path: Path, subset: str = "diamond", seed: int = 0) -> list[Record]:
    """GPQA questions from the password-protected zip, options shuffled per question with ``seed``."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    name = f"gpqa/gpqa_{subset}.csv"
    try:
        with zipfile.ZipFile(path) as archive:
            raw = archive.read(name, pwd=GPQA_PASSWORD)
    except KeyError:
        raise DataError(f"{path}: no member {name} (subsets: diamond, main, extended)") from None
    except (zipfile.BadZipFile, RuntimeError) as exc:
        raise DataError(f"{path}: cannot read the GPQA zip: {exc}") from None
    records = []
    for i, row in enumerate(csv.DictReader(io.StringIO(raw.decode("utf-8"))), start=2):
        options = [
            row["Correct Answer"],
            row["Incorrect Answer 1"],
            row["Incorrect Answer 2"],
            row["Incorrect Answer 3"],
        ]
        options = [o.strip() for o in options]
        order = list(range(4))
        random.Random(f"{seed}:{i}").shuffle(order)
        letters = "ABCD"
        answer = letters[order.index(0)]
        body = "\n".join(f"({letters[j]}) {options[k]}" for j, k in enumerate(order))
        prompt = f"Question: {row['Question'].strip()}\n{body}\nAnswer:"
        records.append(Record(prompt, f" ({answer}) {options[0]}", {"answer": answer}, f"{path}:{name}:{i}"))
    return records


def qa_records(path: Path, skip_malformed: bool = False) -> tuple[list[Record], list[str]]:
    """TriviaQA official JSON, or JSONL with ``question`` and ``answers``/``aliases``/``possible_answers``."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records, skipped = [], []
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"{path}: not valid JSON: {exc}") from None
        items = data.get("Data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise DataError(f"{path}: expected TriviaQA's {{'Data': [...]}} layout")
        for i, item in enumerate(items):
            answer = item.get("Answer") or {}
            aliases = list(dict.fromkeys((answer.get("Aliases") or []) + [answer.get("Value", "")]))
            aliases = [a for a in aliases if a]
            if not item.get("Question") or not aliases:
                skip_or_raise(f"{path}:Data[{i}]: needs 'Question' and answer aliases", skip_malformed, skipped)
                continue
            records.append(
                Record(
                    f"Question: {item['Question']}\nAnswer:",
                    " " + aliases[0],
                    {"aliases": aliases},
                    f"{path}:Data[{i}]",
                )
            )
        return records, skipped
    rows, skipped = read_jsonl(path, skip_malformed)
    for lineno, obj in rows:
        aliases = obj.get("answers") or obj.get("aliases") or obj.get("possible_answers")
        if isinstance(aliases, str):
            try:
                aliases = json.loads(aliases)
            except ValueError:
                aliases = [aliases]
        if not obj.get("question") or not isinstance(aliases, list) or not aliases:
            skip_or_raise(f"{path}:{lineno}: needs 'question' and a non-empty 'answers' list", skip_malformed, skipped)
            continue
        records.append(
            Record(
                f"Question: {obj['question']}\nAnswer:",
                " " + str(aliases[0]),
                {"aliases": [str(a) for a in aliases]},
                f"{path}:{lineno}",
            )
        )
    return records, skipped


def jsonl_reward(prompts, completions, **columns):
    reference = columns.get("answer") or columns.get("reference")
    if reference is None:
        raise DataError("task 'jsonl' needs an 'answer' (or 'reference') field to score completions")
    return reference_match_reward(prompts, completions, reference)


def jsonl_records(path: Path, skip: bool) -> tuple[list[Record], list[str]]:
    report = load_records(path, require_completion=False, skip_malformed=skip, report=False)
    for r in report.records:
        if "answer" not in r.columns and r.completion is not None:
            r.columns["answer"] = r.completion
    return report.records, report.skipped
