"""The experience store: persistence across processes, surviving a kill mid-write, dedupe, search, bad input."""

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from memgen.experience import BM25Retriever, ExperienceError, ExperienceRecord, ExperienceStore, ReasonerEmbedder
from memgen.tiny import tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.slow  # every test here trains, loads a real model or runs a subprocess

PROBLEMS = [f"Q: Ann has {a} pens. gets {b}. loses {c}." for a in range(1, 6) for b in range(1, 4) for c in range(1, 3)]


@pytest.fixture(scope="module")
def embedder():
    tokenizer = tiny_tokenizer()
    return ReasonerEmbedder(tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, seed=3).eval(), tokenizer)


def trajectory(i: int, success: bool = True) -> ExperienceRecord:
    return ExperienceRecord(
        task="demo-B",
        input=PROBLEMS[i],
        trajectory=f" {i},+1=2,so 2.",
        reward=float(success),
        success=success,
        provenance={"run": "test", "step": i},
    )


def test_dedupe_search_update_and_remove_survive_reopening(tmp_path, embedder):
    path = tmp_path / "store"
    with ExperienceStore(path, embedder) as store:
        assert store.add_many([trajectory(i, success=i % 3 != 0) for i in range(12)]) == 12
        # The same experience again, alone or twice in one batch, is not stored again.
        assert not store.add(trajectory(4, success=True))
        assert store.add_many([trajectory(20), trajectory(20), trajectory(4)]) == 1
        insight = ExperienceRecord(kind="insight", task="demo-B", text="finds adds, drops subtracts", votes=2)
        assert store.add(insight)
        # Exact cosine: a stored input is its own nearest neighbour.
        hits = store.search(PROBLEMS[7], k=3, kind="trajectory")
        assert hits[0].record.input == PROBLEMS[7] and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert all(h.record.success for h in store.search(PROBLEMS[3], k=5, success=True))
        store.update(ExperienceRecord(**{**insight.to_json(), "votes": 3}))
        store.remove(trajectory(7).id)
        assert len(store) == 13 and trajectory(7).id not in {h.record.id for h in store.search(PROBLEMS[7], k=13)}

    reopened = ExperienceStore(path, embedder, read_only=True)
    assert len(reopened) == 13
    assert reopened.get(insight.id).votes == 3  # the newest version wins
    with pytest.raises(ExperienceError, match="no experience record"):
        reopened.get(trajectory(7).id)
    # The vectors came from the cache written on close, and they are the ones a fresh embedding gives.
    assert torch.allclose(
        reopened._vectors, embedder.embed([r.search_text for r in reopened._records.values()]), atol=1e-5
    )
    out = tmp_path / "export.jsonl"
    assert reopened.export(out) == 13
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [r.id for r in reopened.records()]


