"""Reading one model version folder so that the bytes that were verified are the bytes that are used.

Every file is opened once, relative to the version folder's own descriptor and without following
links, checked to be a regular file, read, and hashed from those bytes; the graphs are then built
from the same bytes in memory. A file swapped, renamed or linked between the check and the load
cannot be served, because there is no second read of any path. Symbolic links (the folder itself,
or any file in it) and anything that is not a regular file are refused: a model folder holds copies.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from service.manifest import GRAPH_FILES, MANIFEST_FILE, Manifest, ManifestError, parse_manifest
from service.runtime import Graph, Runtime, load_graph
from service.signing import SIGNATURE_FILE

# O_NONBLOCK: a FIFO planted as a graph file must not hang the reload waiting for a writer.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_CHUNK = 1 << 20
_FIX = "copy the real file into the version folder"
_FIX_FOLDER = "copy the folder itself into the model repository"

# Checks the manifest's exact bytes against the signature's bytes (None: no signature file).
SignatureCheck = Callable[[Path, bytes, bytes | None], None]


@dataclass(frozen=True)
class ModelFolder:
    """A version folder as verified: its manifest, and the files asked for, byte for byte as hashed."""

    path: Path
    manifest: Manifest
    blobs: dict[str, bytes] = field(repr=False)


def _open_dir(folder: Path) -> int:
    if folder.parent.is_symlink():
        raise ManifestError(f"{folder.parent} is a symbolic link; vaeserve serves only real folders ({_FIX_FOLDER})")
    try:
        return os.open(folder, _DIR_FLAGS)
    except FileNotFoundError:
        raise ManifestError(f"{folder}: no such folder") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and folder.is_symlink():
            raise ManifestError(f"{folder} is a symbolic link; vaeserve serves only real folders "
                                f"({_FIX_FOLDER})") from None
        raise ManifestError(f"{folder}: cannot open: {e.strerror}") from None


def _open_file(dir_fd: int, folder: Path, name: str) -> int | None:
    """A descriptor for a regular file `name` directly in the folder, or None when there is none."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ManifestError(f"{folder}: {name} is a symbolic link; vaeserve reads only regular files "
                                f"inside the version folder ({_FIX})") from None
        raise ManifestError(f"{folder}: cannot read {name}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ManifestError(f"{folder}: {name} is not a regular file ({_FIX})")
    return fd


def _read(fd: int, digest: hashlib._Hash | None = None, keep: bool = True) -> bytes:
    chunks = []
    with os.fdopen(fd, "rb", closefd=True) as f:
        while chunk := f.read(_CHUNK):
            if digest is not None:
                digest.update(chunk)
            if keep:
                chunks.append(chunk)
    return b"".join(chunks)


def open_folder(folder: Path, *, keep: Iterable[str] = (), check_signature: SignatureCheck | None = None
                ) -> ModelFolder:
    """Read and verify a version folder; `keep` names the listed files whose bytes the caller will use.

    The manifest is parsed from the bytes the signature was checked on; every file the manifest lists
    is hashed as it is read (a file not kept is streamed, not held).
    """
    wanted = set(keep)
    dir_fd = _open_dir(folder)
    try:
        fd = _open_file(dir_fd, folder, MANIFEST_FILE)
        if fd is None:
            raise ManifestError(f"{folder}: no manifest")
        raw = _read(fd)
        if check_signature is not None:
            sig_fd = _open_file(dir_fd, folder, SIGNATURE_FILE)
            check_signature(folder, raw, None if sig_fd is None else _read(sig_fd))
        manifest = parse_manifest(folder / MANIFEST_FILE, raw)
        unknown = wanted - set(manifest.files)
        if unknown:
            raise ManifestError(f"{folder}: the manifest does not list {sorted(unknown)}")
        blobs: dict[str, bytes] = {}
        for name, expected in manifest.files.items():
            fd = _open_file(dir_fd, folder, name)
            if fd is None:
                raise ManifestError(f"{folder}: {name} is listed in the manifest but missing")
            digest = hashlib.sha256()
            data = _read(fd, digest, keep=name in wanted)
            if digest.hexdigest() != expected:
                raise ManifestError(f"{folder}: {name} does not match its sha256 in the manifest")
            if name in wanted:
                blobs[name] = data
        return ModelFolder(folder, manifest, blobs)
    finally:
        os.close(dir_fd)


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a folder whose every listed file matches its sha256."""
    return open_folder(folder).manifest


def open_graphs(folder: Path, runtime: Runtime = "onnx", device: str = "cpu",
                threads: int = 0) -> tuple[Manifest, Graph, Graph]:
    """The verified manifest, and its encoder and decoder built from the verified bytes."""
    names = GRAPH_FILES["encoder", runtime], GRAPH_FILES["decoder", runtime]
    verified = open_folder(folder, keep=names)
    return (verified.manifest, load_graph(verified.blobs[names[0]], runtime, device, threads),
            load_graph(verified.blobs[names[1]], runtime, device, threads))
