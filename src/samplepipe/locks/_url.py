"""`lock_manager_from_url`: a lock manager from a URL or ``SAMPLEPIPE_LOCKS``."""

from __future__ import annotations

import math
import os
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from ._base import ENV_VAR
from ._files import CrashSafeFileLocks, default_lock_dir
from ._redis import RedisLocks, redacted

_FORMS = (
    "None or '' (file locks in the default folder), 'file:///absolute/folder' "
    "(file locks there), or 'redis://host:port/db' (also rediss:// and "
    "unix:///path/to/socket?db=N; optional '?lease_seconds=S') for Redis locks "
    "shared by several hosts"
)


def lock_manager_from_url(url: str | None = None) -> CrashSafeFileLocks | RedisLocks:
    """The lock manager that ``url`` (or ``SAMPLEPIPE_LOCKS``) names.

    Parameters
    ----------
    url : str or None, default=None
        None reads the environment variable ``SAMPLEPIPE_LOCKS``. Then:
        None or ``""``: `CrashSafeFileLocks` in `default_lock_dir`;
        ``file:///absolute/folder``: `CrashSafeFileLocks` in that folder;
        ``redis://host:port/db``, ``rediss://...`` or
        ``unix:///path/to/socket?db=N``: `RedisLocks`, with the query
        parameter ``lease_seconds`` (default 30) taken out as its lease.

    Returns
    -------
    manager : CrashSafeFileLocks or RedisLocks
        Created without touching the folder or contacting the server.

    Raises
    ------
    TypeError
        ``url`` is not a string.
    ValueError
        Any other form of URL, or a bad ``lease_seconds``.

    Examples
    --------
    >>> from samplepipe.locks import lock_manager_from_url
    >>> lock_manager_from_url("file:///var/lib/samplepipe/locks")
    CrashSafeFileLocks('/var/lib/samplepipe/locks')
    >>> lock_manager_from_url("redis://10.0.0.5:6379/2")
    RedisLocks('redis://10.0.0.5:6379/2', lease_seconds=30.0)
    >>> lock_manager_from_url("http://example.org")
    Traceback (most recent call last):
    ...
    ValueError: lock_manager_from_url got url='http://example.org'; expected ...
    """
    where = "url"
    if url is None:
        url = os.environ.get(ENV_VAR)
        where = f"{ENV_VAR} (from the environment)"
    if not url:
        return CrashSafeFileLocks(default_lock_dir())
    if not isinstance(url, str):
        msg = f"lock_manager_from_url got url={url!r}; expected a string or None."
        raise TypeError(msg)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file" and parts.netloc in ("", "localhost"):
        folder = unquote(parts.path)
        if os.path.isabs(folder) and not parts.query:
            return CrashSafeFileLocks(folder)
    elif scheme in ("redis", "rediss", "unix"):
        query = parse_qsl(parts.query, keep_blank_values=True)
        leases = [v for k, v in query if k == "lease_seconds"]
        # Rebuilt by hand: urlunsplit drops the empty host of unix:///path.
        others = urlencode([(k, v) for k, v in query if k != "lease_seconds"])
        rest = url.partition("?")[0] + (f"?{others}" if others else "")
        if not leases:
            return RedisLocks(rest)
        try:
            lease = float(leases[-1])
        except ValueError:
            lease = math.nan
        if math.isfinite(lease) and lease > 0:
            return RedisLocks(rest, lease_seconds=lease)
        msg = (
            f"lock_manager_from_url got {where}={redacted(url)!r} with "
            f"lease_seconds={leases[-1]!r}; expected a number of seconds > 0."
        )
        raise ValueError(msg)
    msg = f"lock_manager_from_url got {where}={redacted(url)!r}; expected {_FORMS}."
    raise ValueError(msg)
