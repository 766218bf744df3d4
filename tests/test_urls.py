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
