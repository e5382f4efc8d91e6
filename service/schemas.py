"""Request parameters and the documented request/response bodies.

`*Params` models validate the scalar fields of a request (JSON body or query string for .npy
bodies). The array fields are converted by `codec` straight to numpy, so each endpoint's
`*Request` model exists for the OpenAPI docs and examples.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.manifest import NAME_PATTERN

ARRAY_FIELDS = ("inputs", "latents", "start", "end", "start_latent", "end_latent")
Row = Annotated[list[float], Field(min_length=1)]
Rows = Annotated[list[Row], Field(min_length=1)]
Seed = Annotated[int | None, Field(None, ge=0, lt=2**63, description="seeds this request's noise; null = random")]

_DIGIT_ROW = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8,
              0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0,
              0, 0]
_LATENT = [0.5, -1.0, 0.2, 0.0, 1.1, -0.3, 0.7, 0.0]


def _examples(*examples: dict[str, Any]) -> ConfigDict:
    extra: dict[str, Any] = {"examples": list(examples)}
    return ConfigDict(extra="forbid", json_schema_extra=extra)


class Common(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, pattern=NAME_PATTERN, description="model name; null = VAE_DEFAULT_MODEL")
    version: int | None = Field(None, ge=1, description="model version; null = the latest")


class EncodeParams(Common):
    sample: bool = Field(False, description="z = mean (false) or a draw from q(z|x) (true)")
    seed: Seed = None


class EncodeRequest(EncodeParams):
    model_config = _examples({"inputs": [_DIGIT_ROW], "sample": False})
    inputs: Rows = Field(description="rows, each flat or shaped as the model's input shape")


class DecodeParams(Common):
    pass


class DecodeRequest(DecodeParams):
    model_config = _examples({"latents": [_LATENT]})
    latents: Rows


class ReconstructParams(EncodeParams):
    pass


class ReconstructRequest(ReconstructParams):
    model_config = _examples({"inputs": [_DIGIT_ROW], "sample": False})
    inputs: Rows


class SampleParams(Common):
    model_config = _examples({"n": 4, "seed": 7, "temperature": 1.0})
    n: int = Field(16, ge=1, description="samples to draw (at most VAE_MAX_ROWS)")
    seed: Seed = None
    temperature: float = Field(1.0, gt=0, le=100, allow_inf_nan=False, description="scales the prior's std")


class InterpolateParams(Common):
    steps: int = Field(8, ge=2, description="points including both ends (at most VAE_MAX_STEPS)")
    method: Literal["linear", "slerp"] = "linear"
    latent: bool = Field(False, description=".npy bodies only: the two rows are latents, not inputs")


class InterpolateRequest(InterpolateParams):
    model_config = _examples({"start": _DIGIT_ROW, "end": _DIGIT_ROW[::-1], "steps": 5, "method": "slerp"},
                             {"start_latent": _LATENT, "end_latent": [-v for v in _LATENT], "steps": 3})
    start: Row | None = Field(None, description="a row in data space")
    end: Row | None = None
    start_latent: Row | None = Field(None, description="a latent vector, instead of start")
    end_latent: Row | None = None


class AnomalyParams(Common):
    score: Literal["elbo", "iwae", "complexity"] | None = Field(
        None, description="elbo: negative ELBO (nats); iwae: importance-weighted -log p(x) (nats); complexity "
                          "(Bernoulli image models): -log2 p minus the input's compressed length, bits, robust to "
                          "simple out-of-distribution inputs. null: elbo, or iwae when samples > 1")
    samples: int | None = Field(None, ge=1, description="K; null = the K the score was calibrated with "
                                                        "(1 for elbo, 64 for iwae and complexity)")
    threshold: float | None = Field(None, allow_inf_nan=False, description="null = the model's calibrated one")


class AnomalyRequest(AnomalyParams):
    model_config = _examples({"inputs": [_DIGIT_ROW], "samples": 1})
    inputs: Rows


class Header(BaseModel):
    model: str
    version: int


class EncodeResponse(Header):
    mean: Rows
    logvar: Rows
    z: Rows
    seed: int | None = Field(description="the seed used when sample is true")


class DecodeResponse(Header):
    outputs: Rows


class ReconstructResponse(Header):
    outputs: Rows
    latents: Rows
    seed: int | None


class SampleResponse(Header):
    outputs: Rows
    latents: Rows
    seed: int


class InterpolateResponse(Header):
    t: Row
    latents: Rows
    outputs: Rows


class AnomalyResponse(Header):
    score: Row = Field(description="nats per row; higher = more anomalous")
    reconstruction: Row
    kl: Row
    percentile: Row = Field(description="share of held-out rows scoring at most this, 0-100")
    is_anomaly: list[bool]
    threshold: float
    samples: int
    score_name: str = Field(description="the score served: elbo, iwae or complexity")


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ModelVersionInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    name: str
    version: int
    versions: list[int]
    input_shape: list[int]
    input_dim: int
    latent_dim: int
    likelihood: str
    feature_names: list[str] | None
    runtime: str
    device: str
    runtime_timings_us: dict[str, float]
    calibration: dict[str, object]
    scores: dict[str, dict[str, float]] = Field(description="each servable score: its K and threshold")
    metrics: dict[str, float]
    created_at: str
    training_command: str | None
