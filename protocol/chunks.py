"""Artifact chunk frames: a fixed 104-byte header followed by raw bytes.

Chunks travel as raw binary MQTT payloads, not JSON, so a 64 KiB chunk costs
64 KiB plus the header. Layout (big-endian, ``struct`` format
``>4s16s32sQQI32s``):

====== ==== ===============================================================
offset size field
====== ==== ===============================================================
0      4    magic ``b"EHC1"`` (the ``1`` is the frame format version)
4      16   request id (the 16 bytes of the request's 32-hex id)
20     32   sha256 of the whole artifact (raw digest)
52     8    offset of this chunk in the artifact
60     8    total size of the artifact
68     4    length of the data that follows
72     32   sha256 of the data that follows
104    n    data
====== ==== ===============================================================
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from protocol.errors import ChunkFormatError
from protocol.manifest import MAX_ARTIFACT_BYTES

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "Chunk",
    "decode_chunk",
    "encode_chunk",
]

MAGIC = b"EHC1"
_HEADER = struct.Struct(">4s16s32sQQI32s")
HEADER_SIZE = _HEADER.size
MIN_CHUNK_SIZE = 4 * 1024
DEFAULT_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 256 * 1024


@dataclass(frozen=True)
class Chunk:
    request_id: str
    artifact_sha256: str
    offset: int
    total_size: int
    data: bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.data)

    @property
    def is_last(self) -> bool:
        return self.end == self.total_size


def encode_chunk(chunk: Chunk) -> bytes:
    if not 0 < len(chunk.data) <= MAX_CHUNK_SIZE:
        raise ChunkFormatError(f"chunk data must be 1..{MAX_CHUNK_SIZE} bytes, got {len(chunk.data)}")
    if chunk.end > chunk.total_size or chunk.total_size > MAX_ARTIFACT_BYTES:
        raise ChunkFormatError(f"chunk [{chunk.offset}, {chunk.end}) lies outside artifact of {chunk.total_size} bytes")
    try:
        rid = bytes.fromhex(chunk.request_id)
        digest = bytes.fromhex(chunk.artifact_sha256)
    except ValueError as exc:
        raise ChunkFormatError(f"request id and sha256 must be hex: {exc}") from None
    if len(rid) != 16 or len(digest) != 32:
        raise ChunkFormatError("request id must be 16 bytes and sha256 32 bytes")
    header = _HEADER.pack(
        MAGIC, rid, digest, chunk.offset, chunk.total_size, len(chunk.data),
        hashlib.sha256(chunk.data).digest(),
    )
    return header + chunk.data


def decode_chunk(payload: bytes) -> Chunk:
    """Parse and check a chunk frame; raises only :class:`ChunkFormatError`."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ChunkFormatError(f"payload must be bytes, got {type(payload).__name__}")
    buf = bytes(payload)
    if len(buf) < HEADER_SIZE:
        raise ChunkFormatError(f"frame is {len(buf)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, rid, digest, offset, total, length, data_hash = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise ChunkFormatError(f"bad magic {magic!r}, expected {MAGIC!r}")
    data = buf[HEADER_SIZE:]
    if length != len(data):
        raise ChunkFormatError(f"header says {length} data bytes, frame carries {len(data)}")
    if not 0 < length <= MAX_CHUNK_SIZE:
        raise ChunkFormatError(f"chunk data must be 1..{MAX_CHUNK_SIZE} bytes, got {length}")
    if total > MAX_ARTIFACT_BYTES or offset + length > total:
        raise ChunkFormatError(f"chunk [{offset}, {offset + length}) lies outside artifact of {total} bytes")
    if hashlib.sha256(data).digest() != data_hash:
        raise ChunkFormatError(f"data at offset {offset} does not match its sha256 (corrupted in transit)")
    return Chunk(request_id=rid.hex(), artifact_sha256=digest.hex(), offset=offset, total_size=total, data=data)
