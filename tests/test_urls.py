"""Store URLs as people see them: no password, no absolute path of this machine."""
import re
import uuid
from urllib.parse import quote, unquote

import pytest

from ablate.urls import MASK, display_url, mask_text, mask_url, split_credentials
from conftest import pg_role_stores, run_ablate, write_spec


@pytest.mark.parametrize("url, shown", [
    ("postgresql://user:secret@db.lab:5432/ablate", "postgresql://user:***@db.lab:5432/ablate"),
    ("postgresql+psycopg://u:p%40ss%2Fword@h/db", "postgresql+psycopg://u:***@h/db"),
    ("mysql://root@localhost/x", "mysql://root@localhost/x"),
    ("http://alice:hunter2@mlflow.lab:5000", "http://alice:***@mlflow.lab:5000"),
    ("postgresql://h/db?user=u&password=pw&sslmode=require", "postgresql://h/db?user=u&password=***&sslmode=require"),
    ("sqlite:///ablate-ledger.db", "sqlite:///ablate-ledger.db"),
    ("not a url", "not a url"),
])
def test_mask_url_hides_passwords(url, shown):
    assert mask_url(url) == shown


def test_display_url_shows_local_stores_relative(tmp_path):
    assert display_url(f"sqlite:///{tmp_path}/sub/mlflow.db", cwd=str(tmp_path)) == "sqlite:///sub/mlflow.db"
    assert display_url("sqlite:////elsewhere/mlflow.db", cwd=str(tmp_path)) == "sqlite:////elsewhere/mlflow.db"
    assert display_url("postgresql://u:pw@h/db", cwd=str(tmp_path)) == "postgresql://u:***@h/db"


def test_mask_text_hides_passwords_inside_messages():
    url = "postgresql://u:s%40cret@db/x?password=qp-secret"
    text = ("cannot open postgresql://u:s%40cret@db/x: FATAL password s@cret rejected; "
            "also qp-secret and http://alice:hunter2@mlflow:5000/api")
    masked = mask_text(text, url)
    assert "s%40cret" not in masked and "s@cret" not in masked and "qp-secret" not in masked
    assert "hunter2" not in masked and "http://alice:***@mlflow:5000/api" in masked
    assert "postgresql://u:***@db/x" in masked
    assert mask_text("no secrets here", "sqlite:///x.db", "not a url") == "no secrets here"


@pytest.mark.parametrize("url, shown", [
    # SQLAlchemy reads the password up to the "@": a "/" in it is no end of the host
    ("postgresql://u:pa/ss@h/db", "postgresql://u:***@h/db"),
    ("postgresql+psycopg://u:pa/ss@h:5432/db?sslmode=require", "postgresql+psycopg://u:***@h:5432/db?sslmode=require"),
    ("mysql+pymysql://root:a/b/c@localhost/x", "mysql+pymysql://root:***@localhost/x"),
    ("postgresql://u:pa/ss@h:notaport/db", "postgresql://u:***@h:notaport/db"),  # one SQLAlchemy cannot read
    ("sqlite+pysqlite:///x.db", "sqlite+pysqlite:///x.db"),
    ("https://alice:hunter2@mlflow.lab/api?token=t0k", "https://alice:***@mlflow.lab/api?token=***"),
])
def test_mask_url_reads_database_urls_as_sqlalchemy_does(url, shown):
    assert mask_url(url) == shown
    if "pa/ss" in url:  # a driver may quote the password alone
        assert "pa/ss" not in mask_text(f"cannot connect to {url}: password pa/ss refused", url)


def test_every_sqlite_driver_is_a_sqlite_file(tmp_path):
    from ablate.locks import sqlite_path, store_lock
    from ablate.urls import is_sqlite
    db = tmp_path / "x.db"
    for url in (f"sqlite:///{db}", f"sqlite+pysqlite:///{db}", f"SQLite:///{db}", f"sqlite:///{db}?timeout=5"):
        assert is_sqlite(url) and sqlite_path(url) == str(db)
        with store_lock(url):  # the lock every writer of the store takes
            assert (tmp_path / "x.db.lock").exists()
    assert sqlite_path("postgresql://h/db") is None and not is_sqlite("http://h:5000")
    assert display_url(f"sqlite+pysqlite:///{tmp_path}/sub/x.db", cwd=str(tmp_path)) == "sqlite+pysqlite:///sub/x.db"


