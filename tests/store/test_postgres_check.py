"""[store] url: a URL that does not parse, a server that refuses the credentials and one that
does not answer are each told apart by `lambdaemon check`, against a private cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.errors import ConfigError
from tests.mosquitto import free_port
from tests.postgres import Postgres

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def cluster(pg_cluster: Postgres) -> Postgres:
    return pg_cluster  # the session's (tests/conftest.py)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def write(tmp_path: Path, store: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"[store]\n{store}")
    return path


def store_table(url: str, password_file: Path | str | None = None) -> str:
    text = f'url = "{url}"\n'
    if password_file is not None:
        text += f'password_file = "{password_file}"\n'
    return text


def test_check_connects_with_the_password_file(cluster, tmp_path):
    db = cluster.create_database()
    path = write(tmp_path, store_table(cluster.url(db), cluster.password_file))
    result = cli("check", "--config", str(path), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["store"].startswith("postgresql ")


def test_check_reads_the_password_as_a_credential(cluster, tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "pg").write_text(cluster.password)
    path = write(tmp_path, store_table(cluster.url(), "credential:pg"))
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds)}
    result = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "store: postgresql" in result.stdout


def test_check_says_the_server_refused_a_wrong_password(cluster, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    path = write(tmp_path, store_table(cluster.url(), wrong))
    result = cli("check", "--config", str(path))
    assert result.returncode == 78
    assert "store.password_file: the server refused lambdaemon@127.0.0.1" in result.stderr
    assert "password authentication failed" in result.stderr


def test_check_says_the_server_refused_a_missing_password(cluster, tmp_path):
    path = write(tmp_path, store_table(cluster.url()))
    result = cli("check", "--config", str(path))
    assert result.returncode == 78
    assert "the server refused lambdaemon@127.0.0.1" in result.stderr


def test_check_says_the_server_refused_an_unknown_user_or_database(cluster, tmp_path):
    for url in (cluster.url(user="nobody"), cluster.url("no_such_db")):
        path = write(tmp_path, store_table(url, cluster.password_file))
        result = cli("check", "--config", str(path))
        assert result.returncode == 78, result.stderr
        assert "the server refused" in result.stderr


def test_check_says_no_server_answers(tmp_path):
    password = tmp_path / "pw"
    password.write_text("x")
    url = f"postgresql://lambdaemon@127.0.0.1:{free_port()}/db"
    result = cli("check", "--config", str(write(tmp_path, store_table(url, password))))
    assert result.returncode == 69
    assert "store.url: cannot reach lambdaemon@127.0.0.1" in result.stderr


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("mysql://u@h/db", "is not postgresql://USER@HOST"),
        ("postgresql://u@h:99999/db", "is not postgresql://USER@HOST"),
        ("postgresql://u@/db", "names no host"),
        ("postgresql://h/db", "names no user"),
        ("postgresql://u@h", "names no database"),
        ("postgresql://u@h/a/b", "names no database"),
        ("postgresql://u:secret@h/db", "holds a password; put it in store.password_file"),
        ("postgresql://u@h/db?sslmode=maybe", "sslmode='maybe' is not one of"),
        ("postgresql://u@h/db?options=-cfoo", "unknown parameter 'options'"),
    ],
)
def test_a_url_that_does_not_parse_names_the_key(tmp_path, url, reason):
    path = write(tmp_path, store_table(url))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "store.url"
    assert reason in caught.value.reason
    result = cli("check", "--config", str(path))
    assert result.returncode == 78
    assert f"{path}: store.url:" in result.stderr


def test_a_password_file_needs_a_url_and_must_be_readable(tmp_path):
    (tmp_path / "pw").write_text("x")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, 'password_file = "pw"\n'))
    assert (caught.value.key, caught.value.reason) == (
        "store.password_file",
        "needs store.url (a PostgreSQL store)",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, store_table("postgresql://u@h/db", "missing")))
    assert caught.value.key == "store.password_file"
    assert "cannot read" in caught.value.reason


def test_the_url_becomes_libpq_parameters(tmp_path):
    from daemon.credentials import store_connection

    (tmp_path / "pw").write_text("s3cret\n")
    url = "postgres://app%40site@db.local:6543/fleet?sslmode=verify-full&sslrootcert=ca.pem"
    config = load_config(write(tmp_path, store_table(url, "pw")))
    assert store_connection(config) == {
        "host": "db.local",
        "port": "6543",
        "dbname": "fleet",
        "user": "app@site",
        "connect_timeout": "5",
        "sslmode": "verify-full",
        "sslrootcert": str((tmp_path / "ca.pem").resolve()),
        "password": "s3cret",
    }


def test_run_says_which_server_it_cannot_use(cluster, tmp_path):
    """`lambdaemon run` on PostgreSQL: a refused password is a config error (78), a server that
    does not answer is unavailable (69), each before anything is served."""
    wrong = tmp_path / "wrong"
    wrong.write_text("not-it\n")
    path = write(tmp_path, store_table(cluster.url(), wrong))
    result = cli("run", "--config", str(path))
    assert result.returncode == 78, result.stderr
    assert "store.password_file: the server refused" in result.stderr
    silent = f"postgresql://lambdaemon@127.0.0.1:{free_port()}/postgres"
    path = write(tmp_path, store_table(silent, cluster.password_file))
    result = cli("run", "--config", str(path))
    assert result.returncode == 69, result.stderr
    assert "store.url: cannot reach lambdaemon@127.0.0.1:" in result.stderr
