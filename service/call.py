"""A parsed request, whichever protocol it came through: parameters, model, and raw array fields."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import codec
from service.errors import InvalidInput, quoted
from service.repository import LoadedModel
from service.settings import Settings


@dataclass(slots=True)
class Call:
    """Validated parameters, the resolved model, and its array fields still raw (lists or arrays)."""

    params: Any
    model: LoadedModel
    arrays: dict[str, Any]
    npy: np.ndarray | None
    settings: Settings
    maybe_bools: bool
    npz: bool = False  # answer .npz rather than JSON (native protocol)
    png: bool = False  # answer one PNG picture (native protocol, image models)
    arrow: bool = False  # answer an Arrow IPC stream (native protocol)
    gone: Callable[[], Awaitable[bool]] | None = None  # whether the client has closed its connection

    def labels(self, n: int, inferred: bool = False) -> np.ndarray | None:
        """Class indices [n] from `label` (one for all rows, or one per row) or `labels` (one per row);
        None for an unconditional model, and for a semi-supervised one given none where the operation
        infers or marginalises the label (`inferred`). A 422 names whatever does not fit the model."""
        label = getattr(self.params, "label", None)
        per_row = getattr(self.params, "labels", None)
        field = "labels" if per_row is not None else "label"
        given = per_row if per_row is not None else label
        model = self.model
        if label is not None and per_row is not None:
            raise InvalidInput("give label (one for all rows) or labels (one per row), not both", field="labels")
        if not model.classes:
            if given is not None:
                raise InvalidInput(f"model {model.name} v{model.version} is not conditional; it takes no {field}",
                                   field=field)
            return None
        if given is None and inferred and model.semi_supervised:
            return None
        if given is None:
            inferable = (" (a semi-supervised model infers it for /encode, /reconstruct, /sample, /anomaly-score "
                         "and /interpolate between data rows, not here)" if model.semi_supervised else "")
            raise InvalidInput(f"model {model.name} v{model.version} is conditional{inferable}: give label (one of "
                               f"{_listing(model.classes)}) for every row, or labels, one per row", field="label")
        if isinstance(given, list) and len(given) != n:
            raise InvalidInput(f"{field} has {len(given)} entries for {n} rows; give one per row "
                               "(or one label for every row)", field=field)
        index = model.class_index
        names = [str(v) for v in (given if isinstance(given, list) else [given])]
        unknown = [v for v in names if v not in index]
        if unknown:
            raise InvalidInput(f"unknown label {quoted(unknown[0])} for model {model.name} v{model.version}; its "
                               f"classes are {_listing(model.classes)}", field=field)
        codes = np.fromiter((index[v] for v in names), dtype=np.int64, count=len(names))
        return codes if len(codes) == n else np.full(n, codes[0], dtype=np.int64)

    def rows(self, field: str) -> np.ndarray:
        """Input rows in data space, float32 [N, D]."""
        value = self.npy if self.npy is not None else self.arrays.get(field)
        return codec.rows(value, field, shape=self.model.input_shape, max_rows=self.settings.max_rows,
                          maybe_bools=self.maybe_bools)

    def latents(self, field: str) -> np.ndarray:
        value = self.npy if self.npy is not None else self.arrays.get(field)
        return codec.rows(value, field, shape=(self.model.latent_dim,), max_rows=self.settings.max_rows,
                          maybe_bools=self.maybe_bools)

    def row(self, field: str, *, latent: bool) -> np.ndarray | None:
        """One vector (interpolation end), or None when absent: [1, D] or [1, L]."""
        value = self.arrays.get(field)
        if value is None:
            return None
        shape = (self.model.latent_dim,) if latent else self.model.input_shape
        return codec.rows([value] if isinstance(value, list) else value, field, shape=shape, max_rows=1,
                          maybe_bools=self.maybe_bools)

    def check_range(self, field: str, value: int, limit: int, setting: str) -> None:
        if value > limit:
            raise InvalidInput(f"{field} is {value}; the limit is {limit} ({setting})", field=field)


def _listing(classes: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(c) for c in classes[:limit])
    return shown + (f", ... ({len(classes)} in all)" if len(classes) > limit else "")
