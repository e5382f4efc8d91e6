"""Arrow IPC stream bodies on the array endpoints, and Arrow answers: the same numbers as JSON, columns
matched to a table model's feature names, and a clear 4xx for a body that is not what it says."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.service_helpers import DEFAULT_MODEL, digits_rows, serving
from tests.test_tables import COLUMNS, QUICK, table, write
from training.cli import main as train_main

pa = pytest.importorskip("pyarrow")
ARROW = "application/vnd.apache.arrow.stream"


def stream(columns: dict) -> bytes:
    table_ = pa.table(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table_.schema) as writer:
        writer.write_table(table_)
    return sink.getvalue().to_pybytes()


def read(body: bytes):
    return pa.ipc.open_stream(body).read_all()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits model and a three-column table model."""
    root = tmp_path_factory.mktemp("arrow")
    shutil.copytree(DEFAULT_MODEL, root / "models" / "digits" / "1")
    data = write(root / "plant.csv", COLUMNS, table(200).tolist())
    assert train_main(["--dataset", "csv", "--data", str(data), *QUICK, "--output", str(root / "models"),
                       "--checkpoint", str(root / "c.pt")]) == 0
    return root / "models"


@pytest.mark.anyio
async def test_arrow_in_and_out_give_the_json_numbers(repo):
    x = digits_rows(4, start=50)
    async with serving(repo, reload_interval=0) as (_, client):
        as_json = (await client.post("/encode", json={"inputs": x.tolist()})).json()
        list_column = stream({"inputs": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64)})
        r = await client.post("/encode", content=list_column, headers={"Content-Type": ARROW, "Accept": ARROW})
        assert r.status_code == 200 and r.headers["content-type"] == ARROW
        got = read(r.content)
        assert got.column_names == ["mean", "logvar", "z"] and got.num_rows == 4
        mean = np.asarray(got.column("mean").combine_chunks().flatten()).reshape(4, 8)
        np.testing.assert_allclose(mean, as_json["mean"], rtol=1e-6)
        scores = await client.post("/anomaly-score?samples=4", content=stream({f"p{j}": x[:, j] for j in range(64)}),
                                   headers={"Content-Type": ARROW, "Accept": ARROW})
        answer = read(scores.content)
        expected = (await client.post("/anomaly-score", json={"inputs": x.tolist(), "samples": 4})).json()
        np.testing.assert_allclose(answer.column("score").to_numpy(), expected["score"], rtol=1e-12)
        assert float(answer.schema.metadata[b"threshold"]) == pytest.approx(expected["threshold"])


@pytest.mark.anyio
async def test_a_table_models_columns_are_matched_by_name(repo):
    x = table(5, seed=3)
    async with serving(repo, default_model="plant", reload_interval=0) as (_, client):
        expected = (await client.post("/anomaly-score", json={"inputs": x.tolist()})).json()["score"]
        shuffled = stream({"temperature": x[:, 2], "pressure": x[:, 0], "flow": x[:, 1]})
        r = await client.post("/anomaly-score", content=shuffled, headers={"Content-Type": ARROW})
        np.testing.assert_allclose(r.json()["score"], expected, rtol=1e-12)
        wrong = await client.post("/anomaly-score", content=stream({"temperature": x[:, 2], "pressure": x[:, 0],
                                                                    "speed": x[:, 1]}),
                                  headers={"Content-Type": ARROW})
        assert wrong.status_code == 422 and "missing ['flow']" in wrong.json()["error"]["message"]


@pytest.mark.anyio
async def test_bad_arrow_bodies_get_a_4xx(repo):
    async with serving(repo, reload_interval=0) as (_, client):
        headers = {"Content-Type": ARROW}
        r = await client.post("/encode", content=b"not arrow", headers=headers)
        assert r.status_code == 400 and "not an Arrow IPC stream" in r.json()["error"]["message"]
        r = await client.post("/encode", content=stream({"a": ["x", "y"]}), headers=headers)
        assert r.status_code == 422 and "must be a number" in r.json()["error"]["message"]
        r = await client.post("/encode", content=stream({"a": pa.array([1.0, None])}), headers=headers)
        assert r.status_code == 422 and "nulls" in r.json()["error"]["message"]
        r = await client.post("/encode", content=stream({"a": [1.0, 2.0]}), headers=headers)
        assert r.status_code == 422  # one value per row for a 64-value model
        assert (await client.post("/encode", json={"inputs": [[0.0] * 64]})).status_code == 200