# ---- hostile URLs: unencoded ?, #, /, @ and : in passwords, as libpq-style URLs carry them ----------

HOSTILE = [  # (url, its password as written or None, what mask_url shows)
    ("postgresql://postgres:pa?ssWORD@127.0.0.1:5432/db", "pa?ssWORD", "postgresql://postgres:***@127.0.0.1:5432/db"),
    ("postgresql://postgres:pa@ssWORD@127.0.0.1:5432/db", "pa@ssWORD", "postgresql://postgres:***@127.0.0.1:5432/db"),
    ("postgresql+psycopg://u:a?bq@cz#dx/ey:fw@db.lab:5432/ablate?sslmode=require", "a?bq@cz#dx/ey:fw",
     "postgresql+psycopg://u:***@db.lab:5432/ablate?sslmode=require"),
    ("postgresql://u:Qm%3Fss%40wd%25@h/db", "Qm%3Fss%40wd%25", "postgresql://u:***@h/db"),
    ("postgresql://u:Km@ssq@h1:5432,h2:5433/db?target_session_attrs=any", "Km@ssq",
     "postgresql://u:***@h1:5432,h2:5433/db?target_session_attrs=any"),
    ("postgres://u:Zq@x?y@[::1]:5432/db", "Zq@x?y", "postgres://u:***@[::1]:5432/db"),
    ("postgresql://u:Wv/x@/db?host=/var/run/postgresql", "Wv/x", "postgresql://u:***@/db?host=/var/run/postgresql"),
    ("mysql://root:r00tpw@@localhost/x", "r00tpw@", "mysql://root:***@localhost/x"),
    ("mysql+pymysql://root:Ja/b?c#d@localhost:3306/x?charset=utf8mb4", "Ja/b?c#d",
     "mysql+pymysql://root:***@localhost:3306/x?charset=utf8mb4"),
    ("mariadb://app:Hx:y:z@db:3306/x", "Hx:y:z", "mariadb://app:***@db:3306/x"),
    ("sqlite:///ledger@2024.db", None, "sqlite:///ledger@2024.db"),
    ("sqlite+pysqlite:////abs/x.db?timeout=5", None, "sqlite+pysqlite:////abs/x.db?timeout=5"),
    ("http://alice:hun@ter2@mlflow.lab:5000", "hun@ter2", "http://alice:***@mlflow.lab:5000"),
    ("https://alice:s3/cr?t#x@mlflow.lab/api?token=t0kq", "s3/cr?t#x", "https://alice:***@mlflow.lab/api?token=***"),
    ("https://tok:Vn@x%2F@mlflow.lab:443/", "Vn@x%2F", "https://tok:***@mlflow.lab:443/"),
    ("http://mlflow.lab:5000", None, "http://mlflow.lab:5000"),
    ("http://bob@mlflow.lab:5000/#/experiments/1", None, "http://bob@mlflow.lab:5000/#/experiments/1"),
    ("postgresql://u:@h/db", "", "postgresql://u:***@h/db"),
    # more than one @ could end the user information: all of it is masked
    ("postgresql://u:Gp@h/db?application_name=me@lab", "Gp@h/db?application_name=me", "postgresql://***@lab"),
    ("http://x/y:Rsec@ret@h:5000", "Rsec@ret", "http://***@h:5000"),
]


