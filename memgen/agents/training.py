"""Training on episodes: expert SFT rows, and episode rollouts for weaver GRPO and trigger RL.

- **SFT** (:func:`expert_rows`): the environment's expert plays the episode offline (ALFWorld's
  planner, the ledger's worked solutions); its replies become assistant turns between the
  rendered observations, with latents at every turn's start and at delimiters inside turns
  (at most ``max_insertions`` per turn, the earliest, as the engine caps them). The loss covers
  assistant tokens only. Expert episodes are played once per record and kept for the run.
- **GRPO / trigger RL** (:func:`episode_rollout`): G episodes per record, played by the batched
  runner with sampling; an episode's reward is its success, shared by all its tokens (per-step
  shaping is off by default; ``invalid_action_penalty`` subtracts a penalty per turn without an action). Each episode becomes one teacher-forcing row per context span
  (:func:`memgen.agents.episode.training_rows`), so the existing GRPO and trigger losses run
  unchanged on a loss mask; with one turn and no restart an episode is exactly a single-turn
  rollout.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..tasks.protocol import RolloutBatch
from ..weaver import INFERENCE, PROMPT
from .env import action_parser
from .episode import EpisodeRow, training_rows
from .runner import _rebuild, run_episodes


def episode_format(run):
    return run.task.make_format(run.unwrapped.tokenizer, run.config.use_chat_template)


def _reply_ids(tok, fmt, reply: str) -> tuple[list[int], str]:
    """The expert reply as the engine would have produced it: ending at the format's stop string or at EOS."""
    if fmt.stop:
        text = reply.rstrip("\n") + fmt.stop[0]
        return tok(text, add_special_tokens=False)["input_ids"], "stop"
    return tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], "eos"


def expert_rows(run, record) -> list[EpisodeRow]:
    """The expert's episode for ``record`` as teacher-forcing rows (one per context span)."""
    cache = run.__dict__.setdefault("_expert_rows", {})
    if record.source in cache:
        return cache[record.source]
    model, config, task = run.unwrapped, run.config, run.task
    tok, fmt = model.tokenizer, episode_format(run)
    env = task.make_env(record)
    budget = min(
        b
        for b in (
            config.max_prompt_tokens + config.max_completion_tokens,
            model.reasoner.context_length,
            task.max_context_tokens,
        )
        if b
    )
    rows: list[EpisodeRow] = []
    try:
        obs, info = env.reset(task.seed_of(record))
        first = fmt.first_prompt(obs, info.get("admissible"))
        row = EpisodeRow(model.encode_prompts([first])[0], [], [], [], [], [], [], None)
        history, won = [], False
        for _ in range(task.max_turns):
            reply = info.get("expert")
            if not reply:
                break
            ids, finish = _reply_ids(tok, fmt, reply)
            offset = len(row.completion_ids)
            inner = [offset + p for p in model.delimiter_positions(ids, prompt_end=False)][: config.max_insertions]
            row.insertions += [offset] + inner
            row.kinds += [PROMPT] + [INFERENCE] * len(inner)
            row.completion_ids += ids
            row.loss_mask += [True] * len(ids)
            obs, _, done, info = env.step(action_parser(env)(tok.decode(ids, skip_special_tokens=True)))
            if done:
                won = bool(info.get("won"))
                break
            text = fmt.transition(tok.decode(ids, skip_special_tokens=True), finish, obs, info.get("admissible"))
            history.append((ids, text))
            following = tok(text, add_special_tokens=False)["input_ids"]
            if len(row.prompt_ids) + len(row.completion_ids) + len(following) + config.max_completion_tokens > budget:
                rows.append(row)
                rebuilt = _rebuild(
                    tok,
                    fmt,
                    first,
                    history,
                    obs,
                    info.get("admissible"),
                    budget - config.max_completion_tokens,
                    task.keep_task,
                    model,
                )
                if rebuilt is None:
                    raise ConfigError(f"{record.source}: an expert turn does not fit the context budget of {budget}")
                row = EpisodeRow(rebuilt, [], [], [], [], [], [], None)
            else:
                row.completion_ids += following
                row.loss_mask += [False] * len(following)
        rows.append(row)
    finally:
        close = getattr(env, "close", None)
        if close:
            close()
    if not won:
        raise ConfigError(f"{record.source}: the expert did not solve this episode, so it gives no SFT data")
    cache[record.source] = rows
    return rows


