"""API keys: off unless VAE_API_KEYS_FILE names a file of key hashes.

The file holds one key per line as its sha256 (hex), optionally followed by a name for the logs:
    3f1c...e9a0 billing-pipeline
Blank lines and `#` comments are skipped. Only hashes are stored, so the file is no secret itself.
A request presents its key as `Authorization: Bearer <key>` or `X-API-Key: <key>`; its hash is
compared with every stored hash in constant time. Keys never reach a log or an error message.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

HASH_LINE = re.compile(r"^([0-9a-fA-F]{64})(?:\s+(\S.*))?$")
OPEN_PATHS = frozenset({"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"})
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
DOC_ASSETS = "/docs-assets/"  # Swagger UI's and ReDoc's scripts, served with the package (no CDN)


class KeyFileError(ValueError):
    """The keys file cannot be used; the service refuses to start rather than run unprotected."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, entries: Iterable[tuple[str, str]]):
        """entries: (sha256 hex, name)."""
        self._entries = [(bytes.fromhex(digest), name) for digest, name in entries]
        if not self._entries:
            raise KeyFileError("the API keys file holds no key; add one (vae-serve new-key) or unset VAE_API_KEYS_FILE")

    @classmethod
    def from_file(cls, path: Path) -> KeyRing:
        try:
            text = path.read_text()
        except OSError as e:
            raise KeyFileError(f"VAE_API_KEYS_FILE {path}: {e.strerror}") from None
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            match = HASH_LINE.match(line)
            if match is None:
                raise KeyFileError(f"VAE_API_KEYS_FILE {path}, line {number}: expected a sha256 hex digest and an "
                                   "optional name (store hashes, never keys: vae-serve new-key prints the line)")
            entries.append((match[1].lower(), match[2] or f"key{number}"))
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, presented: str | None) -> str | None:
        """The matching key's name, or None. Every stored hash is compared, so timing says nothing."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for stored, name in self._entries:
            if hmac.compare_digest(stored, digest):
                found = name
        return found


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key from raw ASGI headers: `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    for name, value in headers:
        if name == b"x-api-key":
            return value.decode("latin-1").strip()
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return None


def needs_key(path: str, *, protect_metrics: bool, protect_docs: bool) -> bool:
    if path in OPEN_PATHS:
        return False
    if path == "/metrics":
        return protect_metrics
    if path in DOC_PATHS or path.startswith(DOC_ASSETS):
        return protect_docs
    return True


def new_key_main(argv: list[str] | None = None) -> int:
    """`vae-serve new-key`: a fresh random key, and the line for VAE_API_KEYS_FILE."""
    p = argparse.ArgumentParser(prog="vae-serve new-key", description=new_key_main.__doc__)
    p.add_argument("--name", default="client", help="a name for the key, shown in logs instead of the key")
    args = p.parse_args(argv)
    if not re.fullmatch(r"\S+", args.name):
        p.error("--name must be one word")
    key = secrets.token_urlsafe(32)
    print(f"key (give it to the client; it is not stored): {key}")
    print(f"line for VAE_API_KEYS_FILE: {hash_key(key)} {args.name}")
    return 0
