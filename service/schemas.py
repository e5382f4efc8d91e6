"""Request parameters and the documented request/response bodies.

`*Params` models validate the scalar fields of a request (JSON body or query string for .npy
bodies). The array fields are converted by `codec` straight to numpy, so each endpoint's
`*Request` model exists for the OpenAPI docs and examples.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from service.manifest import NAME_PATTERN, ScoreName

ARRAY_FIELDS = ("inputs", "latents", "start", "end", "start_latent", "end_latent")
Row = Annotated[list[float], Field(min_length=1)]
Rows = Annotated[list[Row], Field(min_length=1)]
Seed = Annotated[int | None, Field(None, ge=0, lt=2**63, description="seeds this request's noise; null = random")]
Label = str | int
LABEL_DOC = ("conditional models: the class, as GET /models/{name} lists them; one for every row, or a list with one "
             "per row. Required by a conditional model, refused by an unconditional one")
LABELS_DOC = ("conditional models: one class per row (or `label`: one class for every row); as one string (a query "
              "string, a v2 parameter), comma-separated: labels=3,7,1")

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
    label: Label | Annotated[list[Label], Field(min_length=1)] | None = Field(None, description=LABEL_DOC)
    labels: Annotated[list[Label], Field(min_length=1)] | None = Field(None, description=LABELS_DOC)

    @field_validator("label", "labels", mode="before")
    @classmethod
    def _class_names(cls, value: Any, info: ValidationInfo) -> Any:
        """`labels` as one comma-separated string (query strings and v2 parameters are scalars), and one
        clear message for a label of the wrong type, instead of one per member of the union."""
        if info.field_name == "labels" and isinstance(value, str):
            value = value.split(",")

        def ok(v: Any) -> bool:
            return isinstance(v, str | int) and not isinstance(v, bool)
        if value is None or ok(value) or (isinstance(value, list) and value and all(ok(v) for v in value)):
            return value
        raise ValueError(f"a label is a class name (a string or an integer), or a non-empty list of them; "
                         f"got {value!r:.80}")


class PictureFields(BaseModel):
    """How an image model draws its answer as a PNG (Accept: image/png)."""

    def draws(self) -> bool:
        """Whether this request's answer can be a picture."""
        return True

    columns: int | None = Field(None, ge=1, le=1024, description="PNG answers: images (pairs, for /reconstruct) "
                                "per row of the grid; null = a square grid, or one strip for /interpolate")
    upscale: int | None = Field(None, ge=1, le=32, description="PNG answers: each pixel becomes an upscale x "
                                "upscale block; null = enough for a 64-pixel side (8 for 8x8, 3 for 28x28)")


class EncodeParams(Common):
    sample: bool = Field(False, description="z = mean (false) or a draw from q(z|x) (true)")
    seed: Seed = None


class EncodeRequest(EncodeParams):
    model_config = _examples({"inputs": [_DIGIT_ROW], "sample": False})
    inputs: Rows = Field(description="rows, each flat or shaped as the model's input shape")


class DecodeParams(Common, PictureFields):
    pass


class DecodeRequest(DecodeParams):
    model_config = _examples({"latents": [_LATENT]})
    latents: Rows


class ReconstructParams(EncodeParams, PictureFields):
    pass


class ReconstructRequest(ReconstructParams):
    model_config = _examples({"inputs": [_DIGIT_ROW], "sample": False})
    inputs: Rows


class SampleParams(Common, PictureFields):
    model_config = _examples({"n": 4, "seed": 7, "temperature": 1.0})
    n: int = Field(16, ge=1, description="samples to draw (at most VAE_MAX_ROWS)")
    seed: Seed = None
    temperature: float = Field(1.0, gt=0, le=100, allow_inf_nan=False, description="scales the prior's std")


class InterpolateParams(Common, PictureFields):
    label: Label | None = Field(None, description="conditional models: the class of the whole path")
    labels: None = Field(None, description="not taken: a path has one class, `label`")
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


