"""Reading a version folder: only regular files inside it, each read once, used as hashed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from service.folder import open_folder, read_manifest
from service.manifest import ManifestError
from tests.service_helpers import DEFAULT_MODEL


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return Path(shutil.copytree(DEFAULT_MODEL, tmp_path / "digits" / "1"))


def test_the_blobs_are_the_bytes_the_manifest_hashes(folder):
    verified = open_folder(folder, keep=["decoder.onnx"])
    assert verified.blobs == {"decoder.onnx": (folder / "decoder.onnx").read_bytes()}
    assert verified.manifest.name == "digits"


def test_a_file_the_manifest_does_not_list_cannot_be_kept(folder):
    with pytest.raises(ManifestError, match=r"does not list \['extra.bin'\]"):
        open_folder(folder, keep=["extra.bin"])


def test_a_symlinked_graph_is_refused_even_when_it_points_at_the_right_bytes(folder, tmp_path):
    real = tmp_path / "decoder.onnx"
    shutil.move(folder / "decoder.onnx", real)
    (folder / "decoder.onnx").symlink_to(real)
    with pytest.raises(ManifestError, match="decoder.onnx is a symbolic link"):
        read_manifest(folder)


def test_a_symlinked_manifest_is_refused(folder, tmp_path):
    shutil.move(folder / "model.json", tmp_path / "model.json")
    (folder / "model.json").symlink_to(tmp_path / "model.json")
    with pytest.raises(ManifestError, match="model.json is a symbolic link"):
        read_manifest(folder)


def test_a_symlinked_version_or_model_folder_is_refused(folder, tmp_path):
    (tmp_path / "digits" / "2").symlink_to(folder, target_is_directory=True)
    with pytest.raises(ManifestError, match="2 is a symbolic link"):
        read_manifest(tmp_path / "digits" / "2")
    (tmp_path / "alias").symlink_to(tmp_path / "digits", target_is_directory=True)
    with pytest.raises(ManifestError, match="alias is a symbolic link"):
        read_manifest(tmp_path / "alias" / "1")


def test_a_fifo_in_place_of_a_graph_is_refused_without_waiting_for_a_writer(folder):
    (folder / "encoder.onnx").unlink()
    os.mkfifo(folder / "encoder.onnx")
    with pytest.raises(ManifestError, match="encoder.onnx is not a regular file"):
        read_manifest(folder)


def test_a_missing_folder_says_so(tmp_path):
    with pytest.raises(ManifestError, match="no such folder"):
        read_manifest(tmp_path / "nope" / "1")
