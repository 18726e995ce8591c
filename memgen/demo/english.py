"""English multi-step word problems for the real-model experiment (issue 26), with held-out splits.

The tiny demo's domains are a character-level grammar a 1M reasoner learns from scratch. A
real instruct model reads English, so its new skill is small-number bookkeeping stated in
English: a person starts with some items, then several events change the count, and the
question asks for the final count. SmolLM2-135M-Instruct writes plausible steps for such
problems and gets the arithmetic or the bookkeeping wrong (0.08 on a single two-step template).

Variety, so that no arm saturates on one template:

* operations: add (gets, buys, finds, ...), subtract (gives away, loses, uses, ...),
  multiply (doubles, triples: "ends up with twice as many") and divide (shares equally,
  keeping one share), with exact, non-negative integer results;
* **wordings**: every operation has several phrasings. Each operation's phrasings are split
  into *seen* ones (train, validation and the in-domain test) and one *held out* (only the
  "unseen wording" test), so the harder split asks for the same skill in words no arm saw;
* steps: ``steps`` events per problem; the "more steps" test adds one.

Splits are disjoint by question text, drawn from separate random streams (``split:seed``),
and the validation split exists to choose settings on; the test splits are for reporting.
Answers follow one format the SFT targets teach and :func:`as_task`'s reward reads (GSM8K's
``The answer is N``): a sentence per step ending in ``.`` (the delimiters where memory is
woven), then ``The answer is N.``
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..data import Record
from ..tasks import Task
from ..tasks.rewards import completion_text, math_failure_type, math_reward

NAMES = [
    "Tom",
    "Mia",
    "Ravi",
    "Lena",
    "Omar",
    "Sofia",
    "Ken",
    "Ada",
    "Luis",
    "Nora",
    "Ivan",
    "Zoe",
    "Sam",
    "Priya",
    "Ben",
    "Yuki",
    "Eli",
    "Hana",
    "Max",
    "Rosa",
]
ITEMS = [
    "apples",
    "marbles",
    "stickers",
    "books",
    "coins",
    "pencils",
    "shells",
    "cookies",
    "cards",
    "stamps",
    "beads",
    "toy cars",
    "balloons",
    "crayons",
    "tickets",
    "buttons",
]

# Phrasings per operation: "{n}" names, "{x}" the amount, "{i}" the items.
# The last phrasing of each operation is held out of training and validation.
WORDINGS: dict[str, list[str]] = {
    "add": [
        "{n} gets {x} more {i}.",
        "{n} buys {x} {i}.",
        "A friend gives {n} {x} {i}.",
        "{n} finds {x} {i} on the way home.",
    ],
    "sub": [
        "{n} gives away {x} {i}.",
        "{n} loses {x} {i}.",
        "{n} uses {x} of the {i}.",
        "{n} trades away {x} {i} at school.",
    ],
    "mul2": [
        "{n} doubles the number of {i}.",
        "The number of {i} {n} has doubles overnight.",
        "{n} ends up with twice as many {i} as before.",
    ],
    "mul3": [
        "{n} triples the number of {i}.",
        "The number of {i} {n} has becomes three times as large.",
        "{n} ends up with three times as many {i} as before.",
    ],
    "div": [
        "{n} splits the {i} into {x} equal groups and keeps one group.",
        "{n} shares the {i} equally among {x} children and keeps one share.",
        "{n} divides the {i} evenly into {x} boxes and keeps just one box.",
    ],
}
SOLUTION = {
    "add": "{n} gets {x} more, so {a} + {x} = {b}.",
    "sub": "{n} has {x} fewer, so {a} - {x} = {b}.",
    "mul": "The count is multiplied by {x}, so {a} x {x} = {b}.",
    "div": "The count is divided by {x}, so {a} / {x} = {b}.",
}
MAX_VALUE = 60


@dataclass(frozen=True)
class Difficulty:
    """How hard the problems are; chosen on the validation split."""

    steps: int = 2
    """events after the starting count"""
    operations: tuple[str, ...] = ("add", "sub")
    """which operations the events use (add, sub, mul, div)"""
    max_start: int = 12
    """largest starting count"""
    max_amount: int = 9
    """largest amount an add or a subtract changes the count by"""


def _event(rng: random.Random, value: int, difficulty: Difficulty) -> tuple[str, int] | None:
    """One of the difficulty's operations applicable to ``value`` and its amount, or None when none fits."""
    choices = []
    for op in difficulty.operations:
        if op == "add":
            amounts = [x for x in range(2, difficulty.max_amount + 1) if value + x <= MAX_VALUE]
        elif op == "sub":  # amounts from 2: "gives away 1 apples" is not English
            amounts = list(range(2, min(difficulty.max_amount, value) + 1))
        elif op == "mul":
            amounts = [x for x in (2, 3) if value * x <= MAX_VALUE and value > 0]
        else:
            amounts = [x for x in (2, 3, 4) if value % x == 0 and value // x > 0]
        choices += [(op, x) for x in amounts]
    return rng.choice(choices) if choices else None


def _phrase(rng: random.Random, op: str, amount: int, held_out: bool, name: str, items: str) -> str:
    wordings = WORDINGS[f"mul{amount}" if op == "mul" else op]  # each multiply phrasing names its factor
    template = rng.choice(wordings[-1:] if held_out else wordings[:-1])
    return template.format(n=name, x=amount, i=items)


def make_problem(rng: random.Random, difficulty: Difficulty, held_out_wording: bool = False) -> Record:
    """One problem: the question as the prompt, the step-by-step solution as the completion."""
    while True:  # until every event found an operation that fits the running count
        name, items = rng.choice(NAMES), rng.choice(ITEMS)
        value = rng.randint(2, difficulty.max_start)
        sentences, solution = [f"{name} has {value} {items}."], [f"{name} starts with {value} {items}."]
        for step in range(difficulty.steps):
            event = _event(rng, value, difficulty)
            if event is None:
                break
            op, amount = event
            # A held-out-wording problem uses the held-out phrasing for at least its first event.
            held = held_out_wording and (step == 0 or rng.random() < 0.5)
            sentences.append(_phrase(rng, op, amount, held, name, items))
            new = {"add": value + amount, "sub": value - amount, "mul": value * amount, "div": value // amount}[op]
            solution.append(SOLUTION[op].format(n=name, x=amount, a=value, b=new))
            value = new
        else:
            break
    question = " ".join(sentences) + f" How many {items} does {name} have now?"
    completion = " ".join(solution) + f" The answer is {value}."
    return Record(question, completion, {"answer": str(value)}, "english")


def make_split(
    name: str,
    n: int,
    seed: int,
    difficulty: Difficulty,
    held_out_wording: bool = False,
    exclude: set[str] | None = None,
) -> list[Record]:
    """``n`` distinct problems from the stream ``name:seed``, none of whose questions is in ``exclude``."""
    rng = random.Random(f"{name}:{seed}")
    seen = set(exclude or ())
    out = []
    for _ in range(200 * n):
        record = make_problem(rng, difficulty, held_out_wording)
        if record.prompt not in seen:
            seen.add(record.prompt)
            out.append(record)
            if len(out) == n:
                return out
    raise ValueError(f"only {len(out)} distinct problems of {difficulty} for split {name!r}; asked for {n}")


def skill_splits(seed: int, difficulty: Difficulty, sizes: dict[str, int]) -> dict[str, list[Record]]:
    """train / validation / test (in-domain), test_more_steps and test_unseen_wording, disjoint by question.

    ``sizes`` names how many problems each split gets (missing splits are skipped).
    """
    harder = Difficulty(difficulty.steps + 1, difficulty.operations, difficulty.max_start, difficulty.max_amount)
    plan = [
        ("train", difficulty, False),
        ("validation", difficulty, False),
        ("test", difficulty, False),
        ("test_more_steps", harder, False),
        ("test_unseen_wording", difficulty, True),
    ]
    taken: set[str] = set()
    out = {}
    for name, level, held in plan:
        if sizes.get(name):
            out[name] = make_split(name, sizes[name], seed, level, held, taken)
            taken.update(r.prompt for r in out[name])
    return out


def as_task(name: str, records: list[Record]) -> Task:
    """The problems as a memgen Task: answers read as GSM8K's are (``The answer is N``, else the last number)."""
    return Task(name, records, math_reward, {}, [], failure_type=math_failure_type)


def validate_vanilla(
    model_source: str,
    levels: list[Difficulty],
    n: int = 64,
    seed: int = 0,
    max_new_tokens: int = 160,
    base_dtype: str = "auto",
) -> list[dict]:
    """Greedy accuracy of the unchanged model on each level's *validation* split (never the test splits).

    How the experiment's difficulty is chosen: hard enough that the model fails most problems,
    yet stated in words it reads. Prompts go through the model's chat template.
    """
    from ..evaluate import EvalConfig, evaluate
    from ..loading import load_base
    from ..model import MemGen
    from ..precision import resolve_base_dtype

    dtype, reason = resolve_base_dtype(base_dtype)
    base, tokenizer = load_base(model_source, dtype=dtype)
    model = MemGen(base, tokenizer)
    config = EvalConfig(
        task="english",
        memory="off",
        use_chat_template=True,
        max_new_tokens=max_new_tokens,
        batch_size=8,
        progress=False,
    )
    rows = []
    for level in levels:
        records = skill_splits(seed, level, {"validation": n})["validation"]
        summary = evaluate(model, as_task("english", records), config)
        rows.append(
            {
                "steps": level.steps,
                "operations": list(level.operations),
                "max_start": level.max_start,
                "max_amount": level.max_amount,
                "n": summary["n"],
                "accuracy": summary["accuracy"],
                "failures": summary.get("failures"),
                "seconds_per_answer": summary.get("seconds_per_answer"),
                "base_dtype": str(dtype).removeprefix("torch."),
                "dtype_reason": reason,
            }
        )
    return rows


if __name__ == "__main__":  # python -m memgen.demo.english [MODEL]: the validation table that picks the difficulty
    import json
    import sys

    from .. import loading

    source = sys.argv[1] if len(sys.argv) > 1 else loading.packaged_smollm2()
    grid = [
        Difficulty(2, ("add", "sub")),
        Difficulty(3, ("add", "sub")),
        Difficulty(2, ("add", "sub", "mul", "div")),
        Difficulty(3, ("add", "sub", "mul", "div")),
    ]
    print(json.dumps(validate_vanilla(source, grid), indent=1))


# ------------------------------------------------------------------ what the model already does
# Short-answer general knowledge the unchanged SmolLM2-135M-Instruct gets mostly right (measured
# on these lists before any arm trained: capitals 0.78, antonyms 0.93). One-step arithmetic asked
# directly was the first candidate and was dropped: the model scored 0.125 on its validation split.
CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "England": "London",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Ireland": "Dublin",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Belgium": "Brussels",
    "Turkey": "Ankara",
    "Kenya": "Nairobi",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "Indonesia": "Jakarta",
    "Philippines": "Manila",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Cuba": "Havana",
    "Romania": "Bucharest",
    "Saudi Arabia": "Riyadh",
    "Mexico": "Mexico City",
    "Netherlands": "Amsterdam",
    "Scotland": "Edinburgh",
    "Chile": "Santiago",
}
ANTONYMS = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "up": "down",
    "old": "new",
    "light": "dark",
    "open": "closed",
    "early": "late",
    "full": "empty",
    "hard": "soft",
    "high": "low",
    "long": "short",
    "rich": "poor",
    "strong": "weak",
    "thick": "thin",
    "wet": "dry",
    "loud": "quiet",
    "clean": "dirty",
    "heavy": "light",
    "good": "bad",
    "win": "lose",
    "day": "night",
    "black": "white",
    "push": "pull",
    "buy": "sell",
    "left": "right",
    "first": "last",
    "inside": "outside",
    "true": "false",
    "question": "answer",
    "love": "hate",
    "begin": "end",
    "cheap": "expensive",
    "young": "old",
    "tall": "short",
    "deep": "shallow",
    "wide": "narrow",
    "friend": "enemy",
    "sweet": "sour",
}
PLURALS = {
    "child": "children",
    "mouse": "mice",
    "foot": "feet",
    "tooth": "teeth",
    "man": "men",
    "woman": "women",
    "person": "people",
    "goose": "geese",
    "ox": "oxen",
    "cactus": "cacti",
    "knife": "knives",
    "leaf": "leaves",
    "wolf": "wolves",
    "life": "lives",
    "half": "halves",
    "box": "boxes",
    "bus": "buses",
    "city": "cities",
    "baby": "babies",
    "party": "parties",
    "story": "stories",
    "dish": "dishes",
    "church": "churches",
    "potato": "potatoes",
    "tomato": "tomatoes",
    "hero": "heroes",
    "wife": "wives",
    "shelf": "shelves",
    "class": "classes",
    "fox": "foxes",
    "glass": "glasses",
    "cat": "cats",
    "dog": "dogs",
    "book": "books",
    "apple": "apples",
    "car": "cars",
    "house": "houses",
    "tree": "trees",
    "bird": "birds",
    "toy": "toys",
}


