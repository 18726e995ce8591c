"""Answer extraction that needs no data files: multiple-choice letters and numbers with units."""

import pytest

from memgen.tasks.rewards import choice_letter, choice_reward, final_answer, math_reward

pytestmark = pytest.mark.slow  # every test here trains, loads a real model or runs a subprocess

CHOICES = [
    ("The answer is clearly B", "B"),
    ("A careful analysis shows (C)", "C"),
    ("The answer is (A)", "A"),
    ("Answer: D", "D"),
    ("**Answer:** B", "B"),
    ("Answer:\n\n(B)", "B"),
    ("\\boxed{B}", "B"),
    ("Therefore, the final answer is $\\boxed{(D)}$.", "D"),
    ("I'd say the answer is \\boxed{\\text{C}}", "C"),
    ("The correct option is C.", "C"),
    ("The best choice is option A", "A"),
    ("Correct answer: D", "D"),
    ("The answer is A.", "A"),
    ("The answer is C, not A.", "C"),
    ("the answer is a careful one: B", "B"),
    ("Answer: (C) because it fits", "C"),
    ("(A) is wrong, (B) is wrong, so the answer is (D)", "D"),
    ("A) 3  B) 4 ... Answer: B", "B"),
    ("I think it's B.", "B"),
    ("Between A and C, I pick C", "C"),
    ("Options A and B are out; D.", "D"),
    ("So I'll go with D) for this one.", "D"),
    ("A good guess would be B", "B"),
    ("A is correct.", "A"),
    ("A", "A"),
    ("B.", "B"),
    ("Nothing here", None),
    ("Given the data, a reasonable estimate is 4 mol", None),
]


@pytest.mark.parametrize("text, letter", CHOICES)
def test_choice_letter(text, letter):
    assert choice_letter(text) == letter


def test_choice_reward_scores_the_extracted_letter():
    texts = [t for t, letter in CHOICES if letter]
    gold = [letter for _, letter in CHOICES if letter]
    assert choice_reward(None, texts, gold) == [1.0] * len(texts)
    shifted = ["ABCD"[("ABCD".index(g) + 1) % 4] for g in gold]
    assert choice_reward(None, texts, shifted) == [0.0] * len(texts)


@pytest.mark.parametrize(
    "text, answer",
    [
        ("The answer is 72 clips.", "72"),
        ("The answer is $1,200 per month.", "1200"),
        ("so she has 5 apples left. #### 5 apples", "5"),
        ("The answer is 18.", "18"),
        ("The answer is \\frac{1}{2}.", "\\frac{1}{2}"),
        ("The answer is 3/4 cup.", "3/4 cup"),  # maths stays as written for math-verify
    ],
)
def test_final_answer_strips_units_from_a_lone_number(text, answer):
    assert final_answer(text) == answer


def test_gsm8k_answer_with_units_scores_one():
    assert math_reward(None, ["Natalia sold 48 + 24 = 72 clips. The answer is 72 clips."], ["72"]) == [1.0]
    assert math_reward(None, ["The answer is 73 clips."], ["72"]) == [0.0]


# ------------------------------------------------------------------ data loading
def test_skipped_lines_are_reported_with_file_line_and_a_count(tmp_path):
    import warnings

    from memgen.tasks import load_task

    gsm = tmp_path / "gsm.jsonl"
    good = '{"question": "q%d", "answer": "so #### %d"}'
    gsm.write_text(
        "\n".join(
            [
                good % (1, 1),
                '{"question": "no answer"}',
                good % (2, 2),
                "oops",
                '{"question": "q", "answer": "no marker"}',
            ]
        )
        + "\n"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = load_task("gsm8k", gsm, skip_malformed=True)
    messages = [str(w.message) for w in caught]
    assert len(task.records) == 2
    assert any(f"{gsm}:2: missing or empty field" in m for m in messages)
    assert any(f"{gsm}:4: " in m for m in messages)
    assert any(f"{gsm}:5: answer has no '#### <number>' line" in m for m in messages)
    assert messages[-1] == f"{gsm}: skipped 3 malformed record(s)"
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "q", "answers": ["a"]}\n{"question": "q2"}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(load_task("qa", qa, skip_malformed=True).records) == 1
    assert [str(w.message) for w in caught][-2:] == [
        f"skipped malformed record {qa}:2: needs 'question' and a non-empty 'answers' list",
        f"{qa}: skipped 1 malformed record(s)",
    ]


