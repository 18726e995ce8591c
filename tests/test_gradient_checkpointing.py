"""Gradient checkpointing changes memory, not mathematics: the same loss and the same gradients, step for step.

float64 on tiny models: exactly equal (``torch.equal``). float32 on SmolLM2-135M-Instruct: within
float32 tolerance. Each test also checks that checkpointing really ran (layers were recomputed in
the backward pass), so a flag that silently did nothing would fail.
"""

import shutil
import subprocess

import pytest
import test_training
import torch
from conftest import make_memgen
from test_training import common, digit_reward, toy_task

from memgen.train import TriggerTrainConfig, WeaverTrainConfig, train_weaver
from memgen.train.grpo import grpo_step
from memgen.train.runner import Run
from memgen.train.trigger_rl import trigger_step

pytestmark = pytest.mark.slow
workspace = test_training.workspace  # the CLI runs' saved tiny model and data (a module fixture)


class LayerCalls:
    """Counts attention calls of the first decoder layer (recomputation in backward calls it again)."""

    def __init__(self, model):
        self.count = 0
        model.reasoner.backbone.layers[0].self_attn.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.count += 1


def one_step(model, config, trainable: str):
    """Loss, metrics and the gradient of every trainable tensor after one micro-step from the same state."""
    run = Run(config, trainable, model=model, task=toy_task())
    run.reward_fn = digit_reward
    step = {"sft": run.task.sft_step, "grpo": grpo_step, "trigger": trigger_step}[
        config.method if trainable == "weaver" else "trigger"
    ]
    calls = LayerCalls(run.unwrapped)
    loss, metrics = step(run, 0)
    forward_calls = calls.count
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in run.parameters]
    return loss.detach(), grads, calls.count - forward_calls


def configs(tmp_path, name, checkpointing, method):
    kw = dict(per_device_batch_size=4, num_generations=4, max_new_tokens=12, gradient_checkpointing=checkpointing)
    if method == "trigger":
        return TriggerTrainConfig(**common(tmp_path, f"{name}-{checkpointing}", sparsity_lambda=0.1, **kw)), "trigger"
    return WeaverTrainConfig(**common(tmp_path, f"{name}-{checkpointing}", method=method, **kw)), "weaver"


def assert_same_step(plain, checkpointed, exact: bool):
    (loss_a, grads_a, recomputed_a), (loss_b, grads_b, recomputed_b) = plain, checkpointed
    assert recomputed_a == 0 and recomputed_b > 0, "checkpointing should recompute layers in backward"
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads_a)
    if exact:
        assert torch.equal(loss_a, loss_b)
    else:
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        assert (a is None) == (b is None)
        if a is not None:
            if exact:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", ["sft", "grpo", "trigger"])
def test_one_step_gives_the_same_loss_and_gradients_float64(tok, tmp_path, method):
    steps = []
    for checkpointing in (False, True):
        model = make_memgen(tok, randomize=True).double()
        config, trainable = configs(tmp_path, method, checkpointing, method)
        steps.append(one_step(model, config, trainable))
    # Trigger RL trains only the head, on states no trainable tensor produced: nothing to recompute.
    if method == "trigger":
        (loss_a, grads_a, _), (loss_b, grads_b, _) = steps
        assert torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    else:
        assert_same_step(*steps, exact=True)


def test_retrieval_contexts_and_turn_starts_float64(tok):
    """Teacher forcing with retrieved text read by the weaver and prompt-query insertions past position 0."""
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    completions = [[12, 13, 14, 15, 16, 17], [18, 19, 20, 21, 22]]
    insertions = [[0, 2, 4], [0, 3]]
    kinds = [["prompt", "inference", "prompt"], ["prompt", "inference"]]
    contexts = [[[30, 31, 32], [], [33, 34]], [[35], [36, 37, 38, 39]]]
    results = []
    for checkpointing in (False, True):
        model = make_memgen(tok).double()
        if checkpointing:
            model.gradient_checkpointing_enable()
        calls = LayerCalls(model)
        out = model.teacher_forced(prompts, completions, insertions, contexts=contexts, kinds=kinds)
        loss = -(out.logprobs * out.mask).sum()
        before = calls.count
        loss.backward()
        grads = [p.grad.clone() for p in model.weaver_parameters() if p.grad is not None]
        results.append((loss.detach(), grads, calls.count - before))
    assert_same_step(*results, exact=True)


