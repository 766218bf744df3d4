"""Store URLs as they may be shown: passwords masked, local paths relative to the working directory.

A URL printed to a terminal, written into a report or logged to MLflow is read by people who
must not learn a database password from it; a report must not carry the absolute path of the
machine that made it. Use :func:`mask_url` for anything that leaves the process, and
:func:`display_url` for what a person reads.
"""
from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit

MASK = "***"
_SECRET_QUERY = re.compile(r"(?i)((?:^|&)(?:password|passwd|pwd|token|secret|access_token)=)[^&]*")
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^\s:/@]*:)([^\s@/]+)(@)")


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


def mask_text(text: str, *urls: str) -> str:
    """``text`` (an error message, a log line) with the password of every URL in it masked, and
    the passwords of ``urls`` masked wherever they appear: a database driver may quote one alone."""
    text = _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(3), text)
    for url in urls:
        for secret in _secrets(url):
            text = text.replace(secret, MASK)
    return text


def _secrets(url: str) -> set[str]:
    """The password of ``url`` (as written and decoded) and its secret query values."""
    if not url or "://" not in url:
        return set()
    try:
        password = urlsplit(url).password
    except ValueError:  # not a URL after all (a bad port): nothing to take from it
        password = None
    found = {password or "", unquote(password or "")}
    for m in _SECRET_QUERY.finditer(url.partition("?")[2]):
        value = m.group(0)[len(m.group(1)):]
        found |= {value, unquote(value)}
    return found - {""}


def storage_option(url: str | None) -> tuple[str, ...]:
    """``--storage URL`` for a printed command, credentials masked; nothing for the default store."""
    return ("--storage", display_url(url)) if url else ()