def test_skipped_lines_reach_the_cli_as_memgen_warnings(tmp_path):
    import os
    import subprocess
    import sys

    bad = tmp_path / "gsm.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\nnot json\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "memgen",
            "eval",
            "--model",
            str(tmp_path / "missing"),
            "--task",
            "gsm8k",
            "--data",
            str(bad),
            "--skip-malformed",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
    )
    assert f"memgen: warning: skipped malformed record {bad}:2: " in proc.stderr
    assert f"memgen: warning: {bad}: skipped 1 malformed record(s)" in proc.stderr
    assert proc.returncode == 2 and "does not exist" in proc.stderr  # then the missing model, cleanly


CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_template_renders_every_task_prompt(tok):
    from memgen.data import Record, load_records, prompt_token_ids, render_prompt
    from memgen.errors import MemGenError

    plain = Record("Question: 2+2?\nAnswer:", " 4")
    assert render_prompt(plain, tok, False) == plain.prompt
    with pytest.raises(MemGenError, match="no chat template"):
        render_prompt(plain, tok, True)
    tok.chat_template = CHAT
    try:
        assert render_prompt(plain, tok, True) == "<|user|>Question: 2+2?\nAnswer:\n<|assistant|>"
        record = load_records(
            [
                {
                    "messages": [
                        {"role": "system", "content": "be brief"},
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello."},
                    ]
                }
            ]
        ).records[0]
        assert render_prompt(record, tok, True) == "<|system|>be brief\n<|user|>hi\n<|assistant|>"
        ids = prompt_token_ids(record, tok, True)
        assert tok.decode(ids) == "<|system|>be brief\n<|user|>hi\n<|assistant|>" and tok.bos_token_id not in ids
    finally:
        tok.chat_template = None


def test_use_chat_template_reaches_training_and_eval(tok, tmp_path):
    """The flag is read: without a template both entry points refuse it."""
    from conftest import make_memgen, toy_task_records

    from memgen.errors import MemGenError
    from memgen.evaluate import EvalConfig, evaluate
    from memgen.tasks import Task
    from memgen.train import WeaverTrainConfig, train_weaver

    task = Task("toy", toy_task_records(8), lambda p, c, **k: [0.0] * len(c), {}, [])
    config = WeaverTrainConfig(
        model="m",
        data="d",
        output_dir=str(tmp_path / "sft"),
        progress=False,
        max_steps=1,
        per_device_batch_size=2,
        use_chat_template=True,
    )
    with pytest.raises(MemGenError, match="no chat template"):
        train_weaver(config, model=make_memgen(tok, randomize=False), task=task)
    with pytest.raises(MemGenError, match="no chat template"):
        evaluate(make_memgen(tok), task, EvalConfig(use_chat_template=True, max_new_tokens=4, progress=False))
    tok.chat_template = CHAT
    try:
        summary = evaluate(
            make_memgen(tok),
            task,
            EvalConfig(use_chat_template=True, max_new_tokens=4, progress=False, output=str(tmp_path / "e.jsonl")),
        )
        assert summary["n"] == 8
        train_weaver(config, model=make_memgen(tok, randomize=False), task=task)
    finally:
        tok.chat_template = None


def test_failure_types_of_answer_tasks():
    from memgen.tasks.rewards import choice_failure_type, math_failure_type, qa_failure_type

    assert math_failure_type("", "so the answer is 42", "42") == "correct"
    assert math_failure_type("", "#### 41", "42") == "wrong_answer"
    assert math_failure_type("", "I do not know", "42") == "no_answer"
    assert choice_failure_type("", "Answer: (C)", "C") == "correct"
    assert choice_failure_type("", "Answer: B", "C") == "wrong_choice"
    assert choice_failure_type("", "none of them", "C") == "no_choice"
    aliases = ["The Beatles", "Beatles"]
    assert qa_failure_type("", "the beatles\nmore text", aliases) == "correct"
    assert qa_failure_type("", "The Rolling Stones", aliases) == "wrong_answer"
    assert qa_failure_type("", "Beatles tribute band", aliases) == "partial"
    assert qa_failure_type("", "\n", aliases) == "no_answer"
