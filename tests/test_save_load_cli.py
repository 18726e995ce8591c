"""(f) save then load reproduces generation; (g) a mismatched base is refused; the CLI end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import PROMPTS, make_base, make_memgen

from memgen import AdapterError, MemGen

CLI = [sys.executable, "-m", "memgen"]
GEN = dict(memory="trigger", max_new_tokens=40, trigger_threshold=0.3, do_sample=True, seed=4, return_logprobs=True)


def test_save_then_load_reproduces_generation(tok, tmp_path):
    model = make_memgen(tok)
    before = model.generate(PROMPTS, **GEN)
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "memgen_config.json",
        "memgen_modules.safetensors",
    ):
        assert name in files
    restored = MemGen.from_pretrained(tmp_path / "adapter", make_base(tok), tok)
    after = restored.generate(PROMPTS, **GEN)
    assert [c.token_ids for c in after.completions] == [c.token_ids for c in before.completions]
    assert [c.insertion_positions for c in after.completions] == [c.insertion_positions for c in before.completions]
    assert [c.logprobs for c in after.completions] == [c.logprobs for c in before.completions]
    # A fresh, untrained MemGen on the same base behaves differently, so the check above is not vacuous.
    fresh = MemGen(make_base(tok), tok, model.config).generate(PROMPTS, **GEN)
    assert [c.token_ids for c in fresh.completions] != [c.token_ids for c in before.completions]


def test_save_is_atomic_and_overwrites(tok, tmp_path):
    model = make_memgen(tok)
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    with torch.no_grad():
        model.weaver.prompt_queries.add_(1.0)
    model.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no scratch or retired dirs left
    restored = MemGen.from_pretrained(target, make_base(tok), tok)
    assert torch.equal(restored.weaver.prompt_queries, model.weaver.prompt_queries)


def test_failed_save_keeps_previous_checkpoint(tok, tmp_path, monkeypatch):
    model = make_memgen(tok)
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    snapshot = {p.name: p.read_bytes() for p in target.iterdir()}
    import memgen.model as model_module

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_module, "save_file", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(seed=1), "different base weights"),
        (dict(hidden_size=32), "hidden_size"),
        (dict(arch="llama"), "model_type"),
        (dict(num_layers=3), "num_hidden_layers"),
    ],
)
def test_mismatched_base_is_refused(tok, tmp_path, change, reason):
    make_memgen(tok).save_pretrained(tmp_path / "adapter")
    kwargs = dict(arch="qwen2", seed=0)
    kwargs.update(change)
    with pytest.raises(AdapterError, match=reason):
        MemGen.from_pretrained(tmp_path / "adapter", make_base(tok, **kwargs), tok)


def test_vocab_mismatch_is_refused(tok, tmp_path):
    from memgen.tiny import tiny_causal_lm, tiny_tokenizer

    make_memgen(tok).save_pretrained(tmp_path / "adapter")
    other_tok = tiny_tokenizer(alphabet="abc .,\n")
    with pytest.raises(AdapterError, match="vocab_size"):
        MemGen.from_pretrained(tmp_path / "adapter", tiny_causal_lm(other_tok, init_std=0.2), other_tok)


def test_missing_or_foreign_adapter_dir(tok, tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        MemGen.from_pretrained(tmp_path / "nope", make_base(tok), tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="not a memgen adapter"):
        MemGen.from_pretrained(tmp_path / "empty", make_base(tok), tok)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("cli")
    base = make_base(tok)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    model = make_memgen(tok)
    model.save_pretrained(root / "adapter")
    return root, model


def run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_cli_generate_json_matches_python_api(saved):
    root, model = saved
    proc = run_cli(
        "generate",
        "--model",
        str(root / "base"),
        "--adapter",
        str(root / "adapter"),
        "--prompt",
        PROMPTS[2],
        "--memory",
        "always",
        "--max-new-tokens",
        "30",
        "--seed",
        "3",
        "--do-sample",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) >= {"text", "token_ids", "insertions"}
    expected = model.generate(PROMPTS[2], memory="always", max_new_tokens=30, seed=3, do_sample=True).completions[0]
    assert result["token_ids"] == expected.token_ids
    assert result["text"] == expected.text
    assert [i["position"] for i in result["insertions"] if i["inserted"]] == expected.insertion_positions


@pytest.mark.slow
def test_cli_streams_plain_text(saved):
    root, model = saved
    proc = run_cli(
        "generate", "--model", str(root / "base"), "--prompt", "Hello", "--memory", "off", "--max-new-tokens", "20"
    )
    assert proc.returncode == 0, proc.stderr
    expected = model.generate("Hello", memory="off", max_new_tokens=20).completions[0].text
    assert proc.stdout == expected + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "prompt 0 is empty"),
        (["--prompt", "hi", "--memory", "sometimes"], "unknown memory policy"),
        (["--prompt", "hi", "--adapter", "/nonexistent/adapter"], "does not exist"),
        (["--prompt", "x" * 1100], "does not fit the model's context"),
    ],
)
@pytest.mark.slow
def test_cli_bad_input_gives_clean_error(saved, args, message):
    root, _ = saved
    proc = run_cli("generate", "--model", str(root / "base"), *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_missing_model_dir(tmp_path):
    proc = run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_fingerprint_samples_parameters_above_2_to_the_24_entries():
    """float32 cannot hold every integer above 2**24: the sampled indices must still be exact and in range."""
    from memgen.checkpoint import SAMPLES_PER_TENSOR, sample_indices, weights_fingerprint

    numel = 49152 * 576  # SmolLM2-135M's embedding: float32 linspace put its last index past the end
    index = sample_indices(numel, SAMPLES_PER_TENSOR)
    assert index[0] == 0 and index[-1] == numel - 1 and bool((index[1:] > index[:-1]).all())
    module = torch.nn.Module()
    module.big = torch.nn.Parameter(torch.arange(numel, dtype=torch.float32) % 251, requires_grad=False)
    fingerprint = weights_fingerprint(module)
    with torch.no_grad():
        module.big[-1] += 1000  # the last entry is sampled, so changing it changes the fingerprint
    assert weights_fingerprint(module) != fingerprint
    # Small tensors keep the indices they always had, so adapters saved before still match.
    for small in (1, 7, 2048, 100_003, 1 << 24):
        expected = torch.linspace(0, small - 1, min(SAMPLES_PER_TENSOR, small)).long()
        assert torch.equal(sample_indices(small, min(SAMPLES_PER_TENSOR, small)), expected)
