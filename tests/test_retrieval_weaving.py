"""Retrieval-augmented weaving keeps the engine's equivalences: cached vs recompute, batch vs row, TF vs rollout."""

import pytest
import torch
from conftest import PROMPTS, make_memgen
from test_batching import central_threshold
from test_cached_insertion import recompute_logits

from memgen import ConfigError
from memgen.experience import ExperienceRecord, ExperienceStore
from memgen.experience.weaving import ExperienceReader, RetrievalConfig

RECORDS = [
    ("Hello, world.", " hello back, world.", True),
    ("The cat sat on the mat", " and then it slept.", True),
    ("a b c", " d e f.", True),
    ("The dog ran", " away, fast.", False),
    ("world peace", " is hard, but possible.", True),
]


@pytest.fixture()
def store(tmp_path):
    with ExperienceStore(tmp_path / "store", retriever="bm25") as s:
        s.add_many(
            ExperienceRecord(task="toy", input=i, trajectory=t, success=ok, reward=float(ok)) for i, t, ok in RECORDS
        )
    opened = ExperienceStore(tmp_path / "store", retriever="bm25", read_only=True)
    yield opened
    opened.close()


def reader(store, tok, **kw):
    return ExperienceReader(store, tok, RetrievalConfig(**{"top_p": 2, "max_tokens": 12, **kw}))


def read_texts(completions):
    return [ins.context_ids for c in completions for ins in c.insertions if ins.inserted and ins.context_ids]


@pytest.mark.parametrize("query", ["prompt", "context"])
def test_cached_insertions_with_retrieval_match_full_recompute(tok, store, query):
    """The reasoner never sees the retrieved text: its logits equal a recompute over prompt, latents and tokens."""
    model = make_memgen(tok)
    with torch.no_grad():
        out = model.generate(
            PROMPTS,
            memory="random:0.6",
            max_new_tokens=30,
            do_sample=True,
            seed=3,
            max_insertions=4,
            output_logits=True,
            return_latents=True,
            experience=reader(store, tok, query=query),
        )
        for prompt_ids, completion in zip(model.encode_prompts(PROMPTS), out.completions):
            torch.testing.assert_close(
                completion.logits, recompute_logits(model, prompt_ids, completion), atol=1e-4, rtol=0
            )
    contexts = read_texts(out.completions)
    assert len(contexts) >= len(PROMPTS) and all(0 < len(c) <= 12 for c in contexts)
    assert len({tuple(c) for c in contexts}) > 1  # different rows and steps read different text
    for c in out.completions:
        for ins in c.insertions:
            assert (ins.retrieved is not None) == ins.inserted
            assert all(store.get(i).success for i in ins.retrieved or [])


def test_retrieval_changes_the_latents(tok, store):
    model = make_memgen(tok)
    plain = model.generate(PROMPTS[:1], memory="always", max_new_tokens=1, return_latents=True)
    read = model.generate(
        PROMPTS[:1], memory="always", max_new_tokens=1, return_latents=True, experience=reader(store, tok)
    )
    assert (plain.completions[0].insertions[0].latents - read.completions[0].insertions[0].latents).abs().max() > 1e-3


@pytest.mark.parametrize("memory", ["always", "trigger"])
def test_padded_batch_with_retrieval_matches_row_by_row(tok, store, memory):
    model = make_memgen(tok)
    kw = dict(
        memory=memory,
        max_new_tokens=40,
        max_insertions=4,
        return_logprobs=True,
        compact_after=8,
        experience=reader(store, tok),
    )
    if memory == "trigger":  # rows that insert and rows that do not, at the same step
        kw["trigger_threshold"] = central_threshold(model)
    batch = model.generate(PROMPTS, **kw)
    for prompt, completion in zip(PROMPTS, batch.completions):
        single = model.generate([prompt], **kw).completions[0]
        assert completion.token_ids == single.token_ids
        assert [(i.position, i.inserted, i.retrieved, i.context_ids) for i in completion.insertions] == [
            (i.position, i.inserted, i.retrieved, i.context_ids) for i in single.insertions
        ]
        torch.testing.assert_close(torch.tensor(completion.logprobs), torch.tensor(single.logprobs), atol=1e-4, rtol=0)
    assert len(read_texts(batch.completions)) > len(PROMPTS)


def test_teacher_forced_logprobs_match_rollout_with_retrieval(tok, store):
    model = make_memgen(tok).double()
    rollout = model.generate(
        PROMPTS,
        memory="random:0.5",
        max_new_tokens=40,
        do_sample=True,
        seed=21,
        max_insertions=4,
        return_logprobs=True,
        experience=reader(store, tok),
    )
    prompts = model.encode_prompts(PROMPTS)
    completions = [c.token_ids for c in rollout.completions]
    positions = [c.insertion_positions for c in rollout.completions]
    contexts = [c.insertion_contexts for c in rollout.completions]
    assert sum(len(p) for p in positions) > len(PROMPTS) and any(c for row in contexts for c in row)
    with torch.no_grad():
        tf = model.teacher_forced(prompts, completions, positions, contexts=contexts)
        blind = model.teacher_forced(prompts, completions, positions)
    gap = 0.0
    for r, c in enumerate(rollout.completions):
        n = len(c.token_ids)
        torch.testing.assert_close(
            tf.logprobs[r, :n], torch.tensor(c.logprobs, dtype=tf.logprobs.dtype), atol=1e-8, rtol=0
        )
        gap = max(gap, float((blind.logprobs[r, :n] - tf.logprobs[r, :n]).abs().max()))
    assert gap > 1e-3  # without the retrieved text the replay differs: the contexts are really read


