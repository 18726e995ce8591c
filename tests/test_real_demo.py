"""The real-model experiment (``memgen real-demo``): its measures proven against references, then the
real entry point run end to end in ``--quick`` on SmolLM2-135M-Instruct, and resumed from its cache.

* the trigger's insertions that the KL measure finds on a fixed answer are exactly where the
  engine wove while generating that answer (greedy trigger decisions, tiny model);
* vanilla's KL from itself is 0 and a changed model's is positive;
* the LoRA-SFT arm merged into float32 gives the logits of peft's unmerged model;
* the LoRA-SFT arm trains on exactly the tokens weaver SFT trains on, and killed mid-run it
  resumes from its checkpoint to the adapter an uninterrupted run saves;
* the already-known questions' splits are disjoint, and one reward scores numbers and words.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_memgen, toy_task_records

from memgen.demo import drift, real_arms
from memgen.demo.english import answer_reward, general_knowledge
from memgen.tasks.rewards import math_reward

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def test_trigger_insertions_on_a_fixed_answer_are_where_the_engine_wove(tok):
    model = make_memgen(tok, seed=3)
    prompts = [tok(p)["input_ids"] for p in ("copy abc:", "copy dea:", "Hello, world.", "a")]
    out = model.generate(prompts, memory="trigger", max_new_tokens=24, max_insertions=3)
    completions = [c.token_ids for c in out.completions]
    woven = [c.insertion_positions for c in out.completions]
    assert any(len(w) > 1 for w in woven) and any(
        len(w) < 1 + len(model.delimiter_positions(c, False)) for w, c in zip(woven, completions)
    ), "trigger never chose"
    assert drift.insertions_for(model, "trigger", prompts, completions, cap=3) == woven


def test_always_insertions_are_where_the_engine_wove(tok):
    model = make_memgen(tok, seed=4)
    prompts = [tok(p)["input_ids"] for p in ("copy abc:", "Hello, world.")]
    out = model.generate(prompts, memory="always", max_new_tokens=20, max_insertions=2)
    completions = [c.token_ids for c in out.completions]
    assert drift.insertions_for(model, "always", prompts, completions, cap=2) == [
        c.insertion_positions for c in out.completions
    ]


def test_kl_is_zero_from_itself_and_positive_for_a_changed_model(tok):
    model = make_memgen(tok, seed=5)
    prompts = [tok(p)["input_ids"] for p in ("copy abc:", "copy bcd:", "Hello, world.")]
    completions = drift.sample_reference(model, prompts, max_new_tokens=12, seed=0)
    reference = drift.token_logprobs(model, prompts, completions, [[] for _ in prompts])
    assert drift.kl_from_reference(reference, reference)["kl"] == 0.0
    always = drift.insertions_for(model, "always", prompts, completions, cap=4)
    changed = drift.token_logprobs(model, prompts, completions, always)
    result = drift.kl_from_reference(reference, changed)
    assert result["kl"] > 0 and result["tokens"] == sum(len(c) for c in completions)


def test_lora_merged_into_float32_matches_the_unmerged_peft_model(tok, tmp_path):
    from conftest import make_base
    from peft import LoraConfig, get_peft_model

    from memgen.demo.real_model import RealDemoConfig

    cfg = RealDemoConfig(lora_r=4)
    base = make_base(tok)
    peft_model = get_peft_model(
        make_base(tok), LoraConfig(r=4, lora_alpha=8, target_modules=real_arms.memgen_config(cfg).lora_target_modules)
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path / "lora")
    merged = real_arms.lora_merged(base, tok, cfg, tmp_path / "lora")
    ids = torch.tensor([tok("copy abc: abc, abc.")["input_ids"]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = merged.reasoner_model(input_ids=ids).logits
    assert (want - make_base(tok)(input_ids=ids).logits).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_lora_arm_trains_on_the_tokens_weaver_sft_trains_on(tok, tmp_path):
    from memgen.train import WeaverTrainConfig
    from memgen.train.runner import Run
    from memgen.train.sft import sft_example

    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    try:
        records = toy_task_records(8)
        model = make_memgen(tok, randomize=False)
        from memgen.tasks import Task

        task = Task("toy", records, math_reward, {}, [])
        run = Run(
            WeaverTrainConfig(
                model="x",
                data="x",
                output_dir=str(tmp_path),
                use_chat_template=True,
                max_insertions=8,
                progress=False,
                tensorboard=False,
            ),
            "weaver",
            model,
            task,
        )
        for i, record in enumerate(records):
            prompt, completion, _, _ = sft_example(run, record, i, 0)
            assert real_arms.encode_sft(tok, record) == (prompt, completion)
    finally:
        tok.chat_template = None


def test_an_interrupted_lora_arm_resumes_to_the_uninterrupted_adapter(tok, tmp_path, monkeypatch):
    from conftest import make_base
    from safetensors.torch import load_file

    from memgen.demo.real_model import RealDemoConfig
    from memgen.tasks import Task

    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    # 12 records in batches of 4: the interruption falls in the second epoch's permutation.
    task = Task("toy", toy_task_records(12), math_reward, {}, [])
    cfg = RealDemoConfig(lora_r=4, sft_steps=6, batch_size=4, warmup_steps=2, save_every=2, progress=False)
    real_step, calls = real_arms.completion_nll_step, []

    def counted(*args, interrupt_at=None):
        calls.append(1)
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt  # as if the run were killed during its 5th step
        return real_step(*args)

    try:
        base = make_base(tok)
        monkeypatch.setattr(real_arms, "completion_nll_step", counted)
        real_arms.train_lora_sft(base, tok, cfg, tmp_path / "whole", task)
        calls.clear()
        monkeypatch.setattr(real_arms, "completion_nll_step", lambda *a: counted(*a, interrupt_at=5))
        with pytest.raises(KeyboardInterrupt):
            real_arms.train_lora_sft(base, tok, cfg, tmp_path / "killed", task)
        assert real_arms.train_info(tmp_path / "killed" / "adapters" / "lora_sft") is None  # nothing half-written
        calls.clear()
        monkeypatch.setattr(real_arms, "completion_nll_step", counted)
        real_arms.train_lora_sft(base, tok, cfg, tmp_path / "killed", task)
    finally:
        tok.chat_template = None
    assert len(calls) == 2  # steps 5 and 6 only: it resumed from the step-4 checkpoint
    want = load_file(tmp_path / "whole" / "adapters" / "lora_sft" / "adapter_model.safetensors")
    got = load_file(tmp_path / "killed" / "adapters" / "lora_sft" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=0, rtol=0)
    logged = [json.loads(line) for line in (tmp_path / "killed" / "runs" / "lora_sft" / "metrics.jsonl").open()]
    whole = [json.loads(line) for line in (tmp_path / "whole" / "runs" / "lora_sft" / "metrics.jsonl").open()]
    assert logged == whole and [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]


def test_a_cached_run_refuses_other_settings_and_accepts_more_seeds(tmp_path):
    from dataclasses import replace

    from memgen.demo.real_model import RealDemoConfig, check_settings
    from memgen.errors import ConfigError

    cfg = RealDemoConfig(out=str(tmp_path))
    check_settings(cfg, tmp_path)
    check_settings(replace(cfg, seeds=5, progress=False, arms=["vanilla"]), tmp_path)  # changes no cached number
    with pytest.raises(ConfigError, match="sft_steps: 150 -> 3"):
        check_settings(replace(cfg, sft_steps=3), tmp_path)


def test_a_run_without_the_memgen_arms_checks_no_claim_and_says_so():
    from memgen.demo.pipeline import claims_table
    from memgen.demo.real_model import check_claims

    def row(arm, in_domain):
        sets = {
            name: {"accuracy": in_domain, "mean_insertions": 0.0}
            for name in ("in_domain", "more_steps", "unseen_wording", "known")
        }
        return {"arm": arm, "sets": sets, "kl": {"kl": 0.0}}

    runs = [{"seed": 0, "arms": [row("vanilla", 0.1), row("lora_sft", 0.9)]}]
    assert check_claims(runs) == []
    assert "No claim to check" in claims_table([])
    runs[0]["arms"].append(row("memgen_sft", 0.5))
    claims = check_claims(runs)
    assert claims[0]["measure"] == "memgen_sft - vanilla, in-domain" and claims[0]["per_seed"] == [0.4]
    assert "| MemGen SFT beats vanilla in-domain by at least 0.2 |" in claims_table(claims)


def test_general_knowledge_splits_are_disjoint_and_one_reward_reads_numbers_and_words():
    splits = general_knowledge(0, {"train": 40, "validation": 16, "test": 64})
    questions = [r.prompt for s in splits.values() for r in s]
    assert len(questions) == len(set(questions)) == 120
    for record in splits["test"]:
        assert answer_reward([record.prompt], [record.completion], answer=[record.columns["answer"]]) == [1.0]
    assert general_knowledge(1, {"test": 5})["test"] != general_knowledge(0, {"test": 5})["test"]
    with pytest.raises(ValueError, match="general-knowledge questions"):
        general_knowledge(0, {"train": 200})
    completions = [
        "The capital of France is Paris.",
        "Parisian food.",
        "It is Mexico City.",
        "So 3 + 4 = 7. The answer is 7.",
        "The answer is 8.",
    ]
    golds = ["Paris", "Paris", "Mexico City", "7", "7"]
    assert answer_reward([""] * 5, completions, answer=golds) == [1.0, 0.0, 1.0, 1.0, 0.0]


def outcomes(payload: dict) -> list:
    """Per arm: accuracy and insertions per set, and the KL (timings left out)."""
    return [
        (
            row["arm"],
            row["kl"],
            {name: (cell["accuracy"], cell["mean_insertions"]) for name, cell in row["sets"].items()},
        )
        for row in payload["arms"]
    ]


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not beside the checkout")
def test_real_demo_quick_runs_end_to_end_and_resumes_from_its_cache(tmp_path):
    out = tmp_path / "real"
    command = [
        sys.executable,
        "-m",
        "memgen",
        "real-demo",
        "--quick",
        "--out",
        str(out),
        "--progress",
        "false",
        "--data-dir",
        str(DATA),
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    payload = json.loads((out / "results.json").read_text())
    for name in ("report.md", "accuracy.png", "kl.png", "seed-0/run.json"):
        assert (out / name).is_file(), name
    arms = [row["arm"] for row in payload["arms"]]
    assert arms == real_arms.ARMS
    vanilla = payload["arms"][0]
    assert vanilla["kl"]["mean"] == 0.0 and vanilla["sets"]["in_domain"]["mean_insertions"] == 0
    assert set(vanilla["sets"]) == {"in_domain", "more_steps", "unseen_wording", "known", "gsm8k"}
    assert "gsm8k" not in payload["arms"][-1]["sets"]  # memgen_grpo: no harm check (GSM8K_ARMS)
    reference = json.loads((out / "seed-0" / "kl_reference.json").read_text())
    assert len(reference["completions"]) == len(reference["logprobs"]) == 2  # --quick asks for 2 KL prompts
    always = next(r for r in payload["arms"] if r["arm"] == "memgen_sft")
    assert always["sets"]["in_domain"]["mean_insertions"] >= 1  # the prompt end at least
    assert {c["measure"] for c in payload["claims"]} >= {
        "memgen_sft - vanilla, in-domain",
        "KL(lora_sft) - KL(memgen_trigger)",
    }
    for arm in real_arms.ARMS[1:]:
        assert (out / "seed-0" / "adapters" / arm / "train.json").is_file(), arm
    for arm in ("memgen_trigger", "memgen_grpo"):  # RL rollouts sample at the demo's rollout temperature
        saved = yaml.safe_load((out / "seed-0" / "runs" / arm / "config.yaml").read_text())
        assert saved["temperature"] == payload["config"]["rollout_temperature"] == 0.7, arm
    assert "## The paper's claims on this model" in (out / "report.md").read_text()

    # A finished seed is read back, not re-run: the second run trains and decodes nothing.
    (out / "results.json").unlink()
    answers = {p: p.stat().st_mtime_ns for p in (out / "seed-0" / "answers").iterdir()}
    second = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "training" not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "seed-0" / "answers").iterdir()} == answers
    again = json.loads((out / "results.json").read_text())
    assert outcomes(again) == outcomes(payload) and again["claims"] == payload["claims"]

    # An arm whose scores are gone is re-scored from its saved adapter, with the same answers.
    (out / "seed-0" / "run.json").unlink()
    for path in (out / "seed-0" / "scores" / "memgen_sft").iterdir():
        path.unlink()
    third = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "training" not in third.stdout
    rescored = json.loads((out / "results.json").read_text())
    assert outcomes(rescored) == outcomes(payload)
