"""Retention: what the registry keeps of the windows devices report, and the pruner that deletes the rest.

Devices report a telemetry window and a statistics window every minute or so, and drift evaluation adds a report
for each: without pruning the database grows forever. A :class:`RetentionPolicy` says, per table, how many days
are kept (``telemetry``, ``feature_stats``, ``drift_reports``; none: forever). The :class:`Pruner` deletes
rows older than that in bounded batches (at most ``batch`` rows per transaction, by primary key), on its own
thread and never on the ingest path, and always keeps:

- statistics windows drift evaluation has not taken yet (``scored`` false) and those a device's undecided
  windows name (``drift_pending``): the next drift report still sums them;
- every row from the start of the current wave of an active rollout (pending, running, paused, rolling back)
  on: its gates read the telemetry and drift reports since the wave began, on the new version's devices and on
  the baseline's (the rest of the target);
- the newest ``keep_last`` windows (and drift reports) of each device, and fleet reports of each model, however
  old: a quiet device keeps its last reports.

The audit log (a hash chain), gate evaluations (the baselines recorded for earlier waves), model versions
(their signed manifests hold the drift reference profiles), alerts and rollouts are never pruned.

A telemetry or statistics window counts as older than the cutoff when both its ``end`` (the device's time,
bounded by the clock-skew and report-horizon settings) and its ``received_at`` are: the ``(device_id, end)``
index finds them, and a window a device kept offline for days is not pruned the minute it arrives.

Space: PostgreSQL's autovacuum and SQLite's free list both reuse the pages deleted rows leave, so at steady state
(as much pruned as ingested) the database stays the same size; SQLite's file never shrinks by itself (run
``VACUUM`` offline for that).

Exceptions::

    ServerError
     └── RetentionError   a retention setting (days, table, batch) is not one the pruner takes
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete, func, not_, select, true, tuple_
from sqlalchemy.engine import Connection, Engine

from server import leases
from server.db.models import DriftPending, DriftReportRow, Rollout, StatsWindow, TelemetryRow
from server.errors import ServerError
from server.rollouts import ACTIVE

__all__ = ["TABLES", "PruneReport", "Pruner", "RetentionError", "RetentionPolicy", "parse_days"]

log = logging.getLogger(__name__)

#: The tables retention prunes, by the names the CLI and settings use.
TABLES = ("telemetry", "feature_stats", "drift_reports")
#: Longest retention one can ask for (100 years); beyond that, say "none".
MAX_DAYS = 36500.0
_FOREVER = ("0", "none", "forever", "off")


class RetentionError(ServerError, ValueError):
    """A retention setting is not one the pruner takes; the message says what to give instead."""


def parse_days(raw: str | float | None, what: str = "--retain-days") -> float | None:
    """Days to keep from ``raw``: a positive number of days (fractions allowed), or None for "keep forever"
    (``0``, ``none``, ``forever``, ``off`` or nothing)."""
    if raw is None:
        return None
    text = str(raw).strip().lower()
    if text in ("", *_FOREVER):
        return None
    try:
        days = float(text)
    except ValueError:
        raise RetentionError(f"{what}={str(raw)[:50]!r}: give a number of days (e.g. 30), or 0/none to keep "
                             "forever") from None
    if not math.isfinite(days) or days < 0 or days > MAX_DAYS:
        raise RetentionError(f"{what}={str(raw)[:50]!r}: give between 0 and {MAX_DAYS:g} days (0 or none: keep "
                             "forever)")
    return days or None


@dataclass(frozen=True)
class RetentionPolicy:
    """Days kept per table (None: forever), how many of each device's newest rows survive any age, and the most
    rows one transaction deletes."""

    days: Mapping[str, float | None] = field(default_factory=lambda: dict.fromkeys(TABLES))
    keep_last: int = 3
    batch: int = 5000

    def __post_init__(self) -> None:
        unknown = set(self.days) - set(TABLES)
        if unknown:
            raise RetentionError(f"no table {sorted(unknown)[0]!r} to prune: give one of {', '.join(TABLES)}")
        if not 0 <= self.keep_last <= 10_000:
            raise RetentionError(f"keep_last={self.keep_last}: give between 0 and 10000 rows per device")
        if not 1 <= self.batch <= 10_000:
            raise RetentionError(f"batch={self.batch}: give between 1 and 10000 rows per transaction (the "
                                 "SQLite statement limit allows no more)")

    @classmethod
    def parse(cls, default: str | float | None = None, overrides: Iterable[str] = (), **kw: Any) -> RetentionPolicy:
        """The policy of ``--retain-days DEFAULT`` and ``--retain TABLE=DAYS`` (repeatable, overriding it)."""
        base = parse_days(default)
        days: dict[str, float | None] = dict.fromkeys(TABLES, base)
        for item in overrides:
            name, sep, value = str(item).partition("=")
            name = name.strip()
            if not sep or not name:
                raise RetentionError(f"--retain {str(item)[:80]!r}: give TABLE=DAYS, e.g. telemetry=7 "
                                     f"(tables: {', '.join(TABLES)})")
            if name not in TABLES:
                raise RetentionError(f"--retain {str(item)[:80]!r}: no table {name[:40]!r} to prune; give one of "
                                     f"{', '.join(TABLES)}")
            days[name] = parse_days(value, f"--retain {name}")
        return cls(days, **kw)

    @property
    def active(self) -> bool:
        """Whether any table is pruned at all."""
        return any(d is not None for d in self.days.values())

    def describe(self) -> str:
        return ", ".join(f"{t} {'forever' if self.days.get(t) is None else f'{self.days[t]:g} days'}"
                         for t in TABLES)


@dataclass
class PruneReport:
    """What one pass deleted (or, in a dry run, would delete), per table."""

    deleted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))
    #: The cutoff used per table (after an active rollout's floor), None where the table is kept forever.
    cutoffs: dict[str, datetime | None] = field(default_factory=dict)
    dry_run: bool = False

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class _Target:
    """How to find a table's prunable rows, one owner (a device; a model for fleet reports) at a time."""

    table: str
    model: Any
    keys: tuple[Any, ...]
    owner: Any
    order: Any
    olds: tuple[Any, ...]
    #: Which of the table's rows this target covers (drift reports: device or fleet ones).
    extra: tuple[Any, ...] = ()
    #: What a row must also be to go (statistics: taken by drift evaluation).
    done: tuple[Any, ...] = ()