def general_knowledge(seed: int, sizes: dict[str, int]) -> dict[str, list[Record]]:
    """Capitals, antonyms and plurals asked in one sentence: what the model already does.

    The experiment's "already known" task: memory that leaks into it shows as lost accuracy,
    and the trigger should learn to stay quiet on it. Splits (train for the trigger's RL mix,
    validation, test) are disjoint by question and shuffled by ``seed``. Answers are scored
    by :func:`answer_reward` (the gold word appears in the answer).
    """
    questions = (
        [
            Record(f"What is the capital of {k}?", f"The capital of {k} is {v}.", {"answer": v}, "capitals")
            for k, v in CAPITALS.items()
        ]
        + [
            Record(f'What is the opposite of "{k}"?', f'The opposite of "{k}" is "{v}".', {"answer": v}, "antonyms")
            for k, v in ANTONYMS.items()
        ]
        + [
            Record(f'What is the plural of "{k}"?', f'The plural of "{k}" is "{v}".', {"answer": v}, "plurals")
            for k, v in PLURALS.items()
        ]
    )
    random.Random(f"known:{seed}").shuffle(questions)
    if sum(sizes.values()) > len(questions):
        raise ValueError(f"only {len(questions)} general-knowledge questions; asked for {sum(sizes.values())}")
    out, start = {}, 0
    for name in ("train", "validation", "test"):
        n = sizes.get(name, 0)
        if n:
            out[name] = questions[start : start + n]
        start += n
    return out


def _words(text: str) -> str:
    return " " + " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split()) + " "


def answer_reward(prompts, completions, answer, **_) -> list[float]:
    """A number is read as GSM8K's answers are (:func:`math_reward`); a word must appear, as a whole word, in the answer.

    One reward for the trigger's mix of word problems and general-knowledge questions.
    """
    out = []
    for prompt, completion, gold in zip(prompts, completions, answer):
        if re.fullmatch(r"-?\d+", str(gold).strip()):
            out.extend(math_reward([prompt], [completion], answer=[gold]))
        else:
            out.append(1.0 if _words(str(gold)) in _words(completion_text(completion)) else 0.0)
    return out


def answer_failure_type(prompt: str, completion: str, gold) -> str:
    if re.fullmatch(r"-?\d+", str(gold).strip()):
        return math_failure_type(prompt, completion, gold)
    return "correct" if answer_reward([prompt], [completion], [gold])[0] else "wrong_answer"


def known_task(name: str, records: list[Record]) -> Task:
    return Task(name, records, answer_reward, {}, [], failure_type=answer_failure_type)
