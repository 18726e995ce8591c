"""Continuous batching: a request's tokens and insertions do not depend on when it joined a busy batch.

The reference is ``MemGen.generate`` on the request alone (``DecodeSession``, itself proven
against HF ``generate`` with memory off). float64 makes the comparison exact up to rounding, so
greedy tokens and insertion decisions must be identical; float32 is checked with its tolerance.
"""

import threading

import pytest
import torch
from conftest import make_memgen
from test_batching import central_threshold

from memgen import GenerateConfig
from memgen.continuous import (
    ContinuousConfig,
    ContinuousEngine,
    EngineRequest,
    EngineStoppedError,
    QueueFullError,
)

PROMPTS = ["Hello, world.", "a", "The cat sat on the mat, then", "e m e, a."]


def alone(model, prompt_ids, config: GenerateConfig):
    return model.generate([prompt_ids], config, return_logprobs=True).completions[0]


def assert_same(got, want, atol=1e-9, logprobs=True):
    assert got.token_ids == want.token_ids
    assert got.finish_reason == want.finish_reason
    assert [(i.position, i.inserted) for i in got.insertions] == [(i.position, i.inserted) for i in want.insertions]
    probs = [(i.probability or 0.0, j.probability or 0.0) for i, j in zip(got.insertions, want.insertions)]
    for p, q in probs:
        assert abs(p - q) <= max(atol, 1e-6)  # P(invoke) is held in float32 by both engines
    if logprobs and got.logprobs is not None:
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=atol, rtol=0)


def configs(model, memory: str) -> list[GenerateConfig]:
    """Per-request settings that differ in length and insertion cap (and all share ``memory``)."""
    extra = {"trigger_threshold": central_threshold(model)} if memory == "trigger" else {}
    return [
        GenerateConfig(memory=memory, max_new_tokens=n, max_insertions=cap, **extra)
        for n, cap in ((40, 4), (17, 8), (29, 2), (33, 3))
    ]


@pytest.mark.parametrize("memory", ["off", "always", "trigger", "trigger+prompt"])
def test_joining_at_any_step_matches_running_alone_float64(tok, memory):
    model = make_memgen(tok).double()
    model.config.trigger_at_prompt_end = memory == "trigger+prompt"
    memory = memory.split("+")[0]
    prompts = model.encode_prompts(PROMPTS)
    cfgs = configs(model, memory)
    want = [alone(model, p, c) for p, c in zip(prompts, cfgs)]
    first_len = len(want[0].token_ids)
    decisions = 0
    for join in range(0, first_len + 2, 3):
        engine = ContinuousEngine(model, ContinuousConfig(prefill_chunk=4, compact_after=4))
        first = engine.submit(EngineRequest(prompts[0], cfgs[0], logprobs=True))
        for _ in range(join):
            engine.step()
        later = [engine.submit(EngineRequest(p, c, logprobs=True)) for p, c in zip(prompts[1:3], cfgs[1:3])]
        engine.step()
        later.append(engine.submit(EngineRequest(prompts[3], cfgs[3], logprobs=True)))
        engine.run_until_idle()
        for request, expected in zip([first, *later], want):
            (got,) = request.result(timeout=0)
            assert_same(got, expected)
            decisions += len(got.insertions)
    if memory != "off":
        assert decisions > 0
    if memory == "trigger":
        flags = {i.inserted for c in want for i in c.insertions if i.position > 0}
        assert flags == {True, False}, "the randomised trigger should both fire and hold back"


def test_joining_matches_alone_float32_within_tolerance(tok):
    # float32: batch shapes change the summation order, so log-probs agree to 1e-4, not bit for bit.
    model = make_memgen(tok)
    prompts = model.encode_prompts(PROMPTS)
    cfgs = configs(model, "always")
    want = [alone(model, p, c) for p, c in zip(prompts, cfgs)]
    engine = ContinuousEngine(model, ContinuousConfig(prefill_chunk=5, compact_after=4))
    first = engine.submit(EngineRequest(prompts[0], cfgs[0], logprobs=True))
    for _ in range(7):
        engine.step()
    rest = [engine.submit(EngineRequest(p, c, logprobs=True)) for p, c in zip(prompts[1:], cfgs[1:])]
    engine.run_until_idle()
    for request, expected in zip([first, *rest], want):
        assert_same(request.result()[0], expected, atol=1e-4)


def test_rows_with_different_policies_and_seeded_samples_share_a_batch(tok):
    model = make_memgen(tok).double()
    prompts = model.encode_prompts(PROMPTS)
    threshold = central_threshold(model)
    cfgs = [
        GenerateConfig(memory="off", max_new_tokens=30),
        GenerateConfig(memory="always", max_new_tokens=30, do_sample=True, temperature=0.8, top_p=0.9, seed=5),
        GenerateConfig(memory="trigger", max_new_tokens=30, trigger_threshold=threshold),
        GenerateConfig(memory="random:0.5", max_new_tokens=30, do_sample=True, top_k=20, seed=9),
    ]
    engine = ContinuousEngine(model, ContinuousConfig(prefill_chunk=3))
    requests = []
    for p, c in zip(prompts, cfgs):
        requests.append(engine.submit(EngineRequest(p, c, logprobs=True)))
        engine.step()
        engine.step()
    engine.run_until_idle()
    for request, prompt, cfg in zip(requests, prompts, cfgs):
        # generate's log-probs are temperature-scaled, the engine's are the raw model's (as OpenAI's are)
        assert_same(request.result()[0], alone(model, prompt, cfg), logprobs=cfg.temperature == 1.0)


