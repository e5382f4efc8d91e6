"""The HTTP contract, in-process: every endpoint's values against the exported model run directly."""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.scoring import common_noise, sample_latents, scores
from tests.service_helpers import DEFAULT_MODEL, Reference, digits_rows, npy_bytes, serving

pytestmark = pytest.mark.anyio
ATOL = 1e-4


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(DEFAULT_MODEL, root / "digits" / "1")
    return root


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference()


@pytest.fixture
async def client(repo):
    async with serving(repo, runtime="onnx") as (_, c):
        yield c


async def test_health_and_model_listing(client, ref):
    assert (await client.get("/health/live")).json() == {"status": "live"}
    assert (await client.get("/health/ready")).status_code == 200
    listing = (await client.get("/models")).json()
    assert listing["default"] == "digits"
    assert listing["models"] == [{"name": "digits", "versions": [1], "latest": 1}]
    info = (await client.get("/models/digits")).json()
    assert info["input_shape"] == [1, 8, 8] and info["latent_dim"] == 8 and info["likelihood"] == "bernoulli"
    assert info["runtime"] == "onnx" and info["device"] == "cpu"
    assert info["calibration"]["threshold"] == pytest.approx(ref.manifest.calibration.threshold)
    assert (await client.get("/models/digits?version=1")).json()["version"] == 1


async def test_encode_matches_the_exported_encoder(client, ref):
    x = digits_rows(5)
    r = await client.post("/encode", json={"inputs": x.tolist()})
    assert r.status_code == 200
    body = r.json()
    mean, logvar = ref.encode(x)
    assert body["model"] == "digits" and body["version"] == 1 and body["seed"] is None
    np.testing.assert_allclose(body["mean"], mean, atol=ATOL)
    np.testing.assert_allclose(body["logvar"], logvar, atol=ATOL)
    np.testing.assert_allclose(body["z"], mean, atol=ATOL)


@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (3, 8, 8), (3, 64)])
async def test_rows_may_be_flat_or_shaped(client, ref, shape):
    x = digits_rows(3)
    r = await client.post("/encode", json={"inputs": x.reshape(shape).tolist()})
    np.testing.assert_allclose(r.json()["mean"], ref.encode(x)[0], atol=ATOL)


async def test_encode_with_sampling_draws_from_its_own_seed(client, ref):
    x = digits_rows(4)
    body = (await client.post("/encode", json={"inputs": x.tolist(), "sample": True, "seed": 11})).json()
    mean, logvar = ref.encode(x)
    eps = np.random.default_rng(11).standard_normal(mean.shape, dtype=np.float32)
    np.testing.assert_allclose(body["z"], mean + np.exp(0.5 * logvar) * eps, atol=ATOL)
    assert body["seed"] == 11
    unseeded = (await client.post("/encode", json={"inputs": x.tolist(), "sample": True})).json()
    assert isinstance(unseeded["seed"], int) and unseeded["z"] != body["z"]


async def test_decode_returns_data_space(client, ref):
    z = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    body = (await client.post("/decode", json={"latents": z.tolist()})).json()
    np.testing.assert_allclose(body["outputs"], ref.decode(z), atol=ATOL * 16)
    assert np.min(body["outputs"]) >= 0 and np.max(body["outputs"]) <= 16


async def test_reconstruct_is_decode_of_encode(client, ref):
    x = digits_rows(3, start=100)
    body = (await client.post("/reconstruct", json={"inputs": x.tolist()})).json()
    mean, _ = ref.encode(x)
    np.testing.assert_allclose(body["latents"], mean, atol=ATOL)
    np.testing.assert_allclose(body["outputs"], ref.decode(mean), atol=1e-3)


async def test_sample_is_reproducible_and_scaled_by_temperature(client, ref):
    one = (await client.post("/sample", json={"n": 5, "seed": 7, "temperature": 0.5})).json()
    two = (await client.post("/sample", json={"n": 5, "seed": 7, "temperature": 0.5})).json()
    assert one == two
    z = 0.5 * np.random.default_rng(7).standard_normal((5, 8), dtype=np.float32)
    np.testing.assert_allclose(one["latents"], z, atol=1e-6)
    np.testing.assert_allclose(one["outputs"], ref.decode(z), atol=1e-3)
    default = (await client.post("/sample", json={})).json()
    assert len(default["outputs"]) == 16 and isinstance(default["seed"], int)


