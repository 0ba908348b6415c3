"""`appliance init` and the cache storage: a local directory from argv, an Azure connection
string only from the environment, a file or standard input; judged and reached before
anything is written; sealed with the master key where the process server and apply read
it; never shown."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from replication_appliance.storage import store_for_data_dir
from replication_appliance.storage.azure_blob import AzureBlobStore
from replication_appliance.storage.local import LocalStore

from tests.fixtures.azurite import ACCOUNT, ACCOUNT_KEY
from tests.fixtures.ports import free_port

from .test_cli import init_args

ENV = "APPLIANCE_STORAGE_CONNECTION_STRING"
SEALED = Path("private") / "storage-connection.sealed"


def init(d: Path, *extra: str, env: dict | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != ENV}
    return subprocess.run(["appliance", *init_args(d, *extra)], capture_output=True, text=True, timeout=120, input=stdin,
                          check=False, env={**clean, "APPLIANCE_ADMIN_PASSWORD": "cli-operator-password", **(env or {})})


def files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_connection_string_from_stdin_is_checked_sealed_and_never_shown(tmp_path, azurite, monkeypatch):
    d = tmp_path / "data"
    done = init(d, "--storage-file", "-", stdin=azurite.connection_string + "\n")
    assert done.returncode == 0, done.stderr
    assert f"Azure Blob account {ACCOUNT} (http://127.0.0.1:{azurite.port}/{ACCOUNT})" in done.stdout
    for out in (done.stdout, done.stderr):
        assert ACCOUNT_KEY not in out
    assert stat.S_IMODE((d / SEALED).stat().st_mode) == 0o600
    assert files_holding(d, ACCOUNT_KEY) == []
    monkeypatch.delenv(ENV, raising=False)
    store = store_for_data_dir(d)  # what serve, the process server and apply open
    assert isinstance(store, AzureBlobStore)
    store.put_blob("init-storage-test/probe", b"through the sealed string", {})
    assert store.get_blob("init-storage-test/probe")[0] == b"through the sealed string"


def test_connection_string_from_the_environment(tmp_path, azurite, monkeypatch):
    d = tmp_path / "data"
    done = init(d, "--storage-from-env", env={ENV: azurite.connection_string})
    assert done.returncode == 0, done.stderr
    monkeypatch.delenv(ENV, raising=False)
    assert isinstance(store_for_data_dir(d), AzureBlobStore)
    assert files_holding(d, ACCOUNT_KEY) == []


def test_local_directory(tmp_path, monkeypatch):
    d, storage = tmp_path / "data", tmp_path / "laptop-storage"
    done = init(d, "--storage", str(storage))
    assert done.returncode == 0, done.stderr
    assert f"storage       {storage} (sealed" in done.stdout
    monkeypatch.delenv(ENV, raising=False)
    store = store_for_data_dir(d)
    assert isinstance(store, LocalStore) and store.root == storage


def test_connection_string_in_argv_is_refused_without_echo(tmp_path):
    d = tmp_path / "data"
    done = init(d, "--storage", f"AccountName=x;AccountKey={ACCOUNT_KEY}")
    assert done.returncode == 2
    assert "must not be given on the command line" in done.stderr and "--storage-from-env" in done.stderr
    assert ACCOUNT_KEY not in done.stderr + done.stdout
    assert not d.exists()


@pytest.mark.parametrize("value, message", [
    ("AccountName=x;AcountKey=abcd", "unknown key 'AcountKey'"),
    ("AccountName=x", "names no account: it needs AccountName= and AccountKey=, or BlobEndpoint="),
    ("AccountName=x;AccountKey=not*base64!", "AccountKey is not base64"),
    ("AccountName=x;AccountKey=abcd;BlobEndpoint=ftp://host/x", "BlobEndpoint is not an http(s) URL"),
    ("AccountName=x;AccountKey;BlobEndpoint=http://h/x", "part 2 is not Key=value"),
])
def test_malformed_connection_strings_get_a_clear_error_and_leave_nothing(tmp_path, value, message):
    d = tmp_path / "data"
    done = init(d, "--storage-from-env", env={ENV: value})
    assert done.returncode == 1, done.stdout
    assert message in done.stderr and "Traceback" not in done.stderr
    for part in ("abcd", "not*base64!", "ftp://host"):
        assert part not in done.stderr
    assert not d.exists()


def test_empty_connection_string_on_stdin(tmp_path):
    done = init(tmp_path / "data", "--storage-file", "-", stdin="  \n")
    assert done.returncode == 1 and "storage setting is empty" in done.stderr
    assert not (tmp_path / "data").exists()


def test_unreachable_storage_is_refused_before_anything_is_written(tmp_path):
    d = tmp_path / "data"
    closed = free_port()
    value = (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
             f"BlobEndpoint=http://127.0.0.1:{closed}/{ACCOUNT};")
    done = init(d, "--storage-file", "-", stdin=value)
    assert done.returncode == 1
    assert f"cache storage Azure Blob account {ACCOUNT} (http://127.0.0.1:{closed}/{ACCOUNT}) is not usable" in done.stderr
    assert "unreachable" in done.stderr and ACCOUNT_KEY not in done.stderr
    assert not d.exists()


def test_wrong_account_key_is_refused(tmp_path, azurite):
    d = tmp_path / "data"
    wrong = azurite.connection_string.replace(ACCOUNT_KEY, "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=")
    done = init(d, "--storage-file", "-", stdin=wrong)
    assert done.returncode == 1 and "is not usable" in done.stderr, done.stderr
    assert not d.exists()


def test_unreadable_storage_file_and_missing_environment(tmp_path):
    d = tmp_path / "data"
    missing = init(d, "--storage-file", str(tmp_path / "nope"))
    assert missing.returncode == 1 and f"cannot read the storage connection string file {tmp_path / 'nope'}" in missing.stderr
    unset = init(d, "--storage-from-env")
    assert unset.returncode == 1 and f"--storage-from-env: {ENV} is not set or empty" in unset.stderr
    assert not d.exists()


def test_storage_directory_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    done = init(tmp_path / "data", "--storage", str(blocker / "storage"))
    assert done.returncode == 1 and f"storage directory {blocker / 'storage'} cannot be created" in done.stderr
    assert not (tmp_path / "data").exists()
