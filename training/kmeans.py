"""Seeded k-means (k-means++ seeding, Lloyd's steps): the anomaly centres' clusters of labelled anomalies.

Trash is not one thing (a crisp packet, a shoe, a sponge), so ``--anomaly-centres k`` splits the
labelled anomalies into k groups of similar features, and each group gets a centre of its own.

Example:
    >>> kmeans(torch.randn(60, 8), 3, torch.Generator().manual_seed(0)).unique().numel()
    3
"""

from __future__ import annotations

import torch

ITERATIONS = 50


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Cluster index [N] in 0..k-1 for every row of ``points`` [N, F] (N >= k); every cluster keeps a member."""
    points = points.double()
    first = torch.randint(len(points), (1,), generator=generator)
    centres = points[first]
    while len(centres) < k:  # k-means++: the next seed far from the chosen ones, drawn by squared distance
        nearest = torch.cdist(points, centres).min(1).values.pow(2)
        weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)
        centres = torch.cat([centres, points[torch.multinomial(weights, 1, generator=generator)]])
    assignment = torch.cdist(points, centres).argmin(1)
    for _ in range(ITERATIONS):
        for cluster in range(k):
            members = assignment == cluster
            # An emptied cluster takes the point furthest from its centre, so k stays k.
            if not members.any():
                far = torch.cdist(points, centres).min(1).values.argmax()
                assignment[far] = cluster
                members = assignment == cluster
            centres[cluster] = points[members].mean(0)
        updated = torch.cdist(points, centres).argmin(1)
        if torch.equal(updated, assignment):
            break
        assignment = updated
    return assignment
