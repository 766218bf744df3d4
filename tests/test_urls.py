"""Store URLs as people see them: no password, no absolute path of this machine."""
import pytest

from ablate.urls import display_url, mask_text, mask_url


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
