"""Agents: multi-turn episodes through one engine (memgen.agents), on tiny models and the ledger world.

The equivalences of the single-turn engine, for episodes: teacher-forced log-probs of a whole
multi-turn episode equal the rollout's, a padded batch of episodes equals one at a time, and a
never-firing trigger plays the same episode as memory off.
"""

import time

import pytest
import torch
from conftest import make_memgen

from memgen.agents.dialogue import TranscriptFormat
from memgen.agents.env import ActionError, EnvTimeout, ProcessEnv, parse_action
from memgen.agents.episode import training_rows
from memgen.agents.ledger import LedgerEnv, ledger_format
from memgen.agents.runner import AgentConfig, run_episodes


class TalkEnv:
    """Accepts any action; answers with observations of different lengths; ends after ``turns`` turns."""

    def __init__(self, turns=3, name="talk"):
        self.turns, self.name = turns, name

    def reset(self, seed=None):
        self.seed, self.t = seed or 0, 0
        return f"room {self.seed}: a door, a key.", {"admissible": ["open door", "take key"], "won": False}

    def step(self, action):
        self.t += 1
        done = self.t >= self.turns
        obs = "You see " + ", ".join(["a box"] * ((self.seed + self.t) % 3 + 1)) + "."
        return obs, float(done), done, {"admissible": ["look"], "won": done}


class SleepyEnv(TalkEnv):
    def step(self, action):
        time.sleep(60)


def _ending_memgen(tok):
    """A tiny MemGen whose replies end within a few tokens (most characters count as end-of-turn), so the
    runner acts on them instead of refusing replies cut by the token budget."""
    import string

    model = make_memgen(tok)
    model.reasoner_model.generation_config.eos_token_id = [
        tok.convert_tokens_to_ids(c) for c in string.ascii_letters.replace("a", "") + string.digits
    ]
    return model


def _fmt():
    return TranscriptFormat(preamble="Play.\n")


def _play(model, envs, **kw):
    kw.setdefault("max_turn_tokens", 12)
    kw.setdefault("max_turns", 4)
    kw.setdefault("progress", False)
    return run_episodes(model, envs, _fmt(), AgentConfig(**kw), seeds=list(range(len(envs))))


@pytest.mark.parametrize("prompt_decides", [False, True], ids=["turn-start-woven", "turn-start-decided"])
@pytest.mark.parametrize("budget", [None, 300], ids=["whole-history", "truncated"])
def test_multi_turn_teacher_forcing_matches_rollout(tok, prompt_decides, budget):
    model = make_memgen(tok).double()
    model.config.trigger_at_prompt_end = prompt_decides
    if prompt_decides:
        model.prompt_trigger = model._new_trigger_head().double()
    episodes = _play(
        model,
        [TalkEnv(4) for _ in range(3)],
        memory="random:0.5",
        do_sample=True,
        seed=3,
        temperature=0.8,
        return_logprobs=True,
        max_context_tokens=budget,
        max_turns=4,
    )
    rows = [row for e in episodes for row in training_rows(e)]
    assert all(len(e.turns) == 4 for e in episodes)
    if budget is None:
        assert len(rows) == 3
    else:
        assert len(rows) > 3 and any(t.restarted for e in episodes for t in e.turns)
    kinds = [r.kinds for r in rows]
    # Later turns of a row start with prompt-query insertions (woven, or decided by the prompt-end head).
    later_starts = [p for r in rows for p, k in zip(r.insertions, r.kinds) if k == "prompt" and p > 0]
    later_starts += [p for r in rows for p, _, k in r.decisions if k == "prompt" and p > 0]
    assert later_starts, "rows must hold several turns"
    tf = model.teacher_forced(
        [r.prompt_ids for r in rows], [r.completion_ids for r in rows], [r.insertions for r in rows], 0.8, None, kinds
    )
    for i, row in enumerate(rows):
        n = len(row.completion_ids)
        mask = torch.tensor(row.loss_mask)
        torch.testing.assert_close(
            tf.logprobs[i, :n][mask], torch.tensor(row.logprobs, dtype=tf.logprobs.dtype)[mask], atol=1e-8, rtol=0
        )
    # The trigger logits at every decision equal the probabilities the rollout logged.
    logged = [
        ins.probability
        for e in episodes
        for t in e.turns
        for ins in t.completion.insertions
        if ins.probability is not None
    ]
    read = []
    for i, row in enumerate(rows):
        for pos, _, kind in row.decisions:
            if pos == 0:
                z = tf.prompt_trigger_logits[i]
            elif kind == "prompt":
                z = tf.turn_trigger_logits[i, pos - 1]
            else:
                z = tf.trigger_logits[i, pos - 1]
            read.append(torch.sigmoid(z).item())
    assert len(read) == len(logged) > 0
    assert max(abs(a - b) for a, b in zip(read, logged)) < 1e-8


