"""Delimiters, the LoRA switch contract, configs, streaming, stop strings, shared-prefix sampling, errors."""

import pytest
import torch
from conftest import PROMPTS, make_base, make_memgen

from memgen import ConfigError, GenerateConfig, InputError, MemGen, MemGenConfig, MemoryPolicy
from memgen.delimiters import delimiter_token_ids
from memgen.weaver import INFERENCE


def test_delimiters_come_from_vocabulary_including_merged_tokens(tok):
    ids = delimiter_token_ids(tok, [",", ".", "\n"])
    texts = sorted(tok.decode([i]) for i in ids)
    assert texts == sorted([",", ".", "\n", ".\n"])
    assert tok.convert_tokens_to_ids(", ") not in ids  # ends with a space, not a delimiter
    assert tok.eos_token_id not in ids and tok.pad_token_id not in ids


def test_lora_is_in_the_reasoner_only_during_weaver_passes(tok):
    from peft.tuners.lora import LoraLayer

    model = make_memgen(tok)
    plain = make_base(tok)
    ids = torch.tensor([model.encode_prompts(PROMPTS[2])[0]])
    assert not any(isinstance(m, LoraLayer) for m in model.reasoner_model.modules())
    with torch.no_grad():
        outside = model.reasoner_model(input_ids=ids).logits
        with model.weaver.lora_active():
            assert sum(isinstance(m, LoraLayer) for m in model.reasoner_model.modules()) == len(
                model.weaver.lora_layers
            )
            inside = model.reasoner_model(input_ids=ids).logits
        reference = plain(input_ids=ids).logits
    assert torch.equal(outside, reference)
    assert (inside - reference).abs().max() > 1e-3
    assert all(p.requires_grad for p in model.weaver.adapter_parameters())
    assert not any(p.requires_grad for p in model.reasoner_parameters())
    # Registered under the weaver, so optimizers / DDP / .to() see the adapter.
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names) and any("prompt_queries" in n for n in names)


def test_weaver_leaves_no_query_slots_in_cache(tok):
    model = make_memgen(tok)
    reasoner = model.reasoner
    ids = torch.tensor([model.encode_prompts(PROMPTS[0])[0]])
    cache = reasoner.new_cache()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = reasoner.hidden(
            input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1])[None], cache=cache
        )
        keys_before = cache.layers[0].keys.clone()
        latents = model.weaver.weave(
            reasoner, cache, mask, torch.tensor([ids.shape[1]]), torch.tensor([True]), INFERENCE, hidden[:, -1]
        )
    assert latents.shape == (1, model.config.inference_latents, reasoner.hidden_size)
    assert cache.get_seq_length() == ids.shape[1]
    assert torch.equal(cache.layers[0].keys, keys_before)


