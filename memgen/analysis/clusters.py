"""Cluster pooled latents (K-means), score the choice of N (silhouette), and filter insertions by cluster.

K-means and the silhouette come from scikit-learn with a fixed ``random_state``. Cluster
membership is always re-derived as the nearest centroid (squared Euclidean, what
``KMeans.predict`` does), both for the collected latents and inside the decoding engine, so an
insertion of the collection run and the same insertion of an ablation run land in the same
cluster.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import torch

SILHOUETTE_SAMPLE = 3000
"""Largest sample the silhouette is computed on (it is quadratic in the number of points)."""


@dataclass
class Clustering:
    centroids: torch.Tensor
    """(N, d) cluster centres"""
    labels: list[int]
    """each clustered latent's cluster"""
    inertia: float
    seed: int

    @property
    def n_clusters(self) -> int:
        return self.centroids.shape[0]

    def sizes(self) -> list[int]:
        counts = Counter(self.labels)
        return [counts.get(c, 0) for c in range(self.n_clusters)]


def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(n,) index of each point's nearest centroid by squared Euclidean distance."""
    points = points.to(centroids.device, torch.float32)
    return torch.cdist(points, centroids.float()).argmin(dim=1)


def _points(pooled: torch.Tensor):
    """The latents as a float32 array for scikit-learn, and how many distinct ones there are (N's bound)."""
    points = pooled.float().cpu().numpy()
    return points, len({row.tobytes() for row in points})


def _kmeans(pooled: torch.Tensor, points, n: int, seed: int) -> Clustering:
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when points coincide; callers bound N by the distinct ones
        kmeans = KMeans(n_clusters=n, random_state=seed, n_init=10).fit(points)
    centroids = torch.from_numpy(kmeans.cluster_centers_).float()
    labels = nearest_centroid(pooled, centroids).tolist()
    return Clustering(centroids, labels, float(kmeans.inertia_), seed)


def fit_clusters(pooled: torch.Tensor, n_clusters: int, seed: int) -> Clustering:
    """K-means with ``n_clusters`` (fewer if there are fewer distinct latents) and a fixed seed."""
    points, distinct = _points(pooled)
    return _kmeans(pooled, points, max(1, min(n_clusters, distinct)), seed)


def silhouette_sweep(pooled: torch.Tensor, smallest: int, largest: int, seed: int) -> list[dict]:
    """Mean silhouette of K-means with N = smallest..largest (N < number of distinct points)."""
    from sklearn.metrics import silhouette_score

    points, distinct = _points(pooled)
    sample = SILHOUETTE_SAMPLE if len(points) > SILHOUETTE_SAMPLE else None  # None: every point
    sweep = []
    for n in range(smallest, min(largest, distinct - 1) + 1):
        labels = _kmeans(pooled, points, n, seed).labels
        if len(set(labels)) < 2:
            continue
        score = silhouette_score(points, labels, sample_size=sample, random_state=seed)
        sweep.append({"n": n, "silhouette": round(float(score), 4)})
    return sweep


class ClusterFilter:
    """An engine insertion filter: withhold the insertions whose pooled latent falls in ``ablated`` clusters.

    Insertions of kinds outside ``kinds`` are always fed (with ``cluster_over=inference``, the
    prompt end). ``withheld`` counts the suppressed insertions per cluster, ``seen`` all of them.
    """

    def __init__(self, centroids: torch.Tensor, ablated: set[int], kinds: tuple[str, ...]):
        self.centroids = centroids
        self.ablated = set(ablated)
        self.kinds = kinds
        self.withheld: Counter = Counter()
        self.seen: Counter = Counter()

    def __call__(self, latents: torch.Tensor, kind: str) -> torch.Tensor:
        keep = torch.ones(latents.shape[0], dtype=torch.bool)
        if kind not in self.kinds:
            return keep
        labels = nearest_centroid(latents.float().mean(dim=1), self.centroids).cpu()
        for i, label in enumerate(labels.tolist()):
            self.seen[label] += 1
            if label in self.ablated:
                keep[i] = False
                self.withheld[label] += 1
        return keep


class RandomFilter:
    """The control: withhold each insertion (of ``kinds``) with probability ``rate``, seeded."""

    def __init__(self, rate: float, kinds: tuple[str, ...], seed: int):
        self.rate = rate
        self.kinds = kinds
        self.generator = torch.Generator().manual_seed(seed)
        self.withheld = 0

    def __call__(self, latents: torch.Tensor, kind: str) -> torch.Tensor:
        keep = torch.ones(latents.shape[0], dtype=torch.bool)
        if kind in self.kinds:
            keep = torch.rand(latents.shape[0], generator=self.generator) >= self.rate
            self.withheld += int((~keep).sum())
        return keep