def test_padded_batch_of_episodes_matches_one_at_a_time(tok):
    model = make_memgen(tok)
    batch = _play(model, [TalkEnv(3) for _ in range(3)], memory="always", seed=5)
    for i in range(3):
        alone = run_episodes(
            model,
            [TalkEnv(3)],
            _fmt(),
            AgentConfig(memory="always", max_turn_tokens=12, max_turns=4, progress=False, seed=5),
            seeds=[i],
        )[0]
        assert [t.completion.token_ids for t in alone.turns] == [t.completion.token_ids for t in batch[i].turns]
        assert [t.completion.insertion_positions for t in alone.turns] == [
            t.completion.insertion_positions for t in batch[i].turns
        ]


def test_never_firing_trigger_plays_the_memory_off_episode(tok):
    model = make_memgen(tok)
    model.config.trigger_at_prompt_end = True
    model.prompt_trigger = model._new_trigger_head()
    off = _play(model, [TalkEnv(3) for _ in range(2)], memory="off")
    never = _play(model, [TalkEnv(3) for _ in range(2)], memory="trigger", trigger_threshold=1.1)
    for a, b in zip(off, never):
        assert [t.completion.token_ids for t in a.turns] == [t.completion.token_ids for t in b.turns]
        assert all(t.completion.num_insertions == 0 for t in b.turns)
        assert all(t.completion.insertions[0].probability is not None for t in b.turns)  # each turn start decided


def test_one_turn_episode_equals_plain_generate(tok):
    model = make_memgen(tok)
    episodes = _play(model, [TalkEnv(1) for _ in range(2)], memory="always", seed=1, max_turns=1)
    prompts = [_fmt().first_prompt(*TalkEnv(1).reset(i)[:1], ["open door", "take key"]) for i in range(2)]
    out = model.generate(prompts, memory="always", max_new_tokens=12, stop=["\n"], seed=1, max_insertions=4)
    assert [e.turns[0].completion.token_ids for e in episodes] == [c.token_ids for c in out.completions]


def test_ledger_expert_wins_and_wrong_answers_end_the_episode():
    env = LedgerEnv("B")
    obs, info = env.reset(7)
    assert obs.startswith("Q: ") and obs.endswith("\nA:") and ("finds" in obs or "drops" in obs)
    done = False
    while not done:
        obs, reward, done, info = env.step(env.parse_action(info["expert"]))
    assert reward == 1.0 and info["won"]
    env.reset(7)
    _, reward, done, info = env.step("99")
    assert done and reward == 0.0 and not info["won"]
    with pytest.raises(ActionError, match="so N"):
        env.parse_action("no number here")


def test_ledger_format_matches_the_demo_pretraining_rows():
    from memgen.demo.reasoner import demo_tokenizer

    tok = demo_tokenizer()
    fmt = ledger_format(tok)
    env = LedgerEnv("A")
    obs, info = env.reset(0)
    assert fmt.first_prompt(obs) == obs
    text = fmt.transition(info["expert"], "eos", "Q: Ann has 2 eggs. gets 1. loses 1.\nA:")
    assert text == "<bos>Q: Ann has 2 eggs. gets 1. loses 1.\nA:"
    assert tok(text, add_special_tokens=False)["input_ids"][0] == tok.bos_token_id


def test_strict_action_parser():
    assert parse_action("  go to desk 1\nthen more") == "go to desk 1"
    assert parse_action("think <action>take key</action> x <action> open   door </action>") == "open door"
    with pytest.raises(ActionError, match="empty"):
        parse_action(" \n ")
    with pytest.raises(ActionError, match="limit is 200"):
        parse_action("go " * 100)


def test_unparsable_or_overlong_actions_get_a_failure_observation(tok):
    model = make_memgen(tok)
    episode = _play(model, [TalkEnv(2)], memory="off", max_turn_tokens=3, max_turns=2)[0]
    assert len(episode.turns) == 2 and episode.end_reason == "max_turns"
    for turn in episode.turns:  # a reply cut by the turn's token budget is not acted on
        if turn.completion.finish_reason == "length":
            assert turn.action is None and turn.feedback.startswith("Invalid action: the reply did not end within 3")
    assert any(t.completion.finish_reason == "length" for t in episode.turns)


@pytest.mark.slow
def test_step_timeout_ends_the_episode_and_the_batch_goes_on(tok):
    model = _ending_memgen(tok)
    slow = ProcessEnv(SleepyEnv, timeout=1.0, name="sleepy")
    started = time.time()
    try:
        episodes = run_episodes(
            model,
            [slow, TalkEnv(2)],
            _fmt(),
            AgentConfig(memory="off", max_turn_tokens=16, max_turns=2, progress=False),
            seeds=[0, 1],
            env_ids=["sleepy", "talk"],
        )
    finally:
        slow.close()
    assert time.time() - started < 30
    assert episodes[0].end_reason == "timeout" and not episodes[0].success
    assert "longer than 1 s" in episodes[0].turns[-1].feedback
    assert episodes[1].end_reason in ("done", "max_turns") and len(episodes[1].turns) == 2
    assert not slow._process.is_alive()
    with pytest.raises(EnvTimeout):
        slow2 = ProcessEnv(SleepyEnv, timeout=0.5)
        slow2.reset(0)
        slow2.step("x")


