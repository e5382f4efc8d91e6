"""Models that change while serving: new versions switch in without a failed request, vanished ones
finish their in-flight requests, broken, tampered or (with signing on) unsigned ones are refused."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.folder import open_folder
from service.signing import generate_keypair, load_public_keys, verify_signature
from tests.service_helpers import DEFAULT_MODEL, Gate, Reference, copy_model, digits_rows, metric, serving
from training.cli import main as train_main

pytestmark = pytest.mark.anyio


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    shutil.copytree(DEFAULT_MODEL, tmp_path / "models" / "digits" / "1")
    return tmp_path / "models"


async def test_a_new_version_switches_in_under_load_and_the_old_one_drains(repo, tiny_model, tmp_path):
    rows = digits_rows(64)
    staged = copy_model(tmp_path / "staging", "digits", 2, tiny_model)
    references = {1: Reference(repo / "digits" / "1"), 2: Reference(staged)}
    answers: list[tuple[int, int, dict]] = []
    stop = asyncio.Event()
    async with serving(repo, reload_interval=0.05) as (app, client):
        async def load(worker: int) -> None:
            i = worker
            while not stop.is_set():
                r = await client.post("/encode", json={"inputs": rows[i % 64 : i % 64 + 1].tolist()})
                answers.append((i % 64, r.status_code, r.json()))
                i += 7

        workers = [asyncio.create_task(load(w)) for w in range(8)]
        await asyncio.sleep(0.3)
        shutil.copytree(staged, repo / "digits" / "2")  # the poll picks it up
        for _ in range(200):
            if answers and answers[-1][2].get("version") == 2:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)
        models = (await client.get("/models")).json()
    assert all(status == 200 for _, status, _ in answers), [a for a in answers if a[1] != 200][:3]
    versions = [body["version"] for _, _, body in answers]
    assert set(versions) == {1, 2}
    first_new = versions.index(2)
    assert set(versions[first_new + 16 :]) == {2}  # once switched, latest stays the new version
    for i, _, body in answers:  # each answer names the version that computed it
        expected, _ = references[body["version"]].encode(rows[i : i + 1])
        np.testing.assert_allclose(body["mean"], expected, atol=1e-4)
    assert models["models"] == [{"name": "digits", "versions": [1, 2], "latest": 2}]


async def test_a_removed_version_finishes_its_requests_then_is_gone(repo, tmp_path):
    copy_model(repo, "digits", 2, repo / "digits" / "1")
    async with serving(repo, reload_interval=0) as (app, client):
        v1 = app.state.vae.repository.get("digits", 1)
        gate = Gate(v1.encoder.fn)
        v1.encoder.fn = gate
        held = asyncio.create_task(client.post("/encode", json={"inputs": digits_rows(1).tolist(), "version": 1}))
        await asyncio.to_thread(gate.entered.wait, 10)
        shutil.rmtree(repo / "digits" / "1")
        report = (await client.post("/admin/reload")).json()
        assert report["unloaded"] == ["digits/1"] and report["models"] == {"digits": [2]}
        assert (await client.post("/encode", json={"inputs": digits_rows(1).tolist(), "version": 1})).status_code == 404
        gate.open.set()
        r = await held
        assert r.status_code == 200 and r.json()["version"] == 1
        text = (await client.get("/metrics")).text
    assert metric(text, "vae_model_info", version="1") == 0 and metric(text, "vae_model_info", version="2") == 1


async def test_broken_and_tampered_versions_are_refused_while_the_old_one_serves(repo):
    async with serving(repo, reload_interval=0) as (_, client):
        half = repo / "digits" / "2"
        half.mkdir()
        (half / "encoder.onnx").write_bytes(b"still copying")
        report = (await client.post("/admin/reload")).json()
        assert "no manifest" in report["refused"]["digits/2"]
        assert (await client.post("/admin/reload")).json()["refused"] == {}  # unchanged: not retried or recounted
        shutil.rmtree(half)
        tampered = copy_model(repo, "digits", 2, repo / "digits" / "1")
        with (tampered / "weights.safetensors").open("r+b") as f:
            f.seek(200)
            f.write(b"\x00\x01\x02")
        report = (await client.post("/admin/reload")).json()
        assert "does not match its sha256" in report["refused"]["digits/2"]
        listing = (await client.get("/models")).json()
        assert listing["models"][0]["latest"] == 1 and "digits/2" in listing["refused"]
        r = await client.post("/encode", json={"inputs": digits_rows(1).tolist()})
        assert r.status_code == 200 and r.json()["version"] == 1
        shutil.rmtree(tampered)
        copy_model(repo, "digits", 2, repo / "digits" / "1")  # mended: tried again, and loads
        report = (await client.post("/admin/reload")).json()
        assert report["loaded"] == ["digits/2"] and (await client.get("/models")).json()["refused"] == {}
        text = (await client.get("/metrics")).text
    assert metric(text, "vae_model_load_failures_total", version="2") == 2


async def test_signing_on_refuses_unsigned_and_foreign_signed_versions(repo, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    assert train_main(["keygen", str(keys / "ours")]) == 0
    generate_keypair(keys / "theirs.key", keys / "theirs.pub")
    assert (keys / "ours.key").stat().st_mode & 0o077 == 0
    assert train_main(["sign", str(repo / "digits" / "1"), "--key", str(keys / "ours.key")]) == 0
    async with serving(repo, reload_interval=0, trusted_keys=keys / "ours.pub") as (_, client):
        assert (await client.get("/models")).json()["models"][0]["versions"] == [1]
        unsigned = copy_model(repo, "digits", 2, repo / "digits" / "1")
        (unsigned / "model.sig").unlink()
        assert "unsigned" in (await client.post("/admin/reload")).json()["refused"]["digits/2"]
        assert train_main(["sign", str(unsigned), "--key", str(keys / "theirs.key")]) == 0
        assert "does not verify" in (await client.post("/admin/reload")).json()["refused"]["digits/2"]
        assert train_main(["sign", str(unsigned), "--key", str(keys / "ours.key")]) == 0
        assert (await client.post("/admin/reload")).json()["loaded"] == ["digits/2"]
        edited = copy_model(repo, "digits", 3, repo / "digits" / "2")  # signed bytes changed after signing
        assert "does not verify" in (await client.post("/admin/reload")).json()["refused"]["digits/3"]
        r = await client.post("/encode", json={"inputs": digits_rows(1).tolist()})
        assert r.json()["version"] == 2
        assert edited.exists()


def test_training_signs_its_export(tmp_path):
    assert train_main(["keygen", str(tmp_path / "k")]) == 0
    assert train_main(["keygen", str(tmp_path / "k")]) == 2  # never overwrites a key
    assert train_main(["--dataset", "digits", "--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--no-progress",
                       "--output", str(tmp_path / "m"), "--name", "s", "--checkpoint", str(tmp_path / "c.pt"),
                       "--sign", str(tmp_path / "k.key")]) == 0
    folder = tmp_path / "m" / "s" / "1"
    trusted = load_public_keys(tmp_path / "k.pub")
    open_folder(folder, check_signature=partial(verify_signature, trusted=trusted))


def forged_decoder(genuine: Path, target: Path) -> None:
    """The same graph, inputs and outputs as `genuine`, with every weight negated: a forgery of its shape."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(genuine))
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(model, str(target))


