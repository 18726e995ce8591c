"""``AnalyzeConfig``: what ``memgen analyze`` runs, as one typed config (CLI, YAML and Python).

It extends :class:`~memgen.evaluate.EvalConfig`: the collection run and every ablation run are
evaluations of the same task with the same decoding options, so their outcomes compare answer by
answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..dataclass_cli import check_ranges, help_field
from ..errors import ConfigError
from ..evaluate import EvalConfig

CLUSTER_KINDS = ("all", "inference")


@dataclass
class AnalyzeConfig(EvalConfig):
    out: str = help_field("runs/analysis", "output directory: the collection, analysis.md, analysis.json and PNGs")
    collection: str = help_field(
        "",
        "reuse the collection in this directory instead of collecting again (it must "
        "come from the same model, task and decoding options)",
    )
    clusters: int = help_field(4, "N: K-means clusters of the pooled latents (the paper's Appendix G uses 4)", ge=1)
    cluster_seed: int = help_field(0, "seed of K-means (and of t-SNE and the control ablations)", ge=0)
    silhouette_min: int = help_field(2, "smallest N of the silhouette sweep", ge=2)
    silhouette_max: int = help_field(8, "largest N of the silhouette sweep", ge=2)
    cluster_over: str = help_field(
        "all",
        "which insertions are clustered and can be ablated: all (prompt end "
        "too) | inference (delimiters only; prompt-end latents are always fed)",
    )
    top_tokens: int = help_field(10, "nearest vocabulary tokens (cosine) listed per centroid", ge=1)
    typical_contexts: int = help_field(5, "insertions nearest each centroid shown with their text", ge=1)
    context_chars: int = help_field(60, "characters of text kept before each insertion", ge=1)
    ablate: bool = help_field(True, "re-run the evaluation once per cluster with its insertions withheld")
    controls: bool = help_field(
        True,
        "per cluster, also withhold a random share of all insertions equal to the "
        "cluster's share (is it this cluster, or any removal, that matters?)",
    )
    tsne: bool = help_field(True, "draw the t-SNE projection next to PCA")
    tsne_max_points: int = help_field(3000, "largest sample of insertions t-SNE projects (seeded)", ge=10)
    group_by: str = help_field("", "a record column to break accuracy down by (e.g. domain)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self)
        if self.cluster_over not in CLUSTER_KINDS:
            raise ConfigError(f"cluster_over must be one of {', '.join(CLUSTER_KINDS)}, got {self.cluster_over!r}")
        if self.silhouette_max < self.silhouette_min:
            raise ConfigError(f"silhouette_max ({self.silhouette_max}) < silhouette_min ({self.silhouette_min})")
        if self.memory == "off":
            raise ConfigError("memgen analyze needs memory on: with --memory off nothing is woven to analyse")
        if self.memory_source in ("expel", "awm"):
            raise ConfigError(
                f"--memory-source {self.memory_source} puts memory in the prompt; there are no latents "
                "to analyse (use weaver or weaver+retrieval)"
            )
