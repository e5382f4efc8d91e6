"""The export contract between `training` and `service`: the schema of `model.json`.

The service validates every manifest against this schema and refuses anything else; `training`
imports it to write manifests, so the two cannot drift. Bump SCHEMA_VERSION on any breaking change.
"""

from __future__ import annotations

import hashlib
import math
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

SCHEMA_VERSION = 1
MANIFEST_FILE = "model.json"
ENCODER_TS, DECODER_TS = "encoder.pt", "decoder.pt"
ENCODER_ONNX, DECODER_ONNX = "encoder.onnx", "decoder.onnx"
WEIGHTS_FILE = "weights.safetensors"
REQUIRED_FILES = (ENCODER_TS, DECODER_TS, ENCODER_ONNX, DECODER_ONNX, WEIGHTS_FILE)
GraphName = Literal["encoder", "decoder"]
RuntimeName = Literal["torchscript", "onnx"]
GRAPH_FILES: dict[tuple[GraphName, RuntimeName], str] = {
    ("encoder", "torchscript"): ENCODER_TS,
    ("decoder", "torchscript"): DECODER_TS,
    ("encoder", "onnx"): ENCODER_ONNX,
    ("decoder", "onnx"): DECODER_ONNX,
}
PARITY_TOLERANCE = 1e-4
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

