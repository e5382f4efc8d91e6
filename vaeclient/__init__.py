"""vaeclient: a Python client for vaeserve (installed with the project).

    from vaeclient import Client
    with Client("http://127.0.0.1:8000", api_key=None) as vae:
        result = vae.anomaly_score(rows)          # numpy in, typed numpy results out
"""

from vaeclient.client import AsyncClient, Client, Limits
from vaeclient.errors import APIError, VAEError
from vaeclient.results import (
    AnomalyResult,
    ClassifyResult,
    DecodeResult,
    EncodeResult,
    InterpolateResult,
    ReconstructResult,
    SampleResult,
)

__all__ = ["APIError", "AnomalyResult", "AsyncClient", "ClassifyResult", "Client", "DecodeResult", "EncodeResult",
           "InterpolateResult", "Limits", "ReconstructResult", "SampleResult", "VAEError"]
