"""Plain dataclasses that describe a model and a training run; both are stored in the manifest."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

Arch = Literal["mlp", "conv"]
Likelihood = Literal["bernoulli", "gaussian"]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network (nanoGPT-style: the config is the model's identity).

    `hidden` is the MLP's layer widths, or the convolutional encoder's channel counts.
    `decoder_logvar` is the Gaussian decoder's log-variance, learned when `learn_logvar`: one shared
    value, or one per feature when `per_feature_logvar` (features on different scales and noise levels
    then each get their own, which is what makes -log p(x) a fair anomaly score on tables).
    `dense` is a fully connected layer between the conv stack and the latent, on both sides (0: none).
    `num_classes` > 0 makes the VAE conditional: encoder and decoder both see the label, one-hot,
    appended to their input rows ([x | y] and [z | y]), so a label is part of the row wherever rows go.
    `semi_supervised` adds q(y|x), a classifier over x, trained on labelled and unlabelled rows
    (Kingma et al. 2014, M2); the label is then a latent variable where it is not given.
    """

    input_shape: tuple[int, ...]
    latent_dim: int = 8
    hidden: tuple[int, ...] = (128,)
    arch: Arch = "mlp"
    likelihood: Likelihood = "bernoulli"
    learn_logvar: bool = True
    decoder_logvar: float = 0.0
    per_feature_logvar: bool = False
    dense: int = 0
    num_classes: int = 0
    semi_supervised: bool = False

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def __post_init__(self) -> None:
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden sizes must be positive, got {list(self.hidden)}")
        if self.dense < 0 or self.num_classes < 0 or self.num_classes == 1:
            raise ValueError(f"dense must be >= 0 and num_classes 0 or >= 2, got {self.dense}, {self.num_classes}")
        if self.semi_supervised and not self.conditional:
            raise ValueError("a semi-supervised model needs num_classes >= 2")
        if self.arch == "conv" and len(self.input_shape) != 3:
            raise ValueError(f"arch 'conv' needs an image input (C, H, W), got shape {list(self.input_shape)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["input_shape"] = tuple(d["input_shape"])
        d["hidden"] = tuple(d["hidden"])
        return cls(**d)


@dataclass(frozen=True)
class TrainConfig:
    """One training run's hyper-parameters."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 1.0
    warmup_epochs: int = 0
    seed: int = 0
    val_fraction: float = 0.1
    trim: float = 0.0  # share of each batch's highest-loss rows left out of the step (contaminated data)
    refit: float = 0.0  # share of rows a first fit scores worst, left out of a second fit from scratch
    first_fit_epochs: int = 0  # epochs of that first fit; 0: a quarter of `epochs`
    binarize: Literal["none", "dynamic"] = "none"  # dynamic: x ~ Bernoulli(grey level), drawn anew every epoch
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decays to lr / 100 by the last epoch
    # Semi-supervised: the weight of the labelled rows' mean cross-entropy -log q(y|x) beside the
    # per-row negative ELBO (README: Semi-supervised models, how it was chosen).
    classify_weight: float = 5.0
    # Semi-supervised: the weight of virtual adversarial training's smoothness term for q(y|x) over the
    # step's unlabelled rows (0: plain M2), and its perturbation's size as a root-mean-square per feature,
    # so one figure fits every input width (README: Semi-supervised models, how it was chosen).
    vat_weight: float = 0.0
    vat_rms: float = 0.0625

    def vat_radius(self, n_features: int) -> float:
        """The L2 norm of the perturbation over a row of `n_features`: 0.5 on the 8x8 digits, 1.75 on MNIST
        (Miyato et al. 2018 used 2.0 there)."""
        return self.vat_rms * math.sqrt(n_features)

    def first_fit(self) -> TrainConfig:
        """The config of a refit's first fit: short, since a network fits the bulk of the data before its
        rarer rows (Arpit et al. 2017), so an early model ranks the rows that do not belong worst."""
        return replace(self, epochs=self.first_fit_epochs or max(1, self.epochs // 4), refit=0.0)

    def lr_at(self, epoch: int) -> float:
        """Learning rate for a 0-based epoch."""
        if self.lr_schedule == "constant" or self.epochs <= 1:
            return self.lr
        floor = self.lr / 100
        return floor + 0.5 * (self.lr - floor) * (1 + math.cos(math.pi * epoch / (self.epochs - 1)))

    def beta_at(self, epoch: int) -> float:
        """KL weight for a 0-based epoch: annealed linearly from 0 to `beta` over `warmup_epochs`."""
        if self.warmup_epochs <= 0:
            return self.beta
        return self.beta * min(1.0, epoch / self.warmup_epochs)
