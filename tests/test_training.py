"""Recipe tests: the real training entry points on tiny models, a few steps each, asserting recorded values."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_memgen
from safetensors.torch import load_file

from memgen import MemGen, MemGenConfig
from memgen.data import DataError, Record, load_records
from memgen.tasks import Task
from memgen.tiny import tiny_causal_lm, tiny_tokenizer
from memgen.train import TriggerTrainConfig, WeaverTrainConfig, train_trigger, train_weaver
from memgen.train.logging import read_metrics
from memgen.train.trigger_rl import sparsity_penalties

pytestmark = pytest.mark.slow  # every test here trains, loads a real model or runs a subprocess

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")


def toy_records(n=64, seed=0, varied=False):
    """Copy tasks; ``varied`` gives words of 2-6 letters, so completions differ in length."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = "".join(rng.choice("abcde") for _ in range(rng.randint(2, 6) if varied else 3))
        out.append(Record(f"copy {w}:", f" {w}, {w}.", {"answer": f"{w}, {w}."}))
    return out


def toy_task():
    return Task("toy", toy_records(), lambda p, c, **k: [0.0] * len(c), {}, [])


def common(tmp_path, name, **kw):
    base = dict(
        model="in-memory",
        data="in-memory",
        output_dir=str(tmp_path / name),
        progress=False,
        save_every=0,
        per_device_batch_size=8,
        seed=0,
    )
    base.update(kw)
    return base


def test_weaver_sft_loss_falls(tok, tmp_path):
    config = WeaverTrainConfig(**common(tmp_path, "sft", max_steps=30, learning_rate=1e-2))
    final = train_weaver(config, model=make_memgen(tok, randomize=False), task=toy_task())
    losses = [row["loss"] for row in read_metrics(config.output_dir)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert (final / "memgen_config.json").is_file()
    row = read_metrics(config.output_dir)[-1]
    for key in ("loss", "latent_norm", "tokens_per_s", "grad_norm", "lr"):
        assert key in row


def digit_reward(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c[:8]) / 8 for c in completions]


def test_weaver_grpo_raises_reward(tok, tmp_path):
    # 8 prompts x 8 rollouts per step at lr 3e-2: at 4 prompts and lr 5e-2 the gain over 60 steps ranged
    # 1.4-2.5x across seeds and float noise; this setting gave 4.1-6.0x over seeds 0-2.
    config = WeaverTrainConfig(
        **common(
            tmp_path,
            "grpo",
            method="grpo",
            max_steps=80,
            per_device_batch_size=8,
            num_generations=8,
            max_new_tokens=8,
            learning_rate=3e-2,
        )
    )
    train_weaver(config, model=make_memgen(tok, randomize=False), task=toy_task(), reward_fn=digit_reward)
    rewards = [row["reward_mean"] for row in read_metrics(config.output_dir)]
    assert sum(rewards[-5:]) / 5 > 2 * sum(rewards[:5]) / 5
    assert all("clip_ratio" in row for row in read_metrics(config.output_dir))


@pytest.mark.parametrize("loss_type", ["dr_grpo", "dapo"])
def test_grpo_loss_types_and_iterations_run(tok, tmp_path, loss_type):
    config = WeaverTrainConfig(
        **common(
            tmp_path,
            loss_type,
            method="grpo",
            max_steps=4,
            per_device_batch_size=2,
            num_generations=4,
            max_new_tokens=6,
            learning_rate=1e-2,
            loss_type=loss_type,
            num_iterations=2,
            beta=0.05,
            epsilon_high=0.28,
            scale_rewards=False,
        )
    )
    train_weaver(config, model=make_memgen(tok, randomize=False), task=toy_task(), reward_fn=digit_reward)
    rows = read_metrics(config.output_dir)
    assert len(rows) == 4 and all(r["kl"] >= 0 for r in rows)
    # Rollouts are reused for num_iterations steps: steps 1-2 and 3-4 share rewards.
    assert rows[0]["reward_mean"] == rows[1]["reward_mean"] and rows[2]["reward_mean"] == rows[3]["reward_mean"]