def test_a_store_written_in_another_process_reads_back_the_same(tmp_path):
    path = tmp_path / "store"
    script = textwrap.dedent(f"""
        from memgen.experience import ExperienceRecord, ExperienceStore
        with ExperienceStore({str(path)!r}, retriever="bm25") as store:
            store.add(ExperienceRecord(task="qa", input="Who wrote Hamlet", trajectory="Shakespeare", success=True))
            store.add(ExperienceRecord(task="qa", input="capital of France", trajectory="Paris", success=True))
            store.add(ExperienceRecord(kind="workflow", task="qa", text="look up the capital, answer its name"))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    store = ExperienceStore(path, retriever="bm25", read_only=True)
    assert len(store) == 3
    hits = store.search("what is the capital of Spain", k=2)
    assert hits[0].record.trajectory == "Paris" and hits[0].score > hits[1].score


def test_a_kill_during_writes_loses_no_acknowledged_record(tmp_path):
    path = tmp_path / "store"
    # The writer prints each id once add() has returned, then keeps writing until it is killed.
    script = textwrap.dedent(f"""
        import sys
        from memgen.experience import ExperienceRecord, ExperienceStore
        store = ExperienceStore({str(path)!r}, retriever="bm25")
        i = 0
        while True:
            record = ExperienceRecord(task="t", input="problem %d " % i + "x" * 4000, trajectory="y" * 4000)
            store.add(record)
            print(record.id, flush=True)
            i += 1
    """)
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acknowledged = [writer.stdout.readline().strip() for _ in range(30)]
    writer.send_signal(signal.SIGKILL)
    acknowledged += [line.strip() for line in writer.stdout.read().splitlines() if line.strip()]
    writer.wait()
    # A kill between write() and the newline's arrival is rare; tear the tail by hand as well, as it would look.
    with open(path / "records.jsonl", "ab") as handle:
        handle.write(b'{"kind": "trajectory", "task": "t", "input": "half a rec')
    store = ExperienceStore(path, retriever="bm25")
    assert set(acknowledged) <= {r.id for r in store.records()}
    torn = list(path.glob("torn-*.txt"))
    assert len(torn) == 1 and torn[0].read_bytes().endswith(b"half a rec")
    assert (path / "records.jsonl").read_bytes().endswith(b"\n")
    assert store.add(ExperienceRecord(task="t", input="after the kill"))
    store.close()
    assert len(ExperienceStore(path, retriever="bm25", read_only=True)) == len(store)


def test_bad_paths_corruption_and_mismatched_embedders_fail_in_one_line_and_change_nothing(tmp_path, embedder):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ExperienceError, match="is a file"):
        ExperienceStore(a_file, embedder)
    with pytest.raises(ExperienceError, match="no experience store"):
        ExperienceStore(tmp_path / "missing", embedder, create=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ExperienceError, match="not an experience store"):
        ExperienceStore(tmp_path / "other", embedder)

    path = tmp_path / "store"
    with ExperienceStore(path, embedder) as store:
        store.add_many([trajectory(i) for i in range(3)])
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}

    tokenizer = tiny_tokenizer()
    wider = ReasonerEmbedder(tiny_causal_lm(tokenizer, hidden_size=48, num_layers=1, seed=3), tokenizer)
    with pytest.raises(ExperienceError, match="embedding dimension mismatch: .* 32-dim .* 48-dim") as err:
        ExperienceStore(path, wider)
    assert "\n" not in str(err.value)
    retrained = ReasonerEmbedder(tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, seed=4), tokenizer)
    with pytest.raises(ExperienceError, match="was embedded with reasoner:"):
        ExperienceStore(path, retrained)

    log = path / "records.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + "{not json\n" + lines[2])
    corrupted = log.read_bytes()
    with pytest.raises(ExperienceError, match=r"records\.jsonl:2: corrupt experience record"):
        ExperienceStore(path, embedder)
    assert log.read_bytes() == corrupted
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and p.name != "records.jsonl"} == {
        k: v for k, v in before.items() if k != "records.jsonl"
    }


def test_one_writer_at_a_time_and_readers_alongside(tmp_path):
    path = tmp_path / "store"
    writer = ExperienceStore(path, retriever="bm25")
    writer.add(ExperienceRecord(task="t", input="one"))
    second = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from memgen.experience import ExperienceStore\nExperienceStore({str(path)!r}, retriever='bm25')",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode != 0 and "open for writing in another process" in second.stderr
    assert len(ExperienceStore(path, retriever="bm25", read_only=True)) == 1
    writer.close()
    assert ExperienceStore(path, retriever="bm25").add(ExperienceRecord(task="t", input="two"))


def test_bm25_ranks_by_shared_words():
    bm25 = BM25Retriever()
    bm25.reset(["Ann finds 3 pens", "Bob drops 2 cups", "Ann drops 3 cups"])
    scores = bm25.scores("Bob drops cups")
    assert scores.argmax() == 1 and scores[0] == 0


def _memgen(*args, **kw):
    return subprocess.run([sys.executable, "-m", "memgen", *args], capture_output=True, text=True, timeout=300, **kw)


def test_experience_cli_builds_from_eval_answers_shows_and_searches(tmp_path):
    tokenizer = tiny_tokenizer()
    model_dir = tmp_path / "reasoner"
    tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, seed=5).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        "".join(
            json.dumps(
                {"source": f"b.jsonl:{i}", "prompt": PROBLEMS[i], "completion": f" {i}.", "reward": float(i % 2)}
            )
            + "\n"
            for i in range(6)
        )
    )
    store = tmp_path / "store"
    built = _memgen(
        "experience",
        "build",
        "--store",
        str(store),
        "--source",
        str(answers),
        "--task",
        "demo-B",
        "--model",
        str(model_dir),
    )
    assert built.returncode == 0, built.stderr
    assert "added 6 of 6 records" in built.stdout
    again = _memgen(
        "experience",
        "build",
        "--store",
        str(store),
        "--source",
        str(answers),
        "--task",
        "demo-B",
        "--model",
        str(model_dir),
    )
    assert "added 0 of 6 records" in again.stdout and "(6 duplicates); " in again.stdout
    shown = _memgen("experience", "show", "--store", str(store))
    assert shown.returncode == 0 and "6 records" in shown.stdout and "demo-B" in shown.stdout
    found = _memgen(
        "experience", "search", "--store", str(store), "--query", PROBLEMS[3], "--top-k", "2", "--model", str(model_dir)
    )
    assert found.returncode == 0, found.stderr
    first = found.stdout.splitlines()[2]  # the header, its rule, then the best hit
    assert PROBLEMS[3][:40] in first and " 3." in first
    # Provenance points at the answer line each trajectory came from.
    records = [json.loads(line) for line in (store / "records.jsonl").read_text().splitlines()]
    assert records[3]["provenance"]["file"].endswith("answers.jsonl:4") and records[3]["success"]

    # Bad input: one line, file:line, nothing added; a lexical search on a dense store needs no model.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n{oops\n")
    failed = _memgen("experience", "build", "--store", str(store), "--source", str(bad), "--model", str(model_dir))
    assert failed.returncode == 2 and f"{bad}:2: not JSON" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    assert len((store / "records.jsonl").read_text().splitlines()) == 6
    lexical = _memgen(
        "experience", "search", "--store", str(store), "--query", "gets 3. loses 2.", "--embedder", "bm25"
    )
    assert lexical.returncode == 0 and PROBLEMS[5] in lexical.stdout.splitlines()[2]
    # ExpeL and AWM from the CLI, with the reasoner as the LLM: they run and report what they did.
    for action, key in (("insights", "insights="), ("workflows", "workflows=")):
        derived = _memgen(
            "experience",
            action,
            "--store",
            str(store),
            "--task",
            "demo-B",
            "--model",
            str(model_dir),
            "--llm-max-new-tokens",
            "8",
        )
        assert derived.returncode == 0, derived.stderr
        assert key in derived.stdout
    missing = _memgen("experience", "insights", "--store", str(store), "--model", str(model_dir))
    assert missing.returncode == 2 and "needs --model" in missing.stderr
