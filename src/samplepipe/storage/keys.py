"""Sample keys and step names: validation, digests and sub-folder buckets."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

MAX_COMPONENT = 200  # bytes; leaves room for the extension and a temporary suffix
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# the common key: ASCII names, no component starting with "."
_PLAIN_KEY = r"[A-Za-z0-9_\-]+(?:/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)*"
_PLAIN = re.compile(_PLAIN_KEY + r"\Z")
# keys joined by newlines, each of the common form
_PLAIN_LINES = re.compile(rf"(?:{_PLAIN_KEY}\n)*\Z")


def check_keys(
    keys: Sequence[Any], start: int = 0, owner: str = "CheckpointWrapper"
) -> None:
    """`check_key` of each of ``keys`` (at positions from ``start``).

    Keys of the common form (ASCII names, at most 200 characters, no
    dot-first component) are checked at once, in C; any other key by
    `check_key`, which names the rule it breaks.
    """
    try:
        joined = "\n".join(keys)
    except TypeError:  # not all str: check_key names the first one
        joined = None
    if (
        joined is not None
        and joined.count("\n") == len(keys) - 1
        and max(map(len, keys), default=0) <= MAX_COMPONENT
        and _PLAIN_LINES.match(joined + "\n")
    ):
        return
    for i, key in enumerate(keys, start):
        check_key(key, i, owner)


def check_key(
    key: Any, index: int | None = None, owner: str = "CheckpointWrapper"
) -> str:
    """Validate a sample key; return it. Raise ``ValueError`` naming the rule.

    A key is a relative path of ``/``-separated components. Rejected: a missing
    or non-string key, the empty string, C0 and C1 control characters (NUL,
    U+0080-U+009F, ...), a backslash, an absolute path, empty, ``.`` or ``..``
    components, components starting with ``.`` (reserved for temporary files),
    components longer than 200 bytes, strings that are not valid UTF-8 and, on
    Windows only, a drive prefix such as ``C:``. ``"a..b"`` and ``"a:b"`` are
    valid keys.

    Examples
    --------
    >>> check_key("subject_01/sample_07")
    'subject_01/sample_07'
    >>> check_key("../evil")
    Traceback (most recent call last):
    ...
    ValueError: CheckpointWrapper got key '../evil' for a sample; keys must be ...
    """
    where = f"sample {index}" if index is not None else "a sample"
    rule = _key_rule(key)
    if rule:
        msg = f"{owner} got key {key!r} for {where}; {rule}."
        raise ValueError(msg)
    return key


def _key_rule(key: Any) -> str | None:
    if not isinstance(key, str):
        return "keys must be strings (give every sample a str 'key' attribute)"
    if len(key) <= MAX_COMPONENT and _PLAIN.match(key) and "/../" not in key + "/":
        return None  # the common case: ASCII names, no dot-first components
    if not key:
        return "keys must not be empty"
    if _CONTROL.search(key):
        return "keys must not contain NUL or other control characters"
    if "\\" in key:
        return "keys must not contain a backslash; use '/' to make sub-folders"
    if key.startswith("/"):
        return "keys must be relative paths, not absolute ones"
    if os.name == "nt" and _WINDOWS_DRIVE.match(key):
        return "keys must not start with a drive prefix such as 'C:'"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "keys must be valid UTF-8 text"
    for part in key.split("/"):
        if part in ("", ".", ".."):
            return (
                "keys must be normalised relative paths inside 'features_dir' "
                "without empty, '.' or '..' components"
            )
        if part.startswith("."):
            return (
                "key components must not start with '.' (reserved for temporary files)"
            )
        if len(part.encode("utf-8")) > MAX_COMPONENT:
            return (
                f"each '/'-separated part of a key must be at most {MAX_COMPONENT} "
                "bytes long"
            )
    return None


def check_step_name(name: Any, owner: str = "pipeline") -> str:
    """Validate a pipeline step name used as a folder name; return it.

    Step names follow the key rules and must be one path component (no ``/``).
    """
    rule = _key_rule(name)
    if rule is None and "/" in name:
        rule = "step names must be a single folder name without '/'"
    if rule:
        rule = rule.replace("keys", "step names").replace(
            "key components", "step names"
        )
        msg = f"{owner} has a step named {name!r}; {rule}. Rename the step."
        raise ValueError(msg)
    return name


def is_url(path: Any) -> bool:
    """Whether ``path`` looks like a URL (``s3://``, ``file://``, ...)."""
    return isinstance(path, str) and bool(_URL.match(path))


def sample_keys(samples: Sequence[Any], owner: str = "CheckpointWrapper") -> list[str]:
    """Checked keys of ``samples``; duplicates raise ``ValueError``."""
    keys: list[str] = []
    append = keys.append
    for i, s in enumerate(samples):
        try:
            append(s.key)
        except AttributeError:
            if s is None:
                msg = f"{owner} got None instead of a sample at index {i}."
            else:
                msg = (
                    f"{owner} got sample {i} without a 'key' attribute ({s!r}); "
                    "give every sample a unique str key, e.g. Sample(data, "
                    "key='id-1')."
                )
            raise ValueError(msg) from None
    check_keys(keys, 0, owner)
    if len(set(keys)) != len(keys):
        seen: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key in seen:
                msg = (
                    f"{owner} got key {key!r} for samples {seen[key]} and {i}; keys "
                    "must be unique within one call."
                )
                raise ValueError(msg)
            seen[key] = i
    return keys


def keys_digest(keys: Iterable[str]) -> str:
    """SHA-256 of an ordered list of strings; its cost grows with the keys only."""
    h = hashlib.sha256()
    keys = keys if isinstance(keys, list) else list(keys)
    if keys:  # each key followed by NUL, hashed at once
        h.update("\0".join(keys).encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def hash_string(key: str, n_buckets: int = 1000) -> str:
    """A sub-folder name that spreads keys evenly over ``n_buckets`` folders.

    Pass ``hash_fn=samplepipe.hash_string`` to `CheckpointWrapper` when one folder
    would hold too many files. The name is the bucket number, zero-padded to the
    width of ``n_buckets - 1``, from a BLAKE2b digest of the key.

    Examples
    --------
    >>> hash_string("subject_0001/sample_07")
    '361'
    >>> hash_string("subject_0001/sample_07", n_buckets=10)
    '1'
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    width = len(str(n_buckets - 1))
    return f"{int.from_bytes(digest, 'big') % n_buckets:0{width}d}"