def test_latent_init_text_starts_latents_at_its_token_embeddings(tok):
    base = make_base(tok)
    model = MemGen(base, tok, MemGenConfig(prompt_latents=3, inference_latents=2, lora_r=4, latent_init_text="ab"))
    ids = tok("ab", add_special_tokens=False)["input_ids"]
    table = model.reasoner.embed_tokens.weight.detach()
    expected = table[torch.tensor([ids[i % len(ids)] for i in range(3)])]
    expected = expected * (model.weaver.target_norm / expected.norm(dim=-1, keepdim=True))
    out = model.generate(PROMPTS, memory="always", max_new_tokens=6, return_latents=True)
    for completion in out.completions:
        first = completion.insertions[0]
        assert first.position == 0 and first.inserted
        torch.testing.assert_close(first.latents, expected, atol=1e-5, rtol=0)
    # The context paths grow from zero like a LoRA's B: the projection learns on the first step,
    # the queries and the anchor map once it is non-zero.
    prompts = model.encode_prompts(PROMPTS)
    completions = [list(range(5, 15))] * len(PROMPTS)
    optimizer = torch.optim.SGD(model.weaver_parameters(), lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        tf = model.teacher_forced(prompts, completions, [[0, 4]] * len(PROMPTS))
        (-(tf.logprobs * tf.mask).sum()).backward()
        assert model.weaver.projection.weight.grad.abs().sum() > 0
        assert model.weaver.inference_offsets.grad.abs().sum() > 0
        context_grads = model.weaver.anchor_map.weight.grad.abs().sum() + model.weaver.prompt_queries.grad.abs().sum()
        assert (context_grads > 0) == (step == 1)
        optimizer.step()
    with pytest.raises(ConfigError, match="latent_init_text"):
        MemGenConfig(latent_init_text="")


def test_latent_init_text_alternatives_average_slot_by_slot(tok):
    base = make_base(tok)
    model = MemGen(base, tok, MemGenConfig(prompt_latents=2, inference_latents=2, lora_r=4, latent_init_text="ab|cd"))
    table = model.reasoner.embed_tokens.weight.detach()
    ab, cd = (table[torch.tensor(tok(t, add_special_tokens=False)["input_ids"])] for t in ("ab", "cd"))
    torch.testing.assert_close(model.weaver.prompt_offsets.detach(), (ab + cd) / 2)
    assert not torch.allclose(model.weaver.prompt_offsets.detach(), ab)
    with pytest.raises(InputError, match="same number of tokens"):
        MemGen(
            make_base(tok),
            tok,
            MemGenConfig(prompt_latents=2, inference_latents=2, lora_r=4, latent_init_text="ab|abc"),
        )


def test_trigger_costs_no_extra_forward(tok):
    model = make_memgen(tok)
    calls = []
    handle = model.reasoner.backbone.register_forward_hook(lambda *a: calls.append(1))
    out = model.generate(
        PROMPTS[:1], memory="trigger", trigger_threshold=1.1, max_new_tokens=30, insert_at_prompt_end=False
    )
    handle.remove()
    decisions = len(out.completions[0].insertions)
    assert decisions > 0 and out.completions[0].num_insertions == 0
    assert len(calls) == 1 + (len(out.completions[0].token_ids) - 1)  # prefill + one per fed token


def test_memory_policy_parsing():
    assert MemoryPolicy.parse("random:0.25") == MemoryPolicy("random", 0.25)
    assert str(MemoryPolicy.parse("TRIGGER")) == "trigger"
    for bad in ("sometimes", "random:2", "random:x", ""):
        with pytest.raises(ConfigError):
            MemoryPolicy.parse(bad)


@pytest.mark.parametrize("field", ["prompt_latents", "inference_latents"])
def test_k_zero_is_refused(field):
    with pytest.raises(ConfigError, match="positive integer"):
        MemGenConfig(**{field: 0})


def test_bad_prompts_are_refused(tok):
    model = make_memgen(tok, max_positions=64)
    with pytest.raises(InputError, match="prompt 0 is empty"):
        model.generate("")
    with pytest.raises(InputError, match="prompt 1 is empty"):
        model.generate(["ok", ""])
    with pytest.raises(InputError, match="does not fit the model's context of 64"):
        model.generate("x" * 70, memory="off")
    with pytest.raises(InputError, match="prompt latents"):
        model.generate("x" * 62, memory="always")
    with pytest.raises(ConfigError, match="unknown memory policy"):
        model.generate("hi", memory="sometimes")
    with pytest.raises(InputError, match="unknown generation option"):
        model.generate("hi", max_tokens=3)


def test_generation_stops_at_context_end(tok):
    model = make_memgen(tok, max_positions=48)
    out = model.generate(PROMPTS, memory="always", max_new_tokens=200, max_insertions=100, ignore_eos=True)
    for prompt, c in zip(model.encode_prompts(PROMPTS), out.completions):
        used = (
            len(prompt)
            + len(c.token_ids)
            + sum(
                model.config.prompt_latents if i.position == 0 else model.config.inference_latents
                for i in c.insertions
                if i.inserted
            )
        )
        assert used <= 48 and c.finish_reason == "length"


def test_streaming_yields_every_token_and_the_same_text(tok):
    model = make_memgen(tok)
    events = []
    out = model.generate(PROMPTS, memory="always", max_new_tokens=30, on_token=events.append)
    for r, c in enumerate(out.completions):
        mine = [e for e in events if e.row == r]
        assert [e.token_id for e in mine] == c.token_ids
        assert "".join(e.text for e in mine) == c.text
        assert mine[-1].finished and not any(e.finished for e in mine[:-1])
    streamed = list(model.stream(PROMPTS, memory="always", max_new_tokens=30))
    assert [(e.row, e.token_id) for e in streamed] == [(e.row, e.token_id) for e in events]


def test_stop_strings_end_rows(tok):
    model = make_memgen(tok)
    free = model.generate(PROMPTS, memory="off", max_new_tokens=40, ignore_eos=True).completions
    stop = free[0].text[10:12]
    out = model.generate(PROMPTS, memory="off", max_new_tokens=40, ignore_eos=True, stop=[stop]).completions
    assert out[0].finish_reason == "stop" and stop in out[0].text and stop not in out[0].text[: -len(stop) - 1]
    assert free[0].token_ids[: len(out[0].token_ids)] == out[0].token_ids


def test_num_samples_share_one_prefill(tok):
    model = make_memgen(tok)
    calls = []
    handle = model.reasoner.backbone.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["attention_mask"].shape[0]), with_kwargs=True
    )
    out = model.generate(PROMPTS[:2], memory="always", num_samples=4, do_sample=True, seed=0, max_new_tokens=10)
    handle.remove()
    assert len(out.completions) == 8
    # Prefill, prompt-end weaving and latent feed run per prompt, not per sample.
    assert calls[:3] == [2, 2, 2]
    assert calls[3] == 8 and all(c <= 8 for c in calls[3:])  # decode steps (insertions may run on fewer rows)
    assert len({tuple(c.token_ids) for c in out.completions[:4]}) > 1


