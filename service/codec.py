"""Request bodies to numpy, and response payloads to bytes (JSON, or .npy in / .npz out).

The hot path avoids per-element validation: orjson parses, numpy converts the row lists in C,
and only a body that fails (or might hold booleans) is walked in Python to say exactly where.
"""

from __future__ import annotations

import io
import math
import re
import struct
import zipfile
import zlib
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidInput, MalformedBody, NotAcceptable, PayloadTooLarge, UnsupportedMediaType, quoted

JSON = "application/json"
NPY = "application/x-npy"
NPZ = "application/x-npz"
PNG = "image/png"
ARROW = "application/vnd.apache.arrow.stream"
_NUMERIC_KINDS = "fiu"


MAX_DIMS = 8  # an array a request sends has at most this many dimensions (rows, then an image's C, H, W)
MAX_ELEMENTS = 1 << 40  # what a shape may describe even when one of its sides is 0: numpy refuses beyond
_ASCII_INT = re.compile(r"[0-9]{1,18}")


def ascii_int(text: str) -> int | None:
    """A non-negative integer written in ASCII digits (at most 18), else None.

    str.isdigit and int() also take other scripts' digits and superscripts ("²", "١")."""
    return int(text) if _ASCII_INT.fullmatch(text) else None


def check_shape(shape: list[int] | tuple[int, ...], what: str, field: str | None = None) -> None:
    """Refuse shapes numpy cannot hold: too many dimensions, or more elements than any request carries."""
    if len(shape) > MAX_DIMS:
        raise InvalidInput(f"{what}: shape has {len(shape)} dimensions; at most {MAX_DIMS}", field=field)
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise InvalidInput(f"{what}: shape {quoted(list(shape))} describes more values than a request can hold",
                           field=field)


async def read_body(stream: AsyncIterator[bytes], content_length: str | None, limit: int) -> bytes:
    """The whole body, refusing more than `limit` bytes before reading them where the size is declared."""
    if content_length is not None:
        declared = ascii_int(content_length)
        if declared is None:
            raise MalformedBody(f"Content-Length {quoted(content_length)} is not a number of bytes") from None
        if declared > limit:
            raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit} (VAE_MAX_BODY_BYTES)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes (VAE_MAX_BODY_BYTES)")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def media_type(content_type: str | None) -> str:
    """The request's body format; JSON when none is declared."""
    if not content_type:
        return JSON
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind in (JSON, NPY, ARROW):
        return kind
    if kind in ("application/octet-stream", "application/npy"):
        return NPY
    raise UnsupportedMediaType(f"Content-Type {quoted(kind)} is not supported; send {JSON}, {NPY} or {ARROW} "
                               "(with curl: --json, or -H 'Content-Type: application/json')")


# A JSON body above this many bytes has its values counted before it is parsed. The parse holds the GIL
# (a worker thread would not free the event loop), so the bound is what keeps it short: at the default
# limits a legitimate body parses in well under 0.1 s, where 8 million one-value rows took seconds.
LARGE_BODY = 256 * 1024


def check_json_values(body: bytes, max_rows: int, widest_row: int) -> None:
    """A 413 before parsing when a JSON body holds more values than any request may carry: max_rows
    rows of the widest loaded model, plus a label per row. Counting commas is a C scan (~1 ms per MiB);
    parsing 8 million one-value rows takes seconds and a gigabyte, and happened before the rows were counted."""
    values = body.count(b",") + 1
    most = max_rows * (widest_row + 1) + 64  # + 64: the request's other fields
    if values > most:
        raise PayloadTooLarge(f"the JSON body holds about {values} values; a request carries at most {max_rows} rows "
                              f"(VAE_MAX_ROWS) of at most {widest_row} values each (the widest loaded model)")


def parse_json(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise MalformedBody(f"malformed JSON: {e} (NaN and Infinity are not JSON numbers)") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"the body must be a JSON object, got {type(data).__name__}")
    return data


_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER = re.compile(
    r"""\{\s*'descr':\s*'([<>|=]?[fiu][1248])',\s*'fortran_order':\s*(True|False),\s*'shape':\s*\(([\d,\s]*)\),?\s*\}""")