def test_sparsity_penalty_matches_paper_formula():
    # Group of 4: rewards [1, 1, 0, 0] -> median 0.5 -> good rollouts are the first two.
    decisions = [[True, False], [True, True, False, False], [True, True, True], []]
    penalties, p_bars = sparsity_penalties([1.0, 1.0, 0.0, 0.0], decisions, group=4, lam=0.2)
    p_bar = (0.5 + 0.5) / 2
    assert p_bars == [p_bar]
    assert penalties == pytest.approx([0.2 * 1 * (1 - p_bar), 0.2 * 2 * (1 - p_bar), 0.2 * 3 * (1 - p_bar), 0.0])


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_trigger_rl_sparsity_lowers_invocation_only_with_lambda(tok, tmp_path, lam):
    config = TriggerTrainConfig(
        **common(
            tmp_path,
            f"trigger{lam}",
            max_steps=15,
            per_device_batch_size=4,
            num_generations=8,
            max_new_tokens=24,
            learning_rate=5e-2,
            sparsity_lambda=lam,
        )
    )
    model = make_memgen(tok, randomize=False)
    weaver_before = [p.detach().clone() for p in model.weaver_parameters()]
    # Memory cannot help here: every rollout earns the same task reward.
    train_trigger(config, model=model, task=toy_task(), reward_fn=lambda p, c, **k: [1.0] * len(c))
    rows = read_metrics(config.output_dir)
    first, last = sum(r["invocation_rate"] for r in rows[:3]) / 3, sum(r["invocation_rate"] for r in rows[-3:]) / 3
    assert all(r["decisions_per_rollout"] > 1 for r in rows)
    if lam > 0:
        assert last < 0.5 * first
        assert any(r["penalty_mean"] > 0 for r in rows)
    else:
        assert last > first - 0.15
        assert all(r["penalty_mean"] == 0 for r in rows)
    assert all(torch.equal(a, b) for a, b in zip(weaver_before, model.weaver_parameters()))


# ------------------------------------------------------------------ CLI runs: resume and 2 processes
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tok = tiny_tokenizer()
    base = tiny_causal_lm(tok, hidden_size=128, num_layers=4)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    with open(root / "sft.jsonl", "w") as handle:
        for r in toy_records(varied=True):
            handle.write(
                json.dumps({"prompt": r.prompt, "completion": r.completion, "answer": r.columns["answer"]}) + "\n"
            )
    (root / "toy_rewards.py").write_text(
        "def digits(prompts, completions, **columns):\n"
        "    return [sum(ch.isdigit() for ch in c[:8]) / 8 for c in completions]\n"
    )
    MemGen(
        tiny_causal_lm(tok, hidden_size=128, num_layers=4),
        tok,
        MemGenConfig(prompt_latents=2, inference_latents=2, lora_r=4),
    ).save_pretrained(root / "weaver")
    return root


def train_cmd(ws, out, *extra, launcher=None):
    args = [
        "-m",
        "memgen",
        "train",
        "weaver",
        "--method",
        "sft",
        "--model",
        str(ws / "base"),
        "--data",
        str(ws / "sft.jsonl"),
        "--output-dir",
        str(out),
        "--learning-rate",
        "1e-2",
        "--prompt-latents",
        "2",
        "--inference-latents",
        "2",
        "--lora-r",
        "4",
        "--progress",
        "false",
        "--insertion",
        "random",
        *extra,
    ]
    return (launcher or [sys.executable]) + args


def adapter_tensors(directory):
    tensors = {}
    for name in ("adapter_model.safetensors", "memgen_modules.safetensors"):
        tensors.update(load_file(str(Path(directory) / name)))
    return tensors


