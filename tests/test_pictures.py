"""PNG answers: decoded, their pixels are the JSON answer's values for the same seed, laid out as documented."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.pictures import BACKGROUND, PAD, default_upscale
from tests.service_helpers import DEFAULT_MODEL, serving

pytestmark = pytest.mark.anyio
PNG = {"accept": "image/png"}
DIGITS_MAX = 16.0  # the shipped digits model's data range is 0..16


def decode_png(body: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(body))
    assert image.format == "PNG" and image.mode == "L"
    return np.asarray(image)


def cell(picture: np.ndarray, k: int, columns: int, side: int, upscale: int) -> np.ndarray:
    """Image k of the grid, sampled back to side x side (one pixel per upscale block)."""
    step = side * upscale + PAD
    top, left = PAD + (k // columns) * step, PAD + (k % columns) * step
    block = picture[top : top + side * upscale, left : left + side * upscale]
    assert (block == block[::upscale, ::upscale].repeat(upscale, 0).repeat(upscale, 1)).all()  # nearest neighbour
    return block[::upscale, ::upscale]


def grey(values: list[float]) -> np.ndarray:
    return np.rint(np.clip(np.asarray(values) / DIGITS_MAX, 0, 1) * 255).reshape(8, 8)


async def test_sample_png_is_the_json_answer_as_a_grid() -> None:
    async with serving(DEFAULT_MODEL.parents[1]) as (_, client):
        body = {"n": 6, "seed": 3}
        as_json = (await client.post("/sample", json=body)).json()
        r = await client.post("/sample", json=body, headers=PNG)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        picture = decode_png(r.content)
        up = default_upscale(8, 8)
        assert up == 8
        assert picture.shape == (PAD + 2 * (8 * up + PAD), PAD + 3 * (8 * up + PAD))  # ceil(sqrt(6)) = 3 columns
        for k in range(6):
            np.testing.assert_array_equal(cell(picture, k, 3, 8, up), grey(as_json["outputs"][k]))
        assert (picture[:PAD] == BACKGROUND).all()
        wide = decode_png((await client.post("/sample", json={**body, "columns": 6, "upscale": 2},
                                              headers=PNG)).content)
        assert wide.shape == (PAD + 8 * 2 + PAD, PAD + 6 * (8 * 2 + PAD))
        np.testing.assert_array_equal(cell(wide, 5, 6, 8, 2), grey(as_json["outputs"][5]))
        query = await client.post("/sample?n=6&seed=3", headers=PNG)
        assert query.content == r.content


async def test_reconstruct_png_puts_each_input_beside_its_reconstruction() -> None:
    async with serving(DEFAULT_MODEL.parents[1]) as (_, client):
        from sklearn.datasets import load_digits

        x = load_digits().data[:3]
        as_json = (await client.post("/reconstruct", json={"inputs": x.tolist()})).json()
        picture = decode_png((await client.post("/reconstruct", json={"inputs": x.tolist(), "columns": 1},
                                                headers=PNG)).content)
        assert picture.shape[1] == PAD + 2 * (8 * 8 + PAD)  # one pair per row
        for k in range(3):
            np.testing.assert_array_equal(cell(picture, 2 * k, 2, 8, 8), grey(x[k].tolist()))
            np.testing.assert_array_equal(cell(picture, 2 * k + 1, 2, 8, 8), grey(as_json["outputs"][k]))


async def test_interpolate_and_decode_pngs() -> None:
    async with serving(DEFAULT_MODEL.parents[1]) as (_, client):
        body = {"start_latent": [1.0] * 8, "end_latent": [-1.0] * 8, "steps": 5}
        as_json = (await client.post("/interpolate", json=body)).json()
        strip = decode_png((await client.post("/interpolate", json=body, headers=PNG)).content)
        assert strip.shape == (PAD + 8 * 8 + PAD, PAD + 5 * (8 * 8 + PAD))  # one row: a strip
        for k in range(5):
            np.testing.assert_array_equal(cell(strip, k, 5, 8, 8), grey(as_json["outputs"][k]))
        dec = decode_png((await client.post("/decode", json={"latents": as_json["latents"][:1]}, headers=PNG)).content)
        np.testing.assert_array_equal(cell(dec, 0, 1, 8, 8), grey(as_json["outputs"][0]))


async def test_png_refusals_are_406_or_422() -> None:
    async with serving(DEFAULT_MODEL.parents[1]) as (_, client):
        r = await client.post("/encode", json={"inputs": [[0.0] * 64]}, headers=PNG)
        assert r.status_code == 406 and "/sample" in r.json()["error"]["message"]
        r = await client.post("/sample", json={"n": 2, "columns": 0}, headers=PNG)
        assert r.status_code == 422 and r.json()["error"]["field"] == "columns"
        r = await client.post("/sample", json={"n": 5000}, headers=PNG)
        assert r.status_code == 422


async def test_png_is_refused_for_table_models(tmp_path: Path) -> None:
    from training.cli import main as train_main

    rows = np.random.default_rng(0).normal(size=(300, 5))
    np.save(tmp_path / "t.npy", rows)
    assert train_main(["--dataset", "npy", "--data", str(tmp_path / "t.npy"), "--epochs", "1", "--output",
                       str(tmp_path / "m"), "--name", "table", "--no-progress", "--checkpoint",
                       str(tmp_path / "c.pt")]) == 0
    async with serving(tmp_path / "m", default_model="table") as (_, client):
        r = await client.post("/sample", json={"n": 2}, headers=PNG)
        assert r.status_code == 406 and "image models" in r.json()["error"]["message"]


def test_vae_train_plot_writes_the_pictures(tmp_path: Path) -> None:
    """Every picture decodes; the sample grid is the decoder's output for the documented latents."""
    from training.cli import main as train_main

    out = tmp_path / "pictures"
    assert train_main(["plot", str(DEFAULT_MODEL), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"samples.png", "reconstructions.png", "interpolation.png", "traversal.png", "latent_map.png",
                     "curves.png"}
    for name in names:
        with Image.open(out / name) as image:
            image.load()
            assert image.format == "PNG" and min(image.size) > 50
    samples = decode_png((out / "samples.png").read_bytes())
    assert samples.shape == (PAD + 8 * (8 * 8 + PAD),) * 2  # 64 samples, 8 x 8
    traversal = decode_png((out / "traversal.png").read_bytes())
    assert traversal.shape == (PAD + 8 * (8 * 8 + PAD), PAD + 9 * (8 * 8 + PAD))  # 8 latent dims x 9 steps
    from tests.service_helpers import Reference

    ref = Reference()
    z = np.zeros((1, 8), dtype=np.float32)
    centre = cell(traversal, 4, 9, 8, 8)  # the middle of each row is z = 0
    np.testing.assert_array_equal(centre, grey(ref.decode(z)[0].tolist()))
