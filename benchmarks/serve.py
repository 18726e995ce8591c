"""Serving throughput and latency: ``memgen serve`` under 1, 4 and 16 concurrent clients.

Prints JSON. The real server runs as a subprocess on a loopback port; clients are the
official ``openai`` async client, streaming, in this process. Every phase serves the same
``--requests`` completions (fixed length: ``ignore_eos``), spread over C clients that each send
their share one after another, so C=1 is "one request at a time through the same engine"
and the ratios at C=4 and C=16 are the continuous batching's gain. Two more baselines on the
same model in the same run, after the server has stopped (nothing else competes for the
CPU): HF ``generate`` one request at a time, memory off (HF has no latent memory).

Memory is measured ``always`` (K=8 at the prompt end and at every delimiter, up to 8
insertions) and under the ``trigger``; the adapter is untrained (``--adapter`` takes a trained
one), so the trigger's invocation rate is whatever its initial head gives: it is reported.

Per phase: throughput (generated tokens / wall seconds), time to first token (p50, p99),
per-token latency (gaps between a stream's tokens; p50, p99), and each client's p99 gap.
Target (issue 28): at 16 clients, at least 3x the 1-client throughput, and no client's p99
per-token latency above 3x the 1-client p99.

    python benchmarks/serve.py [--requests 16] [--max-tokens 64] [--clients 1,4,16] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Q: what is 3 + 4? A:",
    "The weaver writes memory, and the trigger decides when.",
    "Write a short poem about the sea.",
    "Once upon a time, in a land far away, there lived a",
    "List three uses of a paperclip.",
    "Hello there. How are you today?",
    "def fibonacci(n):\n    ",
    "Explain why the sky is blue in one sentence.",
    "The capital of France is",
    "Tom has 5 apples and gets 3 more. How many apples does he have now?",
    "Translate to French: good morning, my friend.",
    "A train leaves at 9am, travelling at 60 km/h.",
    "Summarise: cats sleep most of the day, and hunt at night.",
    "Three reasons to learn Python are",
    "In 1969, the first humans",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_args: list[str], extra: list[str]):
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "memgen", "serve", *model_args, "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}: {Path(log.name).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not come up")


async def one_request(client, model: str, prompt: str, args, memory: str) -> dict:
    sent = time.perf_counter()
    stamps = []
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=args.max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True, "memgen": {"memory": memory, "max_insertions": 8}},
    )
    inserted = 0
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.text:
                stamps.append(time.perf_counter())
            inserted += len((choice.model_extra.get("memgen") or {}).get("insertions", []))
    return {
        "ttft": stamps[0] - sent if stamps else float("nan"),
        "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
        "insertions": inserted,
    }


async def phase(url: str, model: str, clients: int, args, memory: str) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    shares = [prompts[c::clients] for c in range(clients)]

    async def run_client(share):
        return [await one_request(client, model, p, args, memory) for p in share]

    started = time.perf_counter()
    per_client = await asyncio.gather(*(run_client(s) for s in shares))
    wall = time.perf_counter() - started
    await client.close()
    results = [r for rs in per_client for r in rs]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = args.requests * args.max_tokens
    return {
        "clients": clients,
        "requests": args.requests,
        "tokens": tokens,
        "seconds": round(wall, 3),
        "tokens_per_second": round(tokens / wall, 2),
        "ttft_p50_s": round(percentile([r["ttft"] for r in results], 50), 4),
        "ttft_p99_s": round(percentile([r["ttft"] for r in results], 99), 4),
        "token_latency_p50_s": round(percentile(gaps, 50), 4),
        "token_latency_p99_s": round(percentile(gaps, 99), 4),
        "worst_client_token_latency_p99_s": round(
            max(percentile([g for r in rs for g in r["gaps"]], 99) for rs in per_client), 4
        ),
        "insertions_per_request": round(statistics.mean(r["insertions"] for r in results), 2),
    }


def hf_generate_baseline(model_args: list[str], args) -> dict:
    """HF ``generate``, one request at a time, greedy, fixed length, memory off."""
    from memgen.loading import load_base

    model_path = model_args[model_args.index("--model") + 1]
    base, tok = load_base(model_path)
    base.eval()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    latencies = []
    started = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = tok(p, return_tensors="pt")
            t0 = time.perf_counter()
            out = base.generate(
                **ids,
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            assert out.shape[1] - ids["input_ids"].shape[1] == args.max_tokens
            latencies.append((time.perf_counter() - t0) / args.max_tokens)
    wall = time.perf_counter() - started
    return {
        "clients": 1,
        "requests": args.requests,
        "tokens_per_second": round(args.requests * args.max_tokens / wall, 2),
        "mean_token_latency_s": round(statistics.mean(latencies), 4),
    }


def tiny_model_dir(root: Path) -> list[str]:
    """--quick: a tiny random model with a randomised adapter, saved where the server can load it."""
    from memgen import MemGen, MemGenConfig
    from memgen.tiny import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    base = tiny_causal_lm(tok, hidden_size=64, num_layers=2)
    model = MemGen(base, tok, MemGenConfig(prompt_latents=8, inference_latents=8))
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    model.save_pretrained(root / "adapter")
    return ["--model", str(root / "base"), "--adapter", str(root / "adapter")]


def smollm2_dirs(root: Path, adapter: str | None) -> list[str]:
    """SmolLM2-135M-Instruct from its wheel; an untrained K=8 adapter unless ``adapter`` is given."""
    from memgen import MemGen, MemGenConfig
    from memgen.loading import export_base, load_base, packaged_smollm2

    exported = export_base(packaged_smollm2(), root / "smollm2")  # dequantised once: faster server start
    if adapter:
        return ["--model", str(exported), "--adapter", adapter]
    base, tok = load_base(exported)
    MemGen(base, tok, MemGenConfig(prompt_latents=8, inference_latents=8)).save_pretrained(root / "adapter")
    return ["--model", str(exported), "--adapter", str(root / "adapter")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--memories", default="always,trigger")
    parser.add_argument("--adapter", default=None, help="a trained memgen adapter for SmolLM2 (default: untrained)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few requests (CI: it runs)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.max_tokens, args.clients = 4, 8, "1,4"
    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_args = tiny_model_dir(root) if args.quick else smollm2_dirs(root, args.adapter)
        proc, url = start_server(model_args, ["--max-rows", str(max(clients)), "--served-model-name", "bench"])
        try:
            phases = {}
            for memory in args.memories.split(","):
                asyncio.run(phase(url, "bench", 1, argparse.Namespace(requests=1, max_tokens=4), memory))  # warm-up
                phases[memory] = [asyncio.run(phase(url, "bench", c, args, memory)) for c in clients]
        finally:
            proc.terminate()
            proc.wait(120)
        hf = hf_generate_baseline(model_args, args)
    report = {
        "benchmark": "serve",
        "model": "tiny (quick)" if args.quick else "SmolLM2-135M-Instruct (float32)",
        "latents": 8,
        "max_tokens": args.max_tokens,
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "threads": torch.get_num_threads(),
        "hf_generate_one_at_a_time": hf,
        "memgen": phases,
    }
    for rows in phases.values():
        single = rows[0]
        for row in rows:
            row["throughput_vs_one_at_a_time"] = round(row["tokens_per_second"] / single["tokens_per_second"], 2)
            row["worst_client_p99_vs_one_client_p99"] = round(
                row["worst_client_token_latency_p99_s"] / single["token_latency_p99_s"], 2
            )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
