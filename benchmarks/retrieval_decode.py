"""Decode cost of retrieval-augmented weaving, as a ratio to weaving without retrieval. Prints JSON.

Same process, same model, same prompts, same forced schedule (``memory="always"``: latents at
the prompt end and at every delimiter, K=8, up to ``--insertions`` more per row), seeded sampling
(greedy decoding of a random model repeats one character and never reaches a delimiter):

- ``plain``: memgen without retrieval;
- ``retrieval``: each invocation also retrieves the top-P records (BM25, a store of ``--records``
  synthetic trajectories) and the weaver reads up to ``--max-tokens`` of their tokens.

Reported per batch size: tokens/s of each, the slowdown ratio, and the extra weaver slots read
per insertion. The model is a randomly initialised ~8M-parameter Qwen2 (character tokenizer),
so the text is random but the shapes and the work are real; common letters count as delimiters
so that the random text reaches its insertion points (1 + ``--insertions`` per row).

    python benchmarks/retrieval_decode.py [--batches 1,8] [--records 1000] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time

import torch
from retrieval import problem  # benchmarks/retrieval.py: the synthetic trajectories

from memgen import MemGen, MemGenConfig
from memgen.experience import ExperienceReader, ExperienceStore, RetrievalConfig
from memgen.precision import cpu_capability
from memgen.tiny import tiny_causal_lm, tiny_tokenizer


def run_once(model, prompts, reader, args) -> tuple[float, object]:
    kw = dict(
        memory="always",
        max_new_tokens=args.new_tokens,
        max_insertions=args.insertions,
        ignore_eos=True,
        do_sample=True,
        seed=0,
    )
    start = time.perf_counter()
    out = model.generate(prompts, experience=reader, **kw)
    return time.perf_counter() - start, out


def measure(model, prompts, reader, args) -> dict:
    """Interleaved rounds (plain, then retrieval), after one warm-up each; medians of the rounds."""
    run_once(model, prompts, None, args)
    run_once(model, prompts, reader, args)
    plain, aug, ratios = [], [], []
    for _ in range(args.repeats):
        p, plain_out = run_once(model, prompts, None, args)
        a, aug_out = run_once(model, prompts, reader, args)
        plain.append(p), aug.append(a), ratios.append(a / p)
    tokens = sum(len(c.token_ids) for c in plain_out.completions)
    read = [len(i.context_ids or []) for c in aug_out.completions for i in c.insertions if i.inserted]
    return {
        "plain_tokens_per_s": round(tokens / statistics.median(plain), 1),
        "retrieval_tokens_per_s": round(sum(len(c.token_ids) for c in aug_out.completions) / statistics.median(aug), 1),
        "slowdown": round(statistics.median(ratios), 3),
        "insertions_per_row": len(read) / len(prompts),
        "retrieved_tokens_per_insertion": sum(read) / max(len(read), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--top-p", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--insertions", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--quick", action="store_true", help="batch 1, 8 tokens, 50 records: checks the script runs (CI)"
    )
    args = parser.parse_args()
    if args.quick:
        args.batches, args.records, args.new_tokens, args.insertions, args.repeats = "1", 50, 8, 1, 1
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    base = tiny_causal_lm(tok, hidden_size=256, num_layers=8, seed=0)
    model = MemGen(
        base, tok, MemGenConfig(prompt_latents=8, inference_latents=8, delimiters=[",", ".", " ", "a", "e", "o"])
    )
    rng = random.Random(0)
    results = {
        "machine": {
            "cpu_capability": cpu_capability(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "params_m": round(sum(p.numel() for p in base.parameters()) / 1e6, 1),
        "config": vars(args),
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        with ExperienceStore(f"{tmp}/s", retriever="bm25") as store:
            store.add_many(problem(rng, i) for i in range(args.records))
        store = ExperienceStore(f"{tmp}/s", retriever="bm25", read_only=True)
        reader = ExperienceReader(store, tok, RetrievalConfig(top_p=args.top_p, max_tokens=args.max_tokens))
        for batch in [int(b) for b in args.batches.split(",")]:
            prompts = [problem(rng, args.records + i).input for i in range(batch)]
            results["runs"].append({"batch": batch, **measure(model, prompts, reader, args)})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
