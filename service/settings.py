"""Service settings: one pydantic-settings class, read from VAE_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every field is `VAE_<NAME>` in the environment; the README lists them all."""

    model_config = SettingsConfigDict(env_prefix="VAE_", env_file=None, extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(8001, ge=0, le=65535, description="the Open Inference Protocol over gRPC; 0 = off")
    model_dir: Path = Path("models")
    default_model: str = "digits"
    runtime: Literal["auto", "onnx", "torchscript"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(1, ge=0, description="intra-op threads per graph (0 = the runtime's default)")
    max_batch_size: int = Field(256, ge=1, description="rows merged into one forward pass")
    max_batch_delay_ms: float = Field(0.0, ge=0, le=1000, description="wait to fill a batch; 0 = none")
    max_queue_rows: int = Field(8192, ge=1, description="rows waiting per network before 503")
    max_rows: int = Field(1024, ge=1, description="rows per request (inputs, latents, n)")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_samples: int = Field(1000, ge=1, description="importance samples per row for /anomaly-score")
    max_decode_rows: int = Field(131072, ge=1, description="rows x samples per /anomaly-score request")
    max_pass_values: int = Field(1 << 20, ge=1024, description="decoded values (rows x samples x features) per "
                                 "forward pass of /anomaly-score; a larger request runs as several passes")
    inference_threads: int = Field(1, ge=1, le=64, description="threads running forward passes, shared by every "
                                   "model; each network runs one pass at a time")
    background_nice: int = Field(10, ge=0, le=19, description="how far below the light work's CPU priority "
                                 "large work runs (passes over VAE_MAX_BATCH_SIZE rows, scoring, pictures); 0 = "
                                 "the same")
    max_steps: int = Field(256, ge=2, description="points per /interpolate request")
    max_picture_pixels: int = Field(16 * 1024 * 1024, ge=4096, description="pixels in one PNG answer (width x "
                                    "height x channels); a larger picture is a 422 before it is drawn")
    drift_window_rows: int = Field(10000, ge=100, description="recent scored rows behind vae_anomaly_score_psi")
    request_timeout: float = Field(30.0, gt=0, description="seconds before a request gets 504")
    retry_after: int = Field(1, ge=0, description="Retry-After seconds sent with 503")
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes; batching is per process")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = False
    keep_alive_timeout: float = Field(75.0, gt=0, description="seconds an idle keep-alive connection stays open; "
                                      "above any proxy's idle timeout, or a request sent as it closes is reset")
    api_keys_file: Path | None = Field(None, description="sha256 hashes of the accepted API keys; unset = keys off")
    protect_metrics: bool = Field(False, description="with keys on, /metrics needs a key too")
    trusted_keys: Path | None = Field(None, description="Ed25519 public keys (PEM); set = only signed models load")
    reload_interval: float = Field(10.0, ge=0, description="seconds between looks for new versions; 0 = off")
    protect_docs: bool = Field(False, description="with keys on, /docs, /redoc and /openapi.json need a key too")
    header_timeout_s: float = Field(10.0, gt=0, description="seconds from a request's first byte (or the "
                                    "connection's opening) to the end of its headers; later: 408 and closed")
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="bytes of request line and headers; more: 431")
    tls_cert: Path | None = Field(None, description="PEM certificate chain; set (with tls_key) = serve HTTPS")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(None, description="PEM CA certificates; set = clients must present a "
                                       "certificate signed by one of them (mutual TLS)")

    @field_validator("api_keys_file", "trusted_keys", "tls_cert", "tls_key", "tls_client_ca", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _limits_agree(self) -> Settings:
        if self.max_queue_rows < self.max_rows:
            raise ValueError(f"max_queue_rows ({self.max_queue_rows}) must be at least max_rows ({self.max_rows}), "
                             "or a maximal request could never be queued")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("VAE_TLS_CERT and VAE_TLS_KEY go together: set both to serve HTTPS, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("VAE_TLS_CLIENT_CA asks clients for certificates over TLS: set VAE_TLS_CERT and "
                             "VAE_TLS_KEY too")
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None else "http"


@lru_cache
def get_settings() -> Settings:
    return Settings()
