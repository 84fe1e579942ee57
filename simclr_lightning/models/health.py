"""Representation-health statistics computed on each pretraining batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def representation_health(z0: Tensor, z1: Tensor) -> dict[str, Tensor]:
    """Compute collapse and alignment statistics of two batches of paired embeddings.

    Args:
        z0: Embeddings of the first views, shape (N, D).
        z1: Embeddings of the second views, shape (N, D); row i is the positive of z0's row i.

    Returns:
        ``z_std``: mean over dimensions of the per-dimension standard deviation of the
        L2-normalised embeddings. It falls towards 0 when the embeddings collapse to one point
        and is about ``1 / sqrt(D)`` when they spread evenly over the sphere.
        ``z_std_ratio``: ``z_std * sqrt(D)``, about 1 for a healthy representation.
        ``pos_cosine``: mean cosine similarity of the positive pairs.
        ``neg_cosine``: mean cosine similarity of all other pairs across the two views.
        ``contrastive_top1``: fraction of the 2N embeddings whose most similar other embedding
        is its positive, the accuracy of the NT-Xent classification task.
    """
    n, dim = z0.shape
    z = F.normalize(torch.cat([z0, z1]).float(), dim=1)  # (2N, D)
    z_std = z.std(dim=0).mean()

    # Cosine similarities between every pair of the 2N embeddings.
    similarity = z @ z.T  # (2N, 2N)
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    pos_cosine = similarity[torch.arange(2 * n, device=z.device), positives].mean()

    # Negatives: pairs (i, j) with i in view 0 and j in view 1, i != j.
    cross = similarity[:n, n:]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=z.device)
    neg_cosine = cross[off_diagonal].mean() if n > 1 else cross.new_tensor(float("nan"))

    similarity.fill_diagonal_(float("-inf"))
    top1 = (similarity.argmax(dim=1) == positives).float().mean()
    return {
        "z_std": z_std,
        "z_std_ratio": z_std * dim**0.5,
        "pos_cosine": pos_cosine,
        "neg_cosine": neg_cosine,
        "contrastive_top1": top1,
    }
