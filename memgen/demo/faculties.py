"""The demo's analysis stage: ``memgen analyze`` on the trained weavers (memory faculties, paper App. G).

The weavers of ``memgen_sft`` and ``memgen_grpo`` answer the held-out problems of A, B and C
together; their pooled latents are clustered (N = ``analysis_clusters``), read, and ablated one
cluster at a time, each against a random control, with the demo's failure classifier
(:func:`memgen.tasks.domains.failure_type`) counting what goes wrong. Each arm's full report
(``analysis.md``, plots, the collection) lands in ``seed-S/analysis/<arm>/``; the demo's report
gets a summary table per arm.
"""

from __future__ import annotations

from pathlib import Path

from ..analysis import AnalyzeConfig, analyze
from ..analysis.ablation import by_cluster, top_rise
from ..analysis.report import silhouette_reading
from ..evaluate import format_table
from ..tasks.domains import as_task

ANALYSIS_ARMS = ("memgen_sft", "memgen_grpo")
ANALYSIS_DOMAINS = ("A", "B", "C")


def run_analysis_stage(cfg, arms: dict, tests: dict, out: Path, log) -> dict:
    """Per analysed arm: silhouette sweep, cluster profiles and ablations (compact; the full report is on disk)."""
    task = as_task("ABC-test", [r for d in ANALYSIS_DOMAINS for r in tests[d]])
    result = {}
    for name in ANALYSIS_ARMS:
        arm = arms[name]
        config = AnalyzeConfig(
            task="demo",
            memory=arm.memory,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.eval_batch_size,
            max_insertions=cfg.max_insertions,
            seed=cfg.seed,
            progress=cfg.progress,
            out=str(out / "analysis" / name),
            clusters=cfg.analysis_clusters,
            cluster_seed=cfg.seed,
            group_by="domain",
        )
        report = analyze(
            arm.model, task, config, describe={"arm": name}, log=lambda text: log(f"analysis {name}: {text}")
        )
        result[name] = summarize(report, out / "analysis" / name)
    return result


def summarize(report: dict, directory: Path) -> dict:
    """What the demo keeps of one analysis: silhouette, and per cluster its profile and ablation."""
    ablations, controls, everything = by_cluster(report["ablations"])
    clusters = []
    for p in report["profiles"]:
        c = p["cluster"]
        row = {
            "cluster": c,
            "size": p["size"],
            "prompt_end_share": p.get("prompt_end_share"),
            "ordinals": p.get("ordinals", [])[:2],
            "next_tokens": p.get("next_tokens", [])[:3],
            "nearest_tokens": [t["token"] for t in p["nearest_tokens"][:5]],
        }
        if c in ablations:
            a = ablations[c]
            row.update(
                {
                    "withheld": a["withheld"],
                    "delta": a["delta"],
                    "group_accuracy": a.get("group_accuracy"),
                    "failure_delta": a.get("failure_delta", {}),
                    "control_delta": controls[c]["delta"] if c in controls else None,
                    "control_group_accuracy": controls[c].get("group_accuracy") if c in controls else None,
                }
            )
        clusters.append(row)
    return {
        "directory": str(directory),
        "insertions": report["clustered"],
        "silhouette": report["silhouette"],
        "silhouette_best": report["silhouette_best"],
        "clusters_analysed": report["clusters"],
        "baseline": {
            "accuracy": report["baseline"]["accuracy"],
            "group_accuracy": report["baseline"].get("group_accuracy"),
            "failures": report["baseline"].get("failures"),
        },
        "all_withheld": None
        if everything is None
        else {"accuracy": everything["accuracy"], "group_accuracy": everything.get("group_accuracy")},
        "clusters": clusters,
        "seconds": report["seconds"],
    }


def faculty_table(summary: dict) -> str:
    """One arm's clusters: what they are (kinds, next token) and what withholding each does, per domain."""
    base = summary["baseline"]["group_accuracy"] or {}
    rows = []
    for c in summary["clusters"]:
        row = {
            "cluster": c["cluster"],
            "size": c["size"],
            "prompt end": "-" if c["prompt_end_share"] is None else f"{c['prompt_end_share']:.0%}",
            "insertion #": ", ".join(f"{v} {s:.0%}" for v, s in c["ordinals"]) or "-",
            "next token": ", ".join(f"{v!r} {s:.0%}" for v, s in c["next_tokens"]) or "-",
        }
        if "delta" in c:
            for d in ("A", "B"):
                if d in base and c["group_accuracy"]:
                    row[f"Δ acc {d}"] = f"{c['group_accuracy'][d] - base[d]:+.2f}"
                    if c["control_group_accuracy"]:
                        row[f"Δ acc {d} (control)"] = f"{c['control_group_accuracy'][d] - base[d]:+.2f}"
            rise = top_rise(c["failure_delta"])
            row["failure that rose most"] = f"{rise[0]} +{rise[1]}" if rise else "-"
        rows.append(row)
    return format_table(rows, list(dict.fromkeys(k for r in rows for k in r)))


def silhouette_line(summary: dict) -> str:
    sweep = summary["silhouette"]
    if not sweep:
        return "silhouette: too few distinct latents"
    best = summary["silhouette_best"]
    return (
        "silhouette "
        + ", ".join(f"N={s['n']}: {s['silhouette']:.2f}" for s in sweep)
        + f" (best N={best['n']}: {silhouette_reading(best['silhouette'])})"
    )


def report_section(analysis: dict, seed: int, out: Path) -> list[str]:
    """The demo report's section: per arm, the silhouette, the cluster table and links to its full report."""
    lines = [
        "## Memory faculties: clustering and ablating the latents",
        "",
        f"Seed {seed}. Each weaver answers the held-out A, B and C problems; every woven insertion's latents "
        "are mean-pooled and clustered by K-means; then each cluster is withheld in turn (the weaver runs, its "
        "latents are not fed), next to a random control withholding the same share of all insertions. "
        "Δ acc is against the unablated run; failure types come from the demo's classifier.",
        "",
    ]
    for name, summary in analysis.items():
        rel = Path(summary["directory"]).relative_to(out)
        all_off = summary["all_withheld"]
        lines += [
            f"### {name}",
            "",
            f"{summary['insertions']} insertions; {silhouette_line(summary)}. "
            f"Unablated accuracy {summary['baseline']['accuracy']:.2f}"
            + (f"; every cluster withheld (= memory off): {all_off['accuracy']:.2f}." if all_off else "."),
            "",
            faculty_table(summary),
            "",
            f"Full report: [{rel}/analysis.md]({rel}/analysis.md), ![latents]({rel}/latents.png)",
            "",
        ]
    return lines