def test_decoding_is_unaffected(tok):
    model = make_memgen(tok)
    want = model.generate(["Hello, world."], memory="always", max_new_tokens=20).completions[0].token_ids
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    assert model.generate(["Hello, world."], memory="always", max_new_tokens=20).completions[0].token_ids == want


def test_resumed_run_with_checkpointing_reproduces_the_uninterrupted_one(tok, tmp_path):
    def config(name, steps, **kw):
        return WeaverTrainConfig(
            **common(tmp_path, name, max_steps=steps, save_every=2, per_device_batch_size=4, learning_rate=1e-2, **kw),
            gradient_checkpointing=True,
        )

    straight = train_weaver(config("straight", 4), model=make_memgen(tok).double(), task=toy_task())
    train_weaver(config("resumed", 2), model=make_memgen(tok).double(), task=toy_task())
    shutil.rmtree(tmp_path / "resumed" / "final")
    resumed = train_weaver(config("resumed", 4, resume=True), model=make_memgen(tok).double(), task=toy_task())
    from test_training import adapter_tensors

    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_real_model_one_step_within_float32_tolerance(smollm2_dir, tmp_path, method):
    from memgen import MemGen, MemGenConfig
    from memgen.data import Record
    from memgen.loading import load_base
    from memgen.tasks import Task

    records = [
        Record("Tom has 5 apples and gets 3 more. How many now?", " He has 5 + 3 = 8 apples, so the answer is 8.", {}),
        Record("What is 7 times 6?", " 7 times 6 is 42. The answer is 42.", {}),
    ] * 2
    # A reward that differs between rollouts, so GRPO's advantages (and gradients) are not all zero.
    task = Task("arith", records, lambda p, c, **k: [float(len(x) % 3) for x in c], {}, [])
    steps = []
    for checkpointing in (False, True):
        base, tokenizer = load_base(smollm2_dir)
        torch.manual_seed(0)
        model = MemGen(base, tokenizer, MemGenConfig(prompt_latents=4, inference_latents=4, lora_r=4))
        config = WeaverTrainConfig(
            **common(
                tmp_path,
                f"real-{method}-{checkpointing}",
                method=method,
                per_device_batch_size=2,
                num_generations=4,
                max_new_tokens=10,
                temperature=1.0,
                gradient_checkpointing=checkpointing,
            )
        )
        run = Run(config, "weaver", model=model, task=task)
        run.reward_fn = task.reward_function(config)
        calls = LayerCalls(model)
        loss, _ = (run.task.sft_step if method == "sft" else grpo_step)(run, 0)
        before = calls.count
        loss.backward()
        steps.append(
            (
                loss.detach(),
                [p.grad.clone() if p.grad is not None else None for p in run.parameters],
                calls.count - before,
            )
        )
    assert_same_step(*steps, exact=False)


def test_two_processes_with_checkpointing_match_one_without(workspace, tmp_path):
    from test_training import ENV, adapter_tensors, train_cmd

    from memgen.train.logging import read_metrics

    launcher = test_training.two_processes(29523)
    steps = ["--max-steps", "4"]
    two = subprocess.run(
        train_cmd(
            workspace,
            tmp_path / "two",
            *steps,
            "--per-device-batch-size",
            "4",
            "--gradient-checkpointing",
            "true",
            launcher=launcher,
        ),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        train_cmd(workspace, tmp_path / "one", *steps, "--per-device-batch-size", "8"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    rows_two, rows_one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert [r["loss"] for r in rows_two] == pytest.approx([r["loss"] for r in rows_one], abs=1e-5)
    a, b = adapter_tensors(tmp_path / "one" / "final"), adapter_tensors(tmp_path / "two" / "final")
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-4
