"""The batched episode runner: N environments, one MemGen engine, one KV cache row per episode.

Every turn, the rows whose episodes go on advance together: their transitions (the previous
turn's last token, the observation, the next turn's header) are appended to their cache rows,
the weaver weaves at the start of the turn as at a prompt end (a trigger decision when the
model has a prompt-end trigger head and memory is ``trigger``), and the turn is decoded with
in-reasoning insertions by the memory policy. Finished episodes leave the batch. Nothing is
re-prefilled between turns, and latents woven in earlier turns stay in context.

**Context budget (the truncation rule).** Before a turn, a row must have room for its
transition, the turn-start latents and a whole turn (``max_turn_tokens`` plus the
in-reasoning latents ``max_insertions`` may add) inside ``max_context_tokens`` (default: the
model's context). When it has not, its history is rebuilt as text: the first prompt (the task)
and the newest k turns with their observations, for the largest k that fits; failing that, the
current observation alone as a first prompt; failing that, the episode ends (``context``). The
rebuilt history is prefilled into the row (its old slots are masked) and the latents of the
dropped and kept turns are not re-woven: only the new turn's are.

Departure from the paper: the paper's multi-turn code was not released; weaving at every
assistant turn's start and at delimiters inside turns follows its description.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..config import GenerateConfig
from ..dataclass_cli import check_ranges, help_field
from ..engine import TurnSession
from ..errors import ConfigError, InputError
from .env import ActionError, EnvError, EnvTimeout, ProcessEnv, action_parser
from .episode import Episode, Turn


@dataclass
class AgentConfig:
    """How episodes are played."""

    memory: str = help_field("trigger", "insertion policy: off | always | trigger | random:P")
    max_turns: int = help_field(50, "turns per episode before it ends unfinished", ge=1)
    max_turn_tokens: int = help_field(64, "most tokens the agent writes per turn", ge=1)
    max_context_tokens: int | None = help_field(None, "context budget per episode (default: the model's context)", ge=8)
    keep_task: bool = help_field(True, "truncated histories keep the first prompt (the task)")
    max_insertions: int = help_field(4, "cap on in-reasoning insertions per turn", ge=0)
    do_sample: bool = help_field(False, "sample actions instead of greedy decoding")
    temperature: float = help_field(1.0, "sampling temperature", gt=0)
    top_p: float = help_field(1.0, "nucleus sampling mass", gt=0, le=1)
    top_k: int = help_field(0, "top-k sampling (0 = off)", ge=0)
    trigger_threshold: float = help_field(0.5, "insert when P(invoke) >= this (memory=trigger, no sampling)", ge=0)
    sample_trigger: bool = help_field(False, "draw trigger decisions instead of thresholding (trigger RL)")
    seed: int = help_field(0, "seed of token sampling and trigger decisions", ge=0)
    return_logprobs: bool = help_field(False, "keep each token's log-prob (RL)")
    progress: bool = help_field(True, "show a progress bar of episodes done and success so far")

    def __post_init__(self) -> None:
        check_ranges(self)


def _is_won(reward: float, info: dict) -> bool:
    won = info.get("won")
    if isinstance(won, (list, tuple)):
        won = won[0] if won else None
    return bool(won) if won is not None else reward > 0


def run_episodes(
    model,
    envs: list,
    fmt,
    config: AgentConfig,
    seeds: list[int | None] | None = None,
    group: int = 1,
    experience=None,
    env_ids: list[str] | None = None,
    on_turn: Callable[[int, Turn], None] | None = None,
    insertion_filter=None,
    return_latents: bool = False,
) -> list[Episode]:
    """Play one episode in each environment, batched; returns the episodes in ``envs`` order.

    With ``group`` G > 1, ``envs[i*G:(i+1)*G]`` are G copies of one game that must reset to the
    same first observation: their prompt is prefilled once and its cache shared (GRPO's G
    episodes per game). ``on_turn(row, turn)`` is called after every turn (``memgen agent play``).
    ``insertion_filter`` and ``return_latents`` are :meth:`MemGen.generate`'s (``memgen analyze``).
    """
    if not envs:
        raise InputError("run_episodes needs at least one environment")
    if len(envs) % group:
        raise ConfigError(f"{len(envs)} environments do not split into groups of {group}")
    seeds = list(seeds) if seeds is not None else [None] * len(envs)
    env_ids = env_ids or [getattr(e, "name", f"env{i}") for i, e in enumerate(envs)]
    episodes = [Episode(env_ids[i], None) for i in range(len(envs))]
    # Child-process environments start, reset and step concurrently (they wait on pipes, not on the GIL).
    pool = ThreadPoolExecutor(max_workers=min(len(envs), 16)) if any(isinstance(e, ProcessEnv) for e in envs) else None
    try:
        return _play(
            model,
            envs,
            fmt,
            config,
            seeds,
            group,
            experience,
            env_ids,
            on_turn,
            episodes,
            pool,
            insertion_filter,
            return_latents,
        )
    finally:
        if pool is not None:
            pool.shutdown()


def _play(
    model,
    envs,
    fmt,
    config,
    seeds,
    group,
    experience,
    env_ids,
    on_turn,
    episodes,
    pool,
    insertion_filter=None,
    return_latents=False,
) -> list[Episode]:
    tok, n = model.tokenizer, len(envs)

    def reset(i: int):
        try:
            return envs[i].reset(seeds[i])
        except EnvError as exc:
            raise EnvError(f"{env_ids[i]}: {exc}") from None

    observations, infos = [], []
    for i, (obs, info) in enumerate(pool.map(reset, range(n)) if pool is not None else map(reset, range(n))):
        observations.append(obs)
        infos.append(info or {})
        episodes[i].task_type = (info or {}).get("task_type")
    firsts = [fmt.first_prompt(o, inf.get("admissible")) for o, inf in zip(observations, infos)]
    for start in range(0, n, group):
        if len(set(firsts[start : start + group])) != 1:
            raise InputError(
                f"the {group} copies of {env_ids[start]} reset to different observations; "
                "a group must share its first prompt"
            )
    prompts = model.encode_prompts(firsts[::group])
    gen = GenerateConfig(
        memory=config.memory,
        do_sample=config.do_sample,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        max_new_tokens=config.max_turn_tokens,
        max_insertions=config.max_insertions,
        trigger_threshold=config.trigger_threshold,
        sample_trigger=config.sample_trigger,
        stop=list(fmt.stop),
        num_samples=group,
        seed=config.seed,
        return_logprobs=config.return_logprobs,
        return_latents=return_latents,
    )
    session = TurnSession(model, prompts, gen, experience=experience, insertion_filter=insertion_filter)
    context = model.reasoner.context_length
    limits = [b for b in (config.max_context_tokens, context) if b]
    budget = min(limits) if limits else None
    k_prompt = session.k_prompt if session.prompt_insert else 0
    reserve = (
        k_prompt + config.max_turn_tokens + (config.max_insertions * session.k_infer if session.memory_on else 0) + 1
    )
    if budget is not None and max(len(p) for p in prompts) + reserve > budget:
        raise InputError(
            f"the first prompt ({max(len(p) for p in prompts)} tokens) plus one turn ({reserve}) does "
            f"not fit the context budget of {budget} tokens"
        )
    # Per row: the first prompt's text, and each turn's (token ids, transition text after it), to rebuild
    # a truncated history.
    history: list[list[tuple[list[int], str]]] = [[] for _ in range(n)]
    prompt_ids = [prompts[i // group] for i in range(n)]
    segments = {i: prompt_ids[i] for i in range(n)}
    restarted: set[int] = set()
    bar = tqdm(total=n, desc="episodes", disable=not config.progress, leave=False)
    tally = [0, 0]  # episodes done, episodes won

    def finish(i: int, reason: str) -> None:
        episodes[i].end_reason = reason
        tally[0] += 1
        tally[1] += episodes[i].success
        bar.update(1)
        bar.set_postfix(success=f"{tally[1] / tally[0]:.2f}")

    completions = dict(enumerate(session.first_turn()))
    while completions:
        following: dict[int, list[int]] = {}
        restart: set[int] = set()
        outcomes = _step_all(envs, completions, pool)
        for i, c in completions.items():
            episode = episodes[i]
            action, feedback, reward, done, info, end = outcomes[i]
            if info is not None:
                infos[i] = info
            turn = Turn(observations[i], segments[i], c, action, feedback, float(reward), i in restarted)
            episode.turns.append(turn)
            episode.reward += float(reward)
            if on_turn is not None:
                on_turn(i, turn)
            if done:
                episode.success = not end and _is_won(reward, infos[i])
                finish(i, end or "done")
                continue
            if len(episode.turns) >= config.max_turns:
                finish(i, "max_turns")
                continue
            observations[i] = feedback
            admissible = infos[i].get("admissible")
            text = fmt.transition(
                tok.decode(c.token_ids, skip_special_tokens=True), c.finish_reason, feedback, admissible
            )
            history[i].append((c.token_ids, text))
            segment = [c.token_ids[-1]] + tok(text, add_special_tokens=False)["input_ids"]
            if budget is not None and int(session.state.next_pos[i]) + len(segment) + reserve > budget:
                rebuilt = _rebuild(
                    tok, fmt, firsts[i], history[i], feedback, admissible, budget - reserve, config.keep_task, model
                )
                if rebuilt is None:
                    finish(i, "context")
                    continue
                segment = rebuilt
                restart.add(i)
            following[i] = segment
        segments.update(following)
        restarted = restart
        completions = session.next_turn(following, restart) if following else {}
    bar.close()
    session.close()
    return episodes


def _step_all(envs: list, completions: dict, pool) -> dict:
    """Parse every reply and step its environment (concurrently for child-process environments).

    Returns row -> (action, feedback, reward, done, info or None, end reason if the environment failed).
    """

    def one(i: int):
        env, reply = envs[i], completions[i]
        if reply.finish_reason == "length":  # a cut reply is never acted on: its action may be cut too
            return (
                None,
                (
                    f"Invalid action: the reply did not end within {len(reply.token_ids)} tokens. Reply with "
                    "one short command."
                ),
                0.0,
                False,
                None,
                "",
            )
        try:
            action = action_parser(env)(reply.text)
        except ActionError as exc:
            return None, str(exc), 0.0, False, None, ""
        try:
            feedback, reward, done, info = env.step(action)
        except EnvError as exc:  # the episode fails, the batch goes on
            return (
                action,
                f"The environment failed: {exc}",
                0.0,
                True,
                None,
                ("timeout" if isinstance(exc, EnvTimeout) else "error"),
            )
        return action, feedback, float(reward), bool(done), info or {}, ""

    rows = list(completions)
    results = pool.map(one, rows) if pool is not None else map(one, rows)
    return dict(zip(rows, results))


def _rebuild(
    tok,
    fmt,
    first: str,
    turns: list[tuple[list[int], str]],
    observation: str,
    admissible,
    room: int,
    keep_task: bool,
    model,
) -> list[int] | None:
    """The truncated history's token ids (see the module docstring), or None when nothing fits in ``room``."""

    def encode(text: str) -> list[int]:
        return model.encode_prompts([text])[0]

    if keep_task:
        for k in range(len(turns), 0, -1):
            kept = "".join(tok.decode(ids, skip_special_tokens=False) + after for ids, after in turns[-k:])
            ids = encode(first + kept)
            if len(ids) <= room:
                return ids
    alone = encode(fmt.first_prompt(observation, admissible))
    return alone if len(alone) <= room else None
