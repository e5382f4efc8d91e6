"""The terms of the negative ELBO. Every function returns nats per example, shape [N]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), analytic; mean, logvar: [N, L] -> [N]."""
    return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=1)


def bernoulli_log_likelihood(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log p(x | logits) summed over features; x in [0, 1] (grey levels allowed): [N, D] -> [N]."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=1)


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(x | mean, exp(logvar)) summed over features; logvar broadcasts: [N, D] -> [N]."""
    logvar = logvar.expand_as(mean)
    return -0.5 * torch.sum(LOG_2PI + logvar + (x - mean).pow(2) * torch.exp(-logvar), dim=1)