def test_samples_of_one_request_are_seeded_in_turn_and_share_the_prefill(tok):
    model = make_memgen(tok).double()
    (prompt,) = model.encode_prompts(PROMPTS[2:3])
    cfg = GenerateConfig(memory="always", max_new_tokens=25, do_sample=True, seed=3, num_samples=3)
    engine = ContinuousEngine(model)
    request = engine.submit(EngineRequest(prompt, cfg, logprobs=True))
    engine.run_until_idle()
    got = request.result()
    assert engine.counters["prompt_tokens"] == len(prompt)  # one prefill for the three samples
    for i, completion in enumerate(got):
        single = GenerateConfig(memory="always", max_new_tokens=25, do_sample=True, seed=3 + i)
        assert_same(completion, alone(model, prompt, single))
    assert len({tuple(c.token_ids) for c in got}) > 1


def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_decode(tok):
    model = make_memgen(tok).double()
    short, long = model.encode_prompts(["a", "the cat sat on the mat " * 6])
    cfg = GenerateConfig(memory="always", max_new_tokens=40, ignore_eos=True)
    engine = ContinuousEngine(model, ContinuousConfig(prefill_chunk=8))
    tokens = []
    running = engine.submit(EngineRequest(short, cfg, on_event=lambda e: tokens.append(e.token_id)))
    engine.step()
    joining = engine.submit(EngineRequest(long, cfg))
    chunks = -(-len(long) // 8)
    for step in range(chunks):
        before = len(tokens)
        engine.step()
        assert len(tokens) == before + 1, "a running row got no token while a prompt was prefilled"
        assert engine.load()["running_rows"] == (1 if step < chunks - 1 else 2)
    engine.run_until_idle()
    assert_same(running.result()[0], alone(model, short, cfg))
    assert_same(joining.result()[0], alone(model, long, cfg))


def test_cancelled_rows_are_dropped_and_others_go_on(tok):
    model = make_memgen(tok).double()
    prompts = model.encode_prompts(PROMPTS[:3])
    cfg = GenerateConfig(memory="always", max_new_tokens=40, ignore_eos=True)
    engine = ContinuousEngine(model)
    requests = [engine.submit(EngineRequest(p, cfg, logprobs=True)) for p in prompts]
    for _ in range(5):
        engine.step()
    requests[1].cancel()
    engine.step()
    assert engine.load()["running_rows"] == 2
    engine.run_until_idle()
    assert requests[1].done and engine.counters["cancelled"] == 1
    with pytest.raises(Exception, match="cancelled"):
        requests[1].result()
    for i in (0, 2):
        assert_same(requests[i].result()[0], alone(model, prompts[i], cfg))


def test_max_rows_and_queue_limits(tok):
    model = make_memgen(tok).double()
    prompts = model.encode_prompts(PROMPTS)
    cfg = GenerateConfig(memory="always", max_new_tokens=12, ignore_eos=True)
    engine = ContinuousEngine(model, ContinuousConfig(max_rows=2, max_queue=3))
    requests = [engine.submit(EngineRequest(p, cfg)) for p in prompts]  # 2 get rows, 2 wait
    requests.append(engine.submit(EngineRequest(prompts[0], cfg)))  # the queue's third place
    with pytest.raises(QueueFullError):
        engine.submit(EngineRequest(prompts[0], cfg))
    with pytest.raises(Exception, match="more rows"):
        engine.submit(EngineRequest(prompts[0], GenerateConfig(num_samples=3)))
    peak = 0
    while engine.busy:
        engine.step()
        peak = max(peak, engine.load()["running_rows"])
    assert peak == 2
    for request, prompt in zip(requests, [*prompts, prompts[0]]):
        assert request.result()[0].token_ids == alone(model, prompt, cfg).token_ids


def test_background_thread_serves_concurrent_submitters_and_drains_on_stop(tok):
    model = make_memgen(tok).double()
    prompts = model.encode_prompts(PROMPTS)
    cfgs = configs(model, "trigger")
    engine = ContinuousEngine(model, ContinuousConfig(prefill_chunk=4))
    engine.start()
    results = {}

    def client(i):
        results[i] = engine.submit(EngineRequest(prompts[i % 4], cfgs[i % 4], logprobs=True))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.stop(drain=True, timeout=120)
    with pytest.raises(EngineStoppedError):
        engine.submit(EngineRequest(prompts[0], cfgs[0]))
    for i, request in results.items():
        assert_same(request.result(timeout=0)[0], alone(model, prompts[i % 4], cfgs[i % 4]))


@pytest.mark.parametrize("query", ["prompt", "context"])
def test_retrieval_reads_per_row_as_generate_does(tok, tmp_path, query):
    from test_retrieval_weaving import RECORDS, reader

    from memgen.experience import ExperienceRecord, ExperienceStore

    with ExperienceStore(tmp_path / "store", retriever="bm25") as s:
        s.add_many(
            ExperienceRecord(task="toy", input=i, trajectory=t, success=ok, reward=float(ok)) for i, t, ok in RECORDS
        )
    store = ExperienceStore(tmp_path / "store", retriever="bm25", read_only=True)
    model = make_memgen(tok).double()
    prompts = model.encode_prompts(PROMPTS)
    cfgs = configs(model, "always")
    experience = reader(store, tok, query=query)
    want = [model.generate([p], c, experience=experience).completions[0] for p, c in zip(prompts, cfgs)]
    engine = ContinuousEngine(model, ContinuousConfig(prefill_chunk=4), experience=experience)
    requests = []
    for p, c in zip(prompts, cfgs):
        requests.append(engine.submit(EngineRequest(p, c)))
        engine.step()
    engine.run_until_idle()
    read = 0
    for request, expected in zip(requests, want):
        got = request.result()[0]
        assert_same(got, expected)
        assert [i.context_ids for i in got.insertions] == [i.context_ids for i in expected.insertions]
        read += sum(1 for i in got.insertions if i.context_ids)
    assert read > 0
    store.close()
