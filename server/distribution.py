"""Answering artifact chunk requests from a content-addressed store, with bounded memory.

``answer(request, store)`` yields the chunk frames of one request (docs/protocol.md §6)
one at a time, reading only one chunk from disk per frame, or yields a
single :class:`~protocol.ErrorReply` when the request cannot be served.
Requests that allow a broadcast answer go to the artifact's broadcast topic,
which every device downloading that artifact listens to; the
:class:`BroadcastLedger` keeps a rollout wave's crossing requests for the
same bytes from sending them twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Protocol

from hardware.files import atomic_copy, sha256_file
from protocol import Chunk, ChunkRequest, ErrorCode, ErrorReply, encode_chunk
from server.errors import ServerError

__all__ = ["ArtifactStore", "BroadcastLedger", "DirectoryStore", "Route", "StoreError", "answer"]


class StoreError(ServerError):
    """An artifact cannot be put into the store; the message says why."""


class ArtifactStore(Protocol):
    def size(self, sha256: str) -> int | None:
        """Size of the artifact, or None when the store does not hold it."""

    def read(self, sha256: str, offset: int, length: int) -> bytes: ...

    def put(self, sha256: str, src: Path) -> Path:
        """Hold ``src`` as the artifact ``sha256`` (checked against its content); where it is held."""


class DirectoryStore:
    """Artifacts as files named by their sha256 in one directory (a bundle's ``artifacts/``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, sha256: str) -> Path:
        return self.root / sha256  # sha256 is validated by ChunkRequest: 64 hex characters, no path tricks

    def size(self, sha256: str) -> int | None:
        p = self._path(sha256)
        return p.stat().st_size if p.is_file() else None

    def read(self, sha256: str, offset: int, length: int) -> bytes:
        with self._path(sha256).open("rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    def put(self, sha256: str, src: Path) -> Path:
        """Copy ``src`` in, atomically, unless the store holds it already; StoreError when the copy's content is
        not ``sha256`` (the file changed while it was copied), and nothing is left behind."""
        dest = self._path(sha256)
        if dest.exists():
            return dest
        atomic_copy(src, dest)
        if sha256_file(dest) != sha256:
            dest.unlink()
            raise StoreError(f"{src} changed while it was copied")
        return dest


class Route(Enum):
    SHARED = "shared"  #: publish on the artifact's broadcast topic
    DIRECT = "direct"  #: publish on the asking device's own chunk topic
    SKIP = "skip"  #: already on its way to the device


class BroadcastLedger:
    """When each chunk last went out on its artifact's broadcast topic: whether to send it again, and where.

    A request that allows a broadcast answer says how long the device has listened to the artifact's
    topic (its subscription granted on the same connection), so the device receives every chunk the
    server broadcasts after ``since`` = (time the request arrived − that duration); network delays only
    make ``since`` later than the truth, never earlier. For each chunk asked for, :meth:`route` says:

    - broadcast after ``since`` and within ``window`` seconds: it is on its way, so SKIP;
    - broadcast within ``window`` but before ``since`` (the device joined late and may have missed it):
      DIRECT, to that device alone, so the rest of the wave does not receive it twice;
    - otherwise (never, or long ago, so possibly lost): SHARED, recorded.

    Memory is bounded: at most ``max_entries`` chunks remembered.
    """

    def __init__(self, window: float = 10.0, max_entries: int = 200_000) -> None:
        self.window, self.max_entries = window, max_entries
        self._sent: dict[tuple[str, int, int], float] = {}
        self._lock = threading.Lock()

    def route(self, sha256: str, offset: int, length: int, since: float, now: float) -> Route:
        key = (sha256, offset, length)
        with self._lock:
            sent = self._sent.get(key)
            if sent is not None and now - sent < self.window:
                return Route.SKIP if since < sent else Route.DIRECT
            if len(self._sent) >= self.max_entries:
                self._sent = {k: t for k, t in self._sent.items() if now - t < self.window}
                if len(self._sent) >= self.max_entries:
                    self._sent.clear()
            self._sent[key] = now
            return Route.SHARED


def answer(req: ChunkRequest, store: ArtifactStore, *,
           skip: Callable[[int, int], bool] | None = None) -> Iterator[bytes | ErrorReply]:
    """The frames answering ``req``, leaving out the chunks ``(offset, length)`` for which ``skip`` says so."""
    size = store.size(req.sha256)
    if size is None:
        yield ErrorReply(request_id=req.request_id, code=ErrorCode.NOT_FOUND,
                         message=f"no artifact with sha256 {req.sha256}")
        return
    if req.offset >= size:
        yield ErrorReply(request_id=req.request_id, code=ErrorCode.BAD_REQUEST,
                         message=f"offset {req.offset} is beyond the artifact's {size} bytes")
        return
    end = min(req.offset + req.length, size)
    for off in range(req.offset, end, req.chunk_size):
        n = min(req.chunk_size, end - off)
        if skip is not None and skip(off, n):
            continue
        data = store.read(req.sha256, off, n)
        yield encode_chunk(Chunk(req.request_id, req.sha256, off, size, data))
