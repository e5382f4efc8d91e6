"""`vae-score`: anomaly scores for a whole file, through a running service or in-process.

    vae-score rows.csv --url http://127.0.0.1:8000 --model cardio --id-column id -o scores.csv
    vae-score rows.npy --model-dir models/cardio/1 -o scores.npy

Through a service, rows go as `.npy` chunks of the server's row limit (vaeclient: 503s are waited
out per Retry-After, a 4xx stops the run with the server's message). In-process, the exported graphs
score them exactly as the service does (its preprocessing, fixed noise and calibration), so both ways
give the same numbers. Output: CSV (the id column first when given, then score, percentile,
is_anomaly) or `.npy` (a structured array with the same fields). `--explain K` adds, per row, the K
features with the largest part of the reconstruction term: feature_1, part_1, ... (names from the
model's manifest, else x0, x1, ...).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any, get_args

import numpy as np
from tqdm import tqdm

from service.manifest import CALIBRATED_SAMPLES, ScoreName, score_asked
from training.data import DataError, align_columns, check_finite, column_list, read_csv_table


def read_csv_columns(path: Path, names: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
    """Some columns of a CSV with a header, as text, to carry through to the output."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        at = [header.index(n) for n in names]
        values = [[record[i] for i in at] for record in reader if record]
    return {n: np.asarray([v[j] for v in values]) for j, n in enumerate(names)}


def read_rows(path: Path, id_column: str | None, ignore: tuple[str, ...] = (), header: bool = True
              ) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """(X float32 [N, D], ids or None, a CSV's column names) from a CSV with a header, an .npy, or an .npz
    (X, else its only array)."""
    if not path.exists():
        raise DataError(f"input file not found: {path}")
    ids, names = None, None
    if path.suffix == ".csv":
        x, ids, names = read_csv_table(path, id_column, drop=ignore, header=header)  # ids kept out of the features
    elif path.suffix in (".npy", ".npz"):
        if id_column is not None or ignore:
            raise DataError("--id-column and --ignore-columns apply to CSV input")
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                key = "X" if "X" in loaded.files else (loaded.files[0] if len(loaded.files) == 1 else None)
                if key is None:
                    raise DataError(f"{path}: an .npz holds X (or a single array); has {loaded.files}")
                x = loaded[key]
        else:
            x = loaded
    else:
        raise DataError(f"{path}: give a .csv, .npy or .npz file")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise DataError(f"{path}: no rows to score (shape {list(x.shape)})")
    check_finite(x, str(path))
    return x.astype(np.float32), ids, names


