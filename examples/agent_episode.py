"""Multi-turn episodes through one engine: the ledger world, played with memory woven in at every turn.

Each turn the environment states a count and two events; the agent answers with its steps and a
wrong count ends the episode. Runs offline on a CPU in seconds with a tiny untrained Qwen2, so the
agent loses; ALFWorld (``--task alfworld``) plays the same way through ``memgen.agents``.
"""

import torch

from memgen import MemGen, MemGenConfig
from memgen.agents import load_env_task, run_episodes
from memgen.tiny import tiny_causal_lm, tiny_tokenizer

torch.manual_seed(0)
tok = tiny_tokenizer()
model = MemGen(
    tiny_causal_lm(tok, hidden_size=64, num_layers=2, init_std=0.2),
    tok,
    MemGenConfig(prompt_latents=4, inference_latents=4),
)

task = load_env_task("ledger", "B", split="test", limit=3)  # three held-out episodes of domain B
envs = [task.make_env(record) for record in task.records]
agent = task.agent_config(memory="always", max_turn_tokens=32, max_insertions=2)
episodes = run_episodes(model, envs, task.make_format(tok, False), agent, seeds=[task.seed_of(r) for r in task.records])

for episode in episodes:
    print(
        f"{episode.env_id}: {len(episode.turns)} turn(s), success={episode.success}, "
        f"ended by {episode.end_reason}, {episode.num_insertions} insertion(s)"
    )
    first = episode.turns[0]
    print(f"  first reply: {first.completion.text!r}")
