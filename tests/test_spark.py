"""Batch scoring on Spark: a DataFrame scored on a real local cluster (two worker threads, so two
Python workers) in-process and through a service, and the example job, all with vae-score's numbers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.server import Server
from tests.test_parquet import as_parquet, models, plant  # noqa: F401 - the trained table models
from training.score import main as score_main

pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("pyspark")
if shutil.which("java") is None:
    pytest.skip("Spark needs a Java runtime (java on PATH)", allow_module_level=True)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the workers: this interpreter, with its packages
    session = (SparkSession.builder.master("local[2]").appName("vaeserve-test").config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "2").getOrCreate())
    yield session
    session.stop()


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory, models) -> tuple[Path, dict[str, float]]:  # noqa: F811
    """500 rows as Parquet, and their scores from vae-score in-process."""
    root = tmp_path_factory.mktemp("spark")
    source = as_parquet(root / "rows.parquet", plant(500, seed=7), row_group_size=100)
    assert score_main([str(source), "--model-dir", str(models["csv"]), "--id-column", "id", "--ignore-columns",
                       "site,spare", "--no-progress", "-o", str(root / "expected.parquet")]) == 0
    expected = pq.read_table(root / "expected.parquet")
    return source, dict(zip(expected.column("id").to_pylist(), expected.column("score").to_pylist(), strict=True))


def collected(df) -> dict[str, float]:
    return {r["id"]: r["score"] for r in df.collect()}


def test_a_dataframe_scored_on_two_workers_equals_vae_score(spark, models, rows):  # noqa: F811
    from training.spark import score_dataframe

    source, expected = rows
    df = spark.read.parquet(str(source)).repartition(4)
    assert spark.sparkContext.defaultParallelism == 2 and df.rdd.getNumPartitions() == 4
    scored = score_dataframe(df, models["csv"].as_uri(), keep=["id", "site"])  # a URI, as on a cluster
    assert scored.columns == ["id", "site", "score", "percentile", "is_anomaly"]
    assert dict(scored.dtypes) == {"id": "string", "site": "string", "score": "double", "percentile": "double",
                                   "is_anomaly": "boolean"}
    got = collected(scored)
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-6)


def test_through_a_service_equals_vae_score(spark, models, rows):  # noqa: F811
    from training.spark import score_dataframe

    source, expected = rows
    with Server(model_dir=models["csv"].parents[1], default_model="plant", env={"VAE_RELOAD_INTERVAL": "0"}) as s:
        got = collected(score_dataframe(spark.read.parquet(str(source)), url=s.url, keep=["id"]))
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-6)


def test_the_example_job_writes_parquet(models, rows, tmp_path):  # noqa: F811
    source, expected = rows
    out = tmp_path / "scored"
    done = subprocess.run([sys.executable, "-m", "training.spark", str(source), "--model-dir", str(models["csv"]),
                           "--keep", "id", "-o", str(out), "--master", "local[2]"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    table = pq.read_table(out)
    got = dict(zip(table.column("id").to_pylist(), table.column("score").to_pylist(), strict=True))
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-6)


def test_a_missing_column_is_named(spark, models):  # noqa: F811
    from training.spark import score_dataframe

    df = spark.createDataFrame([(1.0, 2.0)], ["pressure", "flow"])
    with pytest.raises(ValueError, match=r"no column \['temperature'\]"):
        score_dataframe(df, models["csv"])
