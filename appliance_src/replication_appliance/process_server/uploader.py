"""Ships sealed segments to cache storage: split per disk, zstd, AES-256-GCM with the disk's
data key, bounded concurrency, retries with backoff. The local segment is deleted only after
every disk's blob is stored. Blob names come from the segment number, so an upload repeated
after a restart overwrites the same blob with the same records and cannot apply twice. The
machine's manifest (manifests.py) is in storage before any of a segment's blobs."""
from __future__ import annotations

import logging
import random
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..common.errors import DatabaseError
from ..dataplane.manifest import ManifestError
from ..dataplane.segment import (
    FORMAT,
    FORMAT_V2,
    SegmentError,
    blob_name,
    seal,
    split_by_disk,
    valid_prefix,
)
from ..dataplane.session import MachineRecord
from ..storage.base import BlobStore, StorageError
from ..storage.keyring import DataKeyring
from .journal import SealedSegment
from .manifests import Manifests
from .stats import Stats

log = logging.getLogger(__name__)


def _checked_size(seg: SealedSegment, disk: int, size_now: int) -> int | None:
    """The size the segment's records of `disk` were checked against: the journal's record
    (None: not recorded, a segment of an earlier version); a disk added since the segment was
    received has nothing in it, so its size now."""
    if seg.disk_sizes is None:
        return None
    return seg.disk_sizes[disk] if disk < len(seg.disk_sizes) else size_now


class Uploader:
    def __init__(self, store: BlobStore, keyring: DataKeyring, machine: Callable[[uuid.UUID], MachineRecord],
                 stats: Stats, concurrency: int = 4, zstd_level: int = 1,
                 backoff_initial: float = 0.5, backoff_max: float = 15.0) -> None:
        self._store = store
        self._keyring = keyring
        self._manifests = Manifests(store, machine)
        self._stats = stats
        # concurrency 0 keeps segments in the cache (benchmarks of ingest alone, maintenance)
        self._pool = ThreadPoolExecutor(max_workers=max(concurrency, 1), thread_name_prefix="upload")
        self._enabled = concurrency > 0
        self._level = zstd_level
        self._backoff = (backoff_initial, backoff_max)
        self._queued: set[tuple[uuid.UUID, int]] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def submit(self, seg: SealedSegment) -> None:
        key = (seg.machine, seg.segno)
        with self._lock:
            if key in self._queued or self._stopping.is_set() or not self._enabled:
                return
            self._queued.add(key)
        self._pool.submit(self._run, seg)

    def _run(self, seg: SealedSegment) -> None:
        """Until the segment is stored, or can never be: storage, the database and the cache
        disk come back, so every failure but a corrupt segment is retried with backoff."""
        delay = self._backoff[0]
        unexpected = 0
        while not self._stopping.is_set():
            try:
                if self._upload(seg):
                    self._stats.upload_ok(seg.size)
                break
            except SegmentError as e:  # retrying cannot mend it: keep it in the cache for the operator
                log.error("segment %d of %s cannot be uploaded, kept at %s: %s", seg.segno, seg.machine, seg.path, e)
                self._stats.segment_kept(seg.path, f"segment {seg.segno} of {seg.machine} kept in the cache: {e}")
                break
            except (StorageError, DatabaseError, ManifestError, OSError) as e:
                self._stats.upload_failed(f"{type(e).__name__}: {e}")
                log.warning("upload of %s segment %d failed (%s); retrying in %.1fs", seg.machine, seg.segno, e, delay)
            except Exception as e:  # a bug: say so once with its traceback, keep trying
                unexpected += 1
                if unexpected == 1:
                    log.exception("upload of %s segment %d failed unexpectedly; retrying", seg.machine, seg.segno)
                self._stats.upload_failed(f"internal error ({type(e).__name__}), see the process server log")
            self._stopping.wait(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self._backoff[1])
        with self._lock:
            self._queued.discard((seg.machine, seg.segno))

    def _upload(self, seg: SealedSegment) -> bool:
        """Store the segment's logs, then remove it; False: it was gone already."""
        try:
            data = seg.path.read_bytes()
        except FileNotFoundError:  # uploaded and removed since it was listed (handed over twice)
            return False
        _, last_seq = valid_prefix(data)
        manifest = self._manifests.for_segment(seg.machine, seg.segno, last_seq)
        parts = split_by_disk(data, len(manifest.disk_sizes))
        for disk, plain in enumerate(parts):
            key_id, key = self._keyring.current(seg.machine, disk)
            name = blob_name(seg.machine, disk, seg.segno)
            meta = {"key_id": key_id, "format": FORMAT, "segno": str(seg.segno), "last_seq": str(last_seq),
                    "plain_bytes": str(len(plain))}
            size = _checked_size(seg, disk, manifest.disk_sizes[disk])
            if size is None:  # a segment sealed by an earlier version: a log as it wrote them
                meta["format"] = FORMAT_V2
            else:
                meta["disk_size"] = str(size)
            self._store.put_blob(name, seal(plain, key, name, key_id, last_seq, size, self._level), meta)
        seg.remove()
        return True

    def forget(self, machine: uuid.UUID) -> None:
        """What is known of the machine's manifest is stale (it was served elsewhere meanwhile):
        read it again from storage at its next upload. Only with none of its segments here."""
        self._manifests.forget(machine)

    def close(self, wait: bool = True) -> None:
        self._stopping.set()
        self._pool.shutdown(wait=wait, cancel_futures=True)