def parse_npy(body: bytes) -> np.ndarray:
    """An .npy body -> ndarray, without copying the data.

    Plain numeric arrays (what clients send) are read straight off the buffer; numpy's reader
    parses every header with ast.literal_eval, which showed up on the event loop under bulk load.
    Anything else falls back to numpy's reader, which also produces the error messages.
    """
    if body[:6] == _NPY_MAGIC and len(body) > 10 and body[6] in (1, 2, 3):
        if body[6] == 1:
            header_len, start = int.from_bytes(body[8:10], "little"), 10
        else:
            header_len, start = int.from_bytes(body[8:12], "little"), 12
        match = _NPY_HEADER.fullmatch(body[start : start + header_len].decode("latin1").strip())
        if match and match.group(2) == "False":
            dtype = np.dtype(match.group(1))
            shape = tuple(int(d) for d in match.group(3).replace(",", " ").split())
            check_shape(shape, "the .npy array")
            count = math.prod(shape)
            offset = start + header_len
            if len(body) - offset == count * dtype.itemsize:
                return np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape)
    return _parse_npy_with_numpy(body)


def _parse_npy_with_numpy(body: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, EOFError or UnpicklingError for a bad file
        raise MalformedBody(f"the body is not a valid .npy array: {e}") from None
    if not isinstance(array, np.ndarray):
        raise MalformedBody("the body must be a single .npy array, not an .npz archive")
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise InvalidInput(f"the .npy array must hold real numbers, got dtype {array.dtype}")
    check_shape(array.shape, "the .npy array")
    return array


def _shown(value: Any) -> str:
    """A short JSON rendering of a bad value for the error message; values orjson cannot write (integers
    beyond 64 bits, which Python callers and msgpack-style bodies can hold) fall back to repr."""
    try:
        return orjson.dumps(value).decode()[:40]
    except TypeError:
        return repr(value)[:40]


def _first_problem(value: Any, field: str) -> tuple[str, str]:
    """Walk nested lists to the first element that is not a number, or the first ragged row."""
    stack: list[tuple[Any, str]] = [(value, field)]
    while stack:
        v, path = stack.pop()
        if isinstance(v, list):
            lengths = {len(x) if isinstance(x, list) else -1 for x in v}
            if len(lengths) > 1:
                sizes = [len(x) if isinstance(x, list) else "a number" for x in v]
                return path, f"{path} is ragged: its items have lengths {sizes[:8]}"
            stack.extend((x, f"{path}[{i}]") for i, x in reversed(list(enumerate(v))))
        elif isinstance(v, bool) or not isinstance(v, int | float):
            return path, f"{path} is {_shown(v)}, not a number"
    return field, f"{field} could not be read as numbers"


def may_hold_booleans(body: bytes) -> bool:
    """Whether a JSON body contains `true` or `false` anywhere.

    Numpy would coerce booleans inside a numeric row to 1.0/0.0, so such bodies get an exact scan.
    JSON numbers never contain 't' or 'f': jumping between those bytes with find() (memchr) costs a
    few microseconds, where `b"true" in body` scanned the whole 230 KB bulk body in ~100 us.
    """
    for first, word in ((ord("t"), b"true"), (ord("f"), b"false")):
        i = body.find(first)
        while i != -1:
            if body.startswith(word, i):
                return True
            i = body.find(first, i + 1)
    return False


def _has_bool(value: list[Any]) -> bool:
    for row in value:
        if isinstance(row, list):
            if row and isinstance(row[0], list):
                if _has_bool(row):
                    return True
            elif bool in set(map(type, row)):
                return True
        elif isinstance(row, bool):
            return True
    return False


def to_array(value: Any, field: str, *, maybe_bools: bool) -> np.ndarray:
    """JSON value -> float32 ndarray; NaN/Inf and non-numbers are refused with the place named."""
    if isinstance(value, np.ndarray):
        array = value
    else:
        if not isinstance(value, list):
            raise InvalidInput(f"{field} must be a list of rows, got {type(value).__name__}", field=field)
        if not value:
            raise InvalidInput(f"{field} is empty; send at least one row", field=field)
        try:
            array = np.asarray(value)
        except ValueError:
            path, message = _first_problem(value, field)
            raise InvalidInput(message, field=path) from None
        if array.dtype.kind not in _NUMERIC_KINDS or (maybe_bools and _has_bool(value)):
            path, message = _first_problem(value, field)
            raise InvalidInput(message, field=path)
    out = array.astype(np.float32, copy=False)  # beyond float32: inf, refused just below
    if not np.isfinite(out).all():
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(out))[0])
        path = field + "".join(f"[{i}]" for i in where)
        raise InvalidInput(f"{path} is NaN, infinite or outside the float32 range", field=path)
    return out


