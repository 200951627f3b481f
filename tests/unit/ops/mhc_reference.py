"""mHC maps written out the slow, obvious way: Sinkhorn-Knopp in the direct form (exp, then
divide) and the paper's mapping equations one token at a time in float64. The references
the mHC ops and the hyper-connection module are tested against."""

from __future__ import annotations

import torch


def direct_sinkhorn(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """Sinkhorn-Knopp as the paper writes it: M = exp(logits), then row and column
    normalisation ``iterations`` times. Differentiable by plain autograd."""
    m = logits.exp()
    for _ in range(iterations):
        m = m / m.sum(dim=-1, keepdim=True)
        m = m / m.sum(dim=-2, keepdim=True)
    return m


def reference_mappings(x, projection, alpha, bias, iterations, eps):
    """The paper's equations, one token at a time, in float64."""
    x, projection, alpha, bias = (t.double() for t in (x, projection, alpha, bias))
    num_tokens, n, _ = x.shape
    pres, posts, ress = [], [], []
    for t in range(num_tokens):
        vec = x[t].reshape(-1)
        normed = vec / torch.sqrt((vec * vec).mean() + eps)
        logits = projection @ normed
        pres.append(torch.sigmoid(alpha[0] * logits[:n] + bias[:n]))
        posts.append(2 * torch.sigmoid(alpha[1] * logits[n : 2 * n] + bias[n : 2 * n]))
        ress.append(direct_sinkhorn((alpha[2] * logits[2 * n :] + bias[2 * n :]).view(n, n), iterations))
    return torch.stack(pres), torch.stack(posts), torch.stack(ress)
