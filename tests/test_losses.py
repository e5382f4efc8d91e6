import math

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

from service import scoring
from training.config import TrainConfig
from training.losses import bernoulli_log_likelihood, gaussian_kl, gaussian_log_likelihood, virtual_adversarial_kl


def test_analytic_kl_matches_torch_and_monte_carlo():
    torch.manual_seed(0)
    mean, logvar = torch.randn(5, 3), torch.randn(5, 3) * 0.5
    std = torch.exp(0.5 * logvar)
    q = Independent(Normal(mean, std), 1)
    p = Independent(Normal(torch.zeros(3), torch.ones(3)), 1)
    analytic = gaussian_kl(mean, logvar)
    torch.testing.assert_close(analytic, kl_divergence(q, p))
    z = q.sample((200_000,))
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(analytic, monte_carlo, atol=0.02, rtol=0.02)


def test_bernoulli_log_likelihood_matches_torch_distributions():
    torch.manual_seed(1)
    logits = torch.randn(4, 10) * 3
    x = (torch.rand(4, 10) > 0.5).float()
    expected = Independent(Bernoulli(logits=logits), 1).log_prob(x)
    torch.testing.assert_close(bernoulli_log_likelihood(x, logits), expected)


def test_gaussian_log_likelihood_matches_torch_distributions():
    torch.manual_seed(2)
    x, mean = torch.randn(4, 6), torch.randn(4, 6)
    logvar = torch.tensor([0.3])
    expected = Independent(Normal(mean, torch.exp(0.5 * logvar).expand_as(mean)), 1).log_prob(x)
    torch.testing.assert_close(gaussian_log_likelihood(x, mean, logvar), expected)


def test_numpy_scoring_terms_match_the_training_losses():
    """The service's numpy terms and training's torch terms are the same quantities."""
    rng = np.random.default_rng(0)
    x = rng.random((6, 12)).astype(np.float32)
    logits = rng.standard_normal((6, 12)).astype(np.float32)
    probs = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(scoring.log_likelihood(x, probs, "bernoulli", None),
                               bernoulli_log_likelihood(torch.tensor(x), torch.tensor(logits)).numpy(), rtol=1e-5)
    mean = rng.standard_normal((6, 12)).astype(np.float32)
    np.testing.assert_allclose(scoring.log_likelihood(x, mean, "gaussian", -0.4),
                               gaussian_log_likelihood(torch.tensor(x), torch.tensor(mean),
                                                       torch.tensor([-0.4])).numpy(), rtol=1e-5)
    m, lv = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))
    np.testing.assert_allclose(scoring.gaussian_kl(m, lv), gaussian_kl(torch.tensor(m), torch.tensor(lv)).numpy())


def test_importance_weighted_estimate_is_exact_for_a_linear_gaussian_model():
    """With q equal to the true posterior, every importance weight equals p(x): the estimate is exact."""
    # Model: z ~ N(0, 1), x | z ~ N(z, s2). Posterior: N(x / (1 + s2), s2 / (1 + s2)); p(x) = N(0, 1 + s2).
    s2 = 0.5
    x = np.array([[0.7], [-1.2]])
    post_mean, post_logvar = x / (1 + s2), np.full_like(x, math.log(s2 / (1 + s2)))
    eps = scoring.common_noise(50, 1, seed=3)
    z = scoring.sample_latents(post_mean, post_logvar, eps)
    score, _, _ = scoring.scores(x, post_mean, post_logvar, eps, z, "gaussian", math.log(s2))
    exact = -(-0.5 * (math.log(2 * math.pi * (1 + s2)) + x[:, 0] ** 2 / (1 + s2)))
    np.testing.assert_allclose(score, exact, rtol=1e-4)


@pytest.mark.parametrize(("epoch", "expected"), [(0, 0.0), (2, 0.25), (4, 0.5), (8, 0.5), (20, 0.5)])
def test_kl_warmup_anneals_beta_from_zero(epoch, expected):
    assert TrainConfig(beta=0.5, warmup_epochs=4).beta_at(epoch) == pytest.approx(expected)
    assert TrainConfig(beta=0.5, warmup_epochs=0).beta_at(epoch) == 0.5


def _kl_rows(classifier, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    p, q = torch.softmax(classifier(x), dim=1), torch.softmax(classifier(x + r), dim=1)
    return (p * (p.log() - q.log())).sum(dim=1)


def test_the_virtual_adversarial_perturbation_is_the_steepest_one():
    """Logits that read x only through x . w change fastest along w, so one power iteration must land on
    +-w: each row's term is the KL at x +- radius * w / |w|, above any random direction of that length."""
    torch.manual_seed(3)
    w = torch.randn(6)
    classifier = lambda x: (x @ w).unsqueeze(1) * torch.tensor([[1.0, -1.0, 0.5]])  # noqa: E731
    x, radius = torch.randn(32, 6), 0.3
    along = radius * w / w.norm()
    got = virtual_adversarial_kl(classifier, x, radius, torch.Generator().manual_seed(0))
    plus, minus = _kl_rows(classifier, x, along), _kl_rows(classifier, x, -along)
    assert got.shape == (32,)
    assert torch.all(torch.minimum((got - plus).abs(), (got - minus).abs()) < 1e-5 * (1 + got))
    random = torch.randn(32, 6)
    assert torch.all(got >= _kl_rows(classifier, x, radius * random / random.norm(dim=1, keepdim=True)) - 1e-7)


def test_the_virtual_adversarial_term_is_zero_for_a_classifier_that_ignores_its_input():
    bias = torch.tensor([[0.2, -1.0, 3.0]])
    got = virtual_adversarial_kl(lambda x: bias.expand(len(x), 3) + 0 * x[:, :1], torch.randn(5, 4), 1.0)
    torch.testing.assert_close(got, torch.zeros(5))


def test_the_virtual_adversarial_radius_follows_the_input_width():
    cfg = TrainConfig()
    assert cfg.vat_radius(64) == pytest.approx(0.5) and cfg.vat_radius(784) == pytest.approx(1.75)