@pytest.fixture
def signed(repo, tmp_path):
    """digits/1 and a copy as digits/2, both signed with a key the server trusts; the forged decoder beside."""
    assert train_main(["keygen", str(tmp_path / "k")]) == 0
    staged = copy_model(tmp_path / "staging", "digits", 2, repo / "digits" / "1")
    for folder in (repo / "digits" / "1", staged):
        assert train_main(["sign", str(folder), "--key", str(tmp_path / "k.key")]) == 0
    forged_decoder(staged / "decoder.onnx", tmp_path / "forged.onnx")
    return staged, tmp_path / "forged.onnx", tmp_path / "k.pub"


def flipping(path: Path, a: bytes, b: bytes, stop: threading.Event, *, link: bool = False) -> threading.Thread:
    """A thread that swaps `path` between contents a and b (renamed in whole, or as a symlink) until stopped."""
    sources = [path.with_name(f".{path.name}.{i}") for i in range(2)]
    for source, data in zip(sources, (a, b), strict=True):
        source.write_bytes(data)

    def swap(i: int) -> None:
        tmp = path.with_name(f".{path.name}.swap")
        if link:
            tmp.symlink_to(sources[i % 2].resolve())
        else:
            shutil.copyfile(sources[i % 2], tmp)
        os.replace(tmp, path)

    def run() -> None:
        i = 1
        while not stop.is_set():
            swap(i)
            i += 1

    swap(0)  # the path is already what the thread makes of it before anyone reads it
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def decoded(client, version: int, z: np.ndarray) -> np.ndarray:
    r = await client.post("/decode", json={"latents": z.tolist(), "version": version})
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["outputs"])


