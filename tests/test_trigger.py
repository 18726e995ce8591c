"""The trigger head's input standardisation: what it reads, when it is calibrated, and old adapters."""

import json

import pytest
import torch
from conftest import PROMPTS, make_base, make_memgen, toy_task_records
from safetensors.torch import load_file, save_file

from memgen import MemGen, MemGenConfig
from memgen.errors import AdapterError
from memgen.model import MODULES_FILE
from memgen.tasks import Task
from memgen.train import TriggerTrainConfig, train_trigger


def trigger_config(tmp_path, **fields) -> TriggerTrainConfig:
    """A short in-memory trigger RL run of 4 prompts x 4 rollouts; ``fields`` set the rest."""
    return TriggerTrainConfig(
        model="in-memory",
        data="in-memory",
        output_dir=str(tmp_path / "t"),
        progress=False,
        save_every=0,
        per_device_batch_size=4,
        num_generations=4,
        learning_rate=1e-2,
        seed=0,
        **fields,
    )


def test_the_head_reads_only_decision_states(tok):
    model = make_memgen(tok)
    with model.trigger.recording() as seen:
        out = model.generate(PROMPTS, memory="trigger", max_new_tokens=20, insert_at_prompt_end=False)
    decisions = sum(len(c.insertions) for c in out.completions)
    assert decisions > len(PROMPTS)  # several decisions, so the count below means something
    assert sum(len(s) for s in seen) == decisions


def test_calibrating_an_untrained_head_changes_no_probability_then_standardises(tok):
    model = make_memgen(tok, randomize=False)
    head = model.trigger
    states = torch.randn(50, head.input_mean.numel()) * 5 + 3
    before = head(states)
    assert head.untrained and not bool(head.calibrated)
    head.calibrate(states.mean(0), states.std(0, unbiased=False))
    assert bool(head.calibrated)
    assert torch.equal(head(states), before)  # still init_prob everywhere
    with torch.no_grad():
        head.net[-1].weight.normal_()
    standardised = (states - states.mean(0)) / states.std(0, unbiased=False)
    assert torch.allclose(head(states), head.net(standardised).squeeze(-1), atol=1e-5)
    assert not head.untrained


def test_trigger_rl_calibrates_once_from_its_first_rollouts(tok, tmp_path):
    model = make_memgen(tok, randomize=False)
    config = trigger_config(tmp_path, max_new_tokens=16, max_steps=2)
    task = Task("toy", toy_task_records(), lambda p, c, **k: [0.0] * len(c), {}, [])
    seen_means = []
    original = model.trigger.calibrate
    model.trigger.calibrate = lambda mean, std, **kw: (seen_means.append(mean.clone()), original(mean, std, **kw))
    train_trigger(config, model=model, task=task, reward_fn=lambda p, texts, **k: [float(len(t) % 2) for t in texts])
    assert len(seen_means) == 1 and bool(model.trigger.calibrated)
    assert torch.equal(model.trigger.input_mean, seen_means[0])
    assert float(model.trigger.input_scale.min()) > 0 and not torch.equal(
        model.trigger.input_mean, torch.zeros_like(seen_means[0])
    )


def test_adapter_saved_before_standardisation_loads_with_the_identity(tok, tmp_path):
    model = make_memgen(tok)
    model.save_pretrained(tmp_path / "a")
    modules = load_file(str(tmp_path / "a" / MODULES_FILE))
    old = {k: v for k, v in modules.items() if not k.startswith(("trigger.input_", "trigger.calibrated"))}
    assert len(old) == len(modules) - 3
    save_file(old, str(tmp_path / "a" / MODULES_FILE))
    loaded = MemGen.from_pretrained(tmp_path / "a", model.reasoner_model, tok)
    assert not bool(loaded.trigger.calibrated)
    a = model.generate(PROMPTS, memory="trigger", max_new_tokens=20)
    b = loaded.generate(PROMPTS, memory="trigger", max_new_tokens=20)
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]


def test_prompt_end_head_is_saved_and_required(tok, tmp_path):
    config = MemGenConfig(
        prompt_latents=2, inference_latents=2, lora_r=4, trigger_hidden=16, trigger_at_prompt_end=True
    )
    model = MemGen(make_base(tok), tok, config)
    assert len(model.trigger_heads()) == 2 and model.decision_head(prompt_end=True) is model.prompt_trigger
    with torch.no_grad():
        model.prompt_trigger.net[-1].weight.normal_()
    model.save_pretrained(tmp_path / "a")
    loaded = MemGen.from_pretrained(tmp_path / "a", model.reasoner_model, tok)
    assert torch.equal(loaded.prompt_trigger.net[-1].weight, model.prompt_trigger.net[-1].weight)
    modules = load_file(str(tmp_path / "a" / MODULES_FILE))
    save_file(
        {k: v for k, v in modules.items() if not k.startswith("prompt_trigger.")}, str(tmp_path / "a" / MODULES_FILE)
    )
    with pytest.raises(AdapterError, match="prompt_trigger head"):
        MemGen.from_pretrained(tmp_path / "a", model.reasoner_model, tok)


def test_start_at_moves_an_untrained_head_everywhere_and_refuses_a_trained_one(tok):
    head = make_memgen(tok, randomize=False).trigger
    states = torch.randn(40, head.input_mean.numel()) * 4
    head.start_at(0.9)
    assert torch.allclose(torch.sigmoid(head(states)), torch.full((40,), 0.9), atol=1e-6)
    with torch.no_grad():
        head.net[-1].weight.normal_()
    with pytest.raises(ValueError, match="untrained"):
        head.start_at(0.5)


@pytest.mark.parametrize("init_prob", [0.1, 0.9])
def test_trigger_rl_first_rollouts_sample_at_init_prob(tok, tmp_path, init_prob):
    model = make_memgen(tok, randomize=False)
    config = trigger_config(tmp_path, max_new_tokens=24, max_steps=1, init_prob=init_prob)
    task = Task("toy", toy_task_records(), lambda p, c, **k: [0.0] * len(c), {}, [])
    train_trigger(config, model=model, task=task, reward_fn=lambda p, texts, **k: [float(len(t) % 2) for t in texts])
    first = json.loads((tmp_path / "t" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["decisions_per_rollout"] * 16 >= 24  # enough Bernoulli draws for the rate to mean something
    assert abs(first["invocation_rate"] - init_prob) < 0.15