def test_never_invoking_with_an_experience_store_is_plain_generate(tok, store):
    model = make_memgen(tok)
    kw = dict(max_new_tokens=30, do_sample=True, seed=9)
    off = model.generate(PROMPTS, memory="off", experience=reader(store, tok), **kw)
    never = model.generate(
        PROMPTS,
        memory="trigger",
        trigger_threshold=1.1,
        insert_at_prompt_end=False,
        experience=reader(store, tok),
        **kw,
    )
    assert [c.token_ids for c in off.completions] == [c.token_ids for c in never.completions]
    assert not read_texts(never.completions)


def test_reader_keeps_successes_in_rank_order_within_the_token_budget(tok, store):
    found = reader(store, tok, top_p=3, max_tokens=1000).read(["The dog ran away"])[0]
    assert all(store.get(i).success for i in found.record_ids) and len(found.record_ids) == 3
    everything = reader(store, tok, top_p=3, max_tokens=1000, successes_only=False).read(["The dog ran away"])[0]
    assert store.get(everything.record_ids[0]).input == "The dog ran"
    cut = reader(store, tok, top_p=3, max_tokens=5).read(["The dog ran away"])[0]
    assert len(cut.token_ids) == 5 and cut.token_ids == found.token_ids[:5]
    with pytest.raises(ConfigError, match="retrieval query"):
        RetrievalConfig(query="everything")


def test_weaver_training_reads_the_store(tok, store, tmp_path):
    """SFT and GRPO run with --experience; the retrieved text reaches the weaver's gradients."""
    from conftest import toy_task_records

    from memgen.tasks import Task
    from memgen.train import WeaverTrainConfig, train_weaver
    from memgen.train.logging import read_metrics

    task = Task("toy", toy_task_records(16), lambda p, c, **k: [float(len(x) % 3 == 0) for x in c], {}, [])
    weights = {}
    for name, experience in (("with", str(store.path)), ("without", None)):
        model = make_memgen(tok, randomize=False)
        config = WeaverTrainConfig(
            model="in-memory",
            data="in-memory",
            output_dir=str(tmp_path / name),
            progress=False,
            save_every=0,
            per_device_batch_size=4,
            max_steps=2,
            seed=0,
            learning_rate=1e-2,
            experience=experience,
            experience_embedder="bm25",
            retrieval_max_tokens=10,
        )
        train_weaver(config, model=model, task=task)
        weights[name] = torch.cat([p.detach().flatten() for p in model.weaver_parameters()])
        if experience:
            rows = read_metrics(config.output_dir)
            assert all(0 < r["retrieved_tokens_per_insertion"] <= 10 for r in rows)
            grpo = WeaverTrainConfig(
                model="in-memory",
                data="in-memory",
                output_dir=str(tmp_path / "grpo"),
                progress=False,
                save_every=0,
                per_device_batch_size=2,
                num_generations=2,
                max_new_tokens=12,
                max_steps=2,
                seed=0,
                method="grpo",
                experience=experience,
                experience_embedder="bm25",
            )
            train_weaver(grpo, model=model, task=task)
            assert len(read_metrics(grpo.output_dir)) == 2
    assert (weights["with"] - weights["without"]).abs().max() > 1e-4


@pytest.mark.slow
def test_cli_trains_weaver_then_trigger_with_an_experience_store(tmp_path):
    """The real entry points: `memgen train weaver --experience`, then `memgen train trigger --experience`."""
    import json
    import os
    import subprocess
    import sys

    from conftest import toy_task_records

    from memgen.tiny import tiny_causal_lm, tiny_tokenizer
    from memgen.train.logging import read_metrics

    tok = tiny_tokenizer()
    tiny_causal_lm(tok, hidden_size=64, num_layers=2).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": r.prompt, "completion": r.completion, "answer": r.columns["answer"]}) + "\n"
            for r in toy_task_records(16)
        )
    )
    with ExperienceStore(tmp_path / "store", retriever="bm25") as s:
        s.add_many(
            ExperienceRecord(task="toy", input=r.prompt, trajectory=r.completion, success=True)
            for r in toy_task_records(8, seed=1)
        )
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    common = [
        "--model",
        str(tmp_path / "base"),
        "--data",
        str(data),
        "--experience",
        str(tmp_path / "store"),
        "--experience-embedder",
        "bm25",
        "--retrieval-max-tokens",
        "16",
        "--max-steps",
        "2",
        "--per-device-batch-size",
        "4",
        "--progress",
        "false",
        "--save-every",
        "0",
        "--tensorboard",
        "false",
    ]
    weaver = subprocess.run(
        [
            sys.executable,
            "-m",
            "memgen",
            "train",
            "weaver",
            "--output-dir",
            str(tmp_path / "w"),
            "--prompt-latents",
            "2",
            "--inference-latents",
            "2",
            "--lora-r",
            "4",
            *common,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert weaver.returncode == 0, weaver.stderr[-2000:]
    assert all(0 < r["retrieved_tokens_per_insertion"] <= 16 for r in read_metrics(tmp_path / "w"))
    trigger = subprocess.run(
        [
            sys.executable,
            "-m",
            "memgen",
            "train",
            "trigger",
            "--adapter",
            str(tmp_path / "w" / "final"),
            "--output-dir",
            str(tmp_path / "t"),
            "--num-generations",
            "2",
            "--max-new-tokens",
            "12",
            *common,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trigger.returncode == 0, trigger.stderr[-2000:]
    assert len(read_metrics(tmp_path / "t")) == 2
