"""The VAE: separate Encoder and Decoder modules, so each exports to its own graph.

Graphs take and return flat rows ([N, D] in, [N, D] out) whatever the architecture, so the
service only ever handles 2-D arrays. No randomness inside a graph: noise is drawn outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from training.config import ModelConfig
from training.losses import bernoulli_log_likelihood, gaussian_kl, gaussian_log_likelihood


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


def _conv_sizes(size: int, n_layers: int) -> list[int]:
    """Spatial sizes after each stride-2, kernel-3, padding-1 convolution: ceil(n / 2) each time."""
    sizes = [size]
    for _ in range(n_layers):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class _Features(nn.Module):
    """The encoder's layers up to its output: x [N, D] (with a label: [N, D + label_width]) -> [N, features]."""

    def __init__(self, cfg: ModelConfig, label_width: int):
        super().__init__()
        self.input_shape = cfg.input_shape
        self.input_dim = cfg.input_dim
        self.is_conv = cfg.arch == "conv"
        if not self.is_conv:
            self.body: nn.Module = _mlp([cfg.input_dim + label_width, *cfg.hidden])
            self.head: nn.Module = nn.Identity()
            features = cfg.hidden[-1]
        else:
            channels, height, width = cfg.input_shape
            layers: list[nn.Module] = []
            for c_in, c_out in zip((channels, *cfg.hidden[:-1]), cfg.hidden, strict=True):
                layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.ReLU()]
            layers.append(nn.Flatten())
            self.body = nn.Sequential(*layers)
            h = _conv_sizes(height, len(cfg.hidden))[-1]
            w = _conv_sizes(width, len(cfg.hidden))[-1]
            features = cfg.hidden[-1] * h * w + label_width  # the label joins after the convolutions
            self.head = nn.Sequential(nn.Linear(features, cfg.dense), nn.ReLU()) if cfg.dense else nn.Identity()
            features = cfg.dense or features
        self.features = features

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            image, label = x[:, : self.input_dim], x[:, self.input_dim :]
            h = self.body(image.reshape((-1, *self.input_shape)))  # [N, C, H, W] -> [N, F]
            return self.head(torch.cat([h, label], dim=1))
        return self.body(x)


class Encoder(_Features):
    """x [N, D] (conditional: [x | one-hot y], [N, D + C]) -> (mean [N, L], logvar [N, L])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.num_classes)
        self.mean = nn.Linear(self.features, cfg.latent_dim)
        self.logvar = nn.Linear(self.features, cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden(x)
        return self.mean(h), self.logvar(h)


class Classifier(_Features):
    """q(y|x) of a semi-supervised VAE (Kingma et al. 2014, M2): the encoder's architecture over x alone,
    x [N, D] -> class logits [N, C]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, label_width=0)
        self.logits = nn.Linear(self.features, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden(x))


class SemiSupervisedEncoder(nn.Module):
    """The exported encoder of a semi-supervised VAE: [x | one-hot y] [N, D + C] -> (mean, logvar, q(y|x)
    [N, C]). The class probabilities read x alone, so a caller without a label sends any one-hot (zeros)
    and reads them, then encodes again with the label they give."""

    def __init__(self, encoder: Encoder, classifier: Classifier):
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier
        self.input_dim = encoder.input_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder(x)
        return mean, logvar, torch.softmax(self.classifier(x[:, : self.input_dim]), dim=1)


