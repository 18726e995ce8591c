"""ALFWorld on the real games in ../shared/data/alfworld, through alfworld/textworld (the `[agents]` extra).

`make test` installs the extra and sets MEMGEN_REQUIRE_AGENTS=1, so there a missing package fails
instead of skipping.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alfworld"

if os.environ.get("MEMGEN_REQUIRE_AGENTS") != "1":
    pytest.importorskip("alfworld", reason="ALFWorld tests need the [agents] extra")
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is not there", allow_module_level=True)

from memgen.agents.alfworld import TASK_TYPES, check_game, list_games, replay_expert, unpack_split  # noqa: E402
from memgen.agents.play import ExpertConfig, replay_split  # noqa: E402
from memgen.data import DataError  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Games unpack into a cache outside the repository (here a scratch one, shared by this module)."""
    old = os.environ.get("MEMGEN_CACHE")
    os.environ["MEMGEN_CACHE"] = os.environ.get("MEMGEN_TEST_ALFWORLD_CACHE") or str(tmp_path_factory.mktemp("cache"))
    yield Path(os.environ["MEMGEN_CACHE"])
    if old is None:
        os.environ.pop("MEMGEN_CACHE")
    else:
        os.environ["MEMGEN_CACHE"] = old


def test_splits_have_the_published_game_counts(cache):
    assert len(list_games(DATA, "valid_seen")) == 140
    assert len(list_games(DATA, "valid_unseen")) == 134
    assert str(unpack_split(DATA, "valid_seen")).startswith(str(cache))


@pytest.mark.slow
def test_expert_replay_solves_three_valid_seen_games_of_each_task_type():
    # All 140 games take about 3 minutes; `memgen agent expert --split valid_seen` replays them.
    summary = replay_split(ExpertConfig(data=str(DATA), split="valid_seen", workers=2, per_type=3))
    assert summary["games"] == 18
    assert summary["task_types"] == sorted(TASK_TYPES.values())
    assert summary["failed"] == [], json.dumps(summary["failed"], indent=1)


def test_unknown_game_and_corrupt_archive_are_refused(tmp_path):
    with pytest.raises(DataError, match="no such ALFWorld game file"):
        check_game(tmp_path / "nope" / "game.tw-pddl")
    bogus = tmp_path / "game.tw-pddl"
    bogus.write_text('{"grammar": ""}')
    with pytest.raises(DataError, match="missing"):
        check_game(bogus)
    # A truncated copy of a real archive, cut here (the data stays in ../shared).
    cut = tmp_path / "archives"
    cut.mkdir()
    raw = (DATA / "valid_unseen.tar.xz").read_bytes()
    (cut / "valid_unseen.tar.xz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        unpack_split(cut, "valid_unseen")
    with pytest.raises(DataError, match="unknown ALFWorld split"):
        unpack_split(DATA, "test")
    root = Path(os.environ["MEMGEN_CACHE"], "alfworld")
    assert not list(root.glob(f"valid_unseen-{len(raw) // 2}-*")) and not list(root.glob(".valid_unseen-*"))


def test_a_game_steps_through_textworld():
    game = list_games(DATA, "valid_unseen")[0]
    result = replay_expert(game)
    assert result["won"] and result["steps"] > 0


def _tiny_model(tmp_path):
    from memgen.tiny import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_causal_lm(tok, hidden_size=32, num_layers=1, max_positions=4096).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.slow
def test_recipe_sft_then_grpo_then_trigger_on_two_games(tmp_path):
    """The real entry points on 2 training games with a tiny random model, then eval and play."""
    from memgen.train.logging import read_metrics

    base = _tiny_model(tmp_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    common = [
        "--model",
        str(base),
        "--task",
        "alfworld",
        "--data",
        str(DATA),
        "--limit",
        "2",
        "--per-device-batch-size",
        "2",
        "--max-steps",
        "2",
        "--progress",
        "false",
        "--save-every",
        "0",
        "--tensorboard",
        "false",
        "--max-prompt-tokens",
        "3000",
    ]

    def memgen(*args):
        done = subprocess.run(
            [sys.executable, "-m", "memgen", *args], env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    memgen(
        "train",
        "weaver",
        "--method",
        "sft",
        "--output-dir",
        str(tmp_path / "sft"),
        "--prompt-latents",
        "2",
        "--inference-latents",
        "2",
        "--lora-r",
        "4",
        "--max-insertions",
        "2",
        *common,
    )
    sft = read_metrics(tmp_path / "sft")
    assert len(sft) == 2 and all(r["loss"] > 0 and r["turns_per_episode"] >= 3 for r in sft)
    memgen(
        "train",
        "weaver",
        "--method",
        "grpo",
        "--adapter",
        str(tmp_path / "sft" / "final"),
        "--output-dir",
        str(tmp_path / "grpo"),
        "--num-generations",
        "2",
        "--max-new-tokens",
        "6",
        "--max-turns",
        "3",
        "--max-insertions",
        "1",
        *common,
    )
    grpo = read_metrics(tmp_path / "grpo")
    assert len(grpo) == 2 and all("reward_mean" in r and r["tokens"] > 0 for r in grpo)
    memgen(
        "train",
        "trigger",
        "--adapter",
        str(tmp_path / "grpo" / "final"),
        "--output-dir",
        str(tmp_path / "trig"),
        "--num-generations",
        "2",
        "--max-new-tokens",
        "6",
        "--max-turns",
        "3",
        "--max-insertions",
        "1",
        *common,
    )
    assert len(read_metrics(tmp_path / "trig")) == 2

    out = tmp_path / "episodes.jsonl"
    summary = json.loads(
        memgen(
            "eval",
            "--model",
            str(base),
            "--adapter",
            str(tmp_path / "trig" / "final"),
            "--task",
            "alfworld",
            "--data",
            str(DATA),
            "--split",
            "valid_unseen",
            "--limit",
            "2",
            "--max-turns",
            "3",
            "--max-new-tokens",
            "6",
            "--memory",
            "trigger",
            "--json",
            "--progress",
            "false",
            "--output",
            str(out),
        )
    )
    assert summary["n"] == 2 and 0.0 <= summary["success"] <= 1.0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2 and all(r["turns"] == 3 and len(r["log"]) == 3 for r in lines)
    shown = memgen(
        "agent",
        "play",
        "--model",
        str(base),
        "--adapter",
        str(tmp_path / "trig" / "final"),
        "--data",
        str(DATA),
        "--split",
        "valid_unseen",
        "--max-turns",
        "2",
        "--max-turn-tokens",
        "6",
    )
    assert "--- turn 1" in shown and "--- turn 2" in shown and "Your task is to" in shown and "===" in shown
