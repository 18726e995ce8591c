"""Memory faculties (paper App. G): collect the woven latents, cluster them, read and ablate the clusters.

``memgen analyze`` (:func:`analyze`) runs the whole pipeline on any task (answers or agent episodes) and adapter;
the pieces are public for notebooks: :func:`collect` / :class:`Collection`, :func:`fit_clusters`,
:func:`silhouette_sweep`, :func:`read_clusters`, :func:`run_ablations` with :class:`ClusterFilter`.
"""

from .ablation import run_ablations
from .clusters import ClusterFilter, Clustering, RandomFilter, fit_clusters, nearest_centroid, silhouette_sweep
from .collect import Collection, collect
from .config import AnalyzeConfig
from .reading import nearest_tokens, read_clusters
from .run import analyze

__all__ = [
    "AnalyzeConfig",
    "ClusterFilter",
    "Clustering",
    "Collection",
    "RandomFilter",
    "analyze",
    "collect",
    "fit_clusters",
    "nearest_centroid",
    "nearest_tokens",
    "read_clusters",
    "run_ablations",
    "silhouette_sweep",
]
