"""The ExpeL and AWM baselines: operation parsing and semantics, extraction, induction, prompts, eval wiring."""

import json

import pytest
from conftest import make_memgen, toy_task_records

from memgen.evaluate import EvalConfig, evaluate
from memgen.experience import ExperienceRecord, ExperienceStore
from memgen.experience.awm import AWMConfig, OnlineAWM, awm_prompt, induce_workflows, parse_workflows
from memgen.experience.expel import (
    ExpeLConfig,
    Operation,
    apply_operations,
    expel_prompt,
    extract_insights,
    gather_experience,
    insights,
    parse_operations,
    reasoner_llm,
)
from memgen.tasks import Task


@pytest.fixture()
def store(tmp_path):
    with ExperienceStore(tmp_path / "s", retriever="bm25") as s:
        yield s


def test_operations_are_parsed_strictly():
    text = """Here are my operations:
ADD: Check the sign before the number.
ADD 3: Keep one step per comma.
EDIT 1: Always check the sign first.
agree 2: Keep one step per comma.
REMOVE 4: stale
UPVOTE: no number given
EDIT 2:
DOWNVOTE 1: duplicate"""
    ops = parse_operations(text)
    assert [(o.kind, o.index) for o in ops] == [
        ("ADD", None),
        ("ADD", None),
        ("EDIT", 1),
        ("UPVOTE", 2),
        ("DOWNVOTE", 4),
        ("DOWNVOTE", 1),
    ]
    assert ops[0].text == "Check the sign before the number."


def test_insight_votes_follow_expel(store, tmp_path):
    counts = apply_operations(store, "t", [Operation("ADD", None, "rule one"), Operation("ADD", None, "rule two")], 3)
    assert counts["ADD"] == 2 and [r.votes for r in insights(store, "t")] == [2, 2]
    first = insights(store, "t")[0]
    counts = apply_operations(
        store,
        "t",
        [
            Operation("EDIT", 1, "rule one, sharper"),
            Operation("DOWNVOTE", 2, ""),
            Operation("UPVOTE", 7, ""),
            Operation("ADD", None, "rule three"),
            Operation("ADD", None, "rule four"),
        ],
        3,
    )
    listed = insights(store, "t")
    assert [(r.text, r.votes) for r in listed] == [("rule one, sharper", 3), ("rule two", 1), ("rule three", 2)]
    assert listed[0].id == first.id  # an edit keeps the insight's identity
    assert counts["invalid"] == 2  # rule 7 does not exist; the fourth ADD exceeds max_insights
    counts = apply_operations(store, "t", [Operation("DOWNVOTE", 2, ""), Operation("UPVOTE", 2, "")], 3)
    assert counts["removed"] == 1 and counts["invalid"] == 1  # removed, then no longer there to upvote
    store.close()
    reopened = ExperienceStore(tmp_path / "s", retriever="bm25", read_only=True)
    assert [(r.text, r.votes) for r in insights(reopened, "t")] == [("rule one, sharper", 3), ("rule three", 2)]
    reopened.close()


def add_attempts(store):
    rows = [
        ("copy abc:", " abc, abc.", True),
        ("copy abc:", " abd.", False),
        ("copy bcd:", " bcd, bcd.", True),
        ("copy cde:", " cd.", False),
        ("copy dea:", " dea, dea.", True),
    ]
    store.add_many(ExperienceRecord(task="t", input=i, trajectory=o, success=ok, reward=float(ok)) for i, o, ok in rows)


