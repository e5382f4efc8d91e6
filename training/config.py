"""Plain dataclasses that describe a model and a training run; both are stored in the manifest."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
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
    """

    input_shape: tuple[int, ...]
    latent_dim: int = 8
    hidden: tuple[int, ...] = (128,)
    arch: Arch = "mlp"
    likelihood: Likelihood = "bernoulli"
    learn_logvar: bool = True
    decoder_logvar: float = 0.0
    per_feature_logvar: bool = False

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    def __post_init__(self) -> None:
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden sizes must be positive, got {list(self.hidden)}")
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

    def beta_at(self, epoch: int) -> float:
        """KL weight for a 0-based epoch: annealed linearly from 0 to `beta` over `warmup_epochs`."""
        if self.warmup_epochs <= 0:
            return self.beta
        return self.beta * min(1.0, epoch / self.warmup_epochs)
