"""A parsed request, whichever protocol it came through: parameters, model, and raw array fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service import codec
from service.errors import InvalidInput
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
