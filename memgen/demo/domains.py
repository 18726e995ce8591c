"""The demo's synthetic domains: multi-step word problems whose chain of thought ends steps in delimiters.

- **Domain A** (the reasoner's pretraining domain): quantities change with the verbs
  ``gets`` (+) and ``loses`` (-); the solution computes step by step.
- **Nonce problems** (pretraining only): the verbs are random made-up words, so the
  solution first writes a plan of operations (`` [+,-]``) that cannot be read off the
  prompt, then follows it. This teaches the reasoner to *use* a plan, and leaves it
  uncertain whenever it meets verbs it does not know.
- **Domain B** (the new skill): the verbs are ``finds`` (+) and ``drops`` (-), which the
  reasoner never saw; it must guess the plan. Their meaning is the fact that memory can
  supply.
- **Domain C** (held out, never trained on by any arm): three-step problems mixing A and B
  verbs, a cross-domain check.

Every quantity stays in 0..9 (single digits: what a ~6M character-level model learns in
minutes on 2 CPU cores). Each step ends in a delimiter (``,``), where memory can be woven in.
"""

from __future__ import annotations

import random
import re
import string

from ..data import Record
from ..tasks import Task

NAMES = ["Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus", "Ivy", "Jon", "Kim"]
ITEMS = ["pens", "cups", "eggs", "keys", "hats", "toys", "cards", "books"]
VERBS = {"A": {"gets": 1, "loses": -1}, "B": {"finds": 1, "drops": -1}}
RESERVED = {v for d in VERBS.values() for v in d}
ALPHABET = "".join(sorted(set("".join(NAMES) + string.ascii_lowercase + "QA0123456789 .,:+-=[]\n")))
_ANSWER = re.compile(r"so (\d+)\.")


def _nonce_verbs(rng: random.Random) -> dict[str, int]:
    verbs = {}
    while len(verbs) < 2:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 6)))
        if word not in RESERVED and word not in verbs:
            verbs[word] = 1 if not verbs else -1
    return verbs


def make_problem(rng: random.Random, domain: str) -> Record:
    """One problem of domain ``A``, ``B``, ``C`` or ``N`` (nonce, pretraining only)."""
    if domain == "N":
        verbs = _nonce_verbs(rng)
    elif domain == "C":
        verbs = {**VERBS["A"], **VERBS["B"]}
    else:
        verbs = VERBS[domain]
    steps = 3 if domain == "C" else rng.choice([2, 3])
    while True:
        chosen = [rng.choice(list(verbs)) for _ in range(steps)]
        if domain == "C" and not (set(chosen) & set(VERBS["A"]) and set(chosen) & set(VERBS["B"])):
            continue
        value = rng.randint(1, 9)
        start, parts, ok = value, [], True
        for verb in chosen:
            sign = verbs[verb]
            room = 9 - value if sign > 0 else value
            if room < 1:
                ok = False
                break
            amount = rng.randint(1, room)
            new = value + sign * amount
            parts.append((verb, amount, "+" if sign > 0 else "-", f"{value}{'+' if sign > 0 else '-'}{amount}={new}"))
            value = new
        if ok:
            break
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    # Short prompts keep the start value close to where the solution copies it: long-range
    # copying is what a character-level model this small learns last.
    prompt = f"Q: {name} has {start} {item}. " + " ".join(f"{verb} {amount}." for verb, amount, _, _ in parts) + "\nA:"
    # The plan's signs are comma-separated, so memory can be woven in before each one.
    plan = "" if domain == "A" else " [" + ",".join(op for _, _, op, _ in parts) + "]"
    completion = plan + " " + ", ".join(step for _, _, _, step in parts) + f", so {value}.\n"
    return Record(prompt, completion, {"answer": str(value), "domain": domain})


def make_split(domain: str, n: int, seed: int) -> list[Record]:
    rng = random.Random(f"{domain}:{seed}")
    seen, out = set(), []
    while len(out) < n:
        record = make_problem(rng, domain)
        if record.prompt not in seen:
            seen.add(record.prompt)
            out.append(record)
    return out


def disjoint_splits(domain: str, sizes: dict[str, int], seed: int) -> dict[str, list[Record]]:
    """Named splits of one domain with no prompt shared between them."""
    pool = make_split(domain, sum(sizes.values()), seed)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = pool[start: start + size]
        start += size
    return out


def answer_reward(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the completion's ``so N.`` equals the answer (TRL reward signature)."""
    scores = []
    for completion, gold in zip(completions, answer):
        match = _ANSWER.search(completion)
        scores.append(float(bool(match) and match.group(1) == str(gold)))
    return scores


def as_task(name: str, records: list[Record]) -> Task:
    return Task(name, records, answer_reward, {}, ["\n"])