Finite = Annotated[float, Field(allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Preprocessing(Strict):
    """x_model = (x_raw - shift) / scale; each list has one entry per feature, or one shared entry."""

    kind: Literal["scale", "standardize", "minmax"]
    shift: list[Finite] = Field(min_length=1)
    scale: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(min_length=1)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.shift, dtype=np.float32), np.asarray(self.scale, dtype=np.float32)


class ParityCheck(Strict):
    """One comparison of an exported graph against the eager model."""

    graph: Literal["encoder", "decoder"]
    runtime: Literal["torchscript", "onnx"]
    inputs: Literal["validation", "random"]
    batch_size: int = Field(ge=1)
    max_abs_diff: Finite = Field(ge=0)

    @model_validator(mode="after")
    def _within_tolerance(self) -> ParityCheck:
        if self.max_abs_diff > PARITY_TOLERANCE:
            raise ValueError(f"{self.graph}/{self.runtime} parity {self.max_abs_diff:.2e} exceeds {PARITY_TOLERANCE}")
        return self


ScoreName = Literal["elbo", "iwae", "complexity", "typicality"]
# The formula each calibration was computed with. "complexity" is the first complexity score (likelihood
# of the binarised image minus its whole compressed length): exports that carry it still load, but their
# complexity score is not served, since its quantiles describe another formula.
Formula = Literal["negative_elbo", "iwae", "complexity", "complexity_v2", "typicality"]
CURRENT_FORMULA: dict[ScoreName, Formula] = {"elbo": "negative_elbo", "iwae": "iwae", "complexity": "complexity_v2",
                                             "typicality": "typicality"}
# K each score is calibrated, and served by default, with: the importance-weighted ones need samples; the
# typicality score measured the same at K = 16 as at K = 1, so it costs one pass, as the ELBO does.
CALIBRATED_SAMPLES: dict[ScoreName, int] = {"elbo": 1, "iwae": 64, "complexity": 64, "typicality": 1}
# The scores a semi-supervised model also serves with the label marginalised out (no label given):
# those in nats of -log p(x), where summing over the classes means something.
MARGINAL_SCORES: tuple[ScoreName, ...] = ("elbo", "iwae")


def score_asked(score: ScoreName | None, samples: int | None, default: ScoreName = "elbo") -> ScoreName:
    """The score a request means: the one it names, else the model's `default`, or iwae when it asks for
    samples > 1."""
    return score or (default if samples in (None, 1) else "iwae")


class Calibration(Strict):
    """Quantiles of per-row anomaly scores on held-out rows (pyod's threshold_ convention).

    `levels[i]` of the held-out rows scored at most `values[i]`; higher scores are more anomalous.
    """

    score: Formula = "negative_elbo"
    samples: int = Field(ge=1)
    seed: int
    n_rows: int = Field(ge=1)
    levels: list[Annotated[float, Field(ge=0, le=1)]] = Field(min_length=2)
    values: list[Finite] = Field(min_length=2)
    threshold_level: float = Field(gt=0, lt=1)
    threshold: Finite
    _arrays: tuple[np.ndarray, np.ndarray] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _monotone(self) -> Calibration:
        if len(self.levels) != len(self.values):
            raise ValueError("calibration levels and values differ in length")
        if any(b < a for a, b in zip(self.levels, self.levels[1:], strict=False)):
            raise ValueError("calibration levels must increase")
        if any(b < a for a, b in zip(self.values, self.values[1:], strict=False)):
            raise ValueError("calibration values must not decrease")
        return self

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """Share of held-out rows scoring at most each score, 0..100 (interpolated)."""
        if self._arrays is None:  # per request, np.interp would convert both 201-entry lists again (~10 us)
            self._arrays = (np.asarray(self.values), 100.0 * np.asarray(self.levels))
        values, levels = self._arrays
        return np.interp(scores, values, levels)


class Typicality(Strict):
    """The training rows' statistics that the typicality score (`scoring.typicality`) measures a row
    against, fitted at export: the mean and inverse covariance of the statistics `scoring.TYPICALITY_STATISTICS`
    (log(1 + v) each), and the mean and standard deviation of log(1 + negative ELBO), at K = `samples`."""

    statistics: list[Literal["reconstruction", "kl", "distance"]] = Field(min_length=3, max_length=3)
    samples: int = Field(ge=1)
    seed: int
    n_rows: int = Field(ge=2)
    mean: list[Finite] = Field(min_length=3, max_length=3)
    precision: list[list[Finite]] = Field(min_length=3, max_length=3)
    elbo_mean: Finite
    elbo_std: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    _arrays: tuple[np.ndarray, np.ndarray] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _positive_definite(self) -> Typicality:
        if list(self.statistics) != ["reconstruction", "kl", "distance"]:
            raise ValueError(f"typicality statistics must be reconstruction, kl, distance, got {self.statistics}")
        p = np.asarray(self.precision, dtype=np.float64)
        if p.shape != (3, 3) or not np.allclose(p, p.T) or np.linalg.eigvalsh(p).min() <= 0:
            raise ValueError("typicality precision must be a symmetric positive-definite 3 x 3 matrix")
        return self

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean [3], precision [3, 3]), float64, converted once."""
        if self._arrays is None:
            self._arrays = (np.asarray(self.mean, dtype=np.float64), np.asarray(self.precision, dtype=np.float64))
        return self._arrays


class Manifest(Strict):
    schema_version: Literal[1]
    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1)
    created_at: datetime
    input_shape: list[int] = Field(min_length=1)
    latent_dim: int = Field(ge=1)
    likelihood: Literal["bernoulli", "gaussian"]
    decoder_logvar: Finite | list[Finite] | None = None  # Gaussian: shared, or one per feature
    preprocessing: Preprocessing
    feature_names: list[str] | None = None
    classes: list[Annotated[str, Field(min_length=1)]] | None = None  # a conditional model's labels, in one-hot order
    # A semi-supervised model (conditional, with q(y|x)): its encoder graph's third output is the class
    # probabilities [N, C]; a label may be left out, and is then inferred or marginalised.
    semi_supervised: bool = False
    architecture: dict[str, Any]
    training: dict[str, Any]
    metrics: dict[str, Finite]
    parity: list[ParityCheck] = Field(min_length=1)
    calibration: Calibration  # the default score's: the negative ELBO, K = 1
    calibrations: dict[ScoreName, Calibration] = Field(default_factory=dict)  # every other score, at its own K
    typicality: Typicality | None = None  # the typicality score's reference (image models)
    # Semi-supervised models: MARGINAL_SCORES with the label marginalised, calibrated on unlabelled rows.
    marginal_calibrations: dict[ScoreName, Calibration] = Field(default_factory=dict)
    files: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]]

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    @property
    def num_classes(self) -> int:
        """Width of the one-hot label the graphs take after their rows ([x | y], [z | y]); 0 if unconditional."""
        return len(self.classes or ())

    @property
    def default_score(self) -> ScoreName:
        """What /anomaly-score serves when no score is named: typicality where this export has it (image
        models; it dominates the ELBO on the out-of-distribution benchmark, README), else elbo."""
        return "typicality" if self.calibration_for("typicality") is not None else "elbo"

    def calibration_for(self, score: ScoreName, marginal: bool = False) -> Calibration | None:
        """The score's calibration, if this export has one for the formula the service computes
        (`marginal`: with the label marginalised out, semi-supervised models)."""
        if score == "typicality" and self.typicality is None:
            return None
        if marginal:
            calibration = self.marginal_calibrations.get(score)
        else:
            calibration = self.calibration if score == "elbo" else self.calibrations.get(score)
        return calibration if calibration is not None and calibration.score == CURRENT_FORMULA[score] else None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if any(d < 1 for d in self.input_shape):
            raise ValueError(f"input_shape must be positive, got {self.input_shape}")
        for field_name in ("shift", "scale"):
            n = len(getattr(self.preprocessing, field_name))
            if n not in (1, self.input_dim):
                raise ValueError(f"preprocessing.{field_name} has {n} entries; expected 1 or {self.input_dim}")
        if self.feature_names is not None and len(self.feature_names) != self.input_dim:
            raise ValueError(f"feature_names has {len(self.feature_names)} names for {self.input_dim} features")
        if self.classes is not None and (len(self.classes) < 2 or len(set(self.classes)) != len(self.classes)):
            raise ValueError(f"classes must name at least 2 distinct labels, got {self.classes[:10]}")
        if self.semi_supervised and self.classes is None:
            raise ValueError("a semi-supervised model needs classes")
        if self.marginal_calibrations and not self.semi_supervised:
            raise ValueError("marginal_calibrations are for semi-supervised models")
        if self.likelihood == "gaussian" and self.decoder_logvar is None:
            raise ValueError("a gaussian model needs decoder_logvar")
        if isinstance(self.decoder_logvar, list) and len(self.decoder_logvar) != self.input_dim:
            raise ValueError(f"decoder_logvar has {len(self.decoder_logvar)} entries for {self.input_dim} features")
        missing = [f for f in REQUIRED_FILES if f not in self.files]
        if missing:
            raise ValueError(f"files is missing {missing}")
        for f in self.files:
            if "/" in f or "\\" in f or f.startswith(".") or f == MANIFEST_FILE:
                raise ValueError(f"files may only name plain files beside model.json, got {f!r}")
        return self


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ManifestError(ValueError):
    """A model folder that must not be served: bad schema, missing or altered files."""


def parse_manifest(path: Path, data: bytes) -> Manifest:
    """Validate a manifest's bytes against the schema; `path` only names it in the error."""
    try:
        return Manifest.model_validate_json(data)
    except ValueError as e:
        raise ManifestError(f"{path}: invalid manifest: {e}") from None


def json_schema() -> dict[str, Any]:
    return Manifest.model_json_schema()
