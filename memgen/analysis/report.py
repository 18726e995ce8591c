"""``analysis.md``: the analysis as a document that reads on its own (tables, figures, measured findings)."""

from __future__ import annotations

from ..evaluate import format_table
from .ablation import by_cluster, top_rise

# Kaufman & Rousseeuw's reading of the mean silhouette.
SILHOUETTE_BANDS = (
    (0.7, "strong structure"),
    (0.5, "reasonable structure"),
    (0.25, "weak structure"),
    (float("-inf"), "no substantial structure"),
)


def silhouette_reading(score: float) -> str:
    return next(text for bound, text in SILHOUETTE_BANDS if score > bound)


def _tokens(profile: dict, n: int = 10) -> str:
    return " ".join(repr(t["token"]) for t in profile["nearest_tokens"][:n])


def _format_shares(pairs: list) -> str:
    return ", ".join(f"{value!r} {share:.0%}" for value, share in pairs)


def findings(report: dict) -> list[str]:
    """Plain statements of what was measured (no faculty names are inferred automatically)."""
    lines = []
    sweep, analysed = report["silhouette"], report["clusters"]
    if sweep:
        best = report["silhouette_best"]
        at_n = next((s["silhouette"] for s in sweep if s["n"] == analysed), None)
        lines.append(
            f"Silhouette: best at N={best['n']} ({best['silhouette']:.3f}, "
            f"{silhouette_reading(best['silhouette'])})"
            + (f"; at the analysed N={analysed}: {at_n:.3f} ({silhouette_reading(at_n)})." if at_n is not None else ".")
        )
    runs, controls, everything = by_cluster(report["ablations"])
    for c, r in runs.items():
        profile = report["profiles"][c]
        text = (
            f"Cluster {c} ({profile['size']} insertions"
            + (f", {profile['prompt_end_share']:.0%} at the prompt end" if profile["size"] else "")
            + "): "
            f"withholding its {r['withheld']} insertions moved accuracy by {r['delta']:+.3f}"
        )
        if c in controls:
            text += f" (its random control: {controls[c]['delta']:+.3f})"
        rise = top_rise(r.get("failure_delta", {}))
        if rise:
            text += f"; the failure type that rose most: {rise[0]} (+{rise[1]})"
        lines.append(text + ".")
    if everything:
        scope = "memory off" if report["cluster_over"] == "all" else "prompt-end latents only"
        lines.append(
            f"Withholding every cluster ({everything['withheld']} insertions, the same as {scope}): "
            f"accuracy {everything['accuracy']:.3f} ({everything['delta']:+.3f})."
        )
    return lines


def render_markdown(report: dict) -> str:
    base = report["baseline"]
    lines = [f"# Latent memory analysis: {report['task']}", ""]
    described = ", ".join(f"{k} `{v}`" for k, v in report["describe"].items() if v)
    unit = "episodes" if report.get("episodic") else "answers"
    lines += [
        f"{report['examples']} {unit} under memory `{report['memory']}`"
        + (f" ({described})" if described else "")
        + f": accuracy {base['accuracy']:.3f}. "
        f"{report['insertions']} woven insertions were collected; each insertion's K latents are mean-pooled "
        f"into one {report['hidden_size']}-d vector, and the {report['clustered']} "
        + (
            "insertions (prompt end and delimiters)"
            if report["cluster_over"] == "all"
            else "delimiter insertions (prompt-end latents are left out and always fed)"
        )
        + f" are clustered by K-means (N={report['clusters']}, seed {report['cluster_seed']}). "
        "Ablation withholds one cluster's latents during decoding (the weaver runs; its latents are not fed, "
        "and the row continues as if it had not inserted: masked pad slots)."
        + (
            " In episodes, each turn's start is a prompt-end insertion and `insertion #` counts over the whole episode."
            if report.get("episodic")
            else ""
        ),
        "",
    ]
    lines += ["## Findings (measured)", ""] + [f"- {f}" for f in findings(report)] + [""]
    lines += ["## Choosing N: silhouette", ""]
    if report["silhouette"]:
        lines += [
            format_table(
                [
                    {"N": s["n"], "silhouette": s["silhouette"], "reading": silhouette_reading(s["silhouette"])}
                    for s in report["silhouette"]
                ],
                ["N", "silhouette", "reading"],
            ),
            "",
        ]
    lines += [
        f"![silhouette]({report['plots']['silhouette']})",
        "",
        "## The clusters",
        "",
        f"![latents]({report['plots']['latents']})",
        "",
    ]
    rows = []
    for p in report["profiles"]:
        if not p["size"]:
            rows.append({"cluster": p["cluster"], "size": 0})
            continue
        rows.append(
            {
                "cluster": p["cluster"],
                "size": p["size"],
                "prompt end": f"{p['prompt_end_share']:.0%}",
                "mean position": p["mean_position"],
                "insertion #": _format_shares(p["ordinals"][:3]),
                "next token": _format_shares(p["next_tokens"][:3]),
                "groups": _format_shares(p["groups"][:3]) or "-",
                "answers right": p["answer_accuracy"],
            }
        )
    lines += [
        format_table(
            rows,
            ["cluster", "size", "prompt end", "mean position", "insertion #", "next token", "groups", "answers right"],
        ),
        "",
        "`insertion #`: which woven insertion of its answer (1 = the first) the members are.",
        "",
    ]
    for p in report["profiles"]:
        lines += [f"### Cluster {p['cluster']}", "", f"Nearest vocabulary tokens (cosine): {_tokens(p)}", ""]
        if p["typical"]:
            lines += ["Typical contexts (the insertions nearest the centroid; `⟨m⟩` marks where the latents went):", ""]
            lines += [f"- `{t['preceding'][-50:]!r}` ⟨m⟩ `{t['following']!r}`" for t in p["typical"]]
            lines.append("")
    if report["ablations"]:
        lines += [
            "## Ablation",
            "",
            "Each run withholds one cluster's latents; `control` runs withhold the same "
            "share of all insertions at random. Deltas are against the unablated run, answer by answer. "
            "`withheld` counts the insertions the run itself withheld: once one is withheld the answer goes "
            "its own way, so it need not equal the cluster's size in the collection.",
            "",
        ]
        runs = [base] + report["ablations"]
        types = sorted({t for r in runs for t in r.get("failure_delta", {}) if t != "correct"})
        groups = sorted(base.get("group_accuracy", {}))
        table = []
        for r in runs:
            row = {
                "run": r["run"],
                "accuracy": r["accuracy"],
                "delta": f"{r['delta']:+.3f}",
                "withheld": r["withheld"],
                "changed": r["changed_answers"],
                "right→wrong": r["right_to_wrong"],
                "wrong→right": r["wrong_to_right"],
            }
            row.update({f"acc {g}": r["group_accuracy"][g] for g in groups})
            row.update(
                {
                    t: (
                        f"{r['failures'].get(t, 0)} ({r['failure_delta'].get(t, 0):+d})"
                        if r is not base
                        else str(r["failures"].get(t, 0))
                    )
                    for t in types
                }
            )
            table.append(row)
        lines += [format_table(table, list(table[0])), ""]
        if types:
            lines += ["Failure columns: count (change against the unablated run).", ""]
        lines += [f"![ablation]({report['plots']['ablation']})", ""]
    lines += [f"Analysis time: {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"
