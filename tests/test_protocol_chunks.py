from __future__ import annotations

import hashlib
import struct

import pytest

from protocol import HEADER_SIZE, MAX_CHUNK_SIZE, ChunkFormatError, decode_chunk, encode_chunk
from protocol.chunks import MAGIC, Chunk

RID = "ab" * 16
DATA = bytes(range(256)) * 16
SHA = hashlib.sha256(DATA).hexdigest()


def test_header_is_104_bytes_and_round_trips():
    assert HEADER_SIZE == 104
    chunk = Chunk(RID, SHA, 0, len(DATA), DATA[:1000])
    frame = encode_chunk(chunk)
    assert len(frame) == HEADER_SIZE + 1000
    assert frame[:4] == MAGIC
    assert decode_chunk(frame) == chunk
    assert not chunk.is_last


def test_reassembling_chunks_gives_the_artifact():
    frames = [
        encode_chunk(Chunk(RID, SHA, off, len(DATA), DATA[off : off + 1500])) for off in range(0, len(DATA), 1500)
    ]
    chunks = [decode_chunk(f) for f in frames]
    assert b"".join(c.data for c in chunks) == DATA
    assert chunks[-1].is_last
    assert hashlib.sha256(b"".join(c.data for c in chunks)).hexdigest() == SHA


def _frame(**over):
    fields = {"magic": MAGIC, "rid": bytes.fromhex(RID), "sha": bytes.fromhex(SHA), "offset": 0,
              "total": len(DATA), "data": DATA[:100]}
    fields.update(over)
    data = fields["data"]
    length = fields.get("length", len(data))
    digest = fields.get("digest", hashlib.sha256(data).digest())
    header = struct.pack(">4s16s32sQQI32s", fields["magic"], fields["rid"], fields["sha"], fields["offset"],
                         fields["total"], length, digest)
    return header + data


@pytest.mark.parametrize(
    ("frame", "fragment"),
    [
        (b"", "shorter than"),
        (_frame()[:103], "shorter than"),
        (_frame(magic=b"EHC2"), "bad magic"),
        (_frame(length=99), "header says 99"),
        (_frame(data=b""), "1.."),
        (_frame(offset=len(DATA) - 10), "outside artifact"),
        (_frame(digest=b"\0" * 32), "does not match its sha256"),
        (_frame(data=b"x" * (MAX_CHUNK_SIZE + 1), total=10**7), "1.."),
    ],
)
def test_bad_frames(frame, fragment):
    with pytest.raises(ChunkFormatError, match=fragment):
        decode_chunk(frame)


def test_encoder_refuses_what_the_decoder_would():
    with pytest.raises(ChunkFormatError):
        encode_chunk(Chunk(RID, SHA, 0, 10, b"x" * 11))
    with pytest.raises(ChunkFormatError):
        encode_chunk(Chunk("zz", SHA, 0, 10, b"x"))
    with pytest.raises(ChunkFormatError):
        encode_chunk(Chunk(RID, SHA, 0, MAX_CHUNK_SIZE * 2, b"x" * (MAX_CHUNK_SIZE + 1)))
