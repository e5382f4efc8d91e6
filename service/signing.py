"""Signed model folders: an Ed25519 signature over `model.json`, beside it as `model.sig`.

The manifest lists the sha256 of every other file, so signing its exact bytes signs the whole
folder. Part of the export contract: `training` signs (`vae-train --sign KEY`, `vae-train sign`),
the service verifies when VAE_TRUSTED_KEYS names the public keys it trusts.
Keys are PEM files: the private key PKCS#8, the public keys SubjectPublicKeyInfo (several may be
concatenated in one trusted-keys file).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from service.manifest import MANIFEST_FILE, ManifestError

SIGNATURE_FILE = "model.sig"
_PEM_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


def generate_keypair(private_path: Path, public_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    private_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    private_path.chmod(0o600)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_keys(path: Path) -> list[Ed25519PublicKey]:
    """Every PEM public key in the file; at least one, all Ed25519."""
    try:
        blocks = _PEM_BLOCK.findall(path.read_bytes())
    except OSError as e:
        raise ValueError(f"VAE_TRUSTED_KEYS {path}: {e.strerror}") from None
    keys = []
    for block in blocks:
        key = serialization.load_pem_public_key(block)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"VAE_TRUSTED_KEYS {path}: every key must be Ed25519")
        keys.append(key)
    if not keys:
        raise ValueError(f"VAE_TRUSTED_KEYS {path}: no PEM public key found")
    return keys


def sign_folder(folder: Path, key: Ed25519PrivateKey) -> None:
    """Write `model.sig` for the manifest as it is now."""
    signature = key.sign((folder / MANIFEST_FILE).read_bytes())
    (folder / SIGNATURE_FILE).write_text(base64.b64encode(signature).decode() + "\n")


def verify_signature(folder: Path, manifest: bytes, signature: bytes | None,
                     trusted: list[Ed25519PublicKey]) -> None:
    """Raise ManifestError unless the `model.sig` bytes verify these manifest bytes under a trusted key.

    Both are the bytes the caller read once (service.folder), so what is verified is what is used."""
    if signature is None:
        raise ManifestError(f"{folder}: unsigned ({SIGNATURE_FILE} missing) and VAE_TRUSTED_KEYS requires a "
                            "signature")
    try:
        decoded = base64.b64decode(signature.strip(), validate=True)
    except ValueError:
        raise ManifestError(f"{folder}: {SIGNATURE_FILE} is not base64") from None
    for key in trusted:
        try:
            key.verify(decoded, manifest)
            return
        except InvalidSignature:
            continue
    raise ManifestError(f"{folder}: the signature does not verify under any key in VAE_TRUSTED_KEYS")
