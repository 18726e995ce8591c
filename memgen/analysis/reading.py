"""Read what each latent cluster is: nearest vocabulary tokens of its centroid, and its typical contexts.

The centroid is compared by cosine with every row of the reasoner's input-embedding table
(latents live in that space). Typical contexts are the member insertions nearest the
centroid, with the text before and after them. The profile adds what can be counted: how
many members, their kinds, where they sit, which token followed them, which groups they
came from, and how often their answer was right.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..weaver import PROMPT
from .clusters import Clustering

VOCAB_CHUNK = 16384
"""Embedding rows compared at a time: a 150k-token table is never copied whole to float32."""


@torch.no_grad()
def nearest_tokens(model, centroids: torch.Tensor, top: int) -> list[list[dict]]:
    """Per centroid, the ``top`` vocabulary tokens whose input embeddings are nearest by cosine."""
    table = model.reasoner_model.get_input_embeddings().weight
    size = min(len(model.tokenizer), table.shape[0])  # rows past the tokenizer are padding
    queries = torch.nn.functional.normalize(centroids.float(), dim=-1).to(table.device)
    sims = torch.cat(
        [
            queries @ torch.nn.functional.normalize(table[start : start + VOCAB_CHUNK].float(), dim=-1).T
            for start in range(0, size, VOCAB_CHUNK)
        ],
        dim=1,
    )[:, :size]
    values, ids = sims.cpu().topk(min(top, size), dim=1)
    out = []
    for row_values, row_ids in zip(values.tolist(), ids.tolist()):
        out.append(
            [
                {"token": model.tokenizer.decode([i]), "id": i, "cosine": round(v, 4)}
                for i, v in zip(row_ids, row_values)
            ]
        )
    return out


def _shares(values, top: int = 4) -> list[list]:
    counts = Counter(values)
    total = sum(counts.values())
    return [[value, round(count / total, 3)] for value, count in counts.most_common(top)]


def read_clusters(
    model, pooled: torch.Tensor, insertions: list[dict], clustering: Clustering, top_tokens: int, typical: int
) -> list[dict]:
    """One profile per cluster (``pooled`` and ``insertions`` are the clustered ones, in the same order)."""
    tokens = nearest_tokens(model, clustering.centroids, top_tokens)
    profiles = []
    for c in range(clustering.n_clusters):
        members = [i for i, label in enumerate(clustering.labels) if label == c]
        rows = [insertions[i] for i in members]
        profile = {"cluster": c, "size": len(members), "nearest_tokens": tokens[c], "typical": []}
        if members:
            distance = (pooled[members].float() - clustering.centroids[c]).norm(dim=-1)
            order = distance.argsort()[:typical].tolist()
            profile["typical"] = [
                {
                    "preceding": rows[j]["preceding"],
                    "following": rows[j]["following"],
                    "kind": rows[j]["kind"],
                    "distance": round(float(distance[j]), 4),
                }
                for j in order
            ]
            positions = [r["position"] for r in rows]
            profile.update(
                {
                    "prompt_end_share": round(sum(r["kind"] == PROMPT for r in rows) / len(rows), 3),
                    "mean_position": round(sum(positions) / len(positions), 2),
                    "ordinals": _shares(r.get("ordinal") for r in rows),
                    "next_tokens": _shares(r["next_token"] for r in rows),
                    "groups": _shares(r["group"] for r in rows) if any(r["group"] for r in rows) else [],
                    "answer_accuracy": round(sum(r["reward"] for r in rows) / len(rows), 3),
                }
            )
        profiles.append(profile)
    return profiles
