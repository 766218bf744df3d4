"""Store URLs as they may be shown: passwords masked, local paths relative to the working directory.

A URL printed to a terminal, written into a report or logged to MLflow is read by people who
must not learn a database password from it; a report must not carry the absolute path of the
machine that made it. Use :func:`mask_url` for anything that leaves the process,
:func:`display_url` for what a person reads and :func:`mask_text` for a message that may quote
a URL (a driver's error).

Where the credentials of a URL are is decided once, by :func:`split_credentials`, for every
scheme (``postgresql+psycopg``, ``mysql``, ``sqlite``, an MLflow server's ``https``): people
paste passwords unencoded, and the parsers disagree about them. SQLAlchemy reads the password up
to the first ``@`` (``?``, ``#`` and ``/`` included), libpq and ``urllib`` stop the user
information at the first ``/`` (``urllib`` also at ``?`` and ``#``) and take its last ``@``. So
the user information is read as ending at the LAST ``@`` before the host part, and the password
as everything after the first ``:`` of it: whatever any of them would send as a password lies
in there. Where that reading is not sure (the user name holds ``/``, ``?`` or ``#``, or more
than one ``@`` could end it, one of them inside a query value) the whole user information is
masked.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import unquote

from sqlalchemy.engine import make_url

MASK = "***"
_SECRET_QUERY = re.compile(r"(?i)((?:^|[&;])(?:password|passwd|pwd|token|secret|access_token|api_key)=)[^&;#]*")
#: the SQLAlchemy backends a store URL may name (``sqlite``, ``postgresql+psycopg``, ...)
DATABASE_BACKENDS = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "mssql", "oracle")

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(.*)\Z", re.S)
# one host: an [IPv6] literal, or a name or IPv4 address (possibly empty: libpq's socket default),
# with its port as written (a bad one too); libpq takes a comma-separated list of them
_HOST = r"(?:\[[0-9A-Za-z:.%_-]*\]|[^\s/?#@\[\]:,]*)(?::[^\s/?#@,]*)?"
_HOST_PART = re.compile(rf"{_HOST}(?:,{_HOST})*(?=[/?#]|\Z)")
# a host part, a path and a query whose last value runs to the end: an @ after it may be the query's
_INTO_QUERY = re.compile(rf"{_HOST}(?:,{_HOST})*(?:/[^?#]*)?\?(?:[^#]*&)?[\w.%-]+=[^&#]*\Z")
# a URL inside free text: from its scheme to the next blank
_URL_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://\S+")
# where parsers cut a password they misread: its pieces may turn up as a host, a port, a database
_PIECES = re.compile(r"[@:/?#\[\],&=;]")
_MIN_PIECE = 2


@dataclass(frozen=True)
class Credentials:
    """A URL cut where its credentials are: ``head`` + user information + ``@`` + ``rest``.

    ``userinfo`` is None where the URL has none; ``user`` and ``password`` are as written
    (``password`` None where there is no ``:``); ``sure`` is False where the reading is a guess,
    and then the whole user information is to be masked.
    """
    head: str                 # "postgresql+psycopg://"
    userinfo: Optional[str]
    user: Optional[str]
    password: Optional[str]
    rest: str                 # the host part and what follows it, as written
    sure: bool = True


def split_credentials(url: str) -> Optional[Credentials]:
    """Where the user information of ``url`` ends (see the module's doc); None if ``url`` is no
    ``scheme://...`` URL."""
    m = _SCHEME.match(url or "")
    if m is None:
        return None
    head, after = m.groups()
    if after.startswith("/") or "@" not in after:  # no authority (sqlite:///FILE), or no user information
        return Credentials(head, None, None, None, after)
    # the @ that ends the user information: the last one followed by a host part
    ends = [i for i, c in enumerate(after) if c == "@" and _HOST_PART.match(after, i + 1)]
    if not ends:  # no host part after any @: nothing here is readable as one
        userinfo, _, rest = after.rpartition("@")
        return Credentials(head, userinfo, None, None, rest, sure=False)
    end = ends[-1]
    userinfo, rest = after[:end], after[end + 1:]
    user, colon, password = userinfo.partition(":")
    # unsure: an earlier @ and its host part would put this @ in a query value (?application_name=me@lab),
    # or the user name holds what ends a host part
    sure = not any(_INTO_QUERY.match(after, i + 1, end) for i in ends[:-1]) and not re.search(r"[/?#\s]", user)
    return Credentials(head, userinfo, user, password if colon else None, rest, sure)


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


def _mask_query(rest: str) -> str:
    """``rest`` (a URL past its user information) with the values of secret query keys masked."""
    path, qmark, query = rest.partition("?")
    return path + qmark + _SECRET_QUERY.sub(lambda m: m.group(1) + MASK, query) if qmark else rest


def mask_url(url: str) -> str:
    """``url`` with any password (``user:PASSWORD@host``, ``?password=...``) replaced by ``***``,
    the rest as written; the whole user information where it cannot be read for sure
    (:func:`split_credentials`). Anything that is not a ``scheme://`` URL is returned as it is."""
    parts = split_credentials(url)
    if parts is None:
        return url
    if parts.userinfo is None:
        head = parts.head
    elif not parts.sure:
        head = f"{parts.head}{MASK}@"
    elif parts.password is None:
        head = f"{parts.head}{parts.user}@"
    else:
        head = f"{parts.head}{parts.user}:{MASK}@"
    return head + _mask_query(parts.rest)


def display_url(url: str, cwd: str | None = None) -> str:
    """:func:`mask_url`, and a SQLite file under ``cwd`` shown relative to it."""
    masked = mask_url(url)
    parsed = database_url(url)
    if parsed is not None and parsed.get_backend_name().lower() == "sqlite" and parsed.database \
            and os.path.isabs(parsed.database) and split_credentials(url).userinfo is None:
        path, cwd = parsed.database, os.path.abspath(cwd or os.getcwd())
        if path == cwd or path.startswith(cwd.rstrip(os.sep) + os.sep):
            _, qmark, query = masked.partition("?")
            return f"{parsed.drivername}:///{os.path.relpath(path, cwd)}{qmark}{query}"
    return masked


def mask_text(text: str, *urls: str) -> str:
    """``text`` (an error message, a log line) with every URL in it masked as :func:`mask_url`
    does, and the passwords of ``urls`` masked wherever they appear: a driver may quote one
    alone, or a piece of one it misread as a host, a port or a database name."""
    text = _URL_IN_TEXT.sub(_mask_in_text, text)
    whole, pieces = set(), set()
    for url in urls:
        w, p = _secrets(url)
        whole |= w
        pieces |= p
    for secret in sorted(whole, key=len, reverse=True):
        text = text.replace(secret, MASK)
    for piece in sorted(pieces - whole, key=len, reverse=True):  # a piece where it stands alone, not inside a word
        text = re.sub(rf"(?<!\w){re.escape(piece)}(?!\w)", MASK, text)
    return text


def _mask_in_text(m: re.Match) -> str:
    """A URL found in text, masked; the punctuation that closes a sentence after it kept as it is
    (it comes after the last "@", so never out of a password)."""
    token = m.group(0)
    core = token.rstrip(".,;:!)'\">")
    return mask_url(core) + token[len(core):]


def _secrets(url: str) -> tuple[set[str], set[str]]:
    """(secrets, pieces): the password of ``url`` as written and decoded (the whole user
    information where its reading is not sure) and its secret query values; and the pieces of
    the password between the characters where a parser may cut it (``@``, ``:``, ``/``, ...)."""
    parts = split_credentials(url)
    if parts is None:
        return set(), set()
    found = set()
    secret = parts.password if parts.sure else (parts.userinfo if parts.userinfo is not None else None)
    if secret:
        found |= {secret, unquote(secret)}
    for m in _SECRET_QUERY.finditer(parts.rest.partition("?")[2]):
        value = m.group(0)[len(m.group(1)):]
        found |= {value, unquote(value)}
    found -= {""}
    pieces = {piece for s in found for piece in _PIECES.split(s) if len(piece) >= _MIN_PIECE}
    if parts.userinfo is not None and not parts.sure and parts.user:  # the user name alone is no secret
        pieces -= {parts.user}
    return found, pieces


def storage_option(url: str | None) -> tuple[str, ...]:
    """``--storage URL`` for a printed command, credentials masked; nothing for the default store."""
    return ("--storage", display_url(url)) if url else ()
