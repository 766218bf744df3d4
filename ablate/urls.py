"""Store URLs as they may be shown: passwords masked, local paths relative to the working directory.

A URL printed to a terminal, written into a report or logged to MLflow is read by people who
must not learn a database password from it; a report must not carry the absolute path of the
machine that made it. Use :func:`mask_url` for anything that leaves the process, and
:func:`display_url` for what a person reads.
"""
from __future__ import annotations

import os
import re

MASK = "***"
_SECRET_QUERY = re.compile(r"(?i)((?:^|&)(?:password|passwd|pwd|token|secret|access_token)=)[^&]*")


def mask_url(url: str) -> str:
    """``url`` with any password (``user:PASSWORD@host``, ``?password=...``) replaced by ``***``."""
    if not url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    netloc, sep, tail = rest.partition("/")
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{colon}{MASK if colon else ''}@{hostport}"
    path, qmark, query = tail.partition("?")
    if qmark:
        tail = path + qmark + _SECRET_QUERY.sub(lambda m: m.group(1) + MASK, query)
    return f"{scheme}://{netloc}{sep}{tail}"


def display_url(url: str, cwd: str | None = None) -> str:
    """:func:`mask_url`, and a ``sqlite:///`` file under ``cwd`` shown relative to it."""
    url = mask_url(url)
    prefix = "sqlite:///"
    if url.startswith(prefix) and os.path.isabs(url[len(prefix):]):
        path, cwd = url[len(prefix):], os.path.abspath(cwd or os.getcwd())
        if path == cwd or path.startswith(cwd.rstrip(os.sep) + os.sep):
            return prefix + os.path.relpath(path, cwd)
    return url
