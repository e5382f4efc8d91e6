"""Batch scoring on Apache Spark: anomaly scores for a DataFrame's rows with an exported model folder.

Spark, not Ray Data, because pipelines that hold their tables in Parquet mostly run their batch jobs
on Spark already (and on Databricks, EMR, Dataproc), and its `mapInArrow` hands each Python worker
Arrow record batches, the same currency `vae-score` reads Parquet in, never converted to pandas.

    from training.spark import score_dataframe
    scored = score_dataframe(df, "models/sensors/1", keep=["id"])        # the ONNX graphs in-process
    scored = score_dataframe(df, url="http://vaeserve:8000", model="sensors", keep=["id"])  # or the service

In-process, the model folder (a local path, or a URI Spark reads: `s3a://`, `hdfs://`) is shipped to
the executors with `SparkContext.addFile` (or read where it lies, when `ship=False` and every executor
can see the path) and loaded once per Python worker;
each record batch is scored exactly as `vae-score --model-dir` scores it (same preprocessing, noise
and calibration), so the numbers are the same. Through a service, each worker holds one client.

    python -m training.spark rows.parquet --model-dir models/sensors/1 --keep id -o scored/ --master local[2]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.manifest import ScoreName

OUTPUT_FIELDS = (("score", "double"), ("percentile", "double"), ("is_anomaly", "boolean"))
_SCORERS: dict[tuple[Any, ...], Any] = {}  # per Python worker: the scorer of each (model, score, samples)


def _scorer(key: tuple[Any, ...]) -> Any:
    """The worker's scorer for `key`, made on its first batch."""
    scorer = _SCORERS.get(key)
    if scorer is None:
        from training.score import LocalScorer, RemoteScorer

        kind, where, model, score, samples = key
        if kind == "dir":
            from pyspark import SparkFiles

            folder = Path(SparkFiles.get(where)) if not Path(where).is_absolute() else Path(where)
            scorer = LocalScorer(model_dir=folder, score=score, samples=samples)
        else:
            scorer = RemoteScorer(url=where, model=model, version=None, score=score, samples=samples, api_key=None)
        _SCORERS[key] = scorer
    return scorer


def score_dataframe(df: Any, model_dir: str | Path | None = None, *, url: str | None = None,
                    model: str | None = None, keep: list[str] | tuple[str, ...] = (),
                    features: list[str] | None = None, score: ScoreName | None = None, samples: int | None = None,
                    ship: bool = True) -> Any:
    """A DataFrame of `keep` columns, then score, percentile and is_anomaly for every row of `df`.

    Features are the model's `feature_names` columns (or `features`, or every column not kept, in
    order, for a model trained without names)."""
    if (model_dir is None) == (url is None):
        raise ValueError("give model_dir (score in the workers) or url (score through a service), not both")
    import pyarrow as pa

    if model_dir is not None:
        from service.folder import read_manifest

        where = str(model_dir)
        if "://" in where:  # a URI Spark reads (s3a://, hdfs://, file://): fetched to the driver and every executor
            from pyspark import SparkFiles

            df.sparkSession.sparkContext.addFile(where, recursive=True)
            name = where.rstrip("/").rsplit("/", 1)[1]
            names = read_manifest(Path(SparkFiles.get(name))).feature_names
            key: tuple[Any, ...] = ("dir", name, None, score, samples)
        else:
            folder = Path(where).resolve()
            names = read_manifest(folder).feature_names
            if ship:
                df.sparkSession.sparkContext.addFile(str(folder), recursive=True)
                key = ("dir", folder.name, None, score, samples)
            else:
                key = ("dir", str(folder), None, score, samples)
    else:
        from vaeclient import Client

        with Client(url, model=model) as client:  # type: ignore[arg-type]
            names = client.metadata().get("feature_names")
        key = ("url", url, model, score, samples)
    chosen = features or names or [c for c in df.columns if c not in keep]
    missing = [c for c in [*chosen, *keep] if c not in df.columns]
    if missing:
        raise ValueError(f"the DataFrame has no column {missing}; its columns are {df.columns}")
    kept_schema = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in df.schema.fields if f.name in keep)
    schema = ", ".join([*([kept_schema] if kept_schema else []), *(f"{n} {t}" for n, t in OUTPUT_FIELDS)])
    carried = list(keep)

    def score_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import numpy as np

        scorer = _scorer(key)
        for batch in batches:
            if batch.num_rows == 0:
                continue
            x = np.column_stack([np.asarray(batch.column(c).to_numpy(zero_copy_only=False), dtype=np.float32)
                                 for c in chosen])
            result = scorer(x, None, "the DataFrame")
            yield pa.RecordBatch.from_arrays(
                [*(batch.column(c) for c in carried), pa.array(result["score"], pa.float64()),
                 pa.array(result["percentile"], pa.float64()), pa.array(result["is_anomaly"], pa.bool_())],
                names=[*carried, *(n for n, _ in OUTPUT_FIELDS)])

    return df.select(*carried, *chosen).mapInArrow(score_batches, schema)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.spark", description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="Parquet file or folder (any path Spark reads: file://, s3a://, hdfs://)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model-dir", help="an exported model folder (a path, or a URI such as s3a://...), "
                       "shipped to the executors")
    where.add_argument("--url", help="score through a running vaeserve instead")
    p.add_argument("--model", help="with --url: the model's name [default: the server's default]")
    p.add_argument("--keep", default="", help="comma-separated columns carried to the output (ids)")
    p.add_argument("--score", help="which score [default: the model's]")
    p.add_argument("-o", "--output", required=True, help="Parquet folder to write")
    p.add_argument("--master", default=None, help="Spark master, e.g. local[2] [default: spark-submit's]")
    args = p.parse_args(argv)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("vaeserve-score")
    if args.master:
        # Locally the Python workers are this interpreter (its packages); on a cluster, spark-submit's.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = builder.master(args.master)
    spark = builder.getOrCreate()
    try:
        df = spark.read.parquet(args.input)
        keep = [c for c in args.keep.split(",") if c]
        scored = score_dataframe(df, args.model_dir, url=args.url, model=args.model, keep=keep, score=args.score)
        scored.write.mode("overwrite").parquet(args.output)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
