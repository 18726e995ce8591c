"""``memgen analyze``: collect -> cluster -> project -> read -> ablate -> report, on answers or agent episodes."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from ..checkpoint import atomic_write_text
from ..data import DataError
from ..weaver import INFERENCE, PROMPT
from .ablation import baseline_result, run_ablations
from .clusters import fit_clusters, silhouette_sweep
from .collect import Collection, collect
from .config import AnalyzeConfig
from .evaluation import is_episodic, summary_accuracy
from .plots import plot_ablations, plot_latents, plot_silhouette, project
from .reading import read_clusters
from .report import render_markdown

REPORT_JSON, REPORT_MD = "analysis.json", "analysis.md"
PLOTS = {"latents": "latents.png", "silhouette": "silhouette.png", "ablation": "ablation.png"}


def cluster_kinds(config: AnalyzeConfig) -> tuple[str, ...]:
    return (PROMPT, INFERENCE) if config.cluster_over == "all" else (INFERENCE,)


def check_collection_fits(collection: Collection, task, config: AnalyzeConfig) -> None:
    """Refuse a reused collection from another task or example set: ablations compare answer by answer."""
    expected = len(task.records[: config.limit] if config.limit is not None else task.records)
    made = collection.meta.get("config", {})
    problems = [
        f"{key} {made.get(key)!r} != {getattr(config, key)!r}"
        for key in ("memory", "max_new_tokens", "max_insertions", "seed")
        if key in made and made[key] != getattr(config, key)
    ]
    if collection.meta.get("task") != task.name:
        problems.insert(0, f"task {collection.meta.get('task')!r} != {task.name!r}")
    if len(collection.examples) != expected:
        problems.insert(0, f"{len(collection.examples)} examples != {expected} to evaluate")
    if problems:
        raise DataError(f"collection {config.collection} does not fit this analysis: " + "; ".join(problems))


def analyze(model, task, config: AnalyzeConfig, describe: dict | None = None, log=print) -> dict:
    """Run the whole analysis of ``model``'s latents on ``task``; writes everything to ``config.out``.

    Returns the report (what ``analysis.json`` holds). ``describe`` (e.g. model and adapter
    paths) is stored with the collection and shown in the report.
    """
    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.collection:
        collection = Collection.load(config.collection)
        check_collection_fits(collection, task, config)
        log(f"collection: {len(collection)} insertions from {config.collection}")
    else:
        collection = collect(model, task, config, describe)
        collection.save(out / "collection")
        log(
            f"collection: {len(collection)} woven insertions over {len(collection.examples)} "
            f"{'episodes' if is_episodic(task) else 'answers'} (accuracy {summary_accuracy(collection.summary):.3f})"
        )
    kinds = cluster_kinds(config)
    index = collection.select(kinds)
    if not index:
        raise DataError(f"no {' or '.join(kinds)} insertions in the collection to cluster")
    pooled = collection.pooled[index]
    insertions = [collection.insertions[i] for i in index]

    sweep = silhouette_sweep(pooled, config.silhouette_min, config.silhouette_max, config.cluster_seed)
    clustering = fit_clusters(pooled, config.clusters, config.cluster_seed)
    silhouette_best = max(sweep, key=lambda s: s["silhouette"]) if sweep else None
    log(
        f"clusters: N={clustering.n_clusters}, sizes {clustering.sizes()}; silhouette "
        + (", ".join(f"N={s['n']}: {s['silhouette']:.3f}" for s in sweep) or "not computable")
    )
    profiles = read_clusters(model, pooled, insertions, clustering, config.top_tokens, config.typical_contexts)

    coords = project(pooled, config.cluster_seed, config.tsne, config.tsne_max_points)
    title = f"{task.name}, memory {config.memory}: {len(pooled)} insertions, N={clustering.n_clusters}"
    plot_latents(
        coords, clustering.labels, [i["kind"] for i in insertions], clustering.n_clusters, title, out / PLOTS["latents"]
    )
    plot_silhouette(
        sweep,
        clustering.n_clusters,
        f"silhouette of K-means on {len(pooled)} pooled latents",
        out / PLOTS["silhouette"],
    )

    baseline = baseline_result(collection.examples)
    ablations = []
    if config.ablate:
        shares = [size / len(pooled) for size in clustering.sizes()]
        ablations = run_ablations(
            model, task, config, collection.examples, clustering, kinds, shares, out / "ablation", log
        )
        plot_ablations(
            baseline, ablations, f"{task.name}: ablating one latent cluster at a time", out / PLOTS["ablation"]
        )

    report = {
        "task": task.name,
        "memory": config.memory,
        "episodic": is_episodic(task),
        "describe": describe or collection.meta.get("describe", {}),
        "examples": len(collection.examples),
        "insertions": len(collection),
        "clustered": len(pooled),
        "cluster_over": config.cluster_over,
        "hidden_size": int(pooled.shape[1]),
        "clusters": clustering.n_clusters,
        "cluster_seed": config.cluster_seed,
        "sizes": clustering.sizes(),
        "inertia": round(clustering.inertia, 4),
        "silhouette": sweep,
        "silhouette_best": silhouette_best,
        "profiles": profiles,
        "baseline": baseline,
        "ablations": ablations,
        "plots": {k: v for k, v in PLOTS.items() if (out / v).exists() and (k != "ablation" or ablations)},
        "config": asdict(config),
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_text(out / REPORT_JSON, json.dumps(report, indent=2, default=str))
    atomic_write_text(out / REPORT_MD, render_markdown(report))
    log(f"wrote {out / REPORT_MD}, {out / REPORT_JSON} and plots in {report['seconds']:.0f} s")
    return report
