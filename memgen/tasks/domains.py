"""The demo's synthetic domains: multi-step word problems whose chain of thought ends steps in delimiters.

- **Domain A** (the reasoner's pretraining domain): quantities change with the verbs
  ``gets`` (+) and ``loses`` (-). The solution restates the start value, then writes one
  step per delimiter, sign first (`` 3,+2=5,-1=4,so 4.``), so the sign of each step is
  decided right after a ``,``: where MemGen can weave memory in.
- **Nonce problems** (pretraining only): the verbs are random made-up words whose meaning
  differs from problem to problem, so the reasoner cannot know the sign of a step. They end
  in ``s`` like every real verb here: with random letters only, the reasoner learnt that a
  word ending in ``s`` is a verb it knows, and ignored true notes on the unseen B verbs.
- **Notes** (pretraining only): short spans such as ``<++>`` placed where MemGen weaves
  latents (after the prompt and after each ``,``), announcing the sign of the next step. They
  sit in the context but are never a training target, so the reasoner learns to *read*
  notes, never to write them. On nonce problems a note is right; on domain-A problems its
  sign is random, so the reasoner learns to trust its own knowledge of a verb over a note.
  This is the demo's stand-in for what makes a pretrained LLM steerable: it uses context
  where it lacks knowledge. No arm ever sees a note: the weaver must discover, through the
  frozen reasoner, latents that carry the missing fact.
- **Domain B** (the new skill): the verbs are ``finds`` (+) and ``drops`` (-), which the
  reasoner never saw; their meaning is the fact memory can supply.
- **Domain C** (held out, never trained on by any arm): three-step problems mixing A and B
  verbs, a cross-domain check.
- **Domain D** (the continual stage's second new skill): the verbs ``wins`` (+) and ``pays``
  (-), also never seen by the reasoner; arms trained on B go on to D.

Every quantity stays in 0..9 (single digits: what a ~1M-parameter character-level model learns in
minutes on 2 CPU cores).
"""

from __future__ import annotations

import random
import re
import string

from ..data import Record
from .registry import Task

NAMES = ["Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus", "Ivy", "Jon", "Kim"]
ITEMS = ["pens", "cups", "eggs", "keys", "hats", "toys", "cards", "books"]
VERBS = {"A": {"gets": 1, "loses": -1}, "B": {"finds": 1, "drops": -1}, "D": {"wins": 1, "pays": -1}}
RESERVED = {v for d in VERBS.values() for v in d}
ALPHABET = "".join(sorted(set("".join(NAMES) + string.ascii_lowercase + "QA0123456789 .,:+-=<>\n")))
NOTE_WIDTH = 4
"""Tokens in a note; the demo weaves the same number of latents per insertion."""
_ANSWER = re.compile(r"so (\d+)\.")


def note(sign: str) -> str:
    return "<" + sign * (NOTE_WIDTH - 2) + ">"


def _nonce_verbs(rng: random.Random) -> dict[str, int]:
    """Two made-up verbs shaped like the real ones (a stem plus ``s``), so the word's shape says nothing."""
    verbs = {}
    while len(verbs) < 2:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5))) + "s"
        if word not in RESERVED and word not in verbs:
            verbs[word] = 1 if not verbs else -1
    return verbs


def make_problem(rng: random.Random, domain: str) -> Record:
    """One problem of domain ``A``, ``B``, ``C``, ``D`` or ``N`` (nonce, pretraining only)."""
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
            op = "+" if sign > 0 else "-"
            parts.append((verb, amount, op, f"{op}{amount}={new}"))
            value = new
        if ok:
            break
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    # Short prompts keep the start value close to where the solution copies it: long-range
    # copying is what a character-level model this small learns last.
    prompt = f"Q: {name} has {start} {item}. " + " ".join(f"{verb} {amount}." for verb, amount, _, _ in parts) + "\nA:"
    # Each step starts with its sign, right after a delimiter, so the reasoner decides the
    # sign right after it (no space), where memory can be woven: `` 3,+2=5,-1=4,so 4.``
    completion = f" {start}," + ",".join(step for _, _, _, step in parts) + f",so {value}.\n"
    signs = "".join(op for _, _, op, _ in parts)
    return Record(prompt, completion, {"answer": str(value), "domain": domain, "signs": signs})


