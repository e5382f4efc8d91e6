"""Property tests of the request codecs: whatever arrives, the answer is a correct array or one of
the service's own errors (a clear 4xx), never another exception."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service import codec, v2
from service.errors import ServiceError
from service.operations import OPERATIONS

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPE = (1, 2, 3)
WIDTH = math.prod(SHAPE)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=3),
                    st.floats(allow_nan=True, allow_infinity=True), st.floats(-1e3, 1e3))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=8),
                                                            st.dictionaries(st.text(max_size=3), inner, max_size=3)),
                           max_leaves=60)
# Rows that are nearly right: the width and nesting a caller means, with a bad value here and there.
near_rows = st.lists(st.one_of(st.lists(st.one_of(st.floats(-10, 10), scalars), min_size=WIDTH, max_size=WIDTH),
                               st.lists(st.lists(st.lists(st.floats(-1, 1), min_size=3, max_size=3), min_size=2,
                                                 max_size=2), min_size=1, max_size=1)),
                     max_size=5)


def rows(value: object) -> np.ndarray:
    return codec.rows(value, "inputs", shape=SHAPE, max_rows=4, maybe_bools=True)


@SETTINGS
@given(st.one_of(json_values, near_rows))
@example([{"": -(2**63) - 1}])  # an integer orjson cannot write back once broke the error message
def test_rows_returns_valid_float32_rows_or_a_service_error(value):
    try:
        out = rows(value)
    except ServiceError as e:
        assert 400 <= e.status < 500 and e.message
        return
    assert out.dtype == np.float32 and out.ndim == 2 and out.shape[1] == WIDTH and 1 <= len(out) <= 4
    assert np.isfinite(out).all()


@SETTINGS
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.just(WIDTH)),
                  elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
def test_finite_rows_round_trip_exactly_through_json_and_npy(array):
    np.testing.assert_array_equal(rows(orjson.loads(orjson.dumps(array.tolist()))), array)
    buffer = io.BytesIO()
    np.save(buffer, array)
    np.testing.assert_array_equal(rows(codec.parse_npy(buffer.getvalue())), array)


@SETTINGS
@given(st.one_of(st.binary(max_size=300),
                 hnp.arrays(hnp.scalar_dtypes(), hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
                 .map(lambda a: _npy(a))))
def test_npy_bodies_parse_or_fail_cleanly(body):
    try:
        array = codec.parse_npy(body)
    except ServiceError as e:
        assert e.status in (400, 422)
        return
    assert isinstance(array, np.ndarray) and array.dtype.kind in "fiu"


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@SETTINGS
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
def test_json_bodies_parse_to_an_object_or_fail_cleanly(body):
    try:
        data = codec.parse_json(body)
    except ServiceError as e:
        assert e.status in (400, 422)
        return
    assert isinstance(data, dict)
    assert codec.may_hold_booleans(body) == (b"true" in body or b"false" in body)


tensors = st.fixed_dictionaries({"name": st.sampled_from(["inputs", "latents", "x"]),
                                 "datatype": st.sampled_from(["FP32", "FP64", "INT8"]),
                                 "shape": st.one_of(st.lists(st.integers(-1, 4), max_size=3),
                                                    st.lists(st.integers(), max_size=70)),  # any size at all
                                 "data": json_values},
                                optional={"parameters": st.fixed_dictionaries(
                                    {}, optional={"binary_data_size": st.integers(-4, 64)})})
v2_docs = st.fixed_dictionaries({}, optional={"inputs": st.one_of(st.lists(tensors, max_size=3), json_values),
                                              "outputs": st.one_of(st.lists(st.fixed_dictionaries(
                                                  {"name": st.text(max_size=6)}), max_size=2), json_values),
                                              "parameters": st.one_of(st.dictionaries(st.text(max_size=8), scalars,
                                                                                      max_size=3), scalars),
                                              "id": scalars})


@SETTINGS
@given(v2_docs, st.binary(max_size=64), st.booleans(), st.sampled_from(list(OPERATIONS)))
def test_v2_requests_parse_or_fail_cleanly(doc, binary, declare, op):
    header = json.dumps(doc).encode()
    body = header + binary if declare else header
    length = str(len(header)) if declare else None
    try:
        request, params = v2.parse_infer(body, length, f"m.{op}", OPERATIONS[op])
    except ServiceError as e:
        assert 400 <= e.status < 500 and e.message
        return
    assert isinstance(params, dict) and not params.keys() & v2.PROTOCOL_PARAMETERS
    for name, array in request.tensors.items():
        assert name in v2.INPUTS[op] and array.dtype == np.float32
