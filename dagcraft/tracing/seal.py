"""Run seals: one digest over a finished run's committed trace heads, optionally signed.

Each step commit pins the hash of its trace's last line (``AttemptInfo.trace_head``); the
transition that finishes the run records :func:`digest` of every step's committed result and
heads (the material is built by ``orchestrator.model.seal_material``). With a signing key, the
digest is signed with Ed25519, so someone who can rewrite the bucket — traces, step states and
control alike — but lacks the key cannot produce a run that verifies against the public key.

Guarantees:
- The private key is read from a file (``--signing-key FILE``) or from ``$DAGCRAFT_SIGNING_KEY``
  (the PEM text). It is never written to the store, a log or a trace: only the signature and
  the public key's id (:func:`key_id`) are recorded. :func:`take_signer` removes the variable
  from this process's environment, so the step commands a worker starts do not inherit it.
- Error messages name the file or the variable, never the key material.
- Signatures are over ``dagcraft-run-seal-v1:<digest>``, never over caller-chosen bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dagcraft.errors import InvalidInput

if TYPE_CHECKING:  # imported where a key is used: a worker without a signing key never loads it
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNING_KEY_ENV = "DAGCRAFT_SIGNING_KEY"
_CONTEXT = b"dagcraft-run-seal-v1:"
#: a PEM key is a few hundred bytes; refuse to slurp a wrongly named large file
_MAX_KEY_FILE = 64 << 10


def digest(material: Any) -> str:
    """SHA-256 hex of the canonical JSON of ``material`` (sorted keys, no spaces, ASCII)."""
    data = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(data.encode("ascii")).hexdigest()


def key_id(public: Ed25519PublicKey) -> str:
    """A short public fingerprint: the first 16 hex digits of SHA-256 of the raw public key."""
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Signer:
    """Signs run digests with one Ed25519 private key. Its repr shows only the key id."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.key_id = key_id(key.public_key())

    def sign(self, run_digest: str) -> str:
        """The base64 signature of ``run_digest``."""
        return base64.b64encode(self._key.sign(_CONTEXT + run_digest.encode("ascii"))).decode("ascii")

    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)

    def __repr__(self) -> str:
        return f"Signer(key_id={self.key_id!r})"


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise InvalidInput(f"{what} {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_KEY_FILE:
        raise InvalidInput(f"{what} {path}: larger than {_MAX_KEY_FILE} bytes; not a PEM key")
    return data


def _private_from(data: bytes, source: str) -> Signer:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise InvalidInput(f"{source}: not an unencrypted PEM private key "
                           f"(make one with `dagcraft trace keygen`)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidInput(f"{source}: not an Ed25519 key")
    return Signer(key)


def load_signer(path: str | Path | None = None, env: MutableMapping[str, str] | None = None) -> Signer | None:
    """The signer from ``path`` if given, else from ``$DAGCRAFT_SIGNING_KEY`` in ``env``
    (default ``os.environ``), else None. InvalidInput (exit 2) for an unreadable or non-Ed25519
    key."""
    if path is not None:
        p = Path(path)
        return _private_from(_read_key_file(p, "signing key"), f"signing key {p}")
    environ = os.environ if env is None else env
    text = environ.get(SIGNING_KEY_ENV)
    if not text:
        return None
    return _private_from(text.encode("utf-8", "replace"), f"${SIGNING_KEY_ENV}")


def take_signer(path: str | Path | None = None) -> Signer | None:
    """:func:`load_signer`, then remove ``$DAGCRAFT_SIGNING_KEY`` from this process's
    environment, so that child processes (step commands) never inherit the key."""
    signer = load_signer(path)
    os.environ.pop(SIGNING_KEY_ENV, None)
    return signer


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (``SubjectPublicKeyInfo``, as ``dagcraft trace
    keygen`` or ``openssl pkey -pubout`` write it). InvalidInput (exit 2) otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    p = Path(path)
    data = _read_key_file(p, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise InvalidInput(f"public key {p}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidInput(f"public key {p}: not an Ed25519 key")
    return key


def check_signature(public: Ed25519PublicKey, run_digest: str, signature: str) -> bool:
    """Whether ``signature`` (base64) is ``public``'s signature of ``run_digest``."""
    from cryptography.exceptions import InvalidSignature

    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
        public.verify(raw, _CONTEXT + run_digest.encode("ascii"))
    except (InvalidSignature, binascii.Error, ValueError, UnicodeEncodeError):
        return False
    return True


def generate_key(private_out: Path, public_out: Path) -> str:
    """Write a new Ed25519 key pair (private key 0600, never overwriting a file); returns its
    key id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    signer = Signer(key)
    for path in (private_out, public_out):
        if os.path.lexists(path):
            raise InvalidInput(f"{path} already exists; not overwriting a key")
    for path, data, mode in ((private_out, priv, 0o600), (public_out, signer.public_pem(), 0o644)):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise InvalidInput(f"{path} already exists; not overwriting a key") from None
        except OSError as exc:
            raise InvalidInput(f"cannot write {path}: {exc.strerror}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return signer.key_id
