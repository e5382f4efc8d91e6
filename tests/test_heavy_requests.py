"""A careless caller's heavy requests (issue 21, findings 1 and 3) against a real server on 127.0.0.1:
each is refused, or answered, while /health/live keeps answering within 0.5 s and memory stays flat."""

from __future__ import annotations

import threading
import time

import httpx
import orjson
import pytest

from bench.server import Server
from tests.service_helpers import DEFAULT_MODEL

pytestmark = pytest.mark.slow
REPO_ROOT = DEFAULT_MODEL.parents[1]
LIVE_WITHIN_S = 0.5


def worst_live_latency(url: str, heavy: callable) -> tuple[float, object]:  # type: ignore[valid-type]
    """Run `heavy()` in a thread while probing /health/live; (the slowest probe, heavy's result)."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(heavy()))
    worst = 0.0
    with httpx.Client(base_url=url, timeout=30) as client:
        client.get("/health/live")
        thread.start()
        while thread.is_alive() or not result:
            start = time.perf_counter()
            assert client.get("/health/live").status_code == 200
            worst = max(worst, time.perf_counter() - start)
            time.sleep(0.02)
    thread.join()
    return worst, result[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("heavy") / "server.log"
    s = Server(model_dir=REPO_ROOT, env={"VAE_RELOAD_INTERVAL": "0"}, log=log)
    yield s
    s.stop()


def test_a_huge_picture_is_refused_before_it_is_drawn(server):
    """1,024 MNIST samples at 32x upscale would be a 29,000 x 29,000-pixel PNG (7-11 s on the event loop
    and 1.6-3.3 GB before the limit); it is a 422 naming VAE_MAX_PICTURE_PIXELS, and the loop stays free."""
    body = {"model": "mnist", "label": 1, "n": 1024, "upscale": 32, "columns": 1024}
    before = server.rss_mb() or 0.0

    def heavy() -> httpx.Response:
        return httpx.post(f"{server.url}/sample", json=body, headers={"accept": "image/png"}, timeout=30)

    worst, r = worst_live_latency(server.url, heavy)
    assert isinstance(r, httpx.Response) and r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "upscale" and "VAE_MAX_PICTURE_PIXELS" in error["message"]
    assert worst < LIVE_WITHIN_S
    assert (server.rss_mb() or 0.0) - before < 200
    ok = httpx.post(f"{server.url}/sample", json={**body, "n": 16, "upscale": 4, "columns": 4},
                    headers={"accept": "image/png"}, timeout=30)
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"


def test_a_body_of_millions_of_rows_is_refused_before_it_is_parsed(server):
    """8 million one-value rows in 32 MiB of JSON: 413 after 4.9 s of parsing on the event loop before;
    now counted first (values against VAE_MAX_ROWS x the widest model), answered at once."""
    body = b'{"inputs": [' + b",".join([b"[1]"] * 8_000_000) + b"]}"
    before = server.rss_mb() or 0.0

    def heavy() -> httpx.Response:
        return httpx.post(f"{server.url}/encode", content=body, headers={"content-type": "application/json"},
                          timeout=30)

    worst, r = worst_live_latency(server.url, heavy)
    assert isinstance(r, httpx.Response) and r.status_code == 413, r.text
    assert "VAE_MAX_ROWS" in r.json()["error"]["message"]
    assert worst < LIVE_WITHIN_S
    assert (server.rss_mb() or 0.0) - before < 200
    # The same through v2, and a body too many rows long but within the value count is refused by its rows.
    v2 = orjson.dumps({"inputs": [{"name": "inputs", "shape": [8_000_000, 1], "datatype": "FP32",
                                   "data": [1] * 8_000_000}]})
    r = httpx.post(f"{server.url}/v2/models/digits.encode/infer", content=v2, timeout=30)
    assert r.status_code == 413 and "VAE_MAX_ROWS" in r.json()["error"]  # v2's error is a string
    rows = orjson.dumps({"inputs": [[0.0]] * 2000})
    r = httpx.post(f"{server.url}/encode", content=rows, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "2000 rows; the limit is 1024" in r.json()["error"]["message"]


def test_a_heavy_score_on_one_model_does_not_stall_another(server):
    """131 MNIST rows x 1,000 importance samples (within VAE_MAX_DECODE_ROWS) was one 131,000-row forward
    pass: a one-row /encode on the digits model waited 32 s for the shared inference thread and got a
    504, and the server kept 6 GB afterwards. Cut into passes of VAE_MAX_PASS_VALUES decoded values, the
    other model's request runs between them."""
    import numpy as np

    rows = np.random.default_rng(0).uniform(0, 255, (131, 784)).round().tolist()
    heavy_body = {"model": "mnist", "label": "1", "inputs": rows, "samples": 1000, "score": "iwae"}
    before = server.rss_mb() or 0.0
    result: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: result.append(
        httpx.post(f"{server.url}/anomaly-score", json=heavy_body, timeout=60)))
    worst = 0.0
    peak = before
    with httpx.Client(base_url=server.url, timeout=30) as client:
        client.post("/encode", json={"inputs": [[0.0] * 64]})
        thread.start()
        time.sleep(0.3)  # the heavy request is parsed and running
        while thread.is_alive():
            start = time.perf_counter()
            assert client.post("/encode", json={"inputs": [[0.0] * 64]}).status_code == 200
            worst = max(worst, time.perf_counter() - start)
            peak = max(peak, server.rss_mb() or 0.0)
            time.sleep(0.05)
    thread.join()
    (r,) = result
    assert r.status_code == 200, r.text
    assert len(r.json()["score"]) == 131 and r.json()["samples"] == 1000
    assert worst < 1.0, f"a one-row /encode on another model took {worst:.2f} s"
    after = server.rss_mb() or 0.0
    print(f"RSS before {before:.0f} MB, peak {peak:.0f} MB, after {after:.0f} MB; worst encode {worst:.3f} s")
    assert after < 1500


def test_a_heavy_score_whose_client_went_away_runs_no_further_passes(server):
    """The client gives up after 1 s: the request stops at its next pass (recorded as 499), rather than
    decoding its remaining rows x 1,000 samples for nobody."""
    import numpy as np

    from tests.service_helpers import metric

    def decoded() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return metric(text, "vae_rows_processed_total", model="mnist", network="decoder")

    rows = np.random.default_rng(1).uniform(0, 255, (131, 784)).round().tolist()
    body = {"model": "mnist", "label": "1", "inputs": rows, "samples": 1000, "score": "iwae"}
    start = decoded()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/anomaly-score", json=body, timeout=httpx.Timeout(30, read=1.0))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the pass running when the client left still finishes
        before = decoded()
        time.sleep(1.0)
        if decoded() == before:
            break
    done = decoded() - start
    assert done < 131 * 1000 / 2, f"{done:.0f} of 131,000 rows were decoded after the client left"
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "vae_requests_total", endpoint="anomaly-score", status="499") >= 1