def with_notes(record: Record, rng: random.Random, density: float, truthful: bool) -> list[tuple[str, bool]]:
    """``record`` as (text, is_note) segments with a note at each insertion point w.p. ``density``.

    Insertion points are the prompt end and every ``,`` of the solution, where the demo's
    MemGen weaves memory. A truthful note gives the sign of the step that follows it; notes
    where no step follows, and untruthful ones, get a random sign.
    """
    pieces = re.findall(r"[^,]*,|[^,]+$", record.completion)
    signs = record.columns["signs"]
    segments = [(record.prompt, False)]
    for i, piece in enumerate(pieces):
        if rng.random() < density:
            # Piece i >= 1 is step i (piece 0 restates the start value, the last one answers).
            sign = signs[i - 1] if truthful and 1 <= i <= len(signs) else rng.choice("+-")
            segments.append((note(sign), True))
        segments.append((piece, False))
    return segments


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
        out[name] = pool[start : start + size]
        start += size
    return out


def answer_reward(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the completion's ``so N.`` equals the answer (TRL reward signature)."""
    scores = []
    for completion, gold in zip(completions, answer):
        match = _ANSWER.search(completion)
        scores.append(float(bool(match) and match.group(1) == str(gold)))
    return scores


FAILURE_TYPES = (
    "correct",
    "format",
    "copy_error",
    "wrong_sign",
    "arithmetic",
    "stopped_early",
    "extra_step",
    "wrong_final",
)
"""What :func:`failure_type` returns: the first way an answer leaves its reference solution."""
_PROMPT = re.compile(r"has (\d+) \w+\. (.*)\nA:", re.S)
_STEP = re.compile(r"([+-])(\d+)=(\d+)")
_SIGNS = {verb: sign for verbs in VERBS.values() for verb, sign in verbs.items()}


def failure_type(prompt: str, completion: str, gold) -> str:
    """Classify an answer by its first departure from the solution's grammar ``" 3,+2=5,-1=4,so 4."``.

    ``format``: not that grammar; ``copy_error``: the start value or a step's amount differs from the
    prompt's; ``wrong_sign``: a step adds where its verb subtracts (or the reverse); ``arithmetic``: a
    step's result is not its own start plus its own change; ``stopped_early``: fewer steps than the
    prompt, or no final answer; ``extra_step``: more steps; ``wrong_final``: ``so N`` is not the last
    result. ``correct`` when the final answer is ``gold``.
    """
    match = _PROMPT.search(prompt)
    if match is None:
        raise ValueError(f"not a demo prompt: {prompt!r}")
    start = int(match.group(1))
    steps = [(verb, int(amount)) for verb, amount in re.findall(r"(\w+) (\d+)\.", match.group(2))]
    pieces = completion.strip().split(",")
    if not pieces[0].isdigit():
        return "format"
    if int(pieces[0]) != start:
        return "copy_error"
    value = start
    for i, (verb, amount) in enumerate(steps):
        piece = pieces[i + 1] if i + 1 < len(pieces) else ""
        step = _STEP.fullmatch(piece)
        if step is None:
            return "stopped_early" if piece == "" or piece.startswith("so") else "format"
        op, got, result = step.group(1), int(step.group(2)), int(step.group(3))
        if verb in _SIGNS and (op == "+") != (_SIGNS[verb] > 0):
            return "wrong_sign"
        if got != amount:
            return "copy_error"
        if result != value + (got if op == "+" else -got):
            return "arithmetic"
        value = result
    rest = pieces[len(steps) + 1 :]
    if not rest or not rest[0]:
        return "stopped_early"
    if _STEP.fullmatch(rest[0]):
        return "extra_step"
    final = _ANSWER.fullmatch(rest[0].strip())
    if final is None:
        return "stopped_early" if "so".startswith(rest[0].strip()[:2]) else "format"
    if int(final.group(1)) != value:
        return "wrong_final"
    return "correct" if str(value) == str(gold) else "wrong_final"


def as_task(name: str, records: list[Record]) -> Task:
    return Task(name, records, answer_reward, {}, ["\n"], failure_type=failure_type)
