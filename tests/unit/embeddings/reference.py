"""A single-process dense reference for dynamic tables: one row per id ever looked up,
starting from the table's initial-value function, updated by torch.optim (SGD, Adagrad) or
by the textbook formula written out per row (row-wise Adagrad, Adam with the table's
global step count)."""

from __future__ import annotations

import torch

from megatron_gr.ops.pytorch.id_hash import init_scale, initial_values, row_salt


class DenseReference:
    def __init__(self, dim: int, *, seed: int, init_std: float, optimizer: str, lr: float,
                 beta1: float = 0.9, beta2: float = 0.98, eps: float = 1e-8, initial_accumulator: float = 0.0):
        self.dim, self.seed, self.init_std = dim, seed, init_std
        self.optimizer, self.lr = optimizer, lr
        self.beta1, self.beta2, self.eps, self.initial_accumulator = beta1, beta2, eps, initial_accumulator
        self.rows: dict[int, torch.nn.Parameter] = {}
        self.state: dict[int, dict[str, torch.Tensor]] = {}
        self.step_count = 0
        self.torch_optims: dict[int, torch.optim.Optimizer] = {}

    def initial(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.numel()
        return initial_values(ids, torch.full((n,), row_salt(self.seed)), torch.full((n,), init_scale(self.init_std)), self.dim)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        new = [i for i in dict.fromkeys(ids.tolist()) if i not in self.rows]
        if new:
            for i, row in zip(new, self.initial(torch.tensor(new, dtype=torch.int64))):
                self.rows[i] = torch.nn.Parameter(row.clone())
        return torch.stack([self.rows[i].detach() for i in ids.tolist()]) if ids.numel() else torch.zeros(0, self.dim)

    def step(self, grads: dict[int, torch.Tensor]) -> None:
        """One optimizer step; ``grads``: id -> summed gradient of the touched rows."""
        self.step_count += 1
        if self.optimizer in ("sgd", "adagrad"):  # torch.optim, one optimizer per row
            for i, g in grads.items():
                if i not in self.torch_optims:
                    p = [self.rows[i]]
                    self.torch_optims[i] = (
                        torch.optim.SGD(p, lr=self.lr) if self.optimizer == "sgd"
                        else torch.optim.Adagrad(p, lr=self.lr, eps=self.eps, initial_accumulator_value=self.initial_accumulator)
                    )
                self.rows[i].grad = g.clone()
                self.torch_optims[i].step()
            return
        t = self.step_count
        with torch.no_grad():
            for i, g in grads.items():
                w = self.rows[i]
                s = self.state.setdefault(i, {})
                if self.optimizer == "rowwise_adagrad":
                    s["sum"] = s.get("sum", torch.tensor(self.initial_accumulator)) + (g * g).mean()
                    w -= self.lr * g / (s["sum"].sqrt() + self.eps)
                elif self.optimizer == "adam":
                    m = s.get("m", torch.zeros(self.dim)) * self.beta1 + (1 - self.beta1) * g
                    v = s.get("v", torch.zeros(self.dim)) * self.beta2 + (1 - self.beta2) * g * g
                    s["m"], s["v"] = m, v
                    m_hat = m / (1 - self.beta1**t)
                    v_hat = v / (1 - self.beta2**t)
                    w -= self.lr * m_hat / (v_hat.sqrt() + self.eps)
                else:
                    raise ValueError(self.optimizer)