def test_episode_log_is_json_ready(tok):
    import json

    model = make_memgen(tok)
    episode = _play(model, [TalkEnv(2)], memory="always")[0]
    log = json.loads(json.dumps(episode.as_log()))
    assert log["turns"] == len(log["log"]) >= 2 and "insertions" in log["log"][0]


class OneTurnEnv:
    """One turn; success when the action holds an 'a' (so random tiny models succeed sometimes)."""

    def reset(self, seed=None):
        self.seed = seed
        return f"say a word {seed}", {"won": False}

    def step(self, action):
        won = "a" in action
        return "bye", float(won), True, {"won": won}


def _a_reward(prompts, completions, **_):
    scores = []
    for text in completions:
        try:
            scores.append(float("a" in parse_action(text)))
        except ActionError:
            scores.append(0.0)
    return scores


def test_episode_grpo_with_one_turn_equals_single_turn_grpo(tok, tmp_path):
    from memgen.agents.tasks import EnvTask
    from memgen.data import Record
    from memgen.tasks import Task
    from memgen.train import WeaverTrainConfig, train_weaver
    from memgen.train.logging import read_metrics

    fmt = _fmt()
    seeds = list(range(8))

    episodic = EnvTask(
        "one-turn",
        [Record(f"game {s}", None, {"seed": s}, f"game:{s}") for s in seeds],
        lambda record: OneTurnEnv(),
        lambda tokenizer, chat=False: fmt,
        max_turns=1,
    )
    single = Task(
        "one-turn",
        [Record(fmt.first_prompt(OneTurnEnv().reset(s)[0]), None, {}, f"game:{s}") for s in seeds],
        _a_reward,
        {},
        list(fmt.stop),
    )
    results = {}
    for name, task in (("episodes", episodic), ("single", single)):
        # Replies end within their budget: the runner never acts on a cut reply, which a single-turn
        # reward (on text alone) could not know about.
        model = _ending_memgen(tok)
        config = WeaverTrainConfig(
            model="tiny",
            data="tiny",
            method="grpo",
            max_steps=3,
            per_device_batch_size=2,
            num_generations=4,
            max_new_tokens=16,
            max_insertions=2,
            learning_rate=1e-2,
            output_dir=str(tmp_path / name),
            progress=False,
            save_every=0,
            tensorboard=False,
            temperature=1.5,
        )
        train_weaver(config, model=model, task=task)
        results[name] = (read_metrics(tmp_path / name), [p.detach().clone() for p in model.weaver_parameters()])
    ep_rows, single_rows = results["episodes"][0], results["single"][0]
    assert all(r["completion_length"] < 16 for r in single_rows), "no reply may hit the token budget"
    assert any(r["reward_std"] > 0 for r in single_rows), "some group must have a nonzero advantage"
    for a, b in zip(ep_rows, single_rows):
        for key in ("loss", "reward_mean", "reward_std", "tokens", "insertions_per_rollout"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    for p, q in zip(*(results[k][1] for k in ("episodes", "single"))):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    fresh = make_memgen(tok).weaver_parameters()
    assert max((p - q).abs().max().item() for p, q in zip(results["episodes"][1], fresh)) > 1e-4, "GRPO must train"


def test_chat_format_renders_the_same_conversation_as_the_template():
    from memgen.agents.dialogue import ChatFormat
    from memgen.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}<eos>\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]\n{% endif %}"
    )
    fmt = ChatFormat(tok, system="Be brief.")
    first = fmt.first_prompt("You see a desk.", ["go to desk 1", "look"])
    reply = "go to desk 1"
    whole = tok.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "You see a desk.\nAdmissible commands: go to desk 1, look"},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "On the desk 1, you see a pen.\nAdmissible commands: take pen"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    # The reply ended at the template's EOS, which the model generated: the transition does not repeat it.
    ended = first + reply + "<eos>" + fmt.transition(reply, "eos", "On the desk 1, you see a pen.", ["take pen"])
    cut = first + reply + fmt.transition(reply, "length", "On the desk 1, you see a pen.", ["take pen"])
    assert ended == whole and cut == whole
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(Exception, match="rewrites message contents"):
        ChatFormat(tok)


def test_a_first_prompt_that_cannot_fit_the_budget_is_refused(tok):
    from memgen import InputError

    model = make_memgen(tok)
    with pytest.raises(InputError, match="does not fit the context budget of 40 tokens"):
        _play(model, [TalkEnv(2)], memory="always", max_context_tokens=40)


def test_episode_reward_is_success_with_optional_shaping(tok):
    from memgen.agents.training import episode_reward

    class Picky(TalkEnv):
        def parse_action(self, text):
            raise ActionError("Invalid action: say 'please'.")

    model = _ending_memgen(tok)
    episode = _play(model, [Picky(3)], memory="off", max_turn_tokens=16, max_turns=3)[0]
    assert episode.end_reason == "max_turns" and not episode.success
    assert [t.feedback for t in episode.turns] == ["Invalid action: say 'please'."] * 3
    assert episode_reward(episode) == 0.0
    assert episode_reward(episode, 0.1) == pytest.approx(-0.3)
