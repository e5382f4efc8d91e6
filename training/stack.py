"""M1+M2 (Kingma et al. 2014): a semi-supervised VAE (M2) trained on the latent means of an unconditional
one (M1), exported as one model over the original rows.

M1 learns features from every row without labels; M2 learns the classes from those features, where a
few labels go much further than on raw pixels (MNIST with 100 labels: README). The stack is itself a
conditional VAE of the rows: its encoder is M2's over M1's latent means, its decoder M1's over M2's
decoded features, so its ELBO is a bound on the rows' likelihood and the export contract, the parity
checks, the calibrations and every endpoint are those of any semi-supervised model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_weights
from torch import nn

from service.folder import open_folder
from service.manifest import WEIGHTS_FILE, Manifest
from training.config import ModelConfig
from training.data import DataError, Dataset, Preprocessing, fit_preprocessing
from training.model import VAE, Classifier, Decoder, Encoder

# An M1 unit is active when its mean varies over the rows (Burda et al. 2016: Var_x E_q[z_u] > 0.01);
# the others collapsed onto the prior, carry nothing about the row, and standardised would be pure noise.
ACTIVE_VARIANCE = 0.01
ENCODE_BATCH = 4096


def load_vae(folder: Path) -> tuple[Manifest, VAE]:
    """An unconditional model folder's manifest and its eager VAE, rebuilt from its verified weights."""
    try:
        verified = open_folder(folder, keep=[WEIGHTS_FILE])
    except (OSError, ValueError) as e:
        raise DataError(f"--stack-on {folder}: not a model folder that verifies ({e})") from None
    manifest = verified.manifest
    if manifest.classes:
        raise DataError(f"--stack-on {folder}: {manifest.name} v{manifest.version} is conditional; M1 is an "
                        "unconditional model trained without labels (vae-train without --conditional or "
                        "--semi-supervised)")
    vae = VAE(ModelConfig.from_dict(manifest.architecture))
    vae.load_state_dict(load_weights(verified.blobs[WEIGHTS_FILE]))
    return manifest, vae.eval()