def test_config_yaml_and_flags_drive_the_same_dataclass(tmp_path):
    import argparse

    from memgen.dataclass_cli import add_dataclass_arguments, config_from_args, load_yaml

    (tmp_path / "gen.yaml").write_text("max_new_tokens: 7\nmemory: always\nstop: ['##']\n")
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, GenerateConfig)
    args = parser.parse_args(["--memory", "random:0.5", "--do-sample"])
    config = config_from_args(GenerateConfig, args, load_yaml(tmp_path / "gen.yaml"))
    assert (config.max_new_tokens, config.memory, config.do_sample, config.stop) == (7, "random:0.5", True, ["##"])
    (tmp_path / "bad.yaml").write_text("max_new_tokns: 7\n")
    with pytest.raises(ConfigError, match="unknown field"):
        config_from_args(GenerateConfig, parser.parse_args([]), load_yaml(tmp_path / "bad.yaml"))


def test_saved_tiny_tokenizer_reloads_identically_next_to_a_model_config(tok, tmp_path):
    from memgen.loading import load_tokenizer

    make_base(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    for text in PROMPTS:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]


def test_base_with_foreign_lora_is_refused(tok):
    from peft import LoraConfig, inject_adapter_in_model

    from memgen import AdapterError

    base = inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), make_base(tok))
    with pytest.raises(AdapterError, match="carries peft LoRA layers"):
        MemGen(base, tok)


def test_two_memgens_can_share_one_base(tok):
    base = make_base(tok)
    first = MemGen(base, tok, MemGenConfig(prompt_latents=2, inference_latents=2))
    expected = first.generate(PROMPTS, memory="always", max_new_tokens=20).texts
    second = MemGen(base, tok, MemGenConfig(prompt_latents=3, inference_latents=3))
    assert second.generate(PROMPTS, memory="always", max_new_tokens=20).texts != expected
    assert first.generate(PROMPTS, memory="always", max_new_tokens=20).texts == expected