def episode_sft_step(run, micro: int):
    """Token-mean NLL of the expert's assistant turns over the global batch (observations are context)."""
    if run.experience is not None:
        raise ConfigError("--experience is not supported for agent SFT yet; train without it")
    records, _ = run.next_batch()
    rows = [row for record in records for row in expert_rows(run, record)]
    out = run.model(
        [r.prompt_ids for r in rows],
        [r.completion_ids for r in rows],
        [r.insertions for r in rows],
        1.0,
        None,
        [r.kinds for r in rows],
    )
    mask = out.mask.float() * _pad_mask([r.loss_mask for r in rows], out.mask)
    global_tokens = run.global_sum(mask.sum())
    nll_sum = -(out.logprobs * mask).sum()
    loss = nll_sum * run.world / global_tokens
    return loss, {
        "loss": run.global_sum(nll_sum.detach()) / global_tokens,
        "latent_norm": float(out.latent_norm.detach()),
        "tokens": global_tokens,
        "turns_per_episode": run.global_sum(sum(k.count(PROMPT) for r in rows for k in [r.kinds]))
        / run.global_sum(len(records)),
    }


def _pad_mask(masks: list[list[bool]], like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    for i, m in enumerate(masks):
        out[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return out


def episode_reward(episode, invalid_action_penalty: float = 0.0) -> float:
    """Success (1 or 0), minus the optional shaping penalty per turn whose reply held no action."""
    return float(episode.success) - invalid_action_penalty * sum(t.action is None for t in episode.turns)


def episode_rollout(
    run, records, micro: int, memory: str, sample_trigger: bool = False, insert_at_prompt_end: bool = True
) -> RolloutBatch:
    """G sampled episodes per record as a :class:`RolloutBatch` of teacher-forcing rows."""
    config, model, task = run.config, run.unwrapped, run.task
    if config.reward_funcs and config.reward_funcs != ["task"]:
        raise ConfigError("agent tasks are rewarded by episode success; --reward-funcs does not apply")
    if not insert_at_prompt_end:
        raise ConfigError("agent episodes weave at every turn's start; insert_at_prompt_end must stay on")
    g = config.num_generations
    envs = [task.make_env(r) for r in records for _ in range(g)]
    agent = task.agent_config(
        memory=memory,
        max_turn_tokens=config.max_new_tokens,
        max_insertions=config.max_insertions,
        do_sample=True,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        sample_trigger=sample_trigger,
        seed=run.rollout_seed(micro),
        return_logprobs=True,
    )
    was_training = model.training
    model.eval()
    try:
        episodes = run_episodes(
            model,
            envs,
            episode_format(run),
            agent,
            seeds=[task.seed_of(r) for r in records for _ in range(g)],
            group=g,
            experience=run.experience,
            env_ids=[r.source for r in records for _ in range(g)],
        )
    finally:
        model.train(was_training)
        for env in envs:
            close = getattr(env, "close", None)
            if close:
                close()
    rows, owner = [], []
    for e, episode in enumerate(episodes):
        for row in training_rows(episode):
            rows.append(row)
            owner.append(e)
    device = model.device
    width = max(len(r.completion_ids) for r in rows)
    old = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        old[i, : len(r.logprobs)] = torch.tensor(r.logprobs)
    truncated = [episodes[e].end_reason in ("max_turns", "context") for e in owner]
    return RolloutBatch(
        prompt_ids=[r.prompt_ids for r in rows],
        completion_ids=[r.completion_ids for r in rows],
        insertions=[r.insertions for r in rows],
        contexts=None if run.experience is None else [r.contexts for r in rows],
        decisions=[[(p, ins, kind) for p, ins, kind in r.decisions] for r in rows],
        old_logprobs=old.to(device),
        rewards=torch.tensor([episode_reward(e, config.invalid_action_penalty) for e in episodes], device=device),
        truncated=torch.tensor(truncated, device=device),
        texts=[" | ".join(t.completion.text for t in e.turns) for e in episodes],
        kinds=[r.kinds for r in rows],
        loss_mask=_pad_mask([r.loss_mask for r in rows], torch.zeros(len(rows), width, device=device)),
        row_episode=torch.tensor(owner, device=device),
    )
