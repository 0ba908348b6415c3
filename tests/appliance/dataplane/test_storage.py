"""Both storage backends (Azurite and a local directory) behave the same."""
from __future__ import annotations

import pytest
from replication_appliance.storage import BlobNotFound, PreconditionFailed, StorageError, open_store


@pytest.fixture(params=["azurite", "local"])
def store(request, tmp_path):
    if request.param == "azurite":
        return open_store(request.getfixturevalue("azurite").connection_string)
    return open_store(str(tmp_path / "storage"))


def test_block_blobs(store):
    store.put_blob("logs/m/0/000000000001.log", b"one", {"key_id": "k"})
    store.put_blob("logs/m/0/000000000000.log", b"zero", {"key_id": "k"})
    store.put_blob("logs/m/0/000000000001.log", b"one again", {"key_id": "k2"})  # idempotent overwrite
    assert store.get_blob("logs/m/0/000000000001.log") == (b"one again", {"key_id": "k2"})
    assert [b.name for b in store.list_blobs("logs/m/0/")] == ["logs/m/0/000000000000.log", "logs/m/0/000000000001.log"]
    store.delete_blob("logs/m/0/000000000000.log")
    with pytest.raises(BlobNotFound):
        store.get_blob("logs/m/0/000000000000.log")


def test_page_blobs_snapshots_and_ranges(store):
    name = "replicas/m/disk0"
    store.create_page_blob(name, 1 << 20)
    store.create_page_blob(name, 1 << 20)  # idempotent
    with pytest.raises(StorageError, match="exists with size"):
        store.create_page_blob(name, 2 << 20)
    store.write_pages(name, 8192, b"a" * 4096)
    store.set_metadata(name, {"applied_seq": "7"})
    snap = store.snapshot(name, {"marker_seq": "7"})
    store.write_pages(name, 8192, b"b" * 512)
    store.clear_pages(name, 8192 + 512, 512)
    assert store.read_pages(name, 8192, 1024) == b"b" * 512 + bytes(512)
    assert store.read_pages(name, 8192, 1024, snap) == b"a" * 1024
    assert store.get_metadata(name) == {"applied_seq": "7"}
    [info] = store.list_snapshots(name)
    assert info.snapshot_id == snap and info.metadata == {"marker_seq": "7"}
    covered = sum(e - s for s, e in store.page_ranges(name, snap))
    assert 4096 <= covered < (1 << 20)
    with pytest.raises(StorageError, match="multiples of 512"):
        store.write_pages(name, 100, b"x" * 512)
    store.delete_snapshot(name, snap)
    assert store.list_snapshots(name) == []


def test_a_page_blob_is_resized_and_cleared_whole_while_its_snapshots_and_metadata_stay(store):
    """A resized disk's replica is resized; a disk replaced at the same index starts from an
    empty replica (cleared whole), its earlier recovery points kept."""
    name = "replicas/m/disk1"
    store.create_page_blob(name, 1 << 20)
    store.write_pages(name, 0, b"a" * 4096)
    store.set_metadata(name, {"applied_seq": "3"})
    snap = store.snapshot(name, {"marker_seq": "3"})
    store.resize_page_blob(name, 2 << 20)
    assert store.page_blob_size(name) == 2 << 20 and store.read_pages(name, 0, 4096) == b"a" * 4096
    store.write_pages(name, (2 << 20) - 4096, b"z" * 4096)  # the grown part takes writes
    store.clear_pages(name, 0, 2 << 20)
    assert store.page_ranges(name) == [] and store.read_pages(name, 0, 4096) == bytes(4096)
    assert store.page_blob_size(name) == 2 << 20 and store.get_metadata(name) == {"applied_seq": "3"}
    assert store.read_pages(name, 0, 4096, snap) == b"a" * 4096
    later = store.snapshot(name, {"marker_seq": "4"})
    store.resize_page_blob(name, 1 << 19)  # shrunk
    assert [(s.snapshot_id, s.size) for s in store.list_snapshots(name)] == [(snap, 1 << 20), (later, 2 << 20)]
    assert store.page_blob_size(name) == 1 << 19
    with pytest.raises(StorageError, match="positive multiple of 512"):
        store.resize_page_blob(name, 1000)


def test_a_conditional_put_lands_only_over_the_version_it_was_given(store):
    name = "state/conditional.json"  # not under machines/: Azurite is shared by the session's tests
    assert store.blob_etag(name) is None
    first = store.put_blob_if(name, b"v1", {}, None)  # only if absent
    assert store.blob_etag(name) == first and store.get_blob(name)[0] == b"v1"
    with pytest.raises(PreconditionFailed):
        store.put_blob_if(name, b"v1 again", {}, None)
    second = store.put_blob_if(name, b"v2", {}, first)
    assert second != first and store.blob_etag(name) == second
    with pytest.raises(PreconditionFailed):  # a put carried out late, against the version before
        store.put_blob_if(name, b"v1 late", {}, first)
    assert store.get_blob(name)[0] == b"v2"


def test_bad_connection_string_is_not_echoed():
    with pytest.raises(StorageError) as e:
        open_store("AccountName=x;AccountKey=SECRETVALUE;BlobEndpoint=not a url")
    assert "SECRETVALUE" not in str(e.value)