class Decoder(nn.Module):
    """z [N, L] (conditional: [z | one-hot y]) -> distribution parameters [N, D]: Bernoulli logits
    or the Gaussian mean."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.is_conv = cfg.arch == "conv"
        self.input_dim = cfg.input_dim
        z_width = cfg.latent_dim + cfg.num_classes
        if cfg.arch == "mlp":
            widths = list(reversed(cfg.hidden))
            self.body: nn.Module = nn.Sequential(
                _mlp([z_width, *widths]), nn.Linear(widths[-1], cfg.input_dim)
            )
        else:
            channels, height, width = cfg.input_shape
            hs = _conv_sizes(height, len(cfg.hidden))
            ws = _conv_sizes(width, len(cfg.hidden))
            chans = list(reversed(cfg.hidden))
            self.start_shape = (chans[0], hs[-1], ws[-1])
            layers: list[nn.Module] = []
            if cfg.dense:
                layers += [nn.Linear(z_width, cfg.dense), nn.ReLU()]
                z_width = cfg.dense
            layers += [nn.Linear(z_width, chans[0] * hs[-1] * ws[-1]), nn.ReLU(), nn.Unflatten(1, self.start_shape)]
            outs = [*chans[1:], channels]
            for i, (c_in, c_out) in enumerate(zip(chans, outs, strict=True)):
                # Pick output_padding so each transposed conv restores the encoder's size exactly.
                target_h, target_w = hs[-2 - i], ws[-2 - i]
                pad = (1 - target_h % 2, 1 - target_w % 2)
                layers.append(nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=pad))
                if i < len(outs) - 1:
                    layers.append(nn.ReLU())
            layers.append(nn.Flatten())
            self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z)


class OutputHead(nn.Module):
    """What the exported decoder returns: probabilities (Bernoulli) or the mean (Gaussian)."""

    def __init__(self, decoder: Decoder, likelihood: str):
        super().__init__()
        self.decoder = decoder
        self.bernoulli = likelihood == "bernoulli"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        params = self.decoder(z)
        return torch.sigmoid(params) if self.bernoulli else params


@dataclass
class ELBO:
    """Per-example terms, nats, shape [N]: loss = reconstruction + beta * kl."""

    loss: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor


class VAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        width = cfg.input_dim if cfg.per_feature_logvar else 1
        logvar = torch.full((width,), float(cfg.decoder_logvar))
        if cfg.likelihood == "gaussian" and cfg.learn_logvar:
            self.decoder_logvar = nn.Parameter(logvar)
        else:
            self.register_buffer("decoder_logvar", logvar)
        if cfg.semi_supervised:
            self.classifier = Classifier(cfg)

    def one_hot(self, y: torch.Tensor | None, n: int) -> torch.Tensor:
        """Class indices [N] -> the one-hot [N, C] the graphs take; [N, 0] for an unconditional model."""
        if not self.cfg.conditional:
            return torch.zeros((n, 0), device=self.decoder_logvar.device)
        if y is None:
            raise ValueError("a conditional VAE needs labels")
        return torch.nn.functional.one_hot(y, self.cfg.num_classes).float()

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(torch.cat([x, self.one_hot(y, len(x))], dim=1))

    @staticmethod
    def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = mean + sigma * eps; eps ~ N(0, I) is passed in so the caller owns the randomness."""
        return mean + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder parameters [N, D]: logits (Bernoulli) or mean (Gaussian)."""
        return self.decoder(torch.cat([z, self.one_hot(y, len(z))], dim=1))

    def log_likelihood(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        if self.cfg.likelihood == "bernoulli":
            return bernoulli_log_likelihood(x, params)
        return gaussian_log_likelihood(x, params, self.decoder_logvar)

    def elbo(self, x: torch.Tensor, beta: float = 1.0, generator: torch.Generator | None = None,
             y: torch.Tensor | None = None) -> ELBO:
        """Single-sample negative ELBO of flat rows x [N, D] (and labels y [N] if conditional), nats per example."""
        mean, logvar = self.encode(x, y)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = self.reparameterize(mean, logvar, eps)
        reconstruction = -self.log_likelihood(x, self.decode(z, y))
        kl = gaussian_kl(mean, logvar)
        return ELBO(loss=reconstruction + beta * kl, reconstruction=reconstruction, kl=kl)

    def weights(self) -> dict[str, torch.Tensor]:
        """What the model folder's weights file holds: the state dict (a stack's says which network's is which)."""
        return self.state_dict()

    def output_head(self) -> OutputHead:
        return OutputHead(self.decoder, self.cfg.likelihood)

    def exported_encoder(self) -> nn.Module:
        """What the encoder graph computes: (mean, logvar), and q(y|x) for a semi-supervised model."""
        return SemiSupervisedEncoder(self.encoder, self.classifier) if self.cfg.semi_supervised else self.encoder

    def label_terms(self, x: torch.Tensor, beta: float = 1.0,
                    generator: torch.Generator | None = None) -> tuple[ELBO, torch.Tensor]:
        """Every class's ELBO terms given that class, [N, C] each (the loss includes the uniform prior's
        -log p(y) = log C), and log q(y|x) [N, C]: the parts of a semi-supervised model's unlabelled loss."""
        n, c = len(x), self.cfg.num_classes
        labels = torch.arange(c, device=x.device).repeat(n)
        e = self.elbo(x.repeat_interleave(c, dim=0), beta, generator, labels)
        per_class = ELBO(e.loss.view(n, c) + math.log(c), e.reconstruction.view(n, c), e.kl.view(n, c))
        return per_class, torch.log_softmax(self.classifier(x), dim=1)

    def unlabelled_loss(self, x: torch.Tensor, beta: float = 1.0,
                        generator: torch.Generator | None = None) -> ELBO:
        """M2's bound on -log p(x) with the label unobserved, per row [N]: E_q(y|x)[-log p(x, y) bound] - H(q),
        with the reconstruction and KL terms averaged over q(y|x) likewise."""
        per_class, log_q = self.label_terms(x, beta, generator)
        q = log_q.exp()
        return ELBO(loss=(q * (per_class.loss + log_q)).sum(dim=1),
                    reconstruction=(q * per_class.reconstruction).sum(dim=1), kl=(q * per_class.kl).sum(dim=1))
