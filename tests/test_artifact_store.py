"""The server's content-addressed store, written and read through one seam (server/distribution.py)."""

from __future__ import annotations

import hashlib

import pytest

from server.distribution import DirectoryStore, StoreError


def test_put_holds_an_artifact_by_its_digest_once_and_reads_it_back(tmp_path):
    src = tmp_path / "model.onnx"
    src.write_bytes(b"weights" * 1000)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    store = DirectoryStore(tmp_path / "store")
    store.root.mkdir()
    where = store.put(sha, src)
    assert where == store.root / sha and store.size(sha) == 7000
    assert store.read(sha, 7, 7) == b"weights"
    src.write_bytes(b"other")  # already held: not copied again
    assert store.put(sha, src) == where and store.size(sha) == 7000


def test_put_refuses_content_that_is_not_the_digest_and_leaves_nothing(tmp_path):
    src = tmp_path / "model.onnx"
    src.write_bytes(b"weights")
    store = DirectoryStore(tmp_path / "store")
    store.root.mkdir()
    with pytest.raises(StoreError, match="changed while it was copied"):
        store.put("0" * 64, src)
    assert list(store.root.iterdir()) == [] and store.size("0" * 64) is None