def _targets() -> list[_Target]:
    t, s, d = TelemetryRow, StatsWindow, DriftReportRow
    tk = (t.device_id, t.session, t.window_seq)
    sk = (s.device_id, s.session, s.window_seq)
    return [
        _Target("telemetry", t, tk, t.device_id, t.end, (t.end, t.received_at)),
        _Target("feature_stats", s, sk, s.device_id, s.end, (s.end, s.received_at),
                done=(s.scored == true(),)),
        _Target("drift_reports", d, (d.id,), d.device_id, d.id, (d.computed_at,),
                (d.scope == "device",)),
        _Target("drift_reports", d, (d.id,), d.manifest_sha256, d.id, (d.computed_at,),
                (d.scope == "fleet",)),
    ]


class Pruner:
    """Deletes what the policy no longer keeps; one pass per :meth:`prune`, or every ``interval`` in :meth:`run`."""

    def __init__(self, engine: Engine, policy: RetentionPolicy, *,
                 clock: Callable[[], datetime] = _utcnow) -> None:
        self.engine = engine
        self.policy = policy
        self.clock = clock
        #: Rows deleted since start, per table; passes run; DELETE statements (each its own transaction) issued,
        #: and the most rows one of them deleted (for /metrics and tests).
        self.pruned: Counter[str] = Counter()
        self.passes = 0
        self.statements = 0
        self.largest_batch = 0
        self.failures = 0
        #: Set to stop a pass between two batches (the server is stopping).
        self.halt = threading.Event()

    # -- one pass -------------------------------------------------------------------------------

    def rollout_floor(self, conn: Connection) -> datetime | None:
        """The earliest start of the current wave of an active rollout (its creation before it has a wave):
        nothing received since then is pruned. None: no active rollout."""
        rows = conn.execute(select(Rollout.wave_started_at, Rollout.created_at).where(  # type: ignore[call-overload]
            Rollout.state.in_(sorted(s.value for s in ACTIVE)))).all()  # type: ignore[attr-defined]
        starts = [datetime.fromtimestamp(w, tz=timezone.utc) if w is not None else _aware(c) for w, c in rows]
        return min(starts) if starts else None

    def prune(self, *, dry_run: bool = False) -> PruneReport:
        """One pass over every table the policy prunes; returns the rows deleted (or that would be)."""
        now = self.clock()
        report = PruneReport(dry_run=dry_run)
        with self.engine.connect() as conn:
            floor = self.rollout_floor(conn)
            pending = self._pending(conn)
        for target in _targets():
            days = self.policy.days.get(target.table)
            if days is None:
                report.cutoffs[target.table] = None
                continue
            cutoff = now - timedelta(days=days)
            if floor is not None:
                cutoff = min(cutoff, floor)
            report.cutoffs[target.table] = cutoff
            report.deleted[target.table] += self._prune_target(target, cutoff, pending, dry_run)
        self.passes += 1
        if report.total:
            log.info("retention %s %d rows (%s)", "would prune" if dry_run else "pruned", report.total,
                     ", ".join(f"{t} {n}" for t, n in report.deleted.items()))
        return report

    def _pending(self, conn: Connection) -> dict[str, set[tuple[int, int]]]:
        """Each device's statistics windows named by its undecided drift windows (all models)."""
        out: dict[str, set[tuple[int, int]]] = {}
        for device_id, windows in conn.execute(select(DriftPending.device_id, DriftPending.windows)):  # type: ignore[call-overload]
            for key in windows or ():
                if isinstance(key, list) and len(key) == 2:
                    out.setdefault(device_id, set()).add((int(key[0]), int(key[1])))
        return out

    def _where(self, target: _Target, owner: Any, cutoff: datetime, keep_from: Any) -> list[Any]:
        clauses = [target.owner == owner, *target.extra, *target.done, *(c < cutoff for c in target.olds)]
        if keep_from is not None:
            clauses.append(target.order < keep_from)
        return clauses

    def _prune_target(self, target: _Target, cutoff: datetime, pending: dict[str, set[tuple[int, int]]],
                      dry_run: bool) -> int:
        total = 0
        queued: list[tuple[Any, ...]] = []
        with self.engine.connect() as conn:
            owners = [o for (o,) in conn.execute(select(target.owner).distinct().where(
                target.owner.is_not(None), *target.extra, target.olds[0] < cutoff))]
        for owner in owners:
            if self.halt.is_set():
                break
            with self.engine.connect() as conn:
                keep_from = self._keep_from(conn, target, owner)
                if keep_from is _NOTHING:
                    continue
                clauses = self._where(target, owner, cutoff, keep_from)
                skip = pending.get(owner) if target.table == "feature_stats" else None
                if skip:
                    clauses.append(not_(tuple_(target.keys[1], target.keys[2]).in_(sorted(skip))))
                if dry_run:
                    total += conn.execute(select(func.count()).select_from(target.model).where(*clauses)).scalar_one()
                    continue
            while True:
                room = self.policy.batch - len(queued)
                with self.engine.connect() as conn:
                    keys = [tuple(r) for r in conn.execute(
                        select(*target.keys).where(*clauses).order_by(target.order).limit(room))]
                queued.extend(keys)
                if len(queued) >= self.policy.batch:
                    total += self._delete(target, queued, cutoff)
                    queued = []
                if len(keys) < room or self.halt.is_set():
                    break
        if queued:
            total += self._delete(target, queued, cutoff)
        return total

    def _keep_from(self, conn: Connection, target: _Target, owner: Any) -> Any:
        """The ordering value of the owner's ``keep_last``-th newest row (older rows may go); ``_NOTHING`` when
        it has no more than that; None when nothing is kept regardless."""
        if self.policy.keep_last == 0:
            return None
        row = conn.execute(select(target.order).where(target.owner == owner, *target.extra)
                           .order_by(target.order.desc()).offset(self.policy.keep_last - 1).limit(1)).first()
        return _NOTHING if row is None else row[0]

    def _delete(self, target: _Target, keys: list[tuple[Any, ...]], cutoff: datetime) -> int:
        """Delete these rows in one transaction, checking again that they are old (and, for statistics, scored)."""
        key = target.keys[0] if len(target.keys) == 1 else tuple_(*target.keys)
        wanted = key.in_([k[0] for k in keys] if len(target.keys) == 1 else keys)
        stmt = delete(target.model).where(wanted, *target.extra, *target.done, *(c < cutoff for c in target.olds))
        with self.engine.begin() as conn:
            n = conn.execute(stmt).rowcount or 0
        self.statements += 1
        self.largest_batch = max(self.largest_batch, len(keys))
        self.pruned[target.table] += n
        return n

    # -- the thread -----------------------------------------------------------------------------

    def run(self, stop: threading.Event, interval: float, holder: str) -> None:
        """Prune every ``interval`` seconds until ``stop`` is set, while holding the "retention" lease (one
        replica prunes at a time). A failed pass is logged and retried at the next interval."""
        self.halt = stop
        while not stop.wait(interval):
            try:
                if leases.acquire(self.engine, "retention", holder, max(interval * 3, 60.0)):
                    self.prune()
            except Exception:
                self.failures += 1
                log.exception("retention pass failed; retrying in %.0f s", interval)

    def metrics_lines(self) -> list[str]:
        """Prometheus lines: rows pruned per table, passes and failed passes."""
        lines = ["# TYPE edgeherd_server_pruned_rows_total counter"]
        lines += [f'edgeherd_server_pruned_rows_total{{table="{t}"}} {self.pruned[t]}' for t in TABLES]
        lines += ["# TYPE edgeherd_server_prune_passes_total counter", f"edgeherd_server_prune_passes_total "
                  f"{self.passes}", "# TYPE edgeherd_server_prune_failures_total counter",
                  f"edgeherd_server_prune_failures_total {self.failures}"]
        return lines


_NOTHING: Any = object()


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored in UTC)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