def test_killed_run_resumes_to_the_same_parameters(workspace, tmp_path):
    steps = ["--max-steps", "40", "--save-every", "4", "--per-device-batch-size", "8"]
    straight = tmp_path / "straight"
    subprocess.run(train_cmd(workspace, straight, *steps), env=ENV, check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        train_cmd(workspace, killed, *steps), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / "checkpoint-000008" / "trainer_state.pt").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "final").exists()
    logged_before = [r["step"] for r in read_metrics(killed)]
    resumed = subprocess.run(
        train_cmd(workspace, killed, *steps, "--resume"), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = adapter_tensors(straight / "final"), adapter_tensors(killed / "final")
    assert a.keys() == b.keys()
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6
    # What a real resume implies: it starts after a checkpoint (not at step 0), and every step is logged once.
    match = re.search(r"resumed from \S*checkpoint-(\d+) at step (\d+)", resumed.stderr)
    assert match and int(match.group(1)) == int(match.group(2)) >= 8
    start = int(match.group(2))
    assert start % 4 == 0 and start <= max(logged_before)
    assert [r["step"] for r in read_metrics(killed)] == list(range(1, 41))
    assert [r["step"] for r in read_metrics(straight)] == list(range(1, 41))


def test_existing_checkpoints_need_resume(workspace, tmp_path):
    out = tmp_path / "run"
    subprocess.run(train_cmd(workspace, out, "--max-steps", "2"), env=ENV, check=True, capture_output=True)
    again = subprocess.run(train_cmd(workspace, out, "--max-steps", "2"), env=ENV, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr


def two_processes(port: int) -> list[str]:
    """``accelerate launch`` of 2 gloo processes on CPU, on its own rendezvous port."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"] + [
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
    ]


def test_two_processes_match_one_process_with_doubled_batch(workspace, tmp_path):
    launcher = two_processes(29517)
    two = subprocess.run(
        train_cmd(workspace, tmp_path / "two", "--max-steps", "5", "--per-device-batch-size", "4", launcher=launcher),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        train_cmd(workspace, tmp_path / "one", "--max-steps", "5", "--per-device-batch-size", "8"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr
    rows_two, rows_one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert [r["tokens"] for r in rows_two] == [r["tokens"] for r in rows_one]  # same global batches
    assert [r["loss"] for r in rows_two] == pytest.approx([r["loss"] for r in rows_one], abs=1e-5)
    a, b = adapter_tensors(tmp_path / "one" / "final"), adapter_tensors(tmp_path / "two" / "final")
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-4


def test_malformed_lines_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"prompt": "a", "completion": "b"}\n{not json}\n{"prompt": "c"}\n{"prompt": "d", "completion": "e"}\n'
    )
    with pytest.raises(DataError, match=rf"{path}:2: "):
        load_records(path)
    with pytest.warns(UserWarning, match="skipped"):  # each line, then the count
        report = load_records(path, skip_malformed=True)
    assert [r.prompt for r in report.records] == ["a", "d"]
    assert [m.split(": ")[0] for m in report.skipped] == [f"{path}:2", f"{path}:3"]


def test_chat_messages_records(tok):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."}], "answer": "x"}
    ]
    record = load_records(rows).records[0]
    assert (
        record.prompt == "user: hi\nassistant:" and record.completion == "hello." and record.columns == {"answer": "x"}
    )


def test_resume_refuses_changed_settings(workspace, tmp_path):
    out = tmp_path / "run"
    subprocess.run(
        train_cmd(workspace, out, "--max-steps", "3", "--save-every", "2"), env=ENV, check=True, capture_output=True
    )
    shutil.rmtree(out / "final")
    changed = subprocess.run(
        train_cmd(workspace, out, "--max-steps", "3", "--resume", "--learning-rate", "5e-3", "--seed", "3"),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "learning_rate: 0.01 in the checkpoint, 0.005 now" in changed.stderr and "seed: 0" in changed.stderr
    # Display-only settings may change, and a constant-LR run may be extended.
    longer = subprocess.run(
        train_cmd(workspace, out, "--max-steps", "4", "--resume", "--save-every", "1"),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert longer.returncode == 0, longer.stderr
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


LAUNCH_2 = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def rl_cmd(ws, out, target, port, *extra):
    method = ["--method", "grpo", "--num-iterations", "2"] if target == "weaver" else ["--adapter", str(ws / "weaver")]
    return LAUNCH_2 + [
        "--main_process_port",
        str(port),
        "-m",
        "memgen",
        "train",
        target,
        *method,
        "--model",
        str(ws / "base"),
        "--data",
        str(ws / "sft.jsonl"),
        "--output-dir",
        str(out),
        "--learning-rate",
        "5e-2",
        "--per-device-batch-size",
        "2",
        "--num-generations",
        "4",
        "--max-new-tokens",
        "8",
        "--reward-funcs",
        "toy_rewards:digits",
        "--progress",
        "false",
        "--max-steps",
        "4",
        "--prompt-latents",
        "2",
        "--inference-latents",
        "2",
        "--lora-r",
        "4",
        *extra,
    ]


CHECKPOINTING = ("--gradient-checkpointing", "true")


@pytest.mark.parametrize("target", ["weaver", "trigger"], ids=["grpo-2-iterations", "trigger-rl"])
def test_two_process_rl_resumes_to_the_uninterrupted_run(workspace, tmp_path, target):
    """2 processes, interrupted after step 1 (mid-way through GRPO's 2 iterations): every rank gets its own
    cached rollouts and RNG back, so the resumed run ends where the uninterrupted one does. The interrupted
    run trains with gradient checkpointing and the uninterrupted one without: the same gradients either way."""
    env = dict(ENV, PYTHONPATH=str(workspace))
    straight = subprocess.run(
        rl_cmd(workspace, tmp_path / "straight", target, 29531), env=env, capture_output=True, text=True, timeout=600
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    cut = tmp_path / "cut"
    first = subprocess.run(
        rl_cmd(workspace, cut, target, 29532, "--save-every", "1", "--save-total-limit", "9", *CHECKPOINTING),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in (cut / "checkpoint-000001" / "ranks").iterdir()) == ["rank-0.pt", "rank-1.pt"]
    for name in ("checkpoint-000002", "checkpoint-000003", "checkpoint-000004", "final"):
        shutil.rmtree(cut / name, ignore_errors=True)
    resumed = subprocess.run(
        rl_cmd(
            workspace, cut, target, 29533, "--save-every", "1", "--save-total-limit", "9", "--resume", *CHECKPOINTING
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 1" in resumed.stderr
    rows, reference = read_metrics(cut), read_metrics(tmp_path / "straight")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["reward_mean"] for r in rows] == pytest.approx([r["reward_mean"] for r in reference], abs=1e-6)
    a, b = adapter_tensors(tmp_path / "straight" / "final"), adapter_tensors(cut / "final")
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6
    if target == "trigger":
        assert all(r["decisions_per_rollout"] > 0 for r in rows)


def test_p_bar_leaves_out_rollouts_that_made_no_decision():
    # Good rollouts (reward >= median 0.5): one invoked at 1 of 2 delimiters, one had no delimiter at all.
    penalties, p_bars = sparsity_penalties(
        [1.0, 1.0, 0.0, 0.0], [[True, False], [], [True, True], [True]], group=4, lam=1.0
    )
    assert p_bars == [0.5]  # counting the empty rollout as rate 0 would give 0.25
    assert penalties == pytest.approx([0.5, 0.0, 1.0, 0.5])
    # No good rollout decided anything: none of them invoked memory, so p̄ = 0.
    penalties, p_bars = sparsity_penalties([1.0, 0.0], [[], [True, False]], group=2, lam=1.0)
    assert p_bars == [0.0] and penalties == pytest.approx([0.0, 1.0])