@pytest.mark.parametrize("url, password, shown", HOSTILE)
def test_hostile_urls_show_no_password_and_keep_the_rest(url, password, shown):
    assert mask_url(url) == shown
    assert display_url(url) == shown
    message = f"cannot open {url}: connection refused"
    assert mask_text(message) == f"cannot open {shown}: connection refused"  # a URL in a message, none given
    if password:
        decoded = unquote(password)
        for text in (mask_url(url), display_url(url), mask_text(message), mask_text(message, url),
                     mask_text(f"FATAL: password {decoded!r} rejected ({password})", url)):
            assert password not in text and decoded not in text, text


@pytest.mark.parametrize("url, misread", [
    # SQLAlchemy reads the password up to the first "@", and the rest as the host
    ("postgresql://postgres:pa@ssWORD@127.0.0.1:5432/db", "failed to resolve host 'ssWORD@127.0.0.1'"),
    # urllib3 (requests, MLflow's client) ends the authority at "?" or "/": the piece before it is the "host"
    ("http://alice:Pw?abc@Qzdef@127.0.0.1:5000", "Failed to parse: 'alice:Pw' is not a valid host or port"),
    ("http://alice:Sw/abc@Qzdef@127.0.0.1:5000", "Port could not be cast to integer value as 'Sw'"),
])
def test_pieces_of_a_misread_password_are_masked(url, misread):
    password = split_credentials(url).password
    masked = mask_text(misread, url)
    assert MASK in masked
    for piece in re.split(r"[@:/?#]", password):
        assert len(piece) < 2 or not re.search(rf"(?<!\w){re.escape(piece)}(?!\w)", masked), masked
    assert mask_text("could not translate host name to address", url) == "could not translate host name to address"


def test_credentials_are_read_where_every_parser_could_find_them():
    parts = split_credentials("postgresql://u:a?b@c@h:5432/db?x=1")
    assert (parts.user, parts.password, parts.rest, parts.sure) == ("u", "a?b@c", "h:5432/db?x=1", True)
    assert split_credentials("sqlite:///a@b.db").userinfo is None
    assert split_credentials("not a url") is None
    assert not split_credentials("postgresql://u:p@h/db?user=me@lab").sure


@pytest.fixture
def pg_hostile_password():
    """A PostgreSQL role whose password holds "?" and "@", with a ledger and an MLflow database it
    owns (as tests/conftest.py's pg_secret_stores); yields (ledger_url, mlflow_url, password, pieces).
    The URLs carry "?" as is and "@" percent-encoded: SQLAlchemy ends a password at its first "@"."""
    secret = "k" + uuid.uuid4().hex[:9]
    password = f"Pw?{secret}@Qz{secret}"
    with pg_role_stores(password, written=password.replace("@", "%40")) as urls:
        yield urls + [password, (secret, f"Qz{secret}")]


def test_status_on_a_password_with_question_mark_and_at_prints_no_piece_of_it(tmp_path, pg_hostile_password):
    from ablate.ledger import Ledger
    ledger_url, mlflow_url, password, pieces = pg_hostile_password
    write_spec(tmp_path / "s.yaml")
    Ledger(ledger_url, "tiny")  # the spec's study: a real connection through the URL as written
    env = {"MLFLOW_TRACKING_URI": mlflow_url}
    result = run_ablate("status", "s.yaml", "--storage", ledger_url, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    shown = mask_url(ledger_url)
    assert shown == ledger_url.split(":Pw", 1)[0] + ":***@" + ledger_url.rsplit("@", 1)[1]  # the rest as written
    assert f"ledger {shown}; MLflow {mask_url(mlflow_url)}" in result.stdout, result.stdout
    # the same password unencoded: SQLAlchemy takes "Qz..." for part of the host; the error masks it
    raw = ledger_url.replace("%40", "@")
    refused = run_ablate("status", "s.yaml", "--storage", raw, cwd=tmp_path, env=env)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert f"ledger storage {mask_url(raw)}: cannot" in refused.stderr, refused.stderr
    for run in (result, refused):
        output = run.stdout + run.stderr
        for secret in (password, quote(password, safe=""), password.replace("@", "%40"), *pieces):
            assert secret not in output, output
