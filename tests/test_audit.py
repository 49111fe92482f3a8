"""The hash-chained audit log: its format, what verify catches (and what it cannot), concurrent writers."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import delete, update
from sqlmodel import Session, col, select

from server import audit
from server.db.models import AuditEntry, Device

T0 = datetime(2026, 11, 28, 9, 0, 0, 123456, tzinfo=timezone.utc)


# -- the format (pure) --------------------------------------------------------------------------


def test_canonical_encoding_is_the_documented_one():
    raw = audit.canonical(1, T0, "alice", "model.promote", "model:digits:1.0.0", {"to": "candidate", "from": "draft"},
                          audit.GENESIS)
    assert raw == (b'{"action":"model.promote","actor":"alice","at":"2026-11-28T09:00:00.123456+00:00",'
                   b'"detail":{"from":"draft","to":"candidate"},"prev_hash":"' + b"0" * 64 + b'","seq":1,'
                   b'"subject":"model:digits:1.0.0"}')
    assert audit.entry_hash(1, T0, "alice", "model.promote", "model:digits:1.0.0",
                            {"from": "draft", "to": "candidate"}, audit.GENESIS) == hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize(("at", "same"), [
    (T0, True),
    (T0.replace(tzinfo=None), True),  # SQLite hands back naive UTC
    (T0.astimezone(timezone(timedelta(hours=-5))), True),  # PostgreSQL hands back the session's zone
    (T0 + timedelta(microseconds=1), False),
])
def test_the_hash_depends_on_the_instant_not_its_zone(at, same):
    h = audit.entry_hash(1, T0, "a", "b", "c", {}, audit.GENESIS)
    assert (audit.entry_hash(1, at, "a", "b", "c", {}, audit.GENESIS) == h) is same


@pytest.mark.parametrize(("field", "value"), [
    ("seq", 2), ("actor", "mallory"), ("action", "model.retire"), ("subject", "model:digits:2.0.0"),
    ("detail", {"from": "draft", "to": "approved"}), ("prev_hash", "1" * 64),
])
def test_every_field_is_in_the_hash(field, value):
    base = {"seq": 1, "at": T0, "actor": "alice", "action": "model.promote", "subject": "model:digits:1.0.0",
            "detail": {"from": "draft", "to": "candidate"}, "prev_hash": audit.GENESIS}
    assert audit.entry_hash(**(base | {field: value})) != audit.entry_hash(**base)


# -- the database -----------------------------------------------------------------------------


def fill(engine, n: int = 5) -> list[AuditEntry]:
    out = []
    with Session(engine, expire_on_commit=False) as db:
        for i in range(1, n + 1):
            out.append(audit.append(db, f"op{i % 2}", "test.step", f"thing:{i}", {"i": i, "note": "ünïcode"}))
            db.commit()
    return out


def report(engine, anchor=None) -> audit.AuditReport:
    with Session(engine) as db:
        return audit.verify(db, anchor=anchor)


def rows(engine) -> dict[int, AuditEntry]:
    with Session(engine, expire_on_commit=False) as db:
        return {e.seq: e for e in db.exec(select(AuditEntry)).all()}


def set_row(engine, seq: int, **values) -> None:
    with engine.begin() as conn:
        conn.execute(update(AuditEntry).where(col(AuditEntry.seq) == seq).values(**values))


CONTENT = ("at", "actor", "action", "subject", "detail", "prev_hash", "hash")


@pytest.mark.integration
def test_a_fresh_chain_verifies_and_links(engine):
    made = fill(engine, 5)
    assert [e.seq for e in made] == [1, 2, 3, 4, 5]
    assert made[0].prev_hash == audit.GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(made))
    stored = rows(engine)
    assert stored[3].detail == {"i": 3, "note": "ünïcode"}
    assert report(engine) == audit.AuditReport(ok=True, entries=5, problems=[])
    with Session(engine) as db:
        assert audit.verify(db).ok and audit.head(db).seq == 5
        empty_anchor = audit.Anchor(5, stored[5].hash)
        assert audit.verify(db, anchor=empty_anchor).ok


@pytest.mark.integration
def test_an_empty_log_verifies(engine):
    assert report(engine) == audit.AuditReport(ok=True, entries=0, problems=[])


@pytest.mark.integration
@pytest.mark.parametrize(("column", "value"), [
    ("actor", "mallory"),
    ("action", "model.retire"),
    ("subject", "model:other:9.9.9"),
    ("detail", {"i": 3, "note": "edited"}),
    ("at", T0),
    ("prev_hash", "f" * 64),
    ("hash", "e" * 64),
])
def test_verify_detects_an_edit_of_each_column(engine, column, value):
    fill(engine, 5)
    set_row(engine, 3, **{column: value})
    result = report(engine)
    assert not result.ok and result.entries == 5
    assert any(p.startswith("seq 3:") for p in result.problems), result.problems
    if column == "hash":  # the next entry no longer links to it either
        assert any(p.startswith("seq 4: prev_hash") for p in result.problems), result.problems


@pytest.mark.integration
def test_verify_detects_a_deleted_middle_row(engine):
    fill(engine, 5)
    with engine.begin() as conn:
        conn.execute(delete(AuditEntry).where(col(AuditEntry.seq) == 3))
    result = report(engine)
    assert not result.ok and result.entries == 4
    assert result.problems[0].startswith("seq 3 missing"), result.problems
    assert any(p.startswith("seq 4: prev_hash does not match the hash of seq 2") for p in result.problems)


@pytest.mark.integration
def test_verify_detects_a_deleted_first_row(engine):
    fill(engine, 3)
    with engine.begin() as conn:
        conn.execute(delete(AuditEntry).where(col(AuditEntry.seq) == 1))
    result = report(engine)
    assert not result.ok
    assert result.problems[0].startswith("seq 1 missing")
    assert any("genesis" in p for p in result.problems)


@pytest.mark.integration
def test_a_deleted_last_row_shows_only_against_an_anchor(engine, tmp_path):
    made = fill(engine, 5)
    audit.write_anchor(tmp_path, made[-1])
    with engine.begin() as conn:
        conn.execute(delete(AuditEntry).where(col(AuditEntry.seq) == 5))
    # the limit, stated in the docs: what is left is a valid chain
    assert report(engine).ok
    result = report(engine, anchor=audit.read_anchor(tmp_path))
    assert not result.ok
    assert result.problems == ["seq 5: the anchored entry is missing (the log was truncated or the entry deleted; "
                               "4 entries remain)"]


@pytest.mark.integration
def test_entries_after_the_last_anchor_can_be_truncated_unseen(engine, tmp_path):
    made = fill(engine, 5)
    audit.write_anchor(tmp_path, made[2])
    with engine.begin() as conn:
        conn.execute(delete(AuditEntry).where(col(AuditEntry.seq) >= 4))
    assert report(engine, anchor=audit.read_anchor(tmp_path)).ok  # as documented


@pytest.mark.integration
def test_verify_detects_swapped_rows(engine):
    fill(engine, 5)
    before = rows(engine)
    a, b = before[2], before[3]
    with engine.begin() as conn:  # swap everything but seq (hash is unique: park one first)
        conn.execute(update(AuditEntry).where(col(AuditEntry.seq) == 2).values(hash="p" * 64))
        conn.execute(update(AuditEntry).where(col(AuditEntry.seq) == 3).values(**{c: getattr(a, c) for c in CONTENT}))
        conn.execute(update(AuditEntry).where(col(AuditEntry.seq) == 2).values(**{c: getattr(b, c) for c in CONTENT}))
    result = report(engine)
    assert not result.ok
    assert {p.split(":")[0] for p in result.problems} >= {"seq 2", "seq 3", "seq 4"}, result.problems


@pytest.mark.integration
@pytest.mark.parametrize("renumber", ["move", "shift-all", "exchange"])
def test_verify_detects_renumbered_rows(engine, renumber):
    fill(engine, 5)
    with engine.begin() as conn:
        if renumber == "move":
            conn.execute(update(AuditEntry).where(col(AuditEntry.seq) == 3).values(seq=99))
        elif renumber == "shift-all":  # 1..5 → 2..6, highest first
            for seq in range(5, 0, -1):
                conn.execute(update(AuditEntry).where(col(AuditEntry.seq) == seq).values(seq=seq + 1))
        else:  # 2 ↔ 4
            conn.execute(update(AuditEntry).where(col(AuditEntry.seq) == 2).values(seq=100))
            conn.execute(update(AuditEntry).where(col(AuditEntry.seq) == 4).values(seq=2))
            conn.execute(update(AuditEntry).where(col(AuditEntry.seq) == 100).values(seq=4))
    result = report(engine)
    assert not result.ok and result.entries == 5, result.problems


@pytest.mark.integration
def test_a_consistently_rewritten_chain_shows_only_against_an_anchor(engine, tmp_path):
    made = fill(engine, 4)
    audit.write_anchor(tmp_path, made[-1])
    # rewrite entry 2 and recompute every hash after it: the chain is not keyed, so it verifies
    prev = made[0].hash
    with engine.begin() as conn:
        for e in made[1:]:
            actor = "mallory" if e.seq == 2 else e.actor
            digest = audit.entry_hash(e.seq, e.at, actor, e.action, e.subject, e.detail, prev)
            conn.execute(update(AuditEntry).where(col(AuditEntry.seq) == e.seq)
                         .values(actor=actor, prev_hash=prev, hash=digest))
            prev = digest
    assert report(engine).ok
    result = report(engine, anchor=audit.read_anchor(tmp_path))
    assert result.problems == ["seq 4: hash differs from the anchor (the entry or one before it was rewritten)"]


@pytest.mark.integration
def test_an_entry_commits_or_rolls_back_with_its_action(engine):
    with Session(engine) as db:
        db.add(Device(id="pi-1", profile="raspberry-pi-5"))
        audit.append(db, "alice", "device.add", "device:pi-1")
        db.rollback()
    with Session(engine) as db:
        assert db.get(Device, "pi-1") is None and audit.head(db) is None
        db.add(Device(id="pi-1", profile="raspberry-pi-5"))
        audit.append(db, "alice", "device.add", "device:pi-1", {"profile": "raspberry-pi-5"})
        db.commit()
    with Session(engine) as db:
        assert db.get(Device, "pi-1") is not None and audit.head(db).action == "device.add"
    assert report(engine).ok


@pytest.mark.integration
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"detail": {"when": T0}}, "not plain JSON"),
    ({"detail": {"x": float("nan")}}, "not plain JSON"),
    ({"actor": "x" * 65}, "actor must be 1 to 64"),
    ({"actor": ""}, "actor must be 1 to 64"),
    ({"subject": "s" * 257}, "subject must be 1 to 256"),
])
def test_append_refuses_what_it_could_not_store_faithfully(engine, kwargs, message):
    args = {"actor": "alice", "action": "test.bad", "subject": "thing"} | kwargs
    with Session(engine) as db, pytest.raises(audit.AuditError, match=message):
        audit.append(db, **args)


@pytest.mark.integration
def test_detail_is_stored_as_it_was_hashed(engine):
    with Session(engine) as db:
        entry = audit.append(db, "alice", "test.detail", "thing", {"tuple": (1, 2), "nested": {"b": 1, "a": [1.5]}})
        db.commit()
        assert entry.detail == {"tuple": [1, 2], "nested": {"a": [1.5], "b": 1}}
    assert report(engine).ok


@pytest.mark.integration
def test_entries_filters_newest_first(engine):
    with Session(engine) as db:
        for actor, action, subj in [("alice", "model.promote", "model:digits:1.0.0"),
                                    ("bob", "model.approve", "model:digits:1.0.0"),
                                    ("alice", "device.add", "device:pi_%1"),
                                    ("bob", "model.approve", "model:other:2.0.0")]:
            audit.append(db, actor, action, subj)
        db.commit()
        assert [e.seq for e in audit.entries(db)] == [4, 3, 2, 1]
        assert [e.seq for e in audit.entries(db, limit=2)] == [4, 3]
        assert [e.seq for e in audit.entries(db, actor="bob")] == [4, 2]
        assert [e.seq for e in audit.entries(db, action="model.approve", subject_contains="digits")] == [2]
        assert [e.seq for e in audit.entries(db, subject_contains="_%")] == [3]  # wildcards are literal
        assert [e.seq for e in audit.entries(db, subject="model:digits:1.0.0")] == [2, 1]


def test_the_anchor_only_moves_forward_and_rejects_garbage(tmp_path):
    first = AuditEntry(seq=3, at=T0, actor="a", action="b", subject="c", prev_hash=audit.GENESIS, hash="a" * 64)
    older = AuditEntry(seq=2, at=T0, actor="a", action="b", subject="c", prev_hash=audit.GENESIS, hash="b" * 64)
    assert audit.read_anchor(tmp_path) is None
    path = audit.write_anchor(tmp_path, first)
    assert json.loads(path.read_text()) == {"seq": 3, "hash": "a" * 64}
    audit.write_anchor(tmp_path, older)
    assert audit.read_anchor(path) == audit.Anchor(3, "a" * 64)
    for bad in ['{"seq": 0, "hash": "' + "a" * 64 + '"}', '{"seq": 1, "hash": "xyz"}', "[]", "not json"]:
        path.write_text(bad)
        with pytest.raises(audit.AuditError, match="audit anchor"):
            audit.read_anchor(path)


# -- concurrent writers -----------------------------------------------------------------------

THREADS, EACH = 8, 12


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["append", "append_with_retry"])
def test_concurrent_appends_form_one_valid_chain(engine, mode):
    start = threading.Barrier(THREADS)

    def writer(t: int) -> None:
        start.wait()
        for i in range(EACH):
            if mode == "append":  # in the writer's own transaction, committed by it
                with Session(engine) as db:
                    audit.append(db, f"op{t}", "test.concurrent", f"thing:{t}:{i}", {"t": t, "i": i})
                    db.commit()
            else:
                audit.append_with_retry(engine, f"op{t}", "test.concurrent", f"thing:{t}:{i}", {"t": t, "i": i},
                                        attempts=50)

    with ThreadPoolExecutor(THREADS) as pool:
        for future in [pool.submit(writer, t) for t in range(THREADS)]:
            future.result()
    result = report(engine)
    assert result.ok, result.problems
    assert result.entries == THREADS * EACH
    stored = rows(engine)
    assert sorted(stored) == list(range(1, THREADS * EACH + 1))
    assert {e.subject for e in stored.values()} == {f"thing:{t}:{i}" for t in range(THREADS) for i in range(EACH)}


@pytest.mark.integration
def test_append_with_retry_reruns_the_work_when_another_writer_took_the_seq(engine, monkeypatch):
    """A writer that got past the lock (here: the lock switched off) loses on the seq key and is retried."""
    monkeypatch.setattr(audit, "lock", lambda db: None)
    real_head = audit.head
    calls = {"work": 0, "head": 0}

    def racing_head(db):
        with db.no_autoflush:  # the work is not written yet, as with a driver in autocommit
            found = real_head(db)
        calls["head"] += 1
        if calls["head"] == 1:  # another writer commits the same seq right after this read
            with Session(engine) as other:
                audit.append(other, "bob", "test.race", "thing:bob")
                other.commit()
        return found

    def work(db):
        calls["work"] += 1
        db.add(Device(id=f"pi-{calls['work']}", profile="raspberry-pi-5"))

    monkeypatch.setattr(audit, "head", racing_head)
    entry = audit.append_with_retry(engine, "alice", "device.add", "device:pi", work=work)
    assert entry.seq == 2 and calls["work"] == 2
    with Session(engine) as db:
        assert db.get(Device, "pi-1") is None and db.get(Device, "pi-2") is not None  # the first try rolled back
    monkeypatch.undo()
    assert report(engine).ok
