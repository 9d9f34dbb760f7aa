"""Linear text extrapolation (the paper's step 3): a crawled image has no trustworthy caption, so its text
feature is built from its nearest seed images' captions, weighted by how those images combine into it."""

from __future__ import annotations

import numpy as np
import torch

CHUNK = 8_192  # (CHUNK, k, d) float32 neighbour and caption blocks stay under 100 MB each


def extrapolate(
    neighbors: torch.Tensor, target: torch.Tensor, neighbor_texts: torch.Tensor, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ridge least squares: w = argmin ||Fᵀw − f||² + ridge·||w||², then s = Sᵀw, L2-normalised.

    neighbors F (n, k, d), target f (n, d), neighbor_texts S (n, k, d) → weights (n, k), text features (n, d).
    """
    gram = neighbors @ neighbors.transpose(1, 2)
    gram = gram + ridge * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    weights = torch.linalg.solve(gram, (neighbors @ target.unsqueeze(-1))).squeeze(-1)
    text = torch.nn.functional.normalize((weights.unsqueeze(-1) * neighbor_texts).sum(dim=1), dim=-1)
    return weights, text


def extrapolate_batch(
    seed_images: np.ndarray,
    seed_texts: np.ndarray,
    targets: np.ndarray,
    neighbor_rows: np.ndarray,
    ridge: float,
    device: torch.device,
    target_rows: np.ndarray | None = None,
    texts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """extrapolate() for every target (for targets[target_rows] when given: no copy of the kept vectors), given
    its neighbours' rows in the seed arrays; on `device`, in chunks. Returns float32 weights and float16 text
    features (as the shards store them), filled chunk by chunk; into `texts` when given (an (n, d) float16 array, e.g.
    a memory-mapped file: 10M crawled images keep about 5 GB of them)."""
    n = len(targets) if target_rows is None else len(target_rows)
    weights = np.empty((n, neighbor_rows.shape[1]), np.float32)
    texts = np.empty((n, seed_texts.shape[1]), np.float16) if texts is None else texts
    as_tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)  # noqa: E731
    images, captions = (
        as_tensor(seed_images),
        as_tensor(seed_texts),
    )  # gathered on the device, not copied per chunk by numpy
    for start in range(0, n, CHUNK):
        end = min(n, start + CHUNK)
        rows = torch.as_tensor(neighbor_rows[start:end], device=device)
        chunk = targets[start:end] if target_rows is None else targets[target_rows[start:end]]
        weights[start:end], texts[start:end] = (
            t.cpu().numpy() for t in extrapolate(images[rows], as_tensor(chunk), captions[rows], ridge)
        )
    return weights, texts
