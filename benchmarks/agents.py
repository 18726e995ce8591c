"""ALFWorld episodes per minute: the batched episode runner against one episode at a time. Prints JSON.

Same process, same model, same games, same settings: ``--games`` games of ``--split``, each played
for ``--turns`` turns of up to ``--turn-tokens`` sampled tokens with memory ``always`` (latents at
every turn's start and at delimiters). The model is a randomly initialised Qwen2 with a character
tokenizer, so it never wins a game and every episode runs its full ``--turns`` turns: the work
per episode is fixed and the comparison is about the runner. Each game runs in its own child
process (reset and every step under a timeout), in both arms; its start-up is part of both times.

- ``batched``: one :func:`memgen.agents.run_episodes` call over all games (one cache, one decode
  loop per turn, environment steps concurrent across processes);
- ``sequential``: one call per game.

    python benchmarks/agents.py [--games 8] [--turns 6] [--turn-tokens 16] [--split valid_unseen]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from memgen import MemGen, MemGenConfig
from memgen.agents import AgentConfig, TranscriptFormat, alfworld_env, list_games, run_episodes
from memgen.precision import cpu_capability
from memgen.tiny import tiny_causal_lm, tiny_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alfworld"


def play(model, games, args, seed: int) -> tuple[float, list]:
    config = AgentConfig(
        memory="always",
        max_turns=args.turns,
        max_turn_tokens=args.turn_tokens,
        do_sample=True,
        seed=seed,
        max_insertions=2,
        progress=False,
    )
    start = time.perf_counter()
    envs = [alfworld_env(g, max_steps=args.turns) for g in games]
    try:
        episodes = run_episodes(model, envs, TranscriptFormat(), config)
    finally:
        for env in envs:
            env.close()
    return time.perf_counter() - start, episodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--split", default="valid_unseen")
    parser.add_argument("--games", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--turn-tokens", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="2 games of 2 turns: checks the script runs (CI)")
    args = parser.parse_args()
    if args.quick:
        args.games, args.turns, args.turn_tokens = 2, 2, 4
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    base = tiny_causal_lm(tok, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, max_positions=8192)
    model = MemGen(base, tok, MemGenConfig(prompt_latents=8, inference_latents=8, lora_r=8))
    model.eval()
    games = list_games(args.data, args.split)[: args.games]
    play(model, games[:1], args, seed=0)  # warm-up
    batched, episodes = play(model, games, args, seed=0)
    sequential = 0.0
    for game in games:
        seconds, _ = play(model, [game], args, seed=0)
        sequential += seconds
    turns = sum(len(e.turns) for e in episodes)
    print(
        json.dumps(
            {
                "benchmark": "agents",
                "games": len(games),
                "split": args.split,
                "turns_per_episode": turns / len(games),
                "turn_tokens": args.turn_tokens,
                "params": sum(p.numel() for p in base.parameters()),
                "batched_seconds": round(batched, 2),
                "sequential_seconds": round(sequential, 2),
                "batched_episodes_per_min": round(60 * len(games) / batched, 2),
                "sequential_episodes_per_min": round(60 * len(games) / sequential, 2),
                "speedup": round(sequential / batched, 2),
                "end_reasons": sorted({e.end_reason for e in episodes}),
                "machine": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "cpu_capability": cpu_capability(),
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