class Features(nn.Module):
    """Rows in M1's model space [N, D] -> M2's input: M1's active latent means, standardised [N, A]."""

    def __init__(self, encoder: nn.Module, select: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("select", select)  # [L1, A], one 1 per column: which units are active
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, _ = self.encoder(x)
        return (mean @ self.select - self.shift) / self.scale


class StackedEncoder(nn.Module):
    """[x | one-hot y] -> M2's (mean, logvar) given the features of x and y."""

    def __init__(self, features: Features, encoder: Encoder, input_dim: int):
        super().__init__()
        self.features = features
        self.encoder = encoder
        self.input_dim = input_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, label = x[:, : self.input_dim], x[:, self.input_dim :]
        return self.encoder(torch.cat([self.features(rows), label], dim=1))


class StackedClassifier(nn.Module):
    """x [N, D] -> M2's class logits over the features of x."""

    def __init__(self, features: Features, classifier: Classifier):
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class StackedDecoder(nn.Module):
    """[z | one-hot y] -> M1's decoder parameters for the latent M2 decodes (the inactive units at their mean)."""

    def __init__(self, decoder: Decoder, m1_decoder: Decoder, features: Features, fill: torch.Tensor):
        super().__init__()
        self.decoder = decoder
        self.m1_decoder = m1_decoder
        for name in ("select", "shift", "scale"):  # the selection and the standardisation to undo
            self.register_buffer(name, getattr(features, name))
        self.register_buffer("fill", fill)  # [L1]: the training rows' mean of every M1 unit, 0 where active

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        active = self.decoder(z) * self.scale + self.shift  # M2's Gaussian mean of the features, unstandardised
        return self.m1_decoder(self.fill + active @ self.select.T)


class StackedVAE(VAE):
    """The exported stack: a semi-supervised VAE of the rows whose encoder, classifier and decoder are M1
    and M2 composed. Built, not trained: VAE's loss terms and export work on it unchanged."""

    def __init__(self, m1: VAE, m2: VAE, features: Features, fill: torch.Tensor, stacked_on: dict[str, Any]):
        nn.Module.__init__(self)
        self.cfg = StackConfig(**{**dataclasses.asdict(m1.cfg), "latent_dim": m2.cfg.latent_dim,
                                  "num_classes": m2.cfg.num_classes, "semi_supervised": True,
                                  "m1": m1.cfg.to_dict(), "m2": m2.cfg.to_dict(), "stacked_on": stacked_on})
        self.encoder = StackedEncoder(features, m2.encoder, m1.cfg.input_dim)  # type: ignore[assignment]
        self.classifier = StackedClassifier(features, m2.classifier)  # type: ignore[assignment]
        self.decoder = StackedDecoder(m2.decoder, m1.decoder, features, fill)  # type: ignore[assignment]
        self.register_buffer("decoder_logvar", m1.decoder_logvar.detach().clone())
        self.parts = (m1, m2, features)  # a tuple: not registered again, so each tensor is one module's

    def weights(self) -> dict[str, torch.Tensor]:
        """Each network's own state under m1., m2. and the stack's buffers under stack.: every tensor once."""
        m1, m2, features = self.parts
        out = {f"m1.{k}": v for k, v in m1.state_dict().items()}
        out.update({f"m2.{k}": v for k, v in m2.state_dict().items()})
        out.update({f"stack.{k}": getattr(features, k) for k in ("select", "shift", "scale")})
        out["stack.fill"] = self.decoder.fill
        return out


@dataclasses.dataclass(frozen=True)
class StackConfig(ModelConfig):
    """The stack's facts as one model (M1's rows and likelihood, M2's latent and classes), with both
    networks' configs and where M1 came from, for the manifest's `architecture`."""

    m1: dict[str, Any] = dataclasses.field(default_factory=dict)
    m2: dict[str, Any] = dataclasses.field(default_factory=dict)
    stacked_on: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Stack:
    """M1 and what M2 learns from: the rows' active latent means, as a Dataset with the rows' labels."""

    latents: Dataset  # M2's training data
    rows: Dataset  # the rows, with M1's preprocessing: what the stack is exported and calibrated on
    m1: VAE
    features: Features
    fill: torch.Tensor  # [L1]: each inactive unit's mean over the training rows, 0 where active
    record: dict[str, Any]  # M1's folder, name, version, units and file hashes, for the manifest

    def model(self, m2: VAE) -> StackedVAE:
        return StackedVAE(self.m1, m2, self.features, self.fill, self.record)


def m1_preprocessing(manifest: Manifest) -> Preprocessing:
    p = manifest.preprocessing  # float64, so the stack's manifest repeats M1's numbers exactly
    return Preprocessing(p.kind, np.asarray(p.shift, dtype=np.float64), np.asarray(p.scale, dtype=np.float64))


@torch.no_grad()
def _latent_means(m1: VAE, x: np.ndarray) -> np.ndarray:
    return np.concatenate([m1.encoder(torch.from_numpy(x[i : i + ENCODE_BATCH]))[0].numpy()
                           for i in range(0, len(x), ENCODE_BATCH)])


def stack_on(folder: Path, data: Dataset) -> Stack:
    """M1 from `folder` and its active latent means of `data`'s rows (labels as `data` has them)."""
    manifest, m1 = load_vae(folder)
    if manifest.input_dim != data.input_dim:
        raise DataError(f"--stack-on {folder}: {manifest.name} v{manifest.version} takes rows of {manifest.input_dim} "
                        f"values; these have {data.input_dim}")
    if manifest.feature_names and data.feature_names and manifest.feature_names != data.feature_names:
        raise DataError(f"--stack-on {folder}: its columns are {manifest.feature_names[:5]}...; these are "
                        f"{data.feature_names[:5]}...: give M1 the same table's columns")
    data = dataclasses.replace(data, preprocessing=m1_preprocessing(manifest))
    z_train = _latent_means(m1, data.preprocessing.apply(data.x_train))
    z_val = _latent_means(m1, data.preprocessing.apply(data.x_val))
    variance = z_train.var(axis=0)
    active = np.flatnonzero(variance > ACTIVE_VARIANCE)
    if not len(active):
        active = np.array([int(variance.argmax())])  # a collapsed M1 still gives its liveliest unit
    features = fit_preprocessing(z_train[:, active], "gaussian")
    select = np.zeros((z_train.shape[1], len(active)), dtype=np.float32)
    select[active, np.arange(len(active))] = 1.0
    fill = z_train.mean(axis=0).astype(np.float32)
    fill[active] = 0.0
    module = Features(m1.encoder, torch.from_numpy(select), torch.from_numpy(features.shift.astype(np.float32)),
                      torch.from_numpy(features.scale.astype(np.float32)))
    latents = dataclasses.replace(data, input_shape=(len(active),), x_train=z_train[:, active], x_val=z_val[:, active],
                                  preprocessing=features, feature_names=None)
    record = {"folder": str(folder), "name": manifest.name, "version": manifest.version,
              "latent_dim": manifest.latent_dim, "active_units": active.tolist(),
              "files": manifest.files}
    return Stack(latents, data, m1, module, torch.from_numpy(fill), record)
