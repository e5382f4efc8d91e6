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


def score_remote(x: np.ndarray, *, url: str, model: str | None, version: int | None, score: ScoreName | None,
                 samples: int | None, api_key: str | None, progress: bool, ca: Path | None = None,
                 cert: Path | None = None, key: Path | None = None, explain: int = 0,
                 columns: list[str] | None = None, source: str = "the input") -> dict[str, Any]:
    from vaeclient import Client
    # Overload (503) is waited out; a URL that does not answer fails in about a second.
    with Client(url, model=model, version=version, api_key=api_key, retries=20, connect_retries=3, ca=ca, cert=cert,
                key=key) as client:
        limits = client.models()["limits"]
        x = align_columns(x, columns, client.metadata().get("feature_names") if columns else None, source)
        k = samples or (CALIBRATED_SAMPLES[score] if score else 1)  # a model's default score is at K = 1
        chunk = max(1, min(limits["max_rows"], limits["max_decode_rows"] // k))
        parts = []
        names: list[str] | None = None
        for start in tqdm(range(0, len(x), chunk), desc="scoring", unit="chunk", disable=not progress or None):
            r = client.anomaly_score(x[start : start + chunk], score=score, samples=samples, explain=explain > 0)
            parts.append((r.score, r.percentile, r.is_anomaly, top_features(r.explanation, explain)))
            names = r.feature_names
    result: dict[str, Any] = {"score": np.concatenate([p[0] for p in parts]),
                              "percentile": np.concatenate([p[1] for p in parts]),
                              "is_anomaly": np.concatenate([p[2] for p in parts])}
    if explain:
        result["top"] = (np.concatenate([p[3][0] for p in parts]), np.concatenate([p[3][1] for p in parts]), names)
    return result


def top_features(parts: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest parts per row: (feature indices [N, k], parts [N, k]), largest first."""
    if parts is None or k == 0:
        return np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0))
    k = min(k, parts.shape[1])
    index = np.argsort(-parts, axis=1, kind="stable")[:, :k]
    return index, np.take_along_axis(parts, index, axis=1)


def score_local(x: np.ndarray, *, model_dir: Path, score: ScoreName | None, samples: int | None,
                progress: bool, explain: int = 0, columns: list[str] | None = None,
                source: str = "the input") -> dict[str, Any]:
    from training.anomaly import ServedScorer

    scorer = ServedScorer.load(model_dir)
    score = score_asked(score, samples, scorer.manifest.default_score)
    cal = scorer.calibration(score)
    x = align_columns(x, columns, scorer.manifest.feature_names if columns else None, source)
    if x.shape[1] != scorer.manifest.input_dim:
        raise DataError(f"rows have {x.shape[1]} features; the model takes {scorer.manifest.input_dim}")
    chunk = 8192
    scores = np.concatenate([scorer(x[s : s + chunk], samples, score) for s in
                             tqdm(range(0, len(x), chunk), desc="scoring", unit="chunk", disable=not progress or None)])
    result: dict[str, Any] = {"score": scores, "percentile": cal.percentile(scores),
                              "is_anomaly": scores > cal.threshold}
    if explain:
        tops = [top_features(scorer.explain(x[s : s + chunk], samples, score), explain)
                for s in range(0, len(x), chunk)]
        result["top"] = (np.concatenate([t[0] for t in tops]), np.concatenate([t[1] for t in tops]),
                         scorer.manifest.feature_names)
    return result


def write(out: Path, result: dict[str, Any], ids: np.ndarray | None, id_column: str | None) -> None:
    index, parts, names = result.get("top") or (np.zeros((len(result["score"]), 0), dtype=np.int64), None, None)
    k = index.shape[1]
    labels = np.asarray(names if names else [f"x{j}" for j in range(int(index.max(initial=0)) + 1)])
    top_names = labels[index] if k else index
    if out.suffix == ".npy":
        fields = ([(id_column or "id", ids.dtype)] if ids is not None else []) + [
            ("score", np.float64), ("percentile", np.float64), ("is_anomaly", np.bool_)]
        fields += [f for j in range(k) for f in ((f"feature_{j + 1}", labels.dtype), (f"part_{j + 1}", np.float64))]
        table = np.empty(len(result["score"]), dtype=fields)
        if ids is not None:
            table[id_column or "id"] = ids
        for key in ("score", "percentile", "is_anomaly"):
            table[key] = result[key]
        for j in range(k):
            table[f"feature_{j + 1}"], table[f"part_{j + 1}"] = top_names[:, j], parts[:, j]  # type: ignore[index]
        np.save(out, table, allow_pickle=False)
        return
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(([id_column] if ids is not None else []) + ["score", "percentile", "is_anomaly"]
                   + [c for j in range(k) for c in (f"feature_{j + 1}", f"part_{j + 1}")])
        for i in range(len(result["score"])):
            w.writerow(([ids[i]] if ids is not None else []) + [
                repr(float(result["score"][i])), f"{float(result['percentile'][i]):.4f}",
                int(result["is_anomaly"][i])] + [c for j in range(k) for c in (
                    top_names[i, j], f"{float(parts[i, j]):.6g}")])  # type: ignore[index]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae-score", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("input", type=Path, help=".csv (header row), .npy or .npz of raw rows")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running vaeserve, e.g. http://127.0.0.1:8000")
    where.add_argument("--model-dir", type=Path, help="score in-process with this model folder's graphs")
    p.add_argument("-o", "--output", type=Path, required=True, help=".csv or .npy")
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
    p.add_argument("--id-column", help="CSV column carried through to the output instead of being scored")
    p.add_argument("--ignore-columns", type=column_list, default=(), metavar="A,B",
                   help="comma-separated CSV columns left out of the features")
    p.add_argument("--no-header", dest="header", action="store_false",
                   help="the CSV's first row is data: columns are taken by position, not matched by name")
    p.add_argument("--explain", type=int, default=0, metavar="K",
                   help="add each row's K features with the largest part of the reconstruction term (0: none)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.output.suffix not in (".csv", ".npy"):
            raise DataError(f"--output must end in .csv or .npy, got {args.output}")
        started = time.perf_counter()
        x, ids, columns = read_rows(args.input, args.id_column, args.ignore_columns, args.header)
        if args.url:
            result = score_remote(x, url=args.url, model=args.model, version=args.version, score=args.score,
                                  samples=args.samples, api_key=args.api_key, progress=not args.no_progress,
                                  ca=args.ca, cert=args.cert, key=args.key, explain=args.explain, columns=columns,
                                  source=str(args.input))
        else:
            result = score_local(x, model_dir=args.model_dir, score=args.score, samples=args.samples,
                                 progress=not args.no_progress, explain=args.explain, columns=columns,
                                 source=str(args.input))
        write(args.output, result, ids, args.id_column)
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
    print(f"scored {len(x)} rows in {seconds:.1f}s ({len(x) / seconds:,.0f} rows/s): "
          f"{int(result['is_anomaly'].sum())} flagged; wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
