"""Image models' answers as one PNG: a grid of images, pairs (input beside its reconstruction), or a strip.

Layout, so a caller (or a test) can find any image in the picture: every image is scaled up by an
integer factor `upscale` (nearest neighbour, so each pixel becomes an exact upscale x upscale block),
and images sit PAD pixels apart and PAD pixels from the edges, on a background of grey BACKGROUND:
image k of the grid, at row k // columns and column k % columns, has its top-left corner at
x = PAD + column * (width * upscale + PAD), y = PAD + row * (height * upscale + PAD).
Grey levels are the model's data range, [shift, shift + scale] of its preprocessing (0..16 for the
digits, 0..255 for MNIST), mapped linearly onto 0..255 and clipped.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image

from service.errors import InvalidInput, NotAcceptable
from service.schemas import ReconstructParams

PAD = 2
BACKGROUND = 128
MIN_SIDE = 64  # the default upscale makes each image's longer side at least this many pixels


def default_upscale(height: int, width: int) -> int:
    """8x8 digits: 8; 28x28 MNIST: 3."""
    return max(1, math.ceil(MIN_SIDE / max(height, width)))


def to_grey(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Data-space values [N, D] -> uint8 grey levels, the data range onto 0..255."""
    span = np.where(high > low, high - low, 1.0)
    unit = np.clip((x - low) / span, 0.0, 1.0)
    return np.rint(unit * 255.0).astype(np.uint8)


def grid(images: np.ndarray, columns: int, upscale: int) -> np.ndarray:
    """uint8 images [N, C, H, W] -> one picture [rows, cols, C], laid out as the module says."""
    n, c, h, w = images.shape
    columns = max(1, min(columns, n))
    cell_h, cell_w = h * upscale, w * upscale
    canvas = np.full((*canvas_size(n, (c, h, w), columns, upscale), c), BACKGROUND, dtype=np.uint8)
    for k in range(n):  # one image scaled up at a time: the picture is the only large array
        top, left = PAD + (k // columns) * (cell_h + PAD), PAD + (k % columns) * (cell_w + PAD)
        canvas[top : top + cell_h, left : left + cell_w] = images[k].repeat(upscale, axis=1).repeat(upscale, axis=2) \
            .transpose(1, 2, 0)
    return canvas


def encode_png(picture: np.ndarray) -> bytes:
    """[rows, cols, 1 or 3] uint8 -> PNG bytes (grey or RGB)."""
    image = Image.fromarray(picture[:, :, 0] if picture.shape[2] == 1 else picture)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def canvas_size(n: int, input_shape: tuple[int, ...], columns: int, upscale: int) -> tuple[int, int]:
    """(height, width) in pixels of `grid`'s picture of n images laid out in `columns` columns."""
    _, h, w = input_shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    return PAD + rows * (h * upscale + PAD), PAD + columns * (w * upscale + PAD)


def picture(rows: np.ndarray, input_shape: tuple[int, ...], low: np.ndarray, high: np.ndarray, *,
            columns: int | None = None, upscale: int | None = None, pairs: np.ndarray | None = None,
            strip: bool = False, pairs_range: tuple[np.ndarray, np.ndarray] | None = None,
            max_pixels: int | None = None) -> bytes:
    """Data-space rows [N, D] of an image model -> a PNG.

    pairs: rows [N, D] shown left of each row (inputs beside their reconstructions; `columns` then
    counts pairs), drawn over `pairs_range` when given (inputs beside a heat map of another range).
    strip: one row of images (an interpolation) unless `columns` is given.
    Default columns: ceil(sqrt(N)) for a grid or pairs. `max_pixels`: a 422 before anything is drawn
    when the picture would be larger.
    """
    c, h, w = input_shape
    scale = upscale or default_upscale(h, w)
    n = len(rows)
    if columns is None:
        columns = n if strip else math.ceil(math.sqrt(n))
    if max_pixels is not None:
        count, cols = (2 * n, 2 * columns) if pairs is not None else (n, columns)
        height, width = canvas_size(count, input_shape, cols, scale)
        if height * width * c > max_pixels:
            raise InvalidInput(f"the PNG answer would be {width} x {height} pixels ({height * width * c} values); the "
                               f"limit is {max_pixels} (VAE_MAX_PICTURE_PIXELS): ask for a smaller upscale or fewer "
                               "images, or for JSON", field="upscale")
    images = to_grey(rows, low, high).reshape(n, c, h, w)
    if pairs is not None:
        left = to_grey(pairs, *(pairs_range or (low, high))).reshape(n, c, h, w)
        images = np.stack([left, images], axis=1).reshape(2 * n, c, h, w)
        columns *= 2
    return encode_png(grid(images, columns, scale))


MAX_IMAGES = 4096  # images in one PNG answer


def check_drawable(input_shape: tuple[int, ...], operation_draws: bool) -> None:
    """Refuse Accept: image/png before any work when the answer cannot be a picture."""
    if not operation_draws:
        raise NotAcceptable("image/png answers /sample, /decode, /reconstruct, /interpolate and /anomaly-score "
                            "with explain: true; this request is answered as application/json or "
                            "application/x-npz")
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise NotAcceptable(f"image/png is for image models (input shape [1 or 3, H, W]); this model's rows are "
                            f"{list(input_shape)}")


def _check_count(images: int) -> None:
    if images > MAX_IMAGES:
        raise InvalidInput(f"a PNG answer holds at most {MAX_IMAGES} images, this one would hold {images}; "
                           "ask for fewer rows, or for JSON", field="columns")


def render(call: Any, payload: dict[str, Any]) -> bytes:
    """The PNG for a native answer (`call` is the request's Call): outputs, with /reconstruct's inputs beside them."""
    model = call.model
    p = call.params
    low, high = model.data_range()
    if "explanation" in payload:  # each input beside its heat map: 0 nats black, the answer's largest part white
        heat = payload["explanation"]
        top = float(heat.max()) if heat.size else 0.0
        outputs, inputs = heat, call.rows("inputs")
        heat_low, heat_high = np.zeros(heat.shape[1]), np.full(heat.shape[1], top if top > 0 else 1.0)
        _check_count(2 * len(outputs))
        return picture(outputs, model.input_shape, heat_low, heat_high, columns=p.columns, upscale=p.upscale,
                       pairs=inputs, pairs_range=(low, high), max_pixels=call.settings.max_picture_pixels)
    outputs = payload["outputs"]
    inputs = call.rows("inputs") if isinstance(p, ReconstructParams) else None
    _check_count(len(outputs) * (1 if inputs is None else 2))
    return picture(outputs, model.input_shape, low, high, columns=p.columns, upscale=p.upscale, pairs=inputs,
                   strip="t" in payload, max_pixels=call.settings.max_picture_pixels)
