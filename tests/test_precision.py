"""Precision: bf16 only where it is native, trainable weights in fp32 on a bf16 base, GRPO ratios exactly 1."""

import pytest
import torch
from conftest import make_base, toy_task_records

from memgen import MemGen, MemGenConfig
from memgen import precision as precision_module
from memgen.demo.reasoner import ReasonerConfig
from memgen.precision import resolve_precision
from memgen.train import WeaverTrainConfig, train_weaver
from memgen.train.logging import read_metrics


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_uses_bf16_only_where_native(monkeypatch, native):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native)
    choice = resolve_precision("auto", "cpu")
    assert choice.precision == ("bf16" if native else "fp32")
    assert "cpu_capability" in choice.as_dict()
    if native:
        assert resolve_precision("bf16", "cpu").precision == "bf16"
    else:
        with pytest.warns(RuntimeWarning, match="no native bf16.*36x slower"):
            assert resolve_precision("bf16", "cpu").precision == "bf16"
    assert resolve_precision("fp32", "cpu").precision == "fp32"


def test_capability_probe_follows_the_dispatch_level(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert precision_module.cpu_has_native_bf16() is False  # AVX2 kernels emulate bf16 whatever the flags say


def test_reasoner_cache_key_depends_on_precision():
    assert ReasonerConfig(precision="fp32").key() != ReasonerConfig(precision="bf16").key()


def test_weaver_trainable_weights_stay_fp32_on_a_bf16_base(tok):
    base = make_base(tok, dtype=torch.bfloat16)
    model = MemGen(base, tok, MemGenConfig(prompt_latents=2, inference_latents=2, lora_r=4))
    assert all(p.dtype == torch.float32 for p in model.weaver_parameters() + model.trigger_parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.reasoner_parameters())
    # A small update survives: in bf16, 1e-4 on a weight of ~0.1 (spacing ~5e-4) would round away.
    lora_a = model.weaver.adapter_parameters()[0]
    before = lora_a.detach().clone()
    optimizer = torch.optim.SGD(model.weaver_parameters(), lr=1.0)
    prompt = model.encode_prompts("Hello, world.")[0]
    tf = model.teacher_forced([prompt], [list(range(10, 30))], [[0, 4, 9]])
    loss = -(tf.logprobs * tf.mask).sum()
    loss.backward()
    with torch.no_grad():
        lora_a.grad.copy_(torch.full_like(lora_a, 1e-4))
    optimizer.step()
    assert torch.allclose(lora_a - before, torch.full_like(lora_a, -1e-4), atol=1e-7)
    out = model.generate("Hello, world.", memory="always", max_new_tokens=8)  # runs on the bf16 base
    assert len(out.completions[0].token_ids) == 8


def test_grpo_first_iteration_ratio_is_exactly_one_on_a_bf16_base(tok, tmp_path):
    from memgen.tasks import Task

    base = make_base(tok, dtype=torch.bfloat16)
    model = MemGen(base, tok, MemGenConfig(prompt_latents=2, inference_latents=2, lora_r=4))
    config = WeaverTrainConfig(
        model="in-memory",
        data="in-memory",
        output_dir=str(tmp_path / "grpo"),
        progress=False,
        save_every=0,
        method="grpo",
        max_steps=4,
        per_device_batch_size=2,
        num_generations=4,
        max_new_tokens=8,
        learning_rate=1e-2,
        num_iterations=2,
        seed=0,
    )
    task = Task("toy", toy_task_records(), lambda p, c, **k: [float(len(x) % 3) for x in c], {}, [])
    train_weaver(config, model=model, task=task)
    rows = read_metrics(config.output_dir)
    assert [r["ratio_max_deviation"] for r in rows[0::2]] == [0.0, 0.0]  # first iteration of each rollout batch
    assert rows[1]["ratio_max_deviation"] > 0  # the second iteration sees the updated weaver


@pytest.mark.parametrize("native", [True, False])
def test_auto_base_dtype_is_bfloat16_only_where_native(monkeypatch, native):
    from memgen.precision import resolve_base_dtype

    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native)
    dtype, reason = resolve_base_dtype("auto", "cpu")
    assert dtype == (torch.bfloat16 if native else torch.float32) and reason.startswith("auto")
    assert resolve_base_dtype("float32", "cpu")[0] == torch.float32
    with pytest.raises(Exception, match="base dtype must be one of"):
        resolve_base_dtype("fp8", "cpu")
