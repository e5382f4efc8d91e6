import pytest
import torch

from training.config import ModelConfig
from training.model import VAE


@pytest.mark.parametrize(("shape", "arch", "hidden"), [
    ((64,), "mlp", (32,)),
    ((1, 8, 8), "mlp", (64, 32)),
    ((1, 8, 8), "conv", (16, 32)),
    ((1, 28, 28), "conv", (32, 64)),
    ((1, 28, 28), "mlp", (400,)),
    ((3, 7, 9), "conv", (8,)),
])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_shapes(shape, arch, hidden, likelihood):
    cfg = ModelConfig(input_shape=shape, latent_dim=5, hidden=hidden, arch=arch, likelihood=likelihood)
    vae = VAE(cfg)
    x = torch.rand(3, cfg.input_dim)
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (3, 5)
    assert vae.decode(mean).shape == (3, cfg.input_dim)
    out = vae.output_head()(mean)
    if likelihood == "bernoulli":
        assert ((out > 0) & (out < 1)).all()
    terms = vae.elbo(x)
    assert terms.loss.shape == terms.reconstruction.shape == terms.kl.shape == (3,)
    torch.testing.assert_close(terms.loss, terms.reconstruction + terms.kl)


def test_reparameterize_uses_the_given_noise():
    mean, logvar, eps = torch.tensor([[1.0, -1.0]]), torch.log(torch.tensor([[4.0, 0.25]])), torch.tensor([[0.5, 2.0]])
    torch.testing.assert_close(VAE.reparameterize(mean, logvar, eps), torch.tensor([[2.0, 0.0]]))


def test_gaussian_decoder_variance_is_learned_or_fixed():
    learned = VAE(ModelConfig(input_shape=(4,), likelihood="gaussian"))
    fixed = VAE(ModelConfig(input_shape=(4,), likelihood="gaussian", learn_logvar=False, decoder_logvar=-1.0))
    assert any(p is learned.decoder_logvar for p in learned.parameters())
    assert all(p is not fixed.decoder_logvar for p in fixed.parameters())
    assert fixed.decoder_logvar.item() == -1.0


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="latent_dim"):
        ModelConfig(input_shape=(4,), latent_dim=0)
    with pytest.raises(ValueError, match="conv"):
        ModelConfig(input_shape=(4,), arch="conv")
