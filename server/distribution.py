"""Answering artifact chunk requests from a content-addressed store, with bounded memory.

``answer(request, store)`` yields the chunk frames of one request (docs/protocol.md §6)
one at a time, reading only one chunk from disk per frame, or yields a
single :class:`~protocol.ErrorReply` when the request cannot be served.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from protocol import Chunk, ChunkRequest, ErrorCode, ErrorReply, encode_chunk

__all__ = ["ArtifactStore", "DirectoryStore", "answer"]


class ArtifactStore(Protocol):
    def size(self, sha256: str) -> int | None:
        """Size of the artifact, or None when the store does not hold it."""

    def read(self, sha256: str, offset: int, length: int) -> bytes: ...


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


def answer(req: ChunkRequest, store: ArtifactStore) -> Iterator[bytes | ErrorReply]:
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
        data = store.read(req.sha256, off, min(req.chunk_size, end - off))
        yield encode_chunk(Chunk(req.request_id, req.sha256, off, size, data))
