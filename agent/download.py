"""A resumable, verified artifact download: which bytes are held, which to ask for.

Chunks are written in place into ``<sha256>.part``; the set of received
chunks is persisted beside it (after an fsync of the data), so a restart
resumes where the last persisted state left off. Memory is bounded by one
chunk; the whole file is hashed at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from hardware.files import atomic_write, sha256_file
from protocol import MAX_CHUNK_SIZE, Chunk
from protocol.messages import MAX_REQUEST_BYTES

__all__ = ["Download", "download_slot", "missing_ranges"]


def missing_ranges(have: set[int], size: int, chunk_size: int, exclude: set[tuple[int, int]], limit: int,
                   start: int = 0) -> list[tuple[int, int]]:
    """Up to ``limit`` ranges (offset, length) of the chunks neither in ``have`` nor covered by a range in
    ``exclude`` (the requests in flight), ≤ 1 MiB each: a range being answered is never asked for again while
    its first chunks arrive.

    The search begins at the 1 MiB request slot ``start`` (modulo the number of slots) and wraps around,
    so the devices of a wave, starting at different slots, keep different bytes in flight and share
    them all on the artifact's broadcast topic.
    """
    chunks = (size + chunk_size - 1) // chunk_size
    per = max(MAX_REQUEST_BYTES // chunk_size, 1)
    first = (start % ((chunks + per - 1) // per)) * per if chunks else 0
    skip = set(have)
    for offset, length in exclude:
        skip.update(range(offset // chunk_size, (offset + max(length, 1) - 1) // chunk_size + 1))
    out: list[tuple[int, int]] = []
    for lo, hi in ((first, chunks), (0, first)):
        i = lo
        while i < hi and len(out) < limit:
            if i in skip:
                i += 1
                continue
            j = i
            while j < hi and j not in skip and j - i < per:
                j += 1
            out.append((i * chunk_size, min(j * chunk_size, size) - i * chunk_size))
            i = j
    return out


def download_slot(device_id: str) -> int:
    """Where a device starts asking in an artifact (see :func:`missing_ranges`): stable, spread by id."""
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:4], "big")


class Download:
    def __init__(self, directory: Path, sha256: str, size: int, chunk_size: int = 64 * 1024) -> None:
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size {chunk_size}")
        directory.mkdir(parents=True, exist_ok=True)
        self.sha256, self.size, self.chunk_size = sha256, size, chunk_size
        self.part = directory / f"{sha256}.part"
        self._state = directory / f"{sha256}.state"
        self.chunks = (size + chunk_size - 1) // chunk_size
        self.have: set[int] = set()
        self._unsynced = 0
        self._load()
        fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
        self._fd = fd
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)

    def _load(self) -> None:
        try:
            state = json.loads(self._state.read_text())
        except (OSError, ValueError):
            return
        if state.get("size") == self.size and state.get("chunk_size") == self.chunk_size and self.part.exists():
            self.have = {int(i) for i in state.get("have", []) if 0 <= int(i) < self.chunks}

    def persist(self) -> None:
        """Make received chunks durable: fsync the data, then record them."""
        os.fsync(self._fd)
        atomic_write(self._state, json.dumps(
            {"size": self.size, "chunk_size": self.chunk_size, "have": sorted(self.have)}).encode())
        self._unsynced = 0

    @property
    def received(self) -> int:
        last = self.chunks - 1
        return sum(self.size - last * self.chunk_size if i == last else self.chunk_size for i in self.have)

    @property
    def complete(self) -> bool:
        return len(self.have) == self.chunks

    def missing_ranges(self, exclude: set[tuple[int, int]], limit: int, start: int = 0) -> list[tuple[int, int]]:
        """Up to ``limit`` ranges of missing bytes to ask for next: see :func:`missing_ranges`."""
        return missing_ranges(self.have, self.size, self.chunk_size, exclude, limit, start)

    def accept(self, chunk: Chunk) -> bool:
        """Write a chunk if it belongs here and fills a gap; True when it did."""
        if chunk.artifact_sha256 != self.sha256 or chunk.total_size != self.size:
            return False
        if chunk.offset % self.chunk_size:
            return False
        index = chunk.offset // self.chunk_size
        expected = min(self.chunk_size, self.size - chunk.offset)
        if index in self.have or len(chunk.data) != expected:
            return False
        os.pwrite(self._fd, chunk.data, chunk.offset)
        self.have.add(index)
        self._unsynced += 1
        if self._unsynced >= 16 or self.complete:
            self.persist()
        return True

    def verify(self) -> bool:
        os.fsync(self._fd)
        return sha256_file(self.part) == self.sha256

    def reset(self) -> None:
        self.have.clear()
        self.persist()

    def close(self) -> None:
        os.close(self._fd)

    def remove(self) -> None:
        self.close()
        self.part.unlink(missing_ok=True)
        self._state.unlink(missing_ok=True)
