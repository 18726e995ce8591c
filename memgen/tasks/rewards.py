"""Reward functions in TRL's signature ``f(prompts, completions, **columns) -> list[float]``.

Columns of the dataset (``answer``, ``aliases``, ...) arrive as keyword lists aligned with
``completions``, exactly as TRL's ``GRPOTrainer`` passes them, so TRL users can bring their
own functions and use these in TRL. Completions may be strings or message lists.
Math equivalence goes through ``math-verify`` (``\\frac12`` == ``0.5``, ``1,000`` == ``1000``).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

RewardFn = Callable[..., list[float]]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in completion)
    return str(completion)


def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string (what gets scored)."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at >= 0:
            cut = min(cut, at)
    return text[:cut]


# ---------------------------------------------------------------- answer extraction
def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), with nested braces."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i]
    return None


def _strip_units(answer: str) -> str:
    """``72 clips`` -> ``72``, ``$1,200 per month`` -> ``1200``: a lone number among words is the answer.

    Anything with maths in it (LaTeX, a second number, an operator) is left as it is.
    """
    answer = answer.strip().rstrip(".")
    numbers = _NUMBER.findall(answer)
    if len(numbers) == 1 and "\\" not in answer and not re.search(r"[=/^*+]", answer):
        return numbers[0].replace(",", "")
    return answer


def gsm8k_final(solution: str) -> str | None:
    """The number after ``####`` in a GSM8K answer, commas (and any trailing unit) removed."""
    if "####" not in solution:
        return None
    return _strip_units(solution.split("####")[-1].strip().replace(",", ""))


def final_answer(text: str) -> str | None:
    """A completion's final answer: ``\\boxed{}``, ``#### x``, ``answer is x``, else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    marked = gsm8k_final(text)
    if marked:
        return marked
    match = re.search(r"answer is[:\s]*\$?([^\n$]+)", text, flags=re.IGNORECASE)
    if match:
        return _strip_units(match.group(1))
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


# ---------------------------------------------------------------- math
def math_equal(prediction: str | None, gold: str | None) -> bool:
    """Mathematical equivalence of two answers (LaTeX or plain), via math-verify."""
    if prediction is None or gold is None:
        return False
    if prediction.strip() == gold.strip():
        return True
    from math_verify import parse, verify

    def as_latex(s: str) -> str:
        s = s.strip()
        return s if s.startswith("$") or s.startswith("\\(") else f"${s}$"

    try:
        gold_parsed = parse(as_latex(gold))
        pred_parsed = parse(
            as_latex(prediction.replace(",", "") if _NUMBER.fullmatch(prediction.strip()) else prediction)
        )
        return bool(gold_parsed) and bool(pred_parsed) and bool(verify(gold_parsed, pred_parsed))
    except Exception:  # math-verify raises on unparsable LaTeX; an unparsable answer is wrong
        return False


def math_reward(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the completion's final answer is mathematically equal to ``answer``."""
    return [float(math_equal(final_answer(completion_text(c)), str(a))) for c, a in zip(completions, answer)]


def math_failure_type(prompt: str, completion: str, gold) -> str:
    """``correct``, ``no_answer`` (nothing extractable) or ``wrong_answer`` (a task's ``failure_type``)."""
    prediction = final_answer(completion_text(completion))
    if prediction is None:
        return "no_answer"
    return "correct" if math_equal(prediction, str(gold)) else "wrong_answer"


# ---------------------------------------------------------------- QA (TriviaQA / PopQA)
def normalize_answer(text: str) -> str:
    """SQuAD/TriviaQA normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _qa_prediction(text: str) -> str:
    line = text.strip().split("\n")[0]
    match = re.search(r"answer is[:\s]*(.+)", line, flags=re.IGNORECASE)
    return (match.group(1) if match else line).strip()


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = Counter(pred) & Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match_reward(prompts, completions, aliases, **_) -> list[float]:
    """1.0 when the first line of the completion equals any alias after normalisation."""
    return [
        float(any(normalize_answer(_qa_prediction(completion_text(c))) == normalize_answer(a) for a in al))
        for c, al in zip(completions, aliases)
    ]


def f1_reward(prompts, completions, aliases, **_) -> list[float]:
    """Best token-level F1 of the completion's first line over the aliases."""
    return [
        max((token_f1(_qa_prediction(completion_text(c)), a) for a in al), default=0.0)
        for c, al in zip(completions, aliases)
    ]