class RemoteScorer:
    """Scores through a running service: rows go as chunks of its row limits (vaeclient waits out 503s
    per Retry-After; a URL that does not answer fails in about a second)."""

    def __init__(self, *, url: str, model: str | None, version: int | None, score: ScoreName | None,
                 samples: int | None, api_key: str | None, ca: Path | None = None, cert: Path | None = None,
                 key: Path | None = None, explain: int = 0):
        from vaeclient import Client

        self.client = Client(url, model=model, version=version, api_key=api_key, retries=20, connect_retries=3,
                             ca=ca, cert=cert, key=key)
        self.score, self.samples, self.explain = score, samples, explain
        limits = self.client.models()["limits"]
        k = samples or (CALIBRATED_SAMPLES[score] if score else 1)  # a model's default score is at K = 1
        self.chunk = max(1, min(limits["max_rows"], limits["max_decode_rows"] // k))
        self.feature_names: list[str] | None = self.client.metadata().get("feature_names")

    def __call__(self, x: np.ndarray, columns: list[str] | None, source: str, progress: bool = False
                 ) -> dict[str, Any]:
        x = align_columns(x, columns, self.feature_names if columns else None, source)
        parts = []
        names: list[str] | None = None
        for start in tqdm(range(0, len(x), self.chunk), desc="scoring", unit="chunk", disable=not progress or None):
            r = self.client.anomaly_score(x[start : start + self.chunk], score=self.score, samples=self.samples,
                                          explain=self.explain > 0)
            parts.append((r.score, r.percentile, r.is_anomaly, top_features(r.explanation, self.explain)))
            names = r.feature_names
        result: dict[str, Any] = {"score": np.concatenate([p[0] for p in parts]),
                                  "percentile": np.concatenate([p[1] for p in parts]),
                                  "is_anomaly": np.concatenate([p[2] for p in parts])}
        if self.explain:
            result["top"] = (np.concatenate([p[3][0] for p in parts]), np.concatenate([p[3][1] for p in parts]),
                             names)
        return result

    def close(self) -> None:
        self.client.close()


def top_features(parts: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest parts per row: (feature indices [N, k], parts [N, k]), largest first."""
    if parts is None or k == 0:
        return np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0))
    k = min(k, parts.shape[1])
    index = np.argsort(-parts, axis=1, kind="stable")[:, :k]
    return index, np.take_along_axis(parts, index, axis=1)


class LocalScorer:
    """Scores in-process with a model folder's graphs, exactly as the service does."""

    def __init__(self, *, model_dir: Path, score: ScoreName | None, samples: int | None, explain: int = 0):
        from training.anomaly import ServedScorer

        self.scorer = ServedScorer.load(model_dir)
        self.score = score_asked(score, samples, self.scorer.default_score)
        self.calibration = self.scorer.calibration(self.score)
        self.samples, self.explain = samples, explain
        self.feature_names = self.scorer.manifest.feature_names

    def __call__(self, x: np.ndarray, columns: list[str] | None, source: str, progress: bool = False
                 ) -> dict[str, Any]:
        m = self.scorer.manifest
        x = align_columns(x, columns, m.feature_names if columns else None, source)
        if x.shape[1] != m.input_dim:
            raise DataError(f"rows have {x.shape[1]} features; the model takes {m.input_dim}")
        chunk = 8192
        starts = tqdm(range(0, len(x), chunk), desc="scoring", unit="chunk", disable=not progress or None)
        scores = np.concatenate([self.scorer(x[s : s + chunk], self.samples, self.score) for s in starts])
        result: dict[str, Any] = {"score": scores, "percentile": self.calibration.percentile(scores),
                                  "is_anomaly": scores > self.calibration.threshold}
        if self.explain:
            tops = [top_features(self.scorer.explain(x[s : s + chunk], self.samples, self.score), self.explain)
                    for s in range(0, len(x), chunk)]
            result["top"] = (np.concatenate([t[0] for t in tops]), np.concatenate([t[1] for t in tops]),
                             m.feature_names)
        return result

    def close(self) -> None:
        pass


def output_columns(result: dict[str, Any], carried: dict[str, Any]) -> dict[str, Any]:
    """The output's columns in order: carried ones (id first), score, percentile, is_anomaly, then
    feature_j / part_j for each of the K explained features."""
    index, parts, names = result.get("top") or (np.zeros((len(result["score"]), 0), dtype=np.int64), None, None)
    k = index.shape[1]
    labels = np.asarray(names if names else [f"x{j}" for j in range(int(index.max(initial=0)) + 1)])
    top_names = labels[index] if k else index
    columns: dict[str, Any] = dict(carried)
    columns |= {"score": np.asarray(result["score"], dtype=np.float64),
                "percentile": np.asarray(result["percentile"], dtype=np.float64),
                "is_anomaly": np.asarray(result["is_anomaly"], dtype=np.bool_)}
    for j in range(k):
        columns[f"feature_{j + 1}"] = top_names[:, j]
        columns[f"part_{j + 1}"] = parts[:, j]  # type: ignore[index]
    return columns


class Output:
    """Where scores go, a chunk at a time: CSV and Parquet are written as they come, .npy (a structured
    array) once at the end."""

    def __init__(self, path: Path):
        if path.suffix not in (".csv", ".npy", ".parquet"):
            raise DataError(f"--output must end in .csv, .npy or .parquet, got {path}")
        self.path = path
        self._npy: list[dict[str, Any]] = []
        self._csv: Any = None
        self._parquet: Any = None

    def write(self, result: dict[str, Any], carried: dict[str, Any]) -> None:
        columns = output_columns(result, carried)
        if self.path.suffix == ".parquet":
            if self._parquet is None:
                from training.columnar import ParquetSink

                self._parquet = ParquetSink(self.path)
            self._parquet.write(columns)
        elif self.path.suffix == ".npy":
            self._npy.append({k: _numpy(v) for k, v in columns.items()})
        else:
            self._write_csv(columns)

    def _write_csv(self, columns: dict[str, Any]) -> None:
        if self._csv is None:
            self._file = self.path.open("w", newline="")
            self._csv = csv.writer(self._file)
            self._csv.writerow(list(columns))
        values = [v.to_pylist() if hasattr(v, "to_pylist") else np.asarray(v).tolist() for v in columns.values()]
        formats = [_csv_format(name) for name in columns]
        self._csv.writerows([f(v) for f, v in zip(formats, row, strict=True)] for row in zip(*values, strict=True))

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._csv is not None:
            self._file.close()
        if self._npy:
            names = list(self._npy[0])
            arrays = {k: np.concatenate([part[k] for part in self._npy]) for k in names}
            table = np.empty(len(arrays["score"]), dtype=[(k, arrays[k].dtype) for k in names])
            for k in names:
                table[k] = arrays[k]
            np.save(self.path, table, allow_pickle=False)


def _numpy(values: Any) -> np.ndarray:
    """A column (numpy, or an Arrow array carried from Parquet) as numpy; text as fixed-width str."""
    array = values.to_numpy(zero_copy_only=False) if hasattr(values, "to_numpy") else np.asarray(values)
    return array.astype(str) if array.dtype == object else array


def _csv_format(name: str) -> Any:
    """How a column's values are written: scores exactly (repr), percentiles to 4 places, flags as 0/1."""
    if name == "score":
        return lambda v: repr(float(v))
    if name == "percentile":
        return lambda v: f"{float(v):.4f}"
    if name == "is_anomaly":
        return lambda v: int(v)
    if name.startswith("part_"):
        return lambda v: f"{float(v):.6g}"
    return lambda v: v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae-score", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("input", type=Path, help=".csv (header row), .parquet (read a record batch at a time), .npy or "
                   ".npz of raw rows")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running vaeserve, e.g. http://127.0.0.1:8000")
    where.add_argument("--model-dir", type=Path, help="score in-process with this model folder's graphs")
    p.add_argument("-o", "--output", type=Path, required=True, help=".csv, .parquet or .npy")
    p.add_argument("--model", help="with --url: model name [default: the server's default]")
    p.add_argument("--version", type=int, help="with --url: model version [default: latest]")
    p.add_argument("--api-key", help="with --url: an API key, when the server requires one")
    p.add_argument("--ca", type=Path, help="with an https --url: PEM CA bundle that signed the server's certificate "
                   "(for a self-signed or private CA; the certificate is always verified)")
    p.add_argument("--cert", type=Path, help="with an https --url: client certificate (PEM) for mutual TLS")
    p.add_argument("--key", type=Path, help="with --cert: its private key (PEM), unless the certificate file holds it")
    p.add_argument("--score", choices=get_args(ScoreName),
                   help="which score (README: Anomaly detection) [default: the model's, as POST /anomaly-score]")
    p.add_argument("--samples", type=int, help="importance samples per row [default: the score's calibrated K]")
    p.add_argument("--id-column", help="CSV or Parquet column carried through to the output (first) instead of "
                   "being scored")
    p.add_argument("--keep-columns", type=column_list, default=(), metavar="A,B",
                   help="comma-separated CSV or Parquet columns carried through to the output, not scored")
    p.add_argument("--ignore-columns", type=column_list, default=(), metavar="A,B",
                   help="comma-separated CSV or Parquet columns left out of the features")
    p.add_argument("--no-header", dest="header", action="store_false",
                   help="the CSV's first row is data: columns are taken by position, not matched by name")
    p.add_argument("--explain", type=int, default=0, metavar="K",
                   help="add each row's K features with the largest part of the reconstruction term (0: none)")
    p.add_argument("--no-progress", action="store_true")
    return p


def make_scorer(args: argparse.Namespace) -> RemoteScorer | LocalScorer:
    if args.url:
        return RemoteScorer(url=args.url, model=args.model, version=args.version, score=args.score,
                            samples=args.samples, api_key=args.api_key, ca=args.ca, cert=args.cert, key=args.key,
                            explain=args.explain)
    return LocalScorer(model_dir=args.model_dir, score=args.score, samples=args.samples, explain=args.explain)


def score_file(args: argparse.Namespace, out: Output) -> tuple[int, int]:
    """Score the input into `out`; (rows, rows flagged). A Parquet file goes a record batch at a time."""
    carry = [c for c in (args.id_column, *args.keep_columns) if c]
    progress = not args.no_progress
    scorer = None
    try:
        if args.input.suffix == ".parquet":
            from training.columnar import BATCH_ROWS, iter_parquet

            features, total, batches = iter_parquet(args.input, carry=carry, ignore=args.ignore_columns)
            scorer = make_scorer(args)
            rows = flagged = 0
            for batch in tqdm(batches, total=-(-total // BATCH_ROWS), desc="scoring", unit="batch",
                              disable=not progress or None):
                result = scorer(batch.x, features, str(args.input))
                out.write(result, batch.carried)
                rows, flagged = rows + len(batch.x), flagged + int(result["is_anomaly"].sum())
            return rows, flagged
        if args.keep_columns and args.input.suffix != ".csv":
            raise DataError("--keep-columns applies to CSV and Parquet input")
        x, ids, columns = read_rows(args.input, args.id_column, (*args.ignore_columns, *args.keep_columns),
                                    args.header)
        carried = {args.id_column: ids} if ids is not None else {}
        carried |= read_csv_columns(args.input, args.keep_columns) if args.keep_columns else {}
        scorer = make_scorer(args)
        result = scorer(x, columns, str(args.input), progress)
        out.write(result, carried)
        return len(x), int(result["is_anomaly"].sum())
    finally:
        if scorer is not None:
            scorer.close()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        out = Output(args.output)
        started = time.perf_counter()
        try:
            rows, flagged = score_file(args, out)
        finally:
            out.close()
    except Exception as e:  # noqa: BLE001 - a command line says what went wrong, without a traceback
        import httpx

        from vaeclient import APIError

        if isinstance(e, httpx.TransportError):
            hint = " (with mutual TLS, pass --cert and --key)" if args.url.startswith("https") else ""
            print(f"vae-score: error: cannot reach {args.url}: {e or type(e).__name__}{hint}", file=sys.stderr)
            return 2
        if not isinstance(e, DataError | APIError | OSError | ValueError):
            raise
        print(f"vae-score: error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    print(f"scored {rows} rows in {seconds:.1f}s ({rows / seconds:,.0f} rows/s): {flagged} flagged; wrote "
          f"{args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
