"""The main job, `memgen demo`, end to end on its --quick budget (pipeline and outputs, not accuracy)."""

import json
import os
import subprocess
import sys

import pytest

from memgen.tasks.domains import answer_reward, disjoint_splits, make_problem

ARMS = ["vanilla", "lora_sft", "memgen_sft", "memgen_trigger", "memgen_random", "prompt_only", "memgen_grpo"]


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path):
    env = dict(os.environ, MEMGEN_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "memgen", "demo", "--quick", "--out", str(out), "--progress", "false"]
    first = subprocess.run(cmd + ["--seeds", "2"], env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("reasoner: pretraining") == 2
    for name in ("results.json", "report.md", "accuracy.png", "invocation.png", "continual.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert {"config", "seeds", "reasoner", "arms", "continual", "claims", "runs", "total_seconds", "machine"} <= set(
        results
    )
    assert results["seeds"] == [0, 1] and [run["seed"] for run in results["runs"]] == [0, 1]
    assert [a["arm"] for a in results["arms"]] == ARMS
    for arm in results["arms"]:
        assert set(arm["domains"]) == {"A", "B", "C"}
        for summary in arm["domains"].values():
            assert {"accuracy", "accuracy_std", "mean_insertions", "invocation_rate", "seconds_per_answer", "n"} <= set(
                summary
            )
            # The mean and spread are those of the per-seed values the runs recorded.
            assert len(summary["accuracy_per_seed"]) == 2 and 0.0 <= summary["accuracy"] <= 1.0
            assert abs(summary["accuracy"] - sum(summary["accuracy_per_seed"]) / 2) < 1e-3
    per_run = [
        next(a for a in run["arms"] if a["arm"] == "memgen_sft")["domains"]["B"]["accuracy"] for run in results["runs"]
    ]
    # Each seed's run was also written on its own as it finished, so a later seed's failure loses none.
    for run in results["runs"]:
        assert json.loads((out / f"seed-{run['seed']}" / "run.json").read_text())["arms"] == run["arms"]
    assert results["arms"][2]["domains"]["B"]["accuracy_per_seed"] == per_run
    params = {a["arm"]: a["trainable_params"] for a in results["arms"]}
    assert params["vanilla"] == 0 and params["lora_sft"] > 0 and params["memgen_trigger"] > params["memgen_sft"]
    assert all(a["domains"]["B"]["mean_insertions"] == 0 for a in results["arms"] if a["memory"] == "off")
    # Always-on arms weave every prompt end; trigger and random ones decide there too (trigger_at_prompt_end).
    assert all(a["domains"]["B"]["mean_insertions"] >= 1 for a in results["arms"] if a["memory"] == "always")
    assert all(a["domains"]["B"]["mean_insertions"] > 0 for a in results["arms"] if a["memory"] != "off")
    # The reasoner's quality evidence, per seed, as checked at the end of pretraining.
    for run in results["runs"]:
        quality = run["reasoner"]["quality"]
        assert {"accuracy_A", "note_reading", "bar", "met", "checks"} <= set(quality) and quality["checks"]
    assert len(results["reasoner"]["accuracy_A"]["per_seed"]) == 2
    # Continual: every skill after every stage, for both methods; the stage-A row is the pretrained reasoner.
    for method in ("lora_sft", "memgen_sft"):
        stages = results["continual"][method]
        assert [s["stage"] for s in stages] == ["A", "B", "D"]
        assert all(set(s) == {"stage", "A", "B", "D"} for s in stages)
    assert results["continual"]["lora_sft"][0] == results["continual"]["memgen_sft"][0]
    # The agent stage: held-out multi-turn ledger episodes per arm and domain, played through memgen.agents.
    assert set(results["agent"]) == {"vanilla", "memgen_sft", "memgen_trigger"}
    for domains in results["agent"].values():
        assert set(domains) == {"A", "B"} and all(d["n"] == 10 for d in domains.values())
        assert all(len(d["success"]["per_seed"]) == 2 and 0 <= d["success"]["mean"] <= 1 for d in domains.values())
    assert all(d["mean_insertions"] == 0 for d in results["agent"]["vanilla"].values())
    assert all(d["mean_insertions"] >= 1 for d in results["agent"]["memgen_sft"].values())
    episodes = [json.loads(line) for line in (out / "seed-0" / "answers" / "agent-memgen_sft-B.jsonl").open()]
    assert len(episodes) == 10 and all(1 <= e["turns"] <= 2 for e in episodes)
    for claim in results["claims"]:
        assert claim["holds_every_seed"] == all(v >= claim["threshold"] for v in claim["per_seed"])
        assert claim["holds_in_mean"] == (claim["mean"] >= claim["threshold"])
    report = (out / "report.md").read_text()
    assert "memgen_grpo" in report and "Continual learning" in report and "claims" in report
    assert "Agents: multi-turn ledger episodes" in report
    assert "| arm" in first.stdout and " ± " in first.stdout
    # The analysis stage (memgen analyze on the trained weavers), per seed and arm, through memgen.analysis.
    assert "## Memory faculties" in report
    for run in results["runs"]:
        for name in ("memgen_sft", "memgen_grpo"):
            summary = run["analysis"][name]
            directory = out / f"seed-{run['seed']}" / "analysis" / name
            assert all(
                (directory / f).stat().st_size > 0
                for f in ("analysis.md", "analysis.json", "latents.png", "silhouette.png", "ablation.png")
            )
            full = json.loads((directory / "analysis.json").read_text())
            assert summary["insertions"] == full["clustered"] == sum(c["size"] for c in summary["clusters"])
            assert len(summary["clusters"]) == full["clusters"] <= 4
            assert set(summary["baseline"]["group_accuracy"]) == {"A", "B", "C"}
            assert f"seed-{run['seed']}/analysis/{name}/analysis.md" in report
    # A second run finds the cached reasoner, and replaces the first run's per-seed outputs.
    # The cached run also runs the experience arms (issue 11): ExpeL, AWM and the weaver reading retrieved text.
    second = subprocess.run(cmd + ["--experience-arms", "true"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "reasoner: cached" in second.stdout, second.stderr[-3000:]
    assert not (out / "seed-1").exists() and (out / "seed-0").is_dir()
    results = json.loads((out / "results.json").read_text())
    assert [a["arm"] for a in results["arms"]] == ARMS + ["expel", "awm", "memgen_sft_retrieval"]
    experience = results["runs"][0]["experience"]
    assert experience["gathered"]["attempts"] == 40 and {"insights", "workflows"} <= set(experience)
    assert len((out / "seed-0" / "experience" / "records.jsonl").read_text().splitlines()) >= 1
    retrieval = [json.loads(line) for line in (out / "seed-0" / "answers" / "memgen_sft_retrieval-B.jsonl").open()]
    assert all(row["retrieved"] for row in retrieval) or not any(
        r["success"] for r in map(json.loads, (out / "seed-0" / "experience" / "records.jsonl").open())
    )
    expel_rows = [json.loads(line) for line in (out / "seed-0" / "answers" / "expel-B.jsonl").open()]
    assert all(row["insertions"] == 0 for row in expel_rows)  # ExpeL is prompt-only: memory off


def test_reasoner_quality_bar_fails_loudly_or_passes_with_its_evidence(tmp_path, monkeypatch):
    import pytest

    from memgen.demo.reasoner import ReasonerConfig, get_reasoner
    from memgen.errors import QualityBarError

    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path))
    tiny = dict(
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        steps=3,
        batch_size=2,
        seq_len=64,
        quality_size=4,
        check_every=2,
        max_extra_steps=2,
    )
    logged = []
    with pytest.raises(QualityBarError, match="below its quality bar"):
        get_reasoner(ReasonerConfig(**tiny, quality_bar=1.0), set(), progress=False, log=logged.append)
    # Training went on for max_extra_steps before failing, and nothing was cached.
    assert any("training 2 more" in line for line in logged)
    assert not list(tmp_path.rglob("pretrain.json"))
    model, tokenizer, info = get_reasoner(
        ReasonerConfig(**tiny, quality_bar=0.0), set(), progress=False, log=logged.append
    )
    assert info["quality"]["met"] and info["steps"] == 3 and info["quality"]["checks"][0]["step"] == 3
    again = get_reasoner(ReasonerConfig(**tiny, quality_bar=0.0), set(), progress=False, log=logged.append)[2]
    assert again["cached"] and again["quality"] == info["quality"]


def test_decoding_with_notes_matches_row_by_row_decoding():
    """The batched, left-padded note decoder against a plain per-row loop over the same model."""
    import random

    import torch

    from memgen.demo.reasoner import decode_with_notes, demo_tokenizer
    from memgen.tasks.domains import note
    from memgen.tiny import tiny_causal_lm

    tokenizer = demo_tokenizer()
    model = tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, init_std=0.2, seed=3)
    records = [make_problem(random.Random(i), "N") for i in range(6)]
    comma = tokenizer.convert_tokens_to_ids(",")
    boost = torch.zeros(len(tokenizer))
    boost[comma] = 1.5  # an untrained model rarely writes ",": make notes go in mid-answer too
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + boost)
    batched = decode_with_notes(model, tokenizer, records, seed=7, max_new_tokens=12)
    assert any("," in text for text in batched)  # notes were inserted mid-answer, not only at the prompt end

    newline = tokenizer.convert_tokens_to_ids("\n")
    for i, (record, text) in enumerate(zip(records, batched)):
        rng = random.Random(f"7:{i}")
        ids = (
            tokenizer(record.prompt)["input_ids"]
            + tokenizer(note(rng.choice("+-")), add_special_tokens=False)["input_ids"]
        )
        out, k = [], 0
        for _ in range(12):
            with torch.no_grad():
                token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token in (tokenizer.eos_token_id, newline):
                break
            ids.append(token)
            out.append(token)
            if token == comma:
                signs = record.columns["signs"]
                sign = signs[k] if k < len(signs) else rng.choice("+-")
                k += 1
                ids += tokenizer(note(sign), add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(out) == text, i


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

    from memgen.demo.reasoner import ReasonerConfig, _examples, demo_tokenizer
    from memgen.tasks.domains import NOTE_WIDTH, note, with_notes

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
    examples = _examples(random.Random(0), tokenizer, set(), ReasonerConfig(nonce_share=1.0, nonce_notes=1.0))
    pairs = [pair for _ in range(60) for pair in zip(*next(examples))]
    note_ids = set(tokenizer("<>+-", add_special_tokens=False)["input_ids"])
    # Masked: the prompts (context, never predicted) and the notes.
    masked = [tok for tok, label in pairs if label == -100]
    assert masked and any(tok in note_ids for tok in masked)
    prompt_ids = set(tokenizer("Q:", add_special_tokens=False)["input_ids"])
    assert all(label == -100 for tok, label in pairs if tok in prompt_ids)
    lt = tokenizer("<", add_special_tokens=False)["input_ids"][0]
    assert all(label == -100 for tok, label in pairs if tok == lt)  # notes are read, never written
