"""Parquet tables (pyarrow): read whole for training, in record batches for scoring, written as
they come, so `vae-score` on a file larger than memory holds one batch at a time.

Columns are matched by name, as a CSV header's are: the label, id and carried (`keep`) columns are
kept out of the features; every other column is a feature and must be numeric without nulls.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.data import DataError, check_finite

BATCH_ROWS = 65_536  # rows per record batch read and scored: memory is bounded by this, not the file


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401 - registers pa.parquet
    except ImportError:
        raise DataError("Parquet needs pyarrow: pip install pyarrow (it is a dependency of vaeserve)") from None
    return pa


def _file(path: Path) -> Any:
    pa = _pyarrow()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    try:
        # pre_buffer (pyarrow's default) keeps every column chunk read so far: 1.2 GB after a 1.3 GB file.
        return pa.parquet.ParquetFile(path, pre_buffer=False)
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: not a Parquet file ({e})") from None


def _features(names: list[str], kept_out: list[str], path: Path) -> list[str]:
    missing = [c for c in kept_out if c not in names]
    if missing:
        raise DataError(f"{path}: no column {', '.join(map(repr, missing))}; its columns are {names}")
    features = [c for c in names if c not in kept_out]
    if not features:
        raise DataError(f"{path}: no feature columns left (columns {names}, kept out {kept_out})")
    return features


def _matrix(batch: Any, features: list[str], path: Path) -> np.ndarray:
    """A record batch's feature columns as float64 [N, D]; a non-numeric or null cell is a DataError."""
    pa = _pyarrow()
    columns = []
    for name in features:
        column = batch.column(name)
        if column.null_count:
            raise DataError(f"{path}: column {name!r} has {column.null_count} empty cells; fill or drop them")
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
                or pa.types.is_boolean(column.type) or pa.types.is_decimal(column.type)):
            raise DataError(f"{path}: column {name!r} is {column.type}, not numeric; leave it out with "
                            "--ignore-columns, or carry it through with --keep-columns")
        columns.append(np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64))
    x = np.column_stack(columns) if columns else np.zeros((batch.num_rows, 0))
    check_finite(x, str(path))
    return x


def read_parquet_table(path: Path, label_column: str | None, *, drop: tuple[str, ...] | list[str] = ()
                       ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(features float64 [N, D], the label column or None, feature names), as read_csv_table gives them."""
    table = _file(path).read()
    kept_out = [c for c in (label_column, *drop) if c is not None]
    features = _features(table.column_names, kept_out, path)
    if table.num_rows == 0:
        raise DataError(f"{path}: the table has no rows")
    x = _matrix(table, features, path)
    labels = None
    if label_column is not None:
        labels = np.asarray(["" if v is None else str(v) for v in table.column(label_column).to_pylist()])
    return x, labels, features


def parquet_shape(path: Path) -> tuple[int, int]:
    """(rows, columns) from the file's footer, without reading its data."""
    metadata = _file(path).metadata
    return metadata.num_rows, metadata.num_columns


@dataclass
class Batch:
    x: np.ndarray  # float32 [n, D], the feature columns in the file's order
    carried: dict[str, Any]  # id and kept columns, as Arrow arrays


def iter_parquet(path: Path, *, carry: list[str], ignore: tuple[str, ...] = (),
                 batch_rows: int = BATCH_ROWS) -> tuple[list[str], int, Iterator[Batch]]:
    """(feature names, row count, batches): the file read one record batch at a time."""
    f = _file(path)
    names = f.schema_arrow.names
    features = _features(names, [*carry, *ignore], path)
    rows = f.metadata.num_rows
    if rows == 0:
        raise DataError(f"{path}: no rows to score")

    def batches() -> Iterator[Batch]:
        for batch in f.iter_batches(batch_size=batch_rows, columns=[*carry, *features]):
            yield Batch(_matrix(batch, features, path).astype(np.float32),
                        {c: batch.column(c) for c in carry})

    return features, rows, batches()


class ParquetSink:
    """Appends tables to one Parquet file, opened on the first (its schema is the first table's)."""

    def __init__(self, path: Path):
        self.path = path
        self._writer: Any = None

    def write(self, columns: dict[str, Any]) -> None:
        pa = _pyarrow()
        table = pa.table(columns)
        if self._writer is None:
            self._writer = pa.parquet.ParquetWriter(self.path, table.schema)
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
