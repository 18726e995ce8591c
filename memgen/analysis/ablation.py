"""Ablate latent clusters: re-run the evaluation with one cluster's insertions withheld, and compare.

Each run passes a :class:`~memgen.analysis.clusters.ClusterFilter` to the engine: the weaver
runs at every insertion as before, and where its pooled latent falls in the ablated cluster
the latents are not fed. The row then carries masked pad slots, exactly as a row that did not
insert (so withholding every cluster over all insertion kinds is memory off, token for token).
Every run is compared answer by answer with the unablated collection run: accuracy, answers
that flipped, and the change in each failure type.

Departure from the paper (App. G): it reports failure counts per ablated cluster; we also run
a matched random control per cluster (the same share of insertions withheld at random), since
on a small model removing any latents can hurt, and only a cluster that hurts more than its
control says something about what that cluster does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

from ..evaluate import evaluate_task
from .clusters import ClusterFilter, Clustering, RandomFilter
from .evaluation import answer, outcome

ALL_CLUSTERS = "all clusters"
"""The name of the run that withholds every cluster."""


def compare(name: str, rows: list[dict], baseline: list[dict], withheld: int) -> dict:
    """One ablation run against the unablated rows (same examples, same order)."""
    n = len(rows)
    accuracy = sum(map(outcome, rows)) / n
    base_accuracy = sum(map(outcome, baseline)) / n
    result = {
        "run": name,
        "accuracy": round(accuracy, 4),
        "delta": round(accuracy - base_accuracy, 4),
        "withheld": withheld,
        "changed_answers": sum(answer(a) != answer(b) for a, b in zip(rows, baseline)),
        "right_to_wrong": sum(outcome(b) > outcome(a) for a, b in zip(rows, baseline)),
        "wrong_to_right": sum(outcome(a) > outcome(b) for a, b in zip(rows, baseline)),
    }
    if rows and "failure" in rows[0]:
        now, before = Counter(r["failure"] for r in rows), Counter(r["failure"] for r in baseline)
        result["failures"] = dict(sorted(now.items()))
        result["failure_delta"] = {k: now.get(k, 0) - before.get(k, 0) for k in sorted(set(now) | set(before))}
    if rows and baseline[0].get("group"):
        groups = sorted({r["group"] for r in baseline})
        result["group_accuracy"] = {
            g: round(
                sum(outcome(r) for r, b in zip(rows, baseline) if b["group"] == g)
                / sum(b["group"] == g for b in baseline),
                4,
            )
            for g in groups
        }
    return result


def baseline_result(baseline: list[dict]) -> dict:
    """The unablated run in :func:`compare`'s layout."""
    return compare("none (unablated)", baseline, baseline, 0)


def by_cluster(ablations: list[dict]) -> tuple[dict[int, dict], dict[int, dict], dict | None]:
    """:func:`run_ablations`' results as (cluster -> its run, cluster -> its control, the every-cluster run)."""
    runs = {r["cluster"]: r for r in ablations if "cluster" in r and not r.get("control")}
    controls = {r["cluster"]: r for r in ablations if r.get("control")}
    return runs, controls, next((r for r in ablations if r["run"] == ALL_CLUSTERS), None)


def top_rise(failure_delta: dict) -> tuple[str, int] | None:
    """The failure type (not ``correct``) whose count rose most, with the rise; None when none rose."""
    rises = {k: v for k, v in failure_delta.items() if k != "correct" and v > 0}
    if not rises:
        return None
    top = max(rises, key=rises.get)
    return top, rises[top]


def run_ablations(
    model,
    task,
    config,
    baseline: list[dict],
    clustering: Clustering,
    kinds: tuple[str, ...],
    shares: list[float],
    out: Path,
    log=print,
) -> list[dict]:
    """Per cluster, a run withholding it (and its random control, with ``config.controls``); then all of them.

    ``shares`` is each cluster's share of the clustered insertions in the collection run (the
    controls' withholding rate). Every run's answers go to ``out/<run>.jsonl``.
    """
    out.mkdir(parents=True, exist_ok=True)

    def run(tag: str, insertion_filter) -> list[dict]:
        rows: list[dict] = []
        run_config = replace(config, output=str(out / f"{tag}.jsonl"))
        evaluate_task(
            model,
            task,
            run_config,
            insertion_filter=insertion_filter,
            observe=lambda records, outputs, batch_rows: rows.extend(batch_rows),
        )
        return rows

    results = []
    for c in range(clustering.n_clusters):
        cluster_filter = ClusterFilter(clustering.centroids, {c}, kinds)
        rows = run(f"cluster-{c}", cluster_filter)
        ablated = {"cluster": c, **compare(f"cluster {c}", rows, baseline, sum(cluster_filter.withheld.values()))}
        results.append(ablated)
        message = f"ablate cluster {c}: accuracy {ablated['accuracy']:.3f}"
        if config.controls:
            control = RandomFilter(shares[c], kinds, config.cluster_seed + 1 + c)
            rows = run(f"control-{c}", control)
            results.append(
                {
                    "cluster": c,
                    "control": True,
                    **compare(f"control for {c}: random {shares[c]:.0%}", rows, baseline, control.withheld),
                }
            )
            message += f" (its random control {results[-1]['accuracy']:.3f})"
        log(message)
    everything = ClusterFilter(clustering.centroids, set(range(clustering.n_clusters)), kinds)
    rows = run("all", everything)
    results.append(compare(ALL_CLUSTERS, rows, baseline, sum(everything.withheld.values())))
    return results