class AnomalyParams(Common, PictureFields):
    score: ScoreName | None = Field(
        None, description="elbo: negative ELBO (nats); iwae: importance-weighted -log p(x) (nats); complexity "
                          "(Bernoulli image models): -log2 p(x) minus half the compressed length of the image's "
                          "shape, bits, robust to simple out-of-distribution inputs; typicality (image models "
                          "exported with it): -log p of the more surprising of two tests against the training "
                          "rows, one two-sided on the row's reconstruction, KL and reconstruction distance, one "
                          "on its ELBO (nats; flags other data sets' images and simple inputs a likelihood finds "
                          "too likely). null: the model's default (`default_score` in GET /models/{name}: "
                          "typicality where the model has it, else elbo), or iwae when samples > 1")
    samples: int | None = Field(None, ge=1, description="K; null = the K the score was calibrated with "
                                                        "(1 for elbo and typicality, 64 for iwae and complexity)")
    threshold: float | None = Field(None, allow_inf_nan=False, description="null = the model's calibrated one")
    explain: bool = Field(False, description="also answer `explanation`: each feature's part of the row's "
                          "reconstruction term, -log p(x_j | z) in nats averaged over the K samples (a row's parts "
                          "sum to its `reconstruction`), and `feature_names` (a table's columns). An image model "
                          "answers Accept: image/png with each input beside its per-pixel heat map")

    def draws(self) -> bool:
        return self.explain


class AnomalyRequest(AnomalyParams):
    model_config = _examples({"inputs": [_DIGIT_ROW], "samples": 1})
    inputs: Rows


class ClassifyParams(Common):
    label: None = Field(None, description="not taken: /classify answers the labels")
    labels: None = Field(None, description="not taken: /classify answers the labels")


class ClassifyRequest(ClassifyParams):
    model_config = _examples({"inputs": [_DIGIT_ROW]})
    inputs: Rows = Field(description="rows, each flat or shaped as the model's input shape")


class Header(BaseModel):
    model: str
    version: int


class EncodeResponse(Header):
    mean: Rows
    logvar: Rows
    z: Rows
    seed: int | None = Field(description="the seed used when sample is true")
    labels: list[str] | None = Field(None, description="semi-supervised models given no label: the class inferred "
                                     "for each row (q(y|x)'s most likely)")


class DecodeResponse(Header):
    outputs: Rows


class ReconstructResponse(Header):
    outputs: Rows
    latents: Rows
    seed: int | None
    labels: list[str] | None = Field(None, description="semi-supervised models given no label: the class inferred "
                                     "for each row (q(y|x)'s most likely)")


class SampleResponse(Header):
    outputs: Rows
    latents: Rows
    seed: int
    labels: list[str] | None = Field(None, description="conditional models: each row's class (semi-supervised "
                                     "models given no label: drawn from the uniform prior)")


class ClassifyResponse(Header):
    labels: list[str] = Field(description="each row's most likely class, named as the manifest names them")
    probabilities: Rows = Field(description="[N, C]: q(y|x), one per class in the manifest's order "
                                "(GET /models/{name})")


class InterpolateResponse(Header):
    t: Row
    latents: Rows
    outputs: Rows
    labels: list[str] | None = Field(None, description="semi-supervised models given no label: the path's class, "
                                     "inferred from start")


class AnomalyResponse(Header):
    score: Row = Field(description="nats per row; higher = more anomalous")
    reconstruction: Row
    kl: Row
    percentile: Row = Field(description="share of held-out rows scoring at most this, 0-100")
    is_anomaly: list[bool]
    threshold: float
    samples: int
    score_name: str = Field(description="the score served: elbo, iwae, complexity or typicality")
    explanation: Rows | None = Field(None, description="with explain: [N, D] nats per feature (an image's pixels "
                                     "in C x H x W order)")
    feature_names: list[str] | None = Field(None, description="with explain: the manifest's column names, if any")


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
    classes: list[str] | None = Field(description="a conditional model's labels (requests name one of these)")
    semi_supervised: bool = Field(description="has q(y|x): answers /classify, and infers or marginalises a label "
                                  "left out")
    runtime: str
    device: str
    runtime_timings_us: dict[str, float]
    calibration: dict[str, object]
    scores: dict[str, dict[str, float]] = Field(description="each servable score: its K and threshold")
    default_score: str = Field(description="what POST /anomaly-score serves when the request names no score")
    marginal_scores: dict[str, dict[str, float]] = Field(
        description="semi-supervised models: the scores served with the label marginalised (no label given)")
    metrics: dict[str, float]
    created_at: str
    training_command: str | None