async def test_interpolate_linear_and_slerp(client, ref):
    x = digits_rows(2, start=10)
    body = (await client.post("/interpolate", json={"start": x[0].tolist(), "end": x[1].tolist(), "steps": 5})).json()
    mean, _ = ref.encode(x)
    assert body["t"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    z = np.asarray(body["latents"])
    np.testing.assert_allclose(z[0], mean[0], atol=ATOL)
    np.testing.assert_allclose(z[-1], mean[1], atol=ATOL)
    np.testing.assert_allclose(z[2], (mean[0] + mean[1]) / 2, atol=ATOL)
    np.testing.assert_allclose(body["outputs"], ref.decode(z), atol=1e-3)

    a, b = np.eye(8, dtype=np.float32)[0] * 2, np.eye(8, dtype=np.float32)[1] * 2
    s = (await client.post("/interpolate", json={"start_latent": a.tolist(), "end_latent": b.tolist(),
                                                 "steps": 3, "method": "slerp"})).json()
    mid = np.asarray(s["latents"][1])
    np.testing.assert_allclose(mid, [math.sqrt(2), math.sqrt(2), 0, 0, 0, 0, 0, 0], atol=1e-5)  # stays on the sphere


async def test_anomaly_score_matches_the_reference_computation(client, ref):
    x = digits_rows(4, start=200)
    noisy = np.random.default_rng(0).uniform(0, 16, (1, 64)).astype(np.float32)
    rows = np.concatenate([x, noisy])
    body = (await client.post("/anomaly-score", json={"inputs": rows.tolist(), "score": "elbo"})).json()
    m = ref.manifest
    xm = rows / 16
    mean, logvar = ref.encode(rows)
    eps = common_noise(1, 8, m.calibration.seed)
    out = ref.decoder.run(None, {"z": sample_latents(mean, logvar, eps)})[0]
    score, rec, kl = scores(xm, mean, logvar, eps, out, "bernoulli", None)
    np.testing.assert_allclose(body["score"], score, rtol=1e-4)
    np.testing.assert_allclose(body["reconstruction"], rec, rtol=1e-4)
    np.testing.assert_allclose(body["kl"], kl, rtol=1e-4)
    np.testing.assert_allclose(body["percentile"], m.calibration.percentile(score), atol=1e-3)
    assert body["threshold"] == pytest.approx(m.calibration.threshold)
    assert body["is_anomaly"] == [bool(s > m.calibration.threshold) for s in score]
    assert body["is_anomaly"][-1] is True and body["percentile"][-1] == 100.0  # uniform noise is not a digit
    custom = (await client.post("/anomaly-score", json={"inputs": rows.tolist(), "score": "elbo",
                                                        "threshold": 0.0})).json()
    assert custom["threshold"] == 0.0 and all(custom["is_anomaly"])


async def test_the_typicality_score_is_an_image_models_default_and_matches_its_definition(client, ref):
    """The more surprising of two tests against the training rows, computed here from the graphs and
    scipy's distributions: chi-squared (3 degrees of freedom) on the squared Mahalanobis distance of
    log(1 + [reconstruction, KL, distance to the decoder's output]), and a normal upper tail on
    log(1 + negative ELBO). A blank image is flagged; the digits are not."""
    from scipy.stats import chi2, norm

    rows = np.concatenate([digits_rows(4, start=200), np.zeros((1, 64), dtype=np.float32)])
    body = (await client.post("/anomaly-score", json={"inputs": rows.tolist()})).json()
    assert body["score_name"] == "typicality" and body["samples"] == 1
    m = ref.manifest
    assert m.typicality is not None
    xm = rows / 16
    mean, logvar = ref.encode(rows)
    eps = common_noise(1, 8, m.calibration.seed)
    out = ref.decoder.run(None, {"z": sample_latents(mean, logvar, eps)})[0]
    elbo, rec, kl = scores(xm, mean, logvar, eps, out, "bernoulli", None)
    stats = np.log1p(np.stack([rec, kl, np.linalg.norm(xm - out, axis=1)], axis=1))
    d = stats - np.asarray(m.typicality.mean)
    d2 = np.einsum("ij,jk,ik->i", d, np.asarray(m.typicality.precision), d)
    z = (np.log1p(elbo) - m.typicality.elbo_mean) / m.typicality.elbo_std
    expected = np.maximum(-chi2.logsf(d2, 3), -norm.logsf(z))
    np.testing.assert_allclose(body["score"], expected, rtol=1e-5)
    cal = m.calibration_for("typicality")
    assert cal is not None and body["threshold"] == pytest.approx(cal.threshold)
    np.testing.assert_allclose(body["percentile"], cal.percentile(expected), atol=1e-3)
    assert body["is_anomaly"][-1] is True and not any(body["is_anomaly"][:4])
    info = (await client.get(f"/models/{m.name}")).json()
    assert info["default_score"] == "typicality" and "typicality" in info["scores"]


async def test_the_same_row_gets_the_same_score_whatever_its_neighbours(client):
    x = digits_rows(6, start=300)
    alone = (await client.post("/anomaly-score", json={"inputs": x[:1].tolist(), "samples": 8})).json()
    crowd = (await client.post("/anomaly-score", json={"inputs": x[::-1].tolist(), "samples": 8})).json()
    assert crowd["score"][-1] == pytest.approx(alone["score"][0], rel=1e-6)


async def test_importance_weighted_score_matches_the_reference(client, ref):
    x = digits_rows(20, start=500)
    body = (await client.post("/anomaly-score", json={"inputs": x.tolist(), "samples": 16})).json()
    mean, logvar = ref.encode(x)
    eps = common_noise(16, 8, ref.manifest.calibration.seed)
    out = ref.decoder.run(None, {"z": sample_latents(mean, logvar, eps)})[0]
    score, rec, _ = scores(x / 16, mean, logvar, eps, out, "bernoulli", None)
    np.testing.assert_allclose(body["score"], score, rtol=1e-4)
    np.testing.assert_allclose(body["reconstruction"], rec, rtol=1e-4)
    assert body["samples"] == 16


async def test_npy_bodies_and_npz_responses(client, ref):
    x = digits_rows(4)
    r = await client.post("/encode?sample=true&seed=3", content=npy_bytes(x),
                          headers={"Content-Type": "application/x-npy", "Accept": "application/x-npz"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npz"
    arrays = np.load(io.BytesIO(r.content), allow_pickle=False)
    json_body = (await client.post("/encode", json={"inputs": x.tolist(), "sample": True, "seed": 3})).json()
    np.testing.assert_allclose(arrays["z"], json_body["z"], atol=1e-6)
    assert str(arrays["model"]) == "digits" and int(arrays["version"]) == 1

    z = np.zeros((2, 8), dtype=np.float32)
    r = await client.post("/decode", content=npy_bytes(z), headers={"Content-Type": "application/x-npy"})
    np.testing.assert_allclose(r.json()["outputs"], ref.decode(z), atol=1e-3)
    r = await client.post("/anomaly-score?samples=4", content=npy_bytes(x.astype(np.float64)),
                          headers={"Content-Type": "application/x-npy", "Accept": "application/x-npz"})
    scored = np.load(io.BytesIO(r.content))
    assert scored["score"].shape == (4,) and scored["is_anomaly"].dtype == bool
    r = await client.post("/interpolate?steps=3", content=npy_bytes(x[:2]),
                          headers={"Content-Type": "application/x-npy"})
    assert len(r.json()["outputs"]) == 3
    r = await client.post("/reconstruct", content=npy_bytes(x.reshape(4, 1, 8, 8)),
                          headers={"Content-Type": "application/x-npy"})
    np.testing.assert_allclose(r.json()["latents"], ref.encode(x)[0], atol=ATOL)


async def test_openapi_documents_every_endpoint_with_an_example(client):
    spec = (await client.get("/openapi.json")).json()
    for path in ("/encode", "/decode", "/reconstruct", "/sample", "/interpolate", "/anomaly-score"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body.get("examples"), path
    assert (await client.get("/docs")).status_code == 200


async def test_docs_pages_load_nothing_from_outside_the_server(client):
    """Swagger UI and ReDoc come with the package: an offline network still gets working pages."""
    import re

    for page in ("/docs", "/redoc"):
        html = (await client.get(page)).text
        sources = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert sources and all(src.startswith("/") for src in sources), (page, sources)
        for src in sources:
            r = await client.get(src)
            assert r.status_code == 200 and len(r.content) > 1000, (page, src)
        assert "fonts.googleapis" not in html and "cdn." not in html


async def test_unknown_routes_use_the_error_format(client):
    r = await client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await client.get("/encode")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
