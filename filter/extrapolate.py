"""Linear text extrapolation (the paper's step 3): a crawled image has no trustworthy caption, so its text
feature is built from its nearest seed images' captions, weighted by how those images combine into it."""
from __future__ import annotations

import numpy as np
import torch

CHUNK = 65_536


def extrapolate(neighbors: torch.Tensor, target: torch.Tensor, neighbor_texts: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ridge least squares: w = argmin ||Fᵀw − f||² + ridge·||w||², then s = Sᵀw, L2-normalised.

    neighbors F (n, k, d), target f (n, d), neighbor_texts S (n, k, d) → weights (n, k), text features (n, d).
    """
    gram = neighbors @ neighbors.transpose(1, 2)
    gram = gram + ridge * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    weights = torch.linalg.solve(gram, (neighbors @ target.unsqueeze(-1))).squeeze(-1)
    text = torch.nn.functional.normalize((weights.unsqueeze(-1) * neighbor_texts).sum(dim=1), dim=-1)
    return weights, text


def extrapolate_batch(
    seed_images: np.ndarray, seed_texts: np.ndarray, targets: np.ndarray, neighbor_rows: np.ndarray, ridge: float, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """extrapolate() for every target, given its neighbours' rows in the seed arrays; on `device`, in chunks."""
    if not len(targets):
        return np.zeros((0, neighbor_rows.shape[1]), np.float32), np.zeros((0, seed_texts.shape[1]), np.float32)
    weights, texts = [], []
    as_tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)  # noqa: E731
    for start in range(0, len(targets), CHUNK):
        rows = neighbor_rows[start : start + CHUNK]
        w, s = extrapolate(as_tensor(seed_images[rows]), as_tensor(targets[start : start + CHUNK]), as_tensor(seed_texts[rows]), ridge)
        weights.append(w.cpu().numpy())
        texts.append(s.cpu().numpy())
    return np.concatenate(weights), np.concatenate(texts)