def qa_failure_type(prompt: str, completion: str, gold) -> str:
    """``correct`` (exact match with an alias), ``no_answer`` (empty first line), ``partial`` (shares words
    with an alias: F1 > 0) or ``wrong_answer``. ``gold`` is the alias list (or one answer)."""
    aliases = [gold] if isinstance(gold, str) else list(gold or [])
    prediction = _qa_prediction(completion_text(completion))
    if not normalize_answer(prediction):
        return "no_answer"
    if any(normalize_answer(prediction) == normalize_answer(a) for a in aliases):
        return "correct"
    return "partial" if any(token_f1(prediction, a) > 0 for a in aliases) else "wrong_answer"


# ---------------------------------------------------------------- multiple choice (GPQA)
_WORD = r"(?i:{})"
# Explicit statements of the choice, strongest first. Keywords are case-insensitive, the letter is
# not: with IGNORECASE a bare [A-D] matches the "a" of "answer is a careful ..." and the article "A".
_CHOICE_EXPLICIT = [
    re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*\(?([A-D])\)?\s*\}?\s*\}"),
    re.compile(
        _WORD.format(r"answer|option|choice")
        + r"\W{0,3}\s*(?:"
        + _WORD.format(r"is|would be|will be|=|:")
        + r")?\s*\**\s*(?:"
        + _WORD.format(r"option|choice")
        + r"\s*)?\(?([A-D])\b\)?(?![A-Za-z])"
    ),
]
_CHOICE_PAREN = re.compile(r"\(([A-D])\)")
# A bare capital letter; an "A" that starts a phrase ("A careful analysis") is the article, unless a
# verb that takes a choice follows ("A is correct").
_CHOICE_BARE = re.compile(
    r"(?<![A-Za-z0-9])([A-D])(?![A-Za-z0-9])(?!\s+(?!(?:is|was|seems|appears|looks|would|must|should"
    r"|fits|matches|holds)\b)[a-z])"
)


def choice_letter(text: str) -> str | None:
    """The chosen option letter, as careful multiple-choice harnesses extract it.

    First explicit statements (``\\boxed{X}``, "answer is (X)", "Answer: X", "the correct option is
    X"; the last one wins), then the last parenthesised ``(X)``, then the last standalone capital
    letter that is not the article "A".
    """
    for pattern in (*_CHOICE_EXPLICIT, _CHOICE_PAREN, _CHOICE_BARE):
        found = pattern.findall(text)
        if found:
            return found[-1]
    return None


def choice_reward(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the chosen letter (``Answer: C``, ``(C)`` or a lone ``C``) is ``answer``."""
    return [float(choice_letter(completion_text(c)) == str(a).strip().upper()) for c, a in zip(completions, answer)]


def choice_failure_type(prompt: str, completion: str, gold) -> str:
    """``correct``, ``no_choice`` (no option letter found) or ``wrong_choice``."""
    letter = choice_letter(completion_text(completion))
    if letter is None:
        return "no_choice"
    return "correct" if letter == str(gold).strip().upper() else "wrong_choice"


def reference_match_reward(prompts, completions, answer, **_) -> list[float]:
    """Normalised exact match of the whole completion against a reference string."""
    return [
        float(normalize_answer(completion_text(c)) == normalize_answer(str(a))) for c, a in zip(completions, answer)
    ]


# ---------------------------------------------------------------- combination
def combine_rewards(functions: Sequence[RewardFn], weights: Sequence[float] | None = None) -> RewardFn:
    """A reward function that is the weighted sum of ``functions`` (all in TRL's signature)."""
    weights = list(weights) if weights is not None else [1.0] * len(functions)
    if len(weights) != len(functions):
        raise ValueError(f"{len(functions)} reward functions but {len(weights)} weights")

    def combined(prompts, completions, **columns) -> list[float]:
        total = [0.0] * len(completions)
        for fn, w in zip(functions, weights):
            for i, value in enumerate(fn(prompts, completions, **columns)):
                total[i] += w * (0.0 if value is None else float(value))
        return total

    combined.__name__ = "+".join(f"{w:g}*{getattr(f, '__name__', 'reward')}" for f, w in zip(functions, weights))
    return combined