def rows(value: Any, field: str, *, shape: tuple[int, ...], max_rows: int, maybe_bools: bool) -> np.ndarray:
    """A list of rows -> float32 [N, D]; each row flat (D values) or shaped like `shape`."""
    if value is None:
        raise InvalidInput(f"{field} is required", field=field)
    if isinstance(value, list) and len(value) > max_rows and isinstance(value[0], list):  # before converting it
        raise PayloadTooLarge(f"{field} has {len(value)} rows; the limit is {max_rows} (VAE_MAX_ROWS)", field=field)
    array = to_array(value, field, maybe_bools=maybe_bools)
    width = math.prod(shape)
    if array.ndim < 2:
        hint = " (wrap a single row in [...])" if array.ndim == 1 and len(array) == width else ""
        raise InvalidInput(f"{field} must be a list of rows{hint}; got an array of shape {list(array.shape)}",
                           field=field)
    n = array.shape[0]
    if n == 0:
        raise InvalidInput(f"{field} is empty; send at least one row", field=field)
    if n > max_rows:
        raise PayloadTooLarge(f"{field} has {n} rows; the limit is {max_rows} (VAE_MAX_ROWS)", field=field)
    row_shape = array.shape[1:]
    squeezed = tuple(d for d in shape if d != 1) or (1,)
    if row_shape not in ((width,), shape, squeezed):
        allowed = f"{width} values" + (f" or shape {list(shape)}" if len(shape) > 1 else "")
        raise InvalidInput(f"each row of {field} must have {allowed}; got rows of shape {list(row_shape)}",
                           field=field)
    return array.reshape(n, width)


def negotiate(accept: str | None) -> str:
    """The response's media type: .npz or PNG when asked for by name, else JSON."""
    if not accept:
        return JSON
    kinds = [part.split(";", 1)[0].strip().lower() for part in accept.split(",")]
    for kind in (NPZ, PNG, ARROW):
        if kind in kinds:
            return kind
    if not any(k in (JSON, "*/*", "application/*", "") for k in kinds):
        raise NotAcceptable(f"Accept {quoted(accept)}: responses are {JSON}, {NPZ}, {ARROW}, or {PNG} (image "
                            "models' /sample, /decode, /reconstruct and /interpolate)")
    return JSON


def encode_json(payload: dict[str, Any]) -> bytes:
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def _npy_bytes(array: np.ndarray) -> bytes:
    """One array in .npy format (version 1.0), header padded to 64 bytes as numpy writes it."""
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)  # (never 0-d here: ascontiguousarray would make it 1-d)
    if array.dtype.kind in "OV":
        raise ValueError(f"cannot write dtype {array.dtype} without pickle")
    shape = "".join(f"{d}," for d in array.shape) if len(array.shape) == 1 else ", ".join(map(str, array.shape))
    header = f"{{'descr': '{array.dtype.str}', 'fortran_order': False, 'shape': ({shape}), }}"
    pad = 64 - (10 + len(header) + 1) % 64
    header_bytes = (header + " " * pad + "\n").encode("latin1")
    return _NPY_MAGIC + b"\x01\x00" + len(header_bytes).to_bytes(2, "little") + header_bytes + array.tobytes()


# A stored (uncompressed) ZIP entry's fixed parts (APPNOTE 4.3.7, 4.3.12, 4.3.16) as zipfile writes them
# for a ZipInfo: version 2.0, made on Unix, mode 0600, no flags, method 0, the DOS date 1980-01-01 00:00
# (so equal answers are equal bytes), then CRC-32 and sizes.
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")
_DOS_DATE = (0 << 9) | (1 << 5) | 1
_MADE_ON_UNIX = (3 << 8) | 20
_MODE_0600 = 0o600 << 16
_ZIP32_LIMIT = 0xFFFF_FFFF


def encode_npz(payload: dict[str, Any]) -> bytes:
    """One array per field (scalars as 0-d arrays), stored uncompressed; loads without pickle.

    The archive is written directly: zipfile's per-entry bookkeeping cost ~100 us an answer, a tenth of
    the event loop's time at the bulk `.npy` cell; a stored entry is a fixed header, the bytes and their
    CRC-32. An answer too large for 32-bit sizes (ZIP64) is left to zipfile."""
    entries = [(f"{key}.npy".encode(), _npy_bytes(value if isinstance(value, np.ndarray) else np.asarray(value)))
               for key, value in payload.items() if value is not None]
    total = sum(_LOCAL.size + _CENTRAL.size + 2 * len(name) + len(data) for name, data in entries) + _END.size
    if total > _ZIP32_LIMIT:
        return _encode_npz_zip64(entries)
    parts: list[bytes] = []
    central: list[bytes] = []
    offset = 0
    for name, data in entries:
        crc, size = zlib.crc32(data), len(data)
        parts += [_LOCAL.pack(0x04034B50, 20, 0, 0, 0, _DOS_DATE, crc, size, size, len(name), 0), name, data]
        central += [_CENTRAL.pack(0x02014B50, _MADE_ON_UNIX, 20, 0, 0, 0, _DOS_DATE, crc, size, size, len(name), 0,
                                  0, 0, 0, _MODE_0600, offset), name]
        offset += _LOCAL.size + len(name) + size
    directory = b"".join(central)
    return b"".join([*parts, directory, _END.pack(0x06054B50, 0, 0, len(entries), len(entries), len(directory),
                                                  offset, 0)])


