"""Fetch an artifact over MQTT: ask for the ranges still missing, take the chunks, retry what goes unanswered.

Devices fetching the same artifact at the same time (a rollout wave) listen to its broadcast topic and share
every chunk the server sends there; each asks only for what it still lacks, at most :data:`MAX_IN_FLIGHT`
requests at a time, starting at its own place in the file (:func:`agent.download.download_slot`).
"""

from __future__ import annotations

import logging
import queue
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.clock import Clock
from agent.download import Download, download_slot
from agent.errors import InstallFailure
from agent.events import Connected, Disconnected, Message, Tick, WorkerEvent
from protocol import (
    ChunkFormatError,
    ChunkRequest,
    ErrorCode,
    ErrorReply,
    InvalidMessage,
    TopicError,
    TopicKind,
    artifact_topic,
    decode,
    decode_chunk,
    device_topic,
    encode,
    parse_device_topic,
)

if TYPE_CHECKING:
    from agent.session import Session

__all__ = ["MAX_IN_FLIGHT", "Downloader"]

log = logging.getLogger(__name__)
MAX_IN_FLIGHT = 2
#: request id -> (offset, length, when (monotonic) its range was last heard of)
InFlight = dict[str, tuple[int, int, float]]


class Downloader:
    """The chunk-request loop of the install's download step, on the worker thread.

    ``next_event`` waits for the worker's next event (raising :class:`queue.Empty` after ``timeout``);
    events that are not the download's (a command, desired state) go to ``defer`` and are handled after
    it. ``on_progress`` hears of each further quarter received; ``on_half`` (when given) once, when half
    of the chunks are in and persisted.
    """

    def __init__(self, session: Session, device_id: str, chunk_size: int, timeout: float, clock: Clock, *,
                 next_event: Callable[[float], WorkerEvent], defer: Callable[[WorkerEvent], None],
                 on_progress: Callable[[int, int], None]) -> None:
        self.session = session
        self.device_id = device_id
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.clock = clock
        self._next_event = next_event
        self._defer = defer
        self._on_progress = on_progress
        self._request_topic = device_topic(device_id, TopicKind.ARTIFACT_REQUEST)

    def fetch(self, dl: Download, on_half: Callable[[], None] | None = None) -> None:
        """Fill ``dl`` from the server; returns once every chunk is in (and persisted)."""
        shared = artifact_topic(dl.sha256)
        self.session.listen(shared)
        self.session.wait_granted(shared, 2.0)  # so that even the first request may be answered to the wave
        try:
            self._loop(dl, shared, on_half)
        finally:
            self.session.unlisten(shared)

    def _ask(self, dl: Download, shared: str, inflight: InFlight, slot: int) -> None:
        busy = {(o, n) for o, n, _ in inflight.values()}
        granted = self.session.granted.get(shared)
        listening_ms = int((self.clock.monotonic() - granted) * 1000) if granted is not None else 0
        for off, length in dl.missing_ranges(busy, MAX_IN_FLIGHT - len(inflight), start=slot):
            req = ChunkRequest(request_id=uuid.uuid4().hex, sha256=dl.sha256, offset=off, length=length,
                               chunk_size=self.chunk_size, broadcast=granted is not None,
                               listening_ms=min(listening_ms, 86_400_000))
            if self.session.publish(self._request_topic, encode(req)) is not None:
                inflight[req.request_id] = (off, length, self.clock.monotonic())

    def _loop(self, dl: Download, shared: str, on_half: Callable[[], None] | None) -> None:
        inflight: InFlight = {}
        last_progress = self.clock.monotonic()
        backoff = self.timeout
        reported = -1
        slot = download_slot(self.device_id)
        while not dl.complete:
            if self.session.connected.is_set():
                self._ask(dl, shared, inflight, slot)
            ev: WorkerEvent | Tick
            try:
                ev = self._next_event(0.5)
            except queue.Empty:
                ev = Tick()
            match ev:
                case Message(topic=topic, payload=payload):
                    kind = self._kind(topic, shared)
                    if kind is TopicKind.ARTIFACT_CHUNK:
                        if self._take_chunk(dl, payload, inflight):
                            last_progress = self.clock.monotonic()
                            backoff = self.timeout
                            if on_half is not None and len(dl.have) * 2 >= dl.chunks:
                                dl.persist()
                                on_half()
                                on_half = None
                            pct = dl.received * 4 // max(dl.size, 1)
                            if pct != reported:
                                reported = pct
                                self._on_progress(dl.received, dl.size)
                    elif kind is TopicKind.ERROR:
                        self._on_error(payload, inflight)
                    elif kind is not None:
                        self._defer(ev)
                case Connected() | Disconnected():
                    inflight.clear()  # requests in flight are lost with the connection; ask again
                case Tick():
                    pass
                case _:
                    self._defer(ev)
            now = self.clock.monotonic()
            stale = [rid for rid, (_, _, heard) in inflight.items() if now - heard > backoff]
            if stale:  # per request (no frame of its range for that long): other ranges' frames don't count
                log.info("%d request(s) unanswered for %.0f s; asking again", len(stale), backoff)
                for rid in stale:
                    del inflight[rid]
                if now - last_progress > backoff:  # the server is silent altogether: back off
                    backoff = min(backoff * 2, 300.0)
                    last_progress = now
        dl.persist()

    @staticmethod
    def _kind(topic: str, shared: str) -> TopicKind | None:
        """The kind of a message's topic (chunks on the broadcast topic too); None for a topic not ours."""
        if topic == shared:
            return TopicKind.ARTIFACT_CHUNK
        try:
            _, kind = parse_device_topic(topic)
        except TopicError:
            return None
        return kind

    def _take_chunk(self, dl: Download, payload: bytes, inflight: InFlight) -> bool:
        """Write a chunk frame into ``dl`` and settle the requests it answers; whether it was new."""
        try:
            chunk = decode_chunk(payload)
        except ChunkFormatError as exc:
            log.warning("dropped a chunk: %s", exc)
            return False
        accepted = dl.accept(chunk)
        for rid, (off, length, _) in list(inflight.items()):
            first, last = off // self.chunk_size, (off + length - 1) // self.chunk_size
            if all(i in dl.have for i in range(first, last + 1)):
                del inflight[rid]
            elif rid == chunk.request_id and chunk.offset // self.chunk_size == last:
                del inflight[rid]  # answered to its end: what it still lacks was lost on the way; ask
            elif off <= chunk.offset < off + length:  # this request is being answered
                inflight[rid] = (off, length, self.clock.monotonic())
        return accepted

    def _on_error(self, payload: bytes, inflight: InFlight) -> None:
        try:
            err = decode(ErrorReply, payload)
        except InvalidMessage:
            return
        if err.request_id is not None and err.request_id not in inflight:
            return
        if err.code in (ErrorCode.NOT_FOUND, ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE):
            raise InstallFailure(f"the server cannot serve the artifact: {err.code.value}: {err.message}")
        self.clock.sleep(min(err.retry_after_s or 1.0, 30.0))
        inflight.pop(err.request_id or "", None)
