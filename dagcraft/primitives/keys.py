"""Validation of store keys, key segments and relative paths.

Every key the primitives write is built from validated segments, so a user-supplied name can
never escape its namespace (no ``..``, no absolute path, no separator smuggled into a segment)
and can always be stored on both backends (S3 keys are at most 1024 UTF-8 bytes).
Invalid input raises :class:`~dagcraft.errors.InvalidInput` with a one-line message.
"""

from __future__ import annotations

import re
import unicodedata

from dagcraft.errors import InvalidInput

MAX_SEGMENT = 200
MAX_KEY_BYTES = 1024


def _bad_char(value: str) -> str | None:
    if value.isprintable():  # the common case, in C: printable excludes every Cc character
        return None
    for ch in value:
        if ch == "\x00":
            return "NUL"
        if unicodedata.category(ch) == "Cc":
            return "a control character"
    return None


def validate_segment(value: object, what: str = "name") -> str:
    """Return ``value`` if it is one valid path segment, else raise InvalidInput.

    Valid: a non-empty str of at most 200 characters, without ``/`` or ``\\``, NUL or control
    characters, and not ``.`` or ``..``. Step ids such as ``review[reviewer=security]`` and
    ``implement[0]`` are valid.
    """
    if not isinstance(value, str):
        raise InvalidInput(f"invalid {what} {value!r}: must be a string")
    if not value:
        raise InvalidInput(f"invalid {what} {value!r}: must not be empty")
    if len(value) > MAX_SEGMENT:
        raise InvalidInput(f"invalid {what} {value[:40]!r}...: longer than {MAX_SEGMENT} characters")
    if value in (".", ".."):
        raise InvalidInput(f"invalid {what} {value!r}: '.' and '..' are not allowed")
    if "/" in value or "\\" in value:
        raise InvalidInput(f"invalid {what} {value!r}: must not contain '/' or '\\'")
    bad = _bad_char(value)
    if bad:
        raise InvalidInput(f"invalid {what} {value!r}: must not contain {bad}")
    return value


MAX_RUN_ID = 128
_RUN_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def validate_run_id(value: object) -> str:
    """Return ``value`` if it is a valid run id, else raise InvalidInput (exit 2).

    The one rule for run ids: 1-128 characters of ASCII letters, digits, ``_``, ``-`` and
    ``.``, starting with a letter, digit or ``_``. So a run id is always one key segment,
    never contains the ``~`` that separates the ULID in ``runs-index/`` entries, never looks
    like a command-line flag, and prints safely in a terminal or HTML report."""
    if not isinstance(value, str):
        raise InvalidInput(f"invalid run id {value!r}: must be a string")
    if not value or len(value) > MAX_RUN_ID or not _RUN_ID_RE.fullmatch(value):
        shown = repr(value) if len(value) <= 60 else repr(value[:40]) + "..."
        raise InvalidInput(f"invalid run id {shown}: use 1-{MAX_RUN_ID} letters, digits, '_', '-' and '.', "
                           "starting with a letter, digit or '_'")
    return value


def validate_key(key: object, what: str = "key") -> str:
    """Return ``key`` if it is a valid ``/``-separated store key whose every segment is valid."""
    if isinstance(key, str) and key.isascii() and key.isprintable() and "\\" not in key \
            and len(key) <= MAX_KEY_BYTES:
        # the common case, decided with C string methods (status reads 10,000 keys): printable
        # ASCII has no NUL or control character and one byte per character; what is left of
        # the segment rules is no empty, '.' or '..' segment (nor a leading '/') and each
        # segment's length. Anything else: the checks below, which say what is wrong.
        k = f"/{key}/"
        if "//" not in k and "/./" not in k and "/../" not in k \
                and (len(key) <= MAX_SEGMENT or max(map(len, key.split("/"))) <= MAX_SEGMENT):
            return key
    if not isinstance(key, str) or not key:
        raise InvalidInput(f"invalid {what} {key!r}: must be a non-empty string")
    if key.startswith("/"):
        raise InvalidInput(f"invalid {what} {key!r}: must not be absolute")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidInput(f"invalid {what} {key[:40]!r}...: longer than {MAX_KEY_BYTES} bytes")
    for seg in key.split("/"):
        if not seg:
            raise InvalidInput(f"invalid {what} {key!r}: empty path segment")
        try:
            validate_segment(seg, what)
        except InvalidInput as exc:
            raise InvalidInput(f"invalid {what} {key!r}: {str(exc).split(': ', 1)[-1]}") from None
    return key


def validate_prefix(prefix: object) -> str:
    """A list prefix: empty, or a key (possibly ending with ``/``) made of valid segments."""
    if prefix == "":
        return ""
    if not isinstance(prefix, str):
        raise InvalidInput(f"invalid prefix {prefix!r}")
    body = prefix[:-1] if prefix.endswith("/") else prefix
    validate_key(body, "prefix")
    return prefix


def validate_relpath(path: object, what: str = "path") -> str:
    """Return ``path`` if it is a relative path without ``..``, absolute parts, NUL or control
    characters (artifact names, workdir-relative paths). Segments are separated by ``/``."""
    if not isinstance(path, str) or not path:
        raise InvalidInput(f"invalid {what} {path!r}: must be a non-empty string")
    if path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        raise InvalidInput(f"invalid {what} {path!r}: must be relative")
    validate_key(path, what)
    return path


def join(*parts: str) -> str:
    """Join already-validated key parts with ``/``."""
    return "/".join(p.strip("/") for p in parts if p)
