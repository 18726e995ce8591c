"""The real-model experiment's English word problems: correct answers, disjoint splits, held-out wordings."""

import re

import pytest

from memgen.demo.english import WORDINGS, Difficulty, as_task, skill_splits

SIZES = {"train": 300, "validation": 60, "test": 60, "test_more_steps": 60, "test_unseen_wording": 60}
LEVELS = [Difficulty(), Difficulty(3, ("add", "sub", "mul", "div"), 15, 9)]


def _patterns(held_out: bool) -> list[re.Pattern]:
    """Each wording as a regex over its sentence (any name, number and item)."""
    out = []
    for wordings in WORDINGS.values():
        for w in wordings[-1:] if held_out else wordings[:-1]:
            text = re.escape(w).replace(r"\{n\}", r"\w+").replace(r"\{x\}", r"\d+").replace(r"\{i\}", r"[\w ]+")
            out.append(re.compile(text))
    return out


def _events(question: str) -> list[str]:
    return re.split(r"(?<=\.) ", question.rsplit(" How many", 1)[0])[1:]


@pytest.mark.parametrize("difficulty", LEVELS, ids=["2-step-add-sub", "3-step-all-ops"])
def test_splits_are_disjoint_correct_and_hold_their_wordings_out(difficulty):
    splits = skill_splits(0, difficulty, SIZES)
    questions = [r.prompt for records in splits.values() for r in records]
    assert len(questions) == len(set(questions)) == sum(SIZES.values())
    task = as_task("english", [r for records in splits.values() for r in records])
    # Every reference solution scores 1.0 under the task's own reward, and its arithmetic checks.
    assert task.reward(
        [r.prompt for r in task.records],
        [r.completion for r in task.records],
        answer=[r.columns["answer"] for r in task.records],
    ) == [1.0] * len(task.records)
    for record in task.records:
        for a, op, x, b in re.findall(r"(\d+) ([-+x/]) (\d+) = (\d+)", record.completion):
            assert (
                int(b)
                == {"+": int(a) + int(x), "-": int(a) - int(x), "x": int(a) * int(x), "/": int(a) / int(x)}[op]
                >= 0
            )
    seen, held = _patterns(False), _patterns(True)
    for name, records in splits.items():
        steps = difficulty.steps + (name == "test_more_steps")
        for record in records:
            events = _events(record.prompt)
            assert len(events) == steps and record.completion.count(" = ") == steps
            uses_held = [any(p.fullmatch(e) for p in held) for e in events]
            assert all(any(p.fullmatch(e) for p in seen + held) for e in events), events
            if name == "test_unseen_wording":
                assert uses_held[0]
            else:
                assert not any(uses_held), (name, events)


def test_splits_are_reproducible_and_differ_by_seed():
    a = skill_splits(0, Difficulty(), {"train": 20, "test": 10})
    assert [r.prompt for r in a["test"]] == [
        r.prompt for r in skill_splits(0, Difficulty(), {"train": 20, "test": 10})["test"]
    ]
    assert [r.prompt for r in a["test"]] != [
        r.prompt for r in skill_splits(1, Difficulty(), {"train": 20, "test": 10})["test"]
    ]
