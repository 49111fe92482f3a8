"""``edgeherd server run``: the MQTT bridge, artifact distribution, drift evaluation, metrics.

The server subscribes to the device→server topics with MQTT 5 shared
subscriptions (so several replicas split the load), ingests through
:class:`server.ingest.Ingestor`, answers chunk requests from the
content-addressed store (only for artifacts of the bundle the device is
meant to run), evaluates drift on new statistics windows and raises and
clears alerts with hysteresis kept in the database (server/alerts.py), and
delivers them to the alert webhook. With no ``--broker`` it starts and
supervises a Mosquitto of its own on loopback.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
import zlib
from collections import Counter, defaultdict
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sqlalchemy import and_, false, func, or_, update
from sqlmodel import Session, col, select

from protocol import (
    ChunkRequest,
    ErrorCode,
    ErrorReply,
    FeatureStats,
    InvalidMessage,
    Receipt,
    ReferenceProfile,
    SignedManifest,
    TopicError,
    TopicKind,
    artifact_topic,
    decode,
    decode_model,
    device_topic,
    encode,
    error_reply_for,
    parse_device_topic,
    server_subscriptions,
)
from server import agent_releases, leases
from server.alerts import Notifier, observations, observe
from server.broker import SERVER_USER
from server.bus import Bus
from server.db.models import Device, DriftPending, DriftReportRow, ModelVersion, StatsWindow
from server.distribution import BroadcastLedger, Route, answer
from server.drift import misfit, score
from server.ingest import Batch, Ingestor, receipts_for
from server.orchestrator import Orchestrator
from server.presence import online_clause
from server.registry import Registry
from server.retention import Pruner, RetentionPolicy
from server.settings import ALERT_WEBHOOK

__all__ = ["ServerApp"]

log = logging.getLogger(__name__)
#: Messages ingested per database transaction, at most.
_BATCH = 500
#: A device's undecided statistics windows kept to be summed with its next ones, at most (the oldest go first).
MAX_PENDING_WINDOWS = 500


#: Longest a stored window's receipt waits for others of the same device while a backlog drains.
_RECEIPT_LINGER_S = 0.5


class _ReceiptBuffer:
    """Windows stored but not yet receipted, per device: one worker's, sent together
    (:func:`server.ingest.receipts_for`)."""

    def __init__(self) -> None:
        self.windows: dict[str, tuple[set[tuple[int, int]], set[tuple[int, int]]]] = {}
        self.since = 0.0

    def __bool__(self) -> bool:
        return bool(self.windows)

    def add(self, receipts: list[Receipt]) -> None:
        if receipts and not self.windows:
            self.since = time.monotonic()
        for r in receipts:
            tele, stats = self.windows.setdefault(r.device_id, (set(), set()))
            tele.update((s, w) for s, w in r.telemetry)
            stats.update((s, w) for s, w in r.stats)

    def age(self) -> float:
        return time.monotonic() - self.since

    def take(self) -> list[Receipt]:
        out = receipts_for({d: {"telemetry": list(t), "stats": list(st)} for d, (t, st) in self.windows.items()})
        self.windows = {}
        return out


class ServerApp:
    #: Devices read and republished at a time when the server (re)connects to the broker.
    republish_batch = 500

    def __init__(self, data_dir: Path, *, broker_url: str | None = None, metrics_port: int = 9470,
                 workers: int = 2, drift_interval: float = 10.0, broadcast: bool = True,
                 rollout_interval: float = 2.0, broadcast_chunk: int = 256 * 1024,
                 listen: tuple[str, int] | None = None, public_hosts: list[str] | None = None,
                 api_listen: tuple[str, int] | None = None, retention: RetentionPolicy | None = None,
                 prune_every: float = 600.0) -> None:
        self.managed = broker_url is None
        #: Where the operator API listens (HTTPS, server/api); None: no API in this process.
        self.api_listen = api_listen
        self.api: Any = None
        self.registry = Registry(data_dir, broker_url=broker_url, listen=listen, public_hosts=public_hosts)
        self.ingestor = Ingestor(self.registry.engine)
        self.store = self.registry.artifacts
        #: One queue per worker of (topic, payload, monotonic time received); a device's messages always go to
        #: the same worker, so workers never wait on each other's device rows (see Ingestor._lock_devices).
        self.queues: list[queue.Queue[tuple[str, bytes, float] | None]] = [
            queue.Queue(maxsize=100_000 // max(workers, 1)) for _ in range(max(workers, 1))]
        self.workers = max(workers, 1)
        self.drift_interval = drift_interval
        self.holder = f"server-{uuid.uuid4().hex[:8]}"
        #: Steps active rollouts every ``rollout_interval`` seconds (0: this replica never does).
        self.orchestrator = Orchestrator(self.registry, holder=self.holder, interval=rollout_interval or 1.0,
                                         agent_rollouts=agent_releases.advance)
        self.rollout_interval = rollout_interval
        self.metrics_port = metrics_port
        #: Answer requests that allow it on the artifact's broadcast topic (False: every answer unicast,
        #: for fleets whose devices must not see each other's artifacts).
        self.broadcast = broadcast
        #: Only requests in this chunk size, at aligned offsets, are answered on the broadcast topic: one
        #: device cannot make the wave receive the same bytes again and again under other chunkings.
        self.broadcast_chunk = broadcast_chunk
        self.chunks_sent = 0
        self.chunks_shared = 0
        self.ledger = BroadcastLedger()
        self.chunk_errors = 0
        #: Statistics windows taken but not scored because their counts do not fit the model's reference bins.
        self.windows_misfit = 0
        #: Chunk requests refused, by reason (the error code, or ``bad_topic``); on /metrics.
        self.chunk_refused: Counter[str] = Counter()
        self._refused_lock = threading.Lock()
        self.receipts_sent = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        #: Set by the drift loop around its evaluation: commit only while this replica holds the lease.
        self._under_lease = threading.local()
        self._references: dict[str, ReferenceProfile] = {}
        #: Statistics windows scored per transaction, at most.
        self.drift_batch = 1000
        #: Where alerts are POSTed (EDGEHERD_ALERT_WEBHOOK); no deliveries are queued without one.
        webhook = ALERT_WEBHOOK.read()
        self.notifier = Notifier(self.registry.engine, webhook) if webhook else None
        #: Seconds between looks for due webhook deliveries.
        self.notify_interval = 1.0
        self._error_sent: dict[str, float] = {}
        #: The server's connection to the broker (server/bus.py), from :meth:`start`.
        self.client: Bus | None = None
        self._http: ThreadingHTTPServer | None = None
        #: Prunes old report rows every ``prune_every`` seconds on its own thread (server/retention.py); None when
        #: every table is kept forever.
        self.pruner = Pruner(self.registry.engine, retention) if retention is not None and retention.active else None
        self.prune_every = prune_every

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> ServerApp:
        if self.managed:
            self.registry.broker.start()
            self._spawn(self._supervise, "broker-supervisor")
        #: Set on every (re)connection to the broker: the republisher publishes every desired state again.
        self._republish = threading.Event()
        #: Republishing passes finished (each covers every device), for tests and logs.
        self.republish_passes = 0
        self.client = Bus.start(self.registry.server_broker_url, SERVER_USER, self.registry.broker.server_password(),
                                client_id=f"edgeherd-server-{uuid.uuid4().hex[:8]}", on_connect=self._on_connect,
                                on_message=self._enqueue)
        self._spawn(self._republisher, "republish")
        for i in range(self.workers):
            self._spawn(lambda i=i: self._work(self.queues[i]), f"worker-{i}")
        if self.drift_interval > 0:  # 0: this replica leaves drift to the others
            self._spawn(self._drift_loop, "drift")
        if self.notifier is not None:
            self._spawn(self._notify_loop, "alert-webhook")
        if self.pruner is not None and self.prune_every > 0:
            pruner = self.pruner
            self._spawn(lambda: pruner.run(self._stop, self.prune_every, self.holder), "retention")
        if self.rollout_interval > 0:
            self._spawn(lambda: self.orchestrator.run(self._stop), "rollouts")
        if self.metrics_port:
            self._http = _metrics_server(self, self.metrics_port)
            self._spawn(self._http.serve_forever, "metrics")
        if self.api_listen is not None:
            from server.api.serve import ApiServer

            names = self.registry.broker.public_hosts or []
            try:
                self.api = ApiServer(self.registry, *self.api_listen, names).start()
            except BaseException:
                self.stop()
                raise
        log.info("server running; broker %s (devices), %s (the server)", self.registry.broker_url,
                 self.registry.server_broker_url)
        return self

    def _spawn(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=f"edgeherd-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        """Graceful: stop taking messages, ingest what is queued, then close everything."""
        self._stop.set()
        if self.client is not None:
            self.client.close()
        if self.api is not None:
            self.api.stop()
        for q in self.queues:
            q.put(None)  # after the backlog: the workers drain it first
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        for t in self._threads:
            t.join(120 if t.name.startswith("edgeherd-worker") else 5)
        for lease in ("drift", "alert-webhook", "retention", "agent-rollouts"):
            try:
                leases.release(self.registry.engine, lease, self.holder)  # another replica takes over at once
            except Exception:
                log.exception("could not release the %s lease; it expires by itself", lease)
        if self.managed:
            self.registry.broker.stop()
        self.registry.engine.dispose()

    def _supervise(self) -> None:
        while not self._stop.wait(2.0):
            if not self.registry.broker.alive():
                log.error("the managed mosquitto exited; restarting it")
                try:
                    self.registry.broker.start()
                except Exception:
                    log.exception("could not restart mosquitto")

    # -- MQTT -------------------------------------------------------------------------------

    def _on_connect(self, bus: Bus) -> None:
        """On paho's network thread, after every accepted (re)connection."""
        bus.subscribe(server_subscriptions(shared=True))
        self._republish.set()  # the broker may have lost retained desired states: the registry has them

    def _republisher(self) -> None:
        """Off paho's network thread: after each (re)connection, every device's desired state again, as recorded
        (:meth:`Registry.republish_desired`), in batches of :attr:`republish_batch`. A reconnection during a
        pass starts it again; a failed pass is retried."""
        while not self._stop.is_set():
            if not self._republish.wait(0.5):
                continue
            self._republish.clear()
            assert self.client is not None  # noqa: S101 - set before this thread starts
            try:
                self.registry.republish_desired(self.client, batch=self.republish_batch,
                                                cancelled=lambda: self._stop.is_set() or self._republish.is_set())
            except Exception:
                log.exception("republishing the desired states failed; trying again in 5 s")
                if not self._stop.wait(5):
                    self._republish.set()
                continue
            if not (self._stop.is_set() or self._republish.is_set()):
                self.republish_passes += 1

    def _enqueue(self, topic: str, payload: bytes) -> None:
        device = topic.split("/", 4)[3] if topic.count("/") >= 4 else topic
        try:
            self.queues[zlib.crc32(device.encode()) % self.workers].put_nowait((topic, payload, time.monotonic()))
        except queue.Full:
            self.ingestor.dropped["overload"] += 1

    def queued(self) -> int:
        return sum(q.qsize() for q in self.queues)

    def _work(self, q: queue.Queue[tuple[str, bytes, float] | None]) -> None:
        """Take what is queued (up to a batch), serve chunk requests, ingest the rest in one transaction.
        Receipts wait in ``receipts`` while more is queued, up to :data:`_RECEIPT_LINGER_S`: a backlog drained
        batch by batch holds a window or two of each device per batch, and one receipt per device for many
        windows costs the broker and the device far less than one per window."""
        receipts = _ReceiptBuffer()
        while True:
            if receipts and (q.empty() or receipts.age() >= _RECEIPT_LINGER_S):
                self._send_receipts(receipts.take())
            item = q.get()
            if item is None:
                if receipts:
                    self._send_receipts(receipts.take())
                return
            batch = [item]
            while len(batch) < _BATCH:
                try:
                    more = q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    q.put(None)
                    break
                batch.append(more)
            reports = []
            allowed = self._allowed_artifacts(batch)
            for topic, payload, received in batch:
                if topic.endswith("/" + TopicKind.ARTIFACT_REQUEST.value):
                    try:
                        self._serve_chunks(topic, payload, received, allowed)
                    except Exception:
                        log.exception("error serving chunks on %s", topic[:200])
                else:
                    reports.append((topic, payload))
            if not reports:
                continue
            try:
                self._after_ingest(self.ingestor.ingest(reports), receipts)
            except Exception:  # e.g. a database error: retry one by one so one message cannot sink a batch
                log.exception("batch ingest failed; retrying %d messages one by one", len(reports))
                for topic, payload in reports:
                    try:
                        self._after_ingest(self.ingestor.ingest([(topic, payload)]), receipts)
                    except Exception:
                        log.exception("error ingesting a message on %s", topic[:200])

    def _after_ingest(self, batch: Batch, receipts: _ReceiptBuffer) -> None:
        """What a committed batch calls for: receipts (held in ``receipts`` to go out together), refusals, and
        the desired state of devices that were waiting for their runtimes to be known (their hello is in the
        batch)."""
        receipts.add(batch.receipts)
        self._send_receipts([], batch.refused)
        if batch.hellos:
            assert self.client is not None  # noqa: S101
            self.registry.assign_waiting(self.client, batch.hellos)

    def _send_receipts(self, receipts: list[Receipt], refused: list[tuple[str, ErrorReply]] | None = None) -> None:
        """Tell devices which windows are stored (after the commit), so they can forget them, and which
        messages were refused for their times (``bad_time``: a refused window is named, so the device gives it
        up; any other refusal is unsolicited, so at most one per device per second)."""
        assert self.client is not None  # noqa: S101
        for receipt in receipts:
            self.client.publish(device_topic(receipt.device_id, TopicKind.RECEIPT), encode(receipt), qos=1)
        self.receipts_sent += len(receipts)
        for device_id, reply in refused or []:
            self._send_error(device_id, reply, unsolicited=reply.request_id is None)

    def _refused(self, device_id: str, reason: str, detail: str) -> None:
        """Every refused chunk request is logged with the device id and counted by reason."""
        with self._refused_lock:
            self.chunk_refused[reason] += 1
        log.warning("refused a chunk request from %s: %s: %s", device_id, reason, detail[:300])

    def _reply_error(self, device_id: str, reply: ErrorReply, *, undecoded: bool = False) -> None:
        """Log, count and answer a refused chunk request. A request that did not decode is answered at most
        once per device per second (docs/protocol.md §7); it is logged and counted all the same."""
        self._refused(device_id, reply.code.value, reply.message)
        if self._send_error(device_id, reply, unsolicited=undecoded):
            self.chunk_errors += 1

    def _send_error(self, device_id: str, reply: ErrorReply, *, unsolicited: bool) -> bool:
        """Publish ``reply`` on the device's error topic; an unsolicited one (answering nothing the device can
        name) at most once per device per second. Whether it went."""
        now = time.monotonic()
        if unsolicited and now - self._error_sent.get(device_id, 0.0) < 1.0:
            return False
        self._error_sent[device_id] = now
        assert self.client is not None  # noqa: S101
        self.client.publish(device_topic(device_id, TopicKind.ERROR), encode(reply), qos=1)
        return True

    def _allowed_artifacts(self, batch: list[tuple[str, bytes, float]]) -> dict[str, set[str]] | None:
        """The artifacts each device with a chunk request in ``batch`` may fetch, read from the registry once for
        the whole batch (a rollout wave queues many requests; one lookup each kept the first chunks of a wave
        waiting behind the rest). None when there are no such requests or the lookup failed (logged): then
        each request is checked on its own."""
        devices = []
        for topic, _, _ in batch:
            if topic.endswith("/" + TopicKind.ARTIFACT_REQUEST.value):
                try:
                    devices.append(parse_device_topic(topic)[0])
                except TopicError:
                    continue  # refused, counted and logged by _serve_chunks
        if not devices:
            return None
        try:
            return self.registry.desired_artifacts(devices)
        except Exception:
            log.exception("could not read the artifacts of %d devices with chunk requests; checking each request "
                          "on its own", len(set(devices)))
            return None

    def _serve_chunks(self, topic: str, payload: bytes, received: float,
                      allowed: dict[str, set[str]] | None = None) -> None:
        """Answer one chunk request (docs/protocol.md §6); ``allowed``: what devices may fetch, read for the
        request's batch (:meth:`_allowed_artifacts`), else read here."""
        try:
            device_id, _ = parse_device_topic(topic)
        except TopicError as exc:
            self._refused("?", "bad_topic", str(exc))
            return
        try:
            req = decode(ChunkRequest, payload)
        except InvalidMessage as exc:
            self._reply_error(device_id, error_reply_for(exc), undecoded=True)
            return
        may = allowed.get(device_id) if allowed is not None else None
        if req.sha256 not in (may if may is not None else self.registry.desired_bundle_artifacts(device_id)):
            self._reply_error(device_id, ErrorReply(request_id=req.request_id, code=ErrorCode.NOT_FOUND,
                                                    message="no artifact with that sha256 for this device"))
            return
        assert self.client is not None  # noqa: S101
        own = device_topic(device_id, TopicKind.ARTIFACT_CHUNK)
        shared = artifact_topic(req.sha256)
        listening = (req.broadcast and self.broadcast and req.chunk_size == self.broadcast_chunk
                     and req.offset % req.chunk_size == 0)
        since = received - req.listening_ms / 1000
        routes: list[str] = []  # the topic of each frame answer() yields, decided just before it reads it

        def skip(off: int, n: int) -> bool:
            route = self.ledger.route(req.sha256, off, n, since, time.monotonic())
            if route is Route.SKIP:
                self.chunks_shared += 1
                return True
            routes.append(shared if route is Route.SHARED else own)
            return False

        for frame in answer(req, self.store, skip=skip if listening else None):
            if isinstance(frame, ErrorReply):
                self._reply_error(device_id, frame)
                return
            self.client.publish(routes[-1] if listening else own, frame, qos=1)
            self.chunks_sent += 1

    # -- drift --------------------------------------------------------------------------------

    def _drift_loop(self) -> None:
        """Evaluate drift while holding the "drift" lease: with several replicas, one does it at a time."""
        ttl = max(3 * self.drift_interval, 30.0)
        while not self._stop.wait(self.drift_interval):
            try:
                self.drift_step(ttl)
            except Exception:
                log.exception("drift evaluation failed")

    def drift_step(self, ttl: float) -> int | None:
        """One turn of the drift loop: take or renew the "drift" lease for ``ttl`` seconds and, holding it, evaluate
        (each batch commits only while the lease is still this replica's). Windows taken, or None when another
        replica holds the lease."""
        if not leases.acquire(self.registry.engine, "drift", self.holder, ttl):
            return None
        self._under_lease.ttl = ttl
        try:
            return self.evaluate_drift()
        finally:
            self._under_lease.ttl = None

    def evaluate_drift(self) -> int:
        """Score every statistics window not taken yet, in batches; returns how many windows were taken.

        Windows are remembered by their ``scored`` flag, not by a time watermark, so a batch that commits late
        with older ``received_at`` times is scored all the same. A window too small to decide on is stored as an
        "insufficient" report and summed with the device's next windows (same manifest) until they decide. Each
        decided report feeds the device's alert conditions (server/alerts.py), whose hysteresis lives in the
        database. Called by the drift loop under the "drift" lease, each batch commits only if the lease is
        still this replica's."""
        ttl = getattr(self._under_lease, "ttl", None)
        total = 0
        while True:
            taken, more = self._evaluate_batch(ttl)
            total += taken
            if not more:
                return total

    def _reference(self, db: Session, manifest_sha256: str) -> ReferenceProfile | None:
        if manifest_sha256 not in self._references:
            version = db.exec(select(ModelVersion).where(ModelVersion.manifest_sha256 == manifest_sha256)).first()
            reference = decode_model(SignedManifest, version.signed_manifest).manifest.reference \
                if version is not None else None
            if reference is None:
                return None
            self._references[manifest_sha256] = reference
        return self._references[manifest_sha256]

    def _evaluate_batch(self, ttl: float | None) -> tuple[int, bool]:
        """Up to :attr:`drift_batch` windows in one transaction: (windows taken, whether more may be waiting)."""
        fresh: dict[str, list[FeatureStats]] = defaultdict(list)
        taken = 0
        now = datetime.now(timezone.utc)
        with Session(self.registry.engine) as db:
            rows = db.exec(select(StatsWindow).where(col(StatsWindow.scored) == false()).order_by(
                col(StatsWindow.received_at), col(StatsWindow.device_id), col(StatsWindow.session),
                col(StatsWindow.window_seq)).limit(self.drift_batch)).all()
            if not rows:
                return 0, False
            for row in rows:
                claimed = db.connection().execute(update(StatsWindow).where(
                    col(StatsWindow.device_id) == row.device_id, col(StatsWindow.session) == row.session,
                    col(StatsWindow.window_seq) == row.window_seq, col(StatsWindow.scored) == false(),
                ).values(scored=True)).rowcount
                if not claimed:  # another evaluation took it meanwhile
                    continue
                taken += 1
                ref = self._reference(db, row.manifest_sha256)
                if ref is None:  # no such model version here: nothing to score it against
                    continue
                window = FeatureStats.model_validate_json(row.payload)
                why = misfit(ref, window)
                if why is not None:  # taken, never scored: it would break the sums of every other window
                    self.windows_misfit += 1
                    log.warning("statistics window %s/%d/%d of %s does not fit the model's reference (%s); skipped",
                                row.device_id, row.session, row.window_seq, row.manifest_sha256[:12], why)
                    continue
                try:
                    with db.begin_nested():  # one window's failure must not roll back the batch's others
                        self._score_device_window(db, row, window, ref, now)
                except Exception:
                    log.exception("scoring statistics window %s/%d/%d failed; skipped", row.device_id, row.session,
                                  row.window_seq)
                    continue
                fresh[row.manifest_sha256].append(window)
            for manifest_sha256, windows in fresh.items():  # fleet-wide: the summed counts of the new windows
                fleet = score(self._references[manifest_sha256], windows)
                decidable = bool(getattr(fleet, "decidable", True))
                db.add(DriftReportRow(scope="fleet", manifest_sha256=manifest_sha256, n=fleet.n,
                                      drifted=bool(fleet.drifted) and decidable, insufficient=not decidable,
                                      worst=fleet.worst, score=fleet.score, report=fleet.to_dict()))
            if ttl is not None and not leases.still_held(db.connection(), "drift", self.holder, ttl):
                db.rollback()  # another replica may hold it now: it scores these windows instead
                log.warning("the drift lease moved to another replica during an evaluation; not committing it")
                return 0, False
            db.commit()
        return taken, len(rows) >= self.drift_batch

    def _score_device_window(self, db: Session, row: StatsWindow, window: FeatureStats, ref: ReferenceProfile,
                             now: datetime) -> None:
        """Score ``window`` with the device's undecided windows before it; store the report; feed the alerts."""
        pending = db.get(DriftPending, (row.device_id, row.manifest_sha256))
        windows = self._load_windows(db, row.device_id, pending.windows) if pending is not None else []
        windows.append(window)
        report = score(ref, windows)
        decidable = bool(getattr(report, "decidable", True))
        db.add(DriftReportRow(scope="device", device_id=row.device_id, manifest_sha256=row.manifest_sha256,
                              window_received_at=row.received_at, session=row.session, window_seq=row.window_seq,
                              n=report.n, drifted=bool(report.drifted) and decidable, insufficient=not decidable,
                              worst=report.worst, score=report.score,
                              report=report.to_dict() | {"windows": len(windows)}))
        if not decidable:
            keys = ((pending.windows if pending is not None else []) + [[row.session, row.window_seq]])
            keys = keys[-MAX_PENDING_WINDOWS:]
            if pending is None:
                pending = DriftPending(device_id=row.device_id, manifest_sha256=row.manifest_sha256)
            pending.windows, pending.n, pending.updated_at = keys, report.n, now
            db.add(pending)
            return
        if pending is not None:
            db.delete(pending)
            db.flush()
        for obs in observations(report):
            observe(db, row.device_id, row.manifest_sha256, obs, notify=self.notifier is not None, now=now)

    @staticmethod
    def _load_windows(db: Session, device_id: str, keys: list[list[int]]) -> list[FeatureStats]:
        if not keys:
            return []
        wanted = or_(*(and_(col(StatsWindow.session) == s, col(StatsWindow.window_seq) == q) for s, q in keys))
        rows = db.exec(select(StatsWindow).where(StatsWindow.device_id == device_id, wanted)).all()
        return [FeatureStats.model_validate_json(r.payload) for r in rows]

    def _notify_loop(self) -> None:
        """Deliver due alert webhooks while holding the "alert-webhook" lease (one replica sends them)."""
        assert self.notifier is not None  # noqa: S101 - started only with a webhook
        while not self._stop.wait(self.notify_interval):
            try:
                if leases.acquire(self.registry.engine, "alert-webhook", self.holder, 60.0):
                    self.notifier.deliver_due()
            except Exception:
                log.exception("alert webhook delivery failed")

    # -- metrics --------------------------------------------------------------------------------

    def metrics_text(self) -> str:
        with Session(self.registry.engine) as db:
            # online by server/presence.py: a stored "online" the broker never corrected (it went away with the
            # devices) stops counting once the device has been silent too long
            online = db.exec(select(func.count()).select_from(Device).where(online_clause())).one()
        lines = ["# TYPE edgeherd_server_devices_online gauge", f"edgeherd_server_devices_online {online}",
                 "# TYPE edgeherd_server_queue_depth gauge", f"edgeherd_server_queue_depth {self.queued()}",
                 "# TYPE edgeherd_server_chunks_sent_total counter", f"edgeherd_server_chunks_sent_total "
                 f"{self.chunks_sent}", "# TYPE edgeherd_server_chunks_shared_total counter",
                 f"edgeherd_server_chunks_shared_total {self.chunks_shared}",
                 "# TYPE edgeherd_server_receipts_sent_total counter",
                 f"edgeherd_server_receipts_sent_total {self.receipts_sent}",
                 "# TYPE edgeherd_server_messages_total counter"]
        lines += [f'edgeherd_server_messages_total{{result="{k}"}} {v}' for k, v in self.ingestor.accepted.items()]
        lines.append("# TYPE edgeherd_server_dropped_total counter")
        lines += [f'edgeherd_server_dropped_total{{reason="{k}"}} {v}' for k, v in self.ingestor.dropped.items()]
        lines.append("# TYPE edgeherd_server_chunk_requests_refused_total counter")
        lines += [f'edgeherd_server_chunk_requests_refused_total{{reason="{k}"}} {v}'
                  for k, v in sorted(self.chunk_refused.items())]
        if self.pruner is not None:
            lines += self.pruner.metrics_lines()
        return "\n".join(lines) + "\n"


def _metrics_server(app: ServerApp, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = app.metrics_text().encode() if self.path == "/metrics" else b"not found\n"
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server