def _encode_npz_zip64(entries: list[tuple[bytes, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, data in entries:
            archive.writestr(zipfile.ZipInfo(name.decode(), date_time=(1980, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


def parse_arrow(body: bytes) -> tuple[np.ndarray, list[str]]:
    """An Arrow IPC stream -> (rows float32 [N, D], column names): one numeric column per feature, or
    one fixed-size-list column holding each row. Columns are matched to the model's names by the caller."""
    import pyarrow as pa

    try:
        table = pa.ipc.open_stream(body).read_all()
    except (pa.ArrowException, OSError, ValueError) as e:  # whatever the bytes are, they are not a stream
        raise MalformedBody(f"the body is not an Arrow IPC stream ({ARROW}): {e}") from None
    names = table.column_names
    if not names or table.num_rows == 0:
        raise InvalidInput("the Arrow table has no rows or no columns", field="inputs")
    columns = []
    for name in names:
        column = table.column(name).combine_chunks()
        if column.null_count:
            raise InvalidInput(f"Arrow column {quoted(name)} has {column.null_count} nulls", field=name)
        if pa.types.is_fixed_size_list(column.type) and len(names) == 1:
            values = column.flatten().to_numpy(zero_copy_only=False)
            return _float_rows(values.reshape(table.num_rows, column.type.list_size), name), names
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            raise InvalidInput(f"Arrow column {quoted(name)} is {column.type}; every column must be a number "
                               "(one per feature), or send one fixed-size-list column of rows", field=name)
        columns.append(column.to_numpy(zero_copy_only=False))
    return _float_rows(np.column_stack(columns), "inputs"), names


def _float_rows(values: np.ndarray, field: str) -> np.ndarray:
    rows = np.asarray(values, dtype=np.float64)
    if not np.isfinite(rows).all():
        raise InvalidInput(f"{field}: NaN and infinite values are not numbers a model can take", field=field)
    return rows.astype(np.float32)


def order_columns(rows: np.ndarray, names: list[str], expected: list[str] | None) -> np.ndarray:
    """Named columns in the model's feature order; unnamed (c0, c1, ... or a model without names) by position."""
    if expected is None or names == expected or len(names) == 1:
        return rows
    missing, extra = [c for c in expected if c not in names], [c for c in names if c not in expected]
    if missing or extra:
        raise InvalidInput(f"the Arrow columns do not match the model's features: missing {missing}, not in the "
                           f"model {extra}", field="inputs")
    return rows[:, [names.index(c) for c in expected]]


def encode_arrow(payload: dict[str, Any]) -> bytes:
    """One record batch: each array a column (2-D ones as fixed-size lists, a row per entry), per-row
    class names (`labels`, one per row) a string column, other scalars and lists the schema's metadata
    (JSON values)."""
    import pyarrow as pa

    arrays, metadata = {}, {}
    rows = {len(v) for v in payload.values() if isinstance(v, np.ndarray) and v.ndim >= 1}
    for key, value in payload.items():
        if value is None:
            continue
        if isinstance(value, np.ndarray) and value.ndim >= 1:
            flat = pa.array(np.ascontiguousarray(value).reshape(-1))
            width = int(np.prod(value.shape[1:])) if value.ndim > 1 else 0
            arrays[key] = pa.FixedSizeListArray.from_arrays(flat, width) if width else flat
        elif key == "labels" and rows == {len(value)}:
            arrays[key] = pa.array(value, type=pa.string())
        else:
            metadata[key] = orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) > 1:
        raise NotAcceptable(f"this answer's arrays differ in length ({sorted(lengths)}), so it is not one Arrow "
                            "table; ask for JSON or .npz")
    batch = pa.RecordBatch.from_pydict(arrays, metadata=metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()
