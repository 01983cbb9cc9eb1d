"""Penalised logistic regression by Newton's method: the GENIES probes and calibrators and
refeval-eval's length-controlled win rate fit the same objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_logistic(x: torch.Tensor, y: torch.Tensor, penalty: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """w minimising sum_i logloss(y_i, sigmoid(x_i . w)) + 1/2 sum_j penalty_j w_j^2 (x: rows x
    features; a column of ones with penalty 0 is an unpenalised intercept), by Newton's
    method from w = 0, halving any step that does not lower the objective."""
    x, y, penalty = x.double(), y.double(), penalty.double()

    def objective(w: torch.Tensor) -> torch.Tensor:
        z = x @ w
        return (F.softplus(z) - y * z).sum() + 0.5 * (penalty * w * w).sum()

    w = torch.zeros(x.shape[1], dtype=torch.double)
    for _ in range(iterations):
        p = torch.sigmoid(x @ w)
        gradient = x.T @ (p - y) + penalty * w
        hessian = x.T @ (x * (p * (1 - p))[:, None]) + torch.diag(penalty)
        step = torch.linalg.solve(hessian, gradient)
        before, size = objective(w), 1.0
        while objective(w - size * step) > before and size > 1e-12:
            size /= 2
        w = w - size * step
        if (size * step).abs().max() < 1e-10:
            break
    return w
