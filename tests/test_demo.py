"""The main job, `memgen demo`, end to end on its --quick budget (pipeline and outputs, not accuracy)."""

import json
import os
import subprocess
import sys

from memgen.demo.domains import answer_reward, disjoint_splits, make_problem

ARMS = ["vanilla", "lora_sft", "memgen_sft", "memgen_trigger", "memgen_random", "prompt_only", "memgen_grpo"]


def test_demo_quick_runs_end_to_end(tmp_path):
    env = dict(os.environ, MEMGEN_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "memgen", "demo", "--quick", "--out", str(out), "--progress", "false"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "reasoner: pretraining" in first.stdout
    for name in ("results.json", "report.md", "accuracy.png", "invocation.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert {"config", "reasoner", "arms", "total_seconds", "machine"} <= set(results)
    assert [a["arm"] for a in results["arms"]] == ARMS
    for arm in results["arms"]:
        assert set(arm["domains"]) == {"A", "B", "C"}
        for summary in arm["domains"].values():
            assert {"accuracy", "mean_insertions", "invocation_rate", "seconds_per_answer", "n"} <= set(summary)
            assert 0.0 <= summary["accuracy"] <= 1.0
    params = {a["arm"]: a["trainable_params"] for a in results["arms"]}
    assert params["vanilla"] == 0 and params["lora_sft"] > 0 and params["memgen_trigger"] > params["memgen_sft"]
    assert all(a["domains"]["B"]["mean_insertions"] == 0 for a in results["arms"] if a["memory"] == "off")
    assert all(a["domains"]["B"]["mean_insertions"] >= 1 for a in results["arms"] if a["memory"] != "off")
    assert "| arm" in first.stdout and "memgen_grpo" in (out / "report.md").read_text()
    # A second run finds the cached reasoner.
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "reasoner: cached" in second.stdout


def test_domains_are_disjoint_and_scored():
    splits = disjoint_splits("B", {"train": 300, "test": 50}, 1)
    assert not {r.prompt for r in splits["train"]} & {r.prompt for r in splits["test"]}
    import random

    record = make_problem(random.Random(3), "C")
    assert answer_reward(None, [record.completion], [record.columns["answer"]]) == [1.0]
    assert answer_reward(None, [" 1+1=2, so 3.\n"], ["2"]) == [0.0]
    assert "finds" not in make_problem(random.Random(4), "A").prompt


def test_notes_sit_at_insertion_points_and_are_never_targets():
    import random

    from memgen.demo.domains import NOTE_WIDTH, note, with_notes
    from memgen.demo.reasoner import ReasonerConfig, _stream, demo_tokenizer

    record = make_problem(random.Random(5), "N")
    segments = with_notes(record, random.Random(0), 1.0, truthful=True)
    texts = [t for t, is_note in segments if not is_note]
    assert "".join(texts) == record.prompt + record.completion
    # One note before every piece: the prompt end and after each ",".
    assert [is_note for _, is_note in segments[1:]] == [True, False] * (record.completion.count(",") + 1)
    # A truthful note names the sign the next step starts with.
    for (text, is_note), (nxt, _) in zip(segments, segments[1:]):
        if is_note and nxt[0] in "+-":
            assert text == note(nxt[0]) and len(text) == NOTE_WIDTH

    tokenizer = demo_tokenizer()
    stream = _stream(random.Random(0), tokenizer, set(), ReasonerConfig(nonce_share=1.0, nonce_notes=1.0))
    pairs = [next(stream) for _ in range(2000)]
    note_ids = set(tokenizer("<>+-", add_special_tokens=False)["input_ids"])
    masked = [tok for tok, label in pairs if label == -100]
    assert masked and all(tok in note_ids for tok in masked)
    lt = tokenizer("<", add_special_tokens=False)["input_ids"][0]
    assert all(label == -100 for tok, label in pairs if tok == lt)  # notes are read, never written
