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

from sqlalchemy.engine import make_url

MASK = "***"
_SECRET_QUERY = re.compile(r"(?i)((?:^|&)(?:password|passwd|pwd|token|secret|access_token)=)[^&]*")
# user:PASSWORD@ inside free text; a database password may hold "/" (SQLAlchemy reads up to the "@")
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^\s:/@]*:)([^\s@]+)(@)")
#: the SQLAlchemy backends a store URL may name (``sqlite``, ``postgresql+psycopg``, ...)
DATABASE_BACKENDS = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "mssql", "oracle")


# SQLAlchemy's reading of user:password@ in a database URL (sqlalchemy.engine.url._parse_url)
_DB_PASSWORD = re.compile(r"^([\w+]+://[^:/]*:)[^@]*@")


def _backend(url: str) -> str:
    return url.split("://", 1)[0].split("+", 1)[0].lower() if "://" in url else ""


def database_url(url: str):
    """``url`` parsed by SQLAlchemy's ``make_url`` when it names a database (any driver:
    ``sqlite+pysqlite://``), else None: the one reading of a database URL that the stores use."""
    if _backend(url) not in DATABASE_BACKENDS:
        return None
    try:
        return make_url(url)
    except Exception:  # ArgumentError, ValueError (a bad port): not a URL SQLAlchemy can read
        return None


def is_sqlite(url: str) -> bool:
    """Whether ``url`` is a SQLite database URL, whatever its driver (``sqlite+pysqlite:///x.db``)."""
    parsed = database_url(url)
    return parsed is not None and parsed.get_backend_name().lower() == "sqlite"


def absolute_sqlite(url: str, base: str | os.PathLike | None = None) -> str:
    """``url`` with a relative SQLite file made absolute against ``base`` (default: the working
    directory), its driver and query kept; any other URL as it is."""
    parsed = database_url(url)
    if parsed is None or parsed.get_backend_name().lower() != "sqlite":
        return url
    path = parsed.database
    if not path or path == ":memory:" or path.startswith("file:") or os.path.isabs(path):
        return url
    _, qmark, query = url.partition("?")
    return f"{parsed.drivername}:///{os.path.abspath(os.path.join(base or os.getcwd(), path))}{qmark}{query}"


def mask_url(url: str) -> str:
    """``url`` with any password (``user:PASSWORD@host``, ``?password=...``) replaced by ``***``.

    A database URL is read as SQLAlchemy reads it (its password ends at the ``@``, ``/``
    included); any other URL (an MLflow server's) as a URL, its user information ending at the
    first ``/``.
    """
    if not url or "://" not in url:
        return url
    parsed = database_url(url)
    if parsed is not None:
        if parsed.password is not None:
            head = parsed.set(query={}).render_as_string(hide_password=True)
            _, qmark, query = url.partition("?")
            url = head + qmark + query
    elif _backend(url) in DATABASE_BACKENDS:  # one SQLAlchemy cannot read (a bad port): its rule, by hand
        url = _DB_PASSWORD.sub(lambda m: m.group(1) + MASK + "@", url, count=1)
    else:
        scheme, rest = url.split("://", 1)
        netloc, sep, tail = rest.partition("/")
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}{colon}{MASK if colon else ''}@{hostport}"
        url = f"{scheme}://{netloc}{sep}{tail}"
    path, qmark, query = url.partition("?")
    if qmark:
        url = path + qmark + _SECRET_QUERY.sub(lambda m: m.group(1) + MASK, query)
    return url


def display_url(url: str, cwd: str | None = None) -> str:
    """:func:`mask_url`, and a SQLite file under ``cwd`` shown relative to it."""
    masked = mask_url(url)
    parsed = database_url(url)
    if parsed is not None and parsed.get_backend_name().lower() == "sqlite" and parsed.database \
            and os.path.isabs(parsed.database):
        path, cwd = parsed.database, os.path.abspath(cwd or os.getcwd())
        if path == cwd or path.startswith(cwd.rstrip(os.sep) + os.sep):
            _, qmark, query = masked.partition("?")
            return f"{parsed.drivername}:///{os.path.relpath(path, cwd)}{qmark}{query}"
    return masked


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
    found = set()
    if _backend(url) in DATABASE_BACKENDS:  # as SQLAlchemy reads it: up to the "@", as written and decoded
        parsed, m = database_url(url), _DB_PASSWORD.match(url)
        password = m.group(0)[len(m.group(1)):-1] if m else None
        found.add(parsed.password if parsed is not None and parsed.password else "")
    else:
        try:
            password = urlsplit(url).password
        except ValueError:  # not a URL after all (a bad port): nothing to take from it
            password = None
    found |= {password or "", unquote(password or "")}
    for m in _SECRET_QUERY.finditer(url.partition("?")[2]):
        value = m.group(0)[len(m.group(1)):]
        found |= {value, unquote(value)}
    return found - {""}


def storage_option(url: str | None) -> tuple[str, ...]:
    """``--storage URL`` for a printed command, credentials masked; nothing for the default store."""
    return ("--storage", display_url(url)) if url else ()
