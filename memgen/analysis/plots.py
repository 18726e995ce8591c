"""The analysis's figures: latents projected to 2-D (PCA, t-SNE), the silhouette sweep, the ablations."""

from __future__ import annotations

from pathlib import Path

import torch

MARKERS = {"prompt": "x", "inference": "o"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def project(pooled: torch.Tensor, seed: int, tsne: bool, max_points: int) -> dict:
    """2-D coordinates: ``pca`` for every point, ``tsne`` for a seeded sample of at most ``max_points``
    (``tsne_index`` says which points)."""
    from sklearn.decomposition import PCA

    points = pooled.float().cpu().numpy()
    out = {"pca": PCA(n_components=2, random_state=seed).fit_transform(points) if len(points) > 2 else points[:, :2]}
    if tsne and len(points) > 5:
        from sklearn.manifold import TSNE

        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(points), generator=generator)[:max_points].sort().values.numpy()
        perplexity = min(30.0, max(2.0, (len(index) - 1) / 3))
        out["tsne"] = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            points[index]
        )
        out["tsne_index"] = index
    return out


def plot_latents(coords: dict, labels: list[int], kinds: list[str], n_clusters: int, title: str, path: Path) -> Path:
    plt = _pyplot()
    panels = [("pca", "PCA")] + ([("tsne", "t-SNE")] if "tsne" in coords else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    colors = plt.get_cmap("tab10")
    for axis, (key, name) in zip(axes[0], panels):
        xy = coords[key]
        index = coords["tsne_index"] if key == "tsne" else range(len(labels))
        for c in range(n_clusters):
            for kind, marker in MARKERS.items():
                chosen = [j for j, i in enumerate(index) if labels[i] == c and kinds[i] == kind]
                if chosen:
                    axis.scatter(
                        xy[chosen, 0],
                        xy[chosen, 1],
                        s=10 if marker == "o" else 22,
                        marker=marker,
                        color=colors(c % 10),
                        alpha=0.6,
                        linewidths=0.8,
                        label=f"cluster {c}" + (" (prompt end)" if kind == "prompt" else ""),
                    )
        axis.set_title(f"{name} of pooled latents" + (f" ({len(index)} sampled)" if key == "tsne" else ""))
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0][0].legend(fontsize=7, markerscale=1.5, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_silhouette(sweep: list[dict], chosen: int, title: str, path: Path) -> Path:
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(5.2, 3.4))
    if sweep:
        axis.plot([s["n"] for s in sweep], [s["silhouette"] for s in sweep], marker="o")
        for s in sweep:
            if s["n"] == chosen:
                axis.scatter(
                    [s["n"]],
                    [s["silhouette"]],
                    s=90,
                    facecolors="none",
                    edgecolors="tab:red",
                    label=f"N = {chosen} (analysed)",
                )
        axis.legend(fontsize=8)
    else:
        axis.text(0.5, 0.5, "too few distinct latents for a sweep", ha="center", transform=axis.transAxes)
    axis.set_xlabel("N (K-means clusters)")
    axis.set_ylabel("mean silhouette")
    axis.set_ylim(min(0.0, *(s["silhouette"] for s in sweep)) if sweep else 0.0, 1.0)
    axis.axhline(0.25, color="grey", lw=0.7, ls=":")  # below ~0.25 there is no substantial structure
    axis.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ablations(baseline: dict, results: list[dict], title: str, path: Path) -> Path:
    plt = _pyplot()
    runs = [baseline] + results
    names = [r["run"].replace(" (unablated)", "").replace(": random", "\nrandom") for r in runs]
    with_failures = "failure_delta" in baseline
    fig, axes = plt.subplots(1, 2 if with_failures else 1, figsize=(12 if with_failures else 6.5, 4.2), squeeze=False)
    left = axes[0][0]
    colors = ["tab:grey"] + [
        "tab:orange" if r.get("control") else ("tab:red" if "cluster" in r else "tab:purple") for r in results
    ]
    bars = left.bar(range(len(runs)), [r["accuracy"] for r in runs], color=colors)
    left.bar_label(bars, fmt="%.2f", fontsize=7)
    left.set_xticks(range(len(runs)), names, rotation=35, ha="right", fontsize=7)
    left.set_ylim(0, 1.1)
    left.set_ylabel("accuracy")
    left.set_title("accuracy with a cluster withheld (orange: random control)", fontsize=9)
    if with_failures:
        right = axes[0][1]
        types = sorted({t for r in runs for t in r["failures"] if t != "correct"})
        bottom = [0] * len(runs)
        cmap = plt.get_cmap("tab10")
        for k, t in enumerate(types):
            values = [r["failures"].get(t, 0) for r in runs]
            right.bar(range(len(runs)), values, bottom=bottom, label=t, color=cmap(k % 10))
            bottom = [b + v for b, v in zip(bottom, values)]
        right.set_xticks(range(len(runs)), names, rotation=35, ha="right", fontsize=7)
        right.set_ylabel("failed answers")
        right.set_title("failures by type", fontsize=9)
        if types:
            right.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