@pytest.mark.parametrize("link", [False, True], ids=["renamed", "symlinked"])
async def test_a_graph_swapped_while_reload_runs_never_serves_the_forgery(repo, signed, link):
    """The attack: decoder.onnx flips between the signed file and a forged graph while reload reads it.

    Sixteen rounds of copy, flip, reload until loaded, check, remove: a loader that hashed one read and
    built the graph from another would serve the forgery in about a quarter of them."""
    staged, forged, public = signed
    z = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    genuine = Reference(staged).decode(z)
    (forged_out,) = ort.InferenceSession(str(forged)).run(None, {"z": z})
    assert not np.allclose(forged_out * 16.0, genuine, atol=1e-2)  # the forgery would be visible
    target = repo / "digits" / "2"
    async with serving(repo, reload_interval=0, trusted_keys=public) as (_, client):
        for _ in range(16 if not link else 2):
            shutil.copytree(staged, target)
            stop = threading.Event()
            thread = flipping(target / "decoder.onnx", (staged / "decoder.onnx").read_bytes(), forged.read_bytes(),
                              stop, link=link)
            reports = []
            try:
                for _ in range(40):  # each flip changes the file, so a refused version is tried again
                    reports.append((await client.post("/admin/reload")).json())
                    if reports[-1]["loaded"]:
                        break
            finally:
                stop.set()
                thread.join()
            refusals = [r["refused"]["digits/2"] for r in reports if r["refused"]]
            if link:
                assert not any(r["loaded"] for r in reports) and refusals, reports
                assert all("decoder.onnx is a symbolic link" in why for why in refusals), refusals
            else:  # a read that caught the genuine file loads it; one that caught the forgery fails its hash
                assert reports[-1]["loaded"] == ["digits/2"], reports
                assert all("decoder.onnx does not match its sha256" in why for why in refusals), refusals
                np.testing.assert_allclose(await decoded(client, 2, z), genuine, atol=1e-4)
            shutil.rmtree(target)
            assert (await client.post("/admin/reload")).json()["models"] == {"digits": [1]}


async def test_a_signed_version_with_a_graph_replaced_after_signing_is_refused(repo, signed):
    staged, forged, public = signed
    shutil.copyfile(forged, staged / "decoder.onnx")
    async with serving(repo, reload_interval=0, trusted_keys=public) as (_, client):
        shutil.copytree(staged, repo / "digits" / "2")
        report = (await client.post("/admin/reload")).json()
        assert "decoder.onnx does not match its sha256" in report["refused"]["digits/2"]
        z = np.zeros((1, 8), dtype=np.float32)
        np.testing.assert_allclose(await decoded(client, 1, z), Reference(repo / "digits" / "1").decode(z), atol=1e-4)