def test_extraction_compares_pairs_then_summarises_successes(store):
    add_attempts(store)
    seen = []

    def llm(prompts):
        seen.extend(prompts)
        return [
            "ADD: Copy the word twice.\nUPVOTE 1: Copy the word twice."
            if len(seen) > 1
            else "ADD: Copy the word twice."
        ]

    totals = extract_insights(store, "t", llm, ExpeLConfig(success_batches=1, success_batch=3))
    assert totals["pairs"] == 1 and len(seen) == 2  # one failure/success pair, one batch of successes
    assert "Failed attempt:\n abd." in seen[0] and "Successful attempt:\n abc, abc." in seen[0]
    assert "1. Copy the word twice." in seen[1]  # the second call sees the list the first one built
    assert [(r.text, r.votes) for r in insights(store, "t")] == [("Copy the word twice.", 3)]
    assert expel_prompt(store, "other", "copy abc:", ExpeLConfig()) == "copy abc:"  # nothing stored for it
    prompt = expel_prompt(store, "t", "copy abc:", ExpeLConfig(top_k=2))
    assert "1. Copy the word twice." in prompt and prompt.endswith("Now the task.\ncopy abc:")
    examples = prompt.split("Solved examples of similar tasks:")[1].split("Now the task.")[0]
    assert "abd" not in examples and "copy abc:" not in examples  # successes only, never the task itself
    assert examples.count("copy ") == 2


def test_workflows_are_induced_offline_and_online(store):
    add_attempts(store)
    answer = "## Workflow: copy twice\n1. read {word}\n2. write {word}, {word}.\n## Workflow: empty\n"
    assert parse_workflows(answer) == ["## Workflow: copy twice\n1. read {word}\n2. write {word}, {word}."]
    calls = []
    llm = lambda prompts: (calls.extend(prompts), [answer])[1]
    got = induce_workflows(store, "t", llm, AWMConfig(induction_batch=2))
    assert got == {"inductions": 2, "workflows_added": 1, "answers_without_workflow": 0, "workflows": 1}
    assert "copy dea:" in calls[0] and "{number}" in calls[0]  # newest first; placeholders kept literal
    workflow = store.records(kind="workflow")[0]
    assert len(workflow.provenance["from"]) == 2
    assert "copy twice" in awm_prompt(store, "t", "copy xyz:", AWMConfig())
    online = OnlineAWM(store, "u", lambda p: ["## Workflow: w\n1. step"], AWMConfig(induce_every=2))
    assert online.prompt("copy q:") == "copy q:"  # no workflow yet: the agent's own prompt
    online.observe("copy q:", " q, q.", True)
    online.observe("copy r:", " r.", False)
    assert online.stats["inductions"] == 0
    online.observe("copy s:", " s, s.", True)
    assert online.stats == {"successes": 2, "inductions": 1, "workflows_added": 1}
    assert "## Workflow: w" in online.prompt("copy t:")


def test_real_pipeline_on_a_tiny_model_and_eval_sources(tok, tmp_path):
    """Gather with a real model, extract with it as the LLM, then evaluate with each memory source."""
    model = make_memgen(tok, randomize=False)
    records = toy_task_records(6)
    reward = lambda prompts, completions, answer, **k: [float(c.strip() == a) for c, a in zip(completions, answer)]
    task = Task("toy", records, reward, {}, ["\n"])
    with ExperienceStore(tmp_path / "exp", retriever="bm25") as store:
        got = gather_experience(model, task, store, ExpeLConfig(attempts=2, max_new_tokens=8))
        assert got["attempts"] == 12 and len(store.records(kind="trajectory")) == got["added"] <= 12
        llm = reasoner_llm(model, max_new_tokens=16)
        totals = extract_insights(store, "toy", llm, ExpeLConfig(success_batches=1))
        assert totals["insights"] == len(insights(store, "toy"))  # a random tiny model writes no valid rules
        store.add(ExperienceRecord(kind="insight", task="toy", text="Copy the word twice.", votes=2))
        store.add(ExperienceRecord(task="toy", input="copy zzz:", trajectory=" zzz, zzz.", success=True))
    for source in ("expel", "awm", "weaver+retrieval"):
        out = tmp_path / f"{source}.jsonl"
        summary = evaluate(
            model,
            task,
            EvalConfig(
                task="toy",
                memory="always",
                max_new_tokens=6,
                progress=False,
                experience=str(tmp_path / "exp"),
                experience_embedder="bm25",
                memory_source=source,
                output=str(out),
            ),
        )
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert summary["n"] == 6 and rows[0]["prompt"] == records[0].prompt  # the row keeps the task's own prompt
        assert ("retrieved" in rows[0]) == (source == "weaver+retrieval")
    with pytest.raises(Exception, match="needs --experience"):
        EvalConfig(memory_source="expel")
