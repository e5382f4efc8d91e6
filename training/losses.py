"""The terms of the training objectives: the negative ELBO's, and the smoothness term of a semi-supervised
model's classifier. Every function returns nats per example, shape [N]."""

from __future__ import annotations

import math
from collections.abc import Callable

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


def virtual_adversarial_kl(classifier: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, radius: float,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """KL(p(y|x) || p(y|x + r)) for the perturbation r of L2 norm `radius` that most changes the classifier's
    answer, found by one power iteration (virtual adversarial training, Miyato et al. 2018); p(y|x) is held
    fixed, so the gradient makes the classifier smooth around x, labelled or not: [N, D] -> [N]."""
    with torch.no_grad():
        p = torch.softmax(classifier(x), dim=1)

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / (v.norm(dim=1, keepdim=True) + 1e-12)

    def kl(r: torch.Tensor) -> torch.Tensor:
        return F.kl_div(torch.log_softmax(classifier(x + r), dim=1), p, reduction="none").sum(dim=1)

    # The probe: a random direction a fifth of the radius long (small enough to stay local, large enough
    # that float32 resolves the change), turned by the gradient towards the steepest one.
    probe = (radius / 5 * unit(torch.randn(x.shape, generator=generator, device=x.device))).requires_grad_()
    (grad,) = torch.autograd.grad(kl(probe).sum(), probe)
    return kl(radius * unit(grad.detach()))
