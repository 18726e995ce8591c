"""``memgen analyze``: the engine's insertion filter, clustering, the collection file, the CLI recipe, the plots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, make_base, make_memgen

from memgen.analysis import AnalyzeConfig, ClusterFilter, Collection, analyze, collect, fit_clusters, silhouette_sweep
from memgen.tasks.domains import FAILURE_TYPES, as_task, failure_type, make_split

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
CLI = [sys.executable, "-m", "memgen"]


def pooled_latents(output) -> tuple[torch.Tensor, list[str]]:
    rows, kinds = [], []
    for c in output.completions:
        for ins in c.insertions:
            if ins.inserted:
                rows.append(ins.latents.float().mean(dim=0))
                kinds.append("prompt" if ins.position == 0 else "inference")
    return torch.stack(rows), kinds


def blobs(seed=0, n=40, d=16, centers=3):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(centers, d, generator=g) * 6
    return torch.cat([means[c] + torch.randn(n, d, generator=g) for c in range(centers)])


# ---------------------------------------------------------------- clustering
@pytest.mark.slow
def test_clustering_is_deterministic_for_a_seed():
    points = blobs() + torch.randn(120, 16, generator=torch.Generator().manual_seed(5)) * 3
    first, again = fit_clusters(points, 4, seed=3), fit_clusters(points, 4, seed=3)
    assert first.labels == again.labels
    assert torch.equal(first.centroids, again.centroids)
    assert silhouette_sweep(points, 2, 6, seed=3) == silhouette_sweep(points, 2, 6, seed=3)
    # Labels are the nearest centroids, so the engine's filter puts each latent where the report does.
    assert torch.cdist(points, first.centroids).argmin(dim=1).tolist() == first.labels


def test_silhouette_finds_separated_groups_and_caps_n():
    sweep = silhouette_sweep(blobs(centers=3), 2, 8, seed=0)
    assert [s["n"] for s in sweep] == list(range(2, 9))
    assert max(sweep, key=lambda s: s["silhouette"])["n"] == 3
    # Three distinct points: N is capped by what can be told apart.
    few = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 0.0]] * 5 + [[0.0, 9.0]] * 5)
    assert fit_clusters(few, 4, 0).n_clusters == 3
    assert [s["n"] for s in silhouette_sweep(few, 2, 8, 0)] == [2]


def test_nearest_tokens_read_the_embedding_table(tok, monkeypatch):
    from memgen.analysis import nearest_tokens, reading

    model = make_memgen(tok)
    ids = [tok.convert_tokens_to_ids(t) for t in ("x", "7", ",")]
    table = model.reasoner_model.get_input_embeddings().weight.detach()
    monkeypatch.setattr(reading, "VOCAB_CHUNK", 7)  # chunks must not change the answer
    found = nearest_tokens(model, table[ids] * 3.0, top=4)
    assert [row[0]["id"] for row in found] == ids
    assert [row[0]["token"] for row in found] == ["x", "7", ","]
    assert all(abs(row[0]["cosine"] - 1) < 1e-4 and len(row) == 4 for row in found)
    assert all(row[0]["cosine"] >= row[1]["cosine"] >= row[3]["cosine"] for row in found)


# ---------------------------------------------------------------- the engine's insertion filter
@pytest.mark.parametrize("memory", ["always", "trigger"])
def test_ablating_an_empty_cluster_changes_nothing(tok, memory):
    model = make_memgen(tok)
    plain = model.generate(PROMPTS, memory=memory, max_new_tokens=30, output_logits=True, return_latents=True)
    pooled, _ = pooled_latents(plain)
    clustering = fit_clusters(pooled, 2, seed=0)
    far = clustering.centroids.mean(dim=0, keepdim=True) + 1e3  # a third centroid no latent is near
    empty = ClusterFilter(torch.cat([clustering.centroids, far]), {2}, ("prompt", "inference"))
    filtered = model.generate(PROMPTS, memory=memory, max_new_tokens=30, output_logits=True, insertion_filter=empty)
    assert sum(empty.seen.values()) == len(pooled) and not empty.withheld
    for a, b in zip(plain.completions, filtered.completions):
        assert a.token_ids == b.token_ids
        assert a.insertion_positions == b.insertion_positions
        assert not any(ins.suppressed for ins in b.insertions)
        torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_ablating_every_cluster_is_memory_off(tok, arch):
    model = make_memgen(tok, arch)
    woven = model.generate(PROMPTS, memory="always", max_new_tokens=30, return_latents=True)
    clustering = fit_clusters(pooled_latents(woven)[0], 3, seed=0)
    everything = ClusterFilter(clustering.centroids, {0, 1, 2}, ("prompt", "inference"))
    ablated = model.generate(PROMPTS, memory="always", max_new_tokens=30, insertion_filter=everything)
    off = model.generate(PROMPTS, memory="off", max_new_tokens=30)
    assert [c.token_ids for c in ablated.completions] == [c.token_ids for c in off.completions]
    assert all(not c.insertion_positions for c in ablated.completions)
    assert sum(everything.withheld.values()) == sum(len(c.insertions) for c in ablated.completions) > len(PROMPTS)
    # Clustering only delimiter insertions leaves the prompt end woven: every cluster withheld is then
    # memory with no in-reasoning insertions.
    inference = ClusterFilter(clustering.centroids, {0, 1, 2}, ("inference",))
    kept_prompt = model.generate(PROMPTS, memory="always", max_new_tokens=30, insertion_filter=inference)
    prompt_only = model.generate(PROMPTS, memory="always", max_new_tokens=30, max_insertions=0)
    assert [c.token_ids for c in kept_prompt.completions] == [c.token_ids for c in prompt_only.completions]
    assert all(c.insertion_positions == [0] for c in kept_prompt.completions)
    assert off.texts != prompt_only.texts  # the two statements are not the same statement


def test_a_withheld_insertion_leaves_no_trace(tok):
    """Withholding some insertions: the rollout equals teacher forcing with only the fed ones (float64)."""
    model = make_memgen(tok).double()
    woven = model.generate(PROMPTS, memory="always", max_new_tokens=30, return_latents=True)
    pooled, _ = pooled_latents(woven)
    clustering = fit_clusters(pooled, 3, seed=0)
    biggest = max(range(3), key=lambda c: clustering.sizes()[c])
    partial = ClusterFilter(clustering.centroids, {biggest}, ("prompt", "inference"))
    rollout = model.generate(
        PROMPTS, memory="always", max_new_tokens=30, return_logprobs=True, insertion_filter=partial
    )
    suppressed = [ins for c in rollout.completions for ins in c.insertions if ins.suppressed]
    assert suppressed and sum(c.num_insertions for c in rollout.completions) > 0
    assert all(not ins.inserted for ins in suppressed)
    tf = model.teacher_forced(
        model.encode_prompts(PROMPTS),
        [c.token_ids for c in rollout.completions],
        [c.insertion_positions for c in rollout.completions],
    )
    for r, c in enumerate(rollout.completions):
        n = len(c.token_ids)
        torch.testing.assert_close(
            tf.logprobs[r, :n], torch.tensor(c.logprobs, dtype=tf.logprobs.dtype), atol=1e-8, rtol=0
        )


# ---------------------------------------------------------------- failure types
def test_demo_failure_types():
    record = make_split("B", 1, 0)[0]
    prompt, gold = record.prompt, record.columns["answer"]
    solution = record.completion.strip()  # e.g. "4,-3=1,+5=6,so 6."
    start, *steps, final = solution.split(",")
    first_op, rest = steps[0][0], steps[0][1:]
    amount, result = rest.split("=")
    flipped = ("-" if first_op == "+" else "+") + rest
    cases = {
        solution: "correct",
        "": "format",
        "so what": "format",
        f"{int(start) % 9 + 1}," + ",".join(steps + [final]): "copy_error",
        ",".join([start, flipped] + steps[1:] + [final]): "wrong_sign",
        ",".join([start, f"{first_op}{amount}={int(result) + 1}"] + steps[1:] + [final]): "arithmetic",
        ",".join([start, steps[0]]) + ",so 1.": "stopped_early",
        ",".join([start] + steps): "stopped_early",
        ",".join([start] + steps + ["+1=9", final]): "extra_step",
        ",".join([start] + steps + [f"so {int(gold) % 9 + 1}."]): "wrong_final",
    }
    for completion, expected in cases.items():
        assert failure_type(prompt, completion, gold) == expected, completion
    assert set(cases.values()) <= set(FAILURE_TYPES)


# ---------------------------------------------------------------- collection and the whole analysis
@pytest.fixture(scope="module")
def demo_task():
    return as_task("toy", make_split("A", 8, 0) + make_split("B", 8, 0))


def config(out, **kw):
    kw = {
        "memory": "always",
        "max_new_tokens": 16,
        "batch_size": 8,
        "progress": False,
        "out": str(out),
        "group_by": "domain",
        "silhouette_max": 5,
        **kw,
    }
    return AnalyzeConfig(**kw)


def test_collection_round_trips(tmp_path, tok, demo_task):
    model = make_memgen(tok)
    collection = collect(model, demo_task, config(tmp_path), describe={"model": "tiny"})
    assert len(collection) == sum(row["insertions"] for row in collection.examples) > len(demo_task.records)
    assert {ins["kind"] for ins in collection.insertions} == {"prompt", "inference"}
    first = collection.insertions[0]
    assert first["preceding"] == demo_task.records[0].prompt[-60:] and first["position"] == 0
    for index, example in enumerate(collection.examples[:4]):
        ordinals = [ins["ordinal"] for ins in collection.insertions if ins["example"] == index]
        assert ordinals == list(range(1, example["insertions"] + 1))
    assert all(ins["failure"] in FAILURE_TYPES for ins in collection.insertions)
    collection.save(tmp_path / "c")
    loaded = Collection.load(tmp_path / "c")
    assert torch.equal(loaded.pooled, collection.pooled)
    assert (loaded.insertions, loaded.examples, loaded.summary) == (
        collection.insertions,
        collection.examples,
        json.loads(json.dumps(collection.summary)),
    )
    assert loaded.meta["describe"] == {"model": "tiny"}
    (tmp_path / "c" / "insertions.jsonl").write_text('{"ok": 1}\nnot json\n')
    with pytest.raises(Exception, match=r"insertions.jsonl:2"):
        Collection.load(tmp_path / "c")


def test_analysis_reuses_a_collection(tmp_path, tok, demo_task):
    model = make_memgen(tok)
    first = analyze(model, demo_task, config(tmp_path / "a", ablate=False, tsne=False), log=lambda *_: None)
    again = analyze(
        model,
        demo_task,
        config(tmp_path / "b", ablate=False, tsne=False, collection=str(tmp_path / "a" / "collection")),
        log=lambda *_: None,
    )
    assert again["sizes"] == first["sizes"] and again["silhouette"] == first["silhouette"]
    assert [p["nearest_tokens"] for p in again["profiles"]] == [p["nearest_tokens"] for p in first["profiles"]]
    assert not (tmp_path / "b" / "collection").exists() and not first["ablations"]
    with pytest.raises(Exception, match="16 examples != 5 to evaluate.*max_new_tokens 16 != 12"):
        analyze(
            model,
            demo_task,
            config(tmp_path / "c", limit=5, max_new_tokens=12, collection=str(tmp_path / "a" / "collection")),
            log=lambda *_: None,
        )


def test_analysis_of_agent_episodes(tmp_path, tok):
    """Ledger episodes: latents collected per turn, and every cluster withheld plays the memory-off episodes."""
    from memgen.agents.evaluate import evaluate_agent
    from memgen.agents.tasks import load_env_task
    from memgen.evaluate import EvalConfig

    task = load_env_task("ledger", "AB", "test", 6)
    model = make_memgen(tok)
    cfg = config(tmp_path, task="ledger", max_new_tokens=12, controls=False, tsne=False, clusters=2, group_by="domain")
    report = analyze(model, task, cfg, log=lambda *_: None)
    collection = Collection.load(tmp_path / "collection")
    assert report["episodic"] and len(collection.examples) == 6
    turns = {ins["turn"] for ins in collection.insertions}
    assert turns == {1, 2}  # a reply without an answer is an invalid action, not the end: both turns are played
    assert all(ins["kind"] == "prompt" for ins in collection.insertions if ins["position"] == 0)
    assert len(collection) == sum(e["insertions"] for e in collection.examples)
    assert {e["failure"] for e in collection.examples} <= {"correct", "lost", "max_turns", "context"}
    off = []
    evaluate_agent(
        model,
        task,
        EvalConfig(task="ledger", memory="off", max_new_tokens=12, progress=False),
        observe=lambda records, episodes, logs: off.extend(logs),
    )
    ablated = [json.loads(line) for line in (tmp_path / "ablation" / "all.jsonl").read_text().splitlines()]
    assert [[t["reply"] for t in r["log"]] for r in ablated] == [[t["reply"] for t in r["log"]] for r in off]
    assert all(t["insertions"] == [] for r in off for t in r["log"])
    assert report["ablations"][-1]["withheld"] == sum(r["suppressed"] for r in ablated) > 0
    assert set(report["baseline"]["group_accuracy"]) == {"A", "B"}


def run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/data/gsm8k missing")
def test_recipe_analyze_cli_on_gsm8k(tmp_path, tok):
    """The real entry point: collect -> cluster -> project -> read -> ablate -> report on 6 GSM8K problems."""
    base = make_base(tok)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    make_memgen(tok).save_pretrained(tmp_path / "adapter")
    common = [
        "--model",
        str(tmp_path / "base"),
        "--adapter",
        str(tmp_path / "adapter"),
        "--task",
        "gsm8k",
        "--data",
        str(GSM8K),
        "--limit",
        "6",
        "--max-new-tokens",
        "20",
        "--progress",
        "false",
    ]
    proc = run_cli(
        "analyze", *common, "--memory", "always", "--out", str(tmp_path / "out"), "--clusters", "3", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    out = tmp_path / "out"
    report = json.loads((out / "analysis.json").read_text())
    examples = [json.loads(line) for line in (out / "collection" / "examples.jsonl").read_text().splitlines()]
    assert summary["insertions"] == report["insertions"] == sum(e["insertions"] for e in examples)
    assert len(examples) == 6 and {e["failure"] for e in examples} <= {"correct", "no_answer", "wrong_answer"}
    assert sum(report["sizes"]) == report["clustered"] == report["insertions"] and len(report["sizes"]) == 3
    assert [s["n"] for s in report["silhouette"]] == list(range(2, 9))
    assert all(len(p["nearest_tokens"]) == 10 for p in report["profiles"])
    runs = [r["run"] for r in report["ablations"]]
    assert runs == [
        "cluster 0",
        "control for 0: random " + runs[1].split()[-1],
        "cluster 1",
        runs[3],
        "cluster 2",
        runs[5],
        "all clusters",
    ]
    # Every cluster withheld (prompt end included) is memory off, answer by answer, through the CLI.
    proc = run_cli("eval", *common, "--memory", "off", "--output", str(tmp_path / "off.jsonl"), "--json")
    assert proc.returncode == 0, proc.stderr
    off = [json.loads(line)["completion"] for line in (tmp_path / "off.jsonl").read_text().splitlines()]
    ablated = [json.loads(line) for line in (out / "ablation" / "all.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in ablated] == off
    assert sum(r["suppressed"] for r in ablated) == report["ablations"][-1]["withheld"] > 0
    markdown = (out / "analysis.md").read_text()
    for heading in ("## Findings (measured)", "## Choosing N: silhouette", "## The clusters", "## Ablation"):
        assert heading in markdown
    for name in ("latents.png", "silhouette.png", "ablation.png"):
        assert f"]({name})" in markdown
    check_png(out / "latents.png", min_width=900)
    check_png(out / "silhouette.png", min_width=500)
    check_png(out / "ablation.png", min_width=1200)


def check_png(path: Path, min_width: int) -> None:
    """The file opens as a PNG of a plausible size and is not blank."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= min_width and 300 <= height <= 2000, (path, image.size)
        colors = image.convert("L").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 20, f"{path} looks blank"


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"memory": "off"}, "needs memory on"),
        ({"cluster_over": "delimiters"}, "cluster_over"),
        ({"silhouette_min": 5, "silhouette_max": 3}, "silhouette_max"),
    ],
)
def test_bad_analyze_config_is_refused(tmp_path, kw, message):
    with pytest.raises(Exception, match=message):
        config(tmp_path, **kw)
