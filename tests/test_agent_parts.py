"""The agent's parts on their own: the install step each state reports, the ack statuses on the wire, and
the download loop driven by a scripted broker on an injected clock (its timeouts and back-off in clock
seconds, not wall time)."""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable
from datetime import datetime, timezone

import pytest

from agent.clock import Clock
from agent.download import Download
from agent.downloader import Downloader
from agent.errors import InstallFailure
from agent.events import Message, Resume, WorkerEvent
from agent.install import Step, wire_step
from protocol import (
    AckStatus,
    Chunk,
    ChunkRequest,
    CommandAck,
    ErrorCode,
    ErrorReply,
    InstallStep,
    InvalidMessage,
    TopicKind,
    decode,
    device_topic,
    encode,
    encode_chunk,
)

DEVICE = "pi-1"
CHUNK = 4096
DATA = bytes(range(256)) * 64 + b"tail"  # 4 whole chunks and a short one
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.mark.parametrize(("step", "serving", "wire"), [
    (Step.IDLE, False, None), (Step.IDLE, True, None),
    *[(s, serving, InstallStep[s.name]) for s in Step if s not in (Step.IDLE, Step.FAILED)
      for serving in (False, True)],
    (Step.FAILED, True, InstallStep.REVERTED), (Step.FAILED, False, InstallStep.FAILED),
])
def test_each_install_step_reports_its_wire_step(step, serving, wire):
    assert wire_step(step, serving=serving) is wire


def test_every_wire_step_is_reported_by_some_state():
    reported = {wire_step(s, serving=serving) for s in Step for serving in (False, True)} - {None}
    assert reported == set(InstallStep)


def test_ack_statuses_are_the_wire_strings():
    assert [s.value for s in AckStatus] == ["accepted", "rejected", "done", "failed"]
    ack = CommandAck(device_id=DEVICE, command_id="0" * 32, status=AckStatus.FAILED, message="no",
                     ts=datetime(2026, 11, 28, tzinfo=timezone.utc))
    payload = encode(ack)
    assert b'"status":"failed"' in payload and f"{ack.status}" == "failed"
    assert decode(CommandAck, payload).status is AckStatus.FAILED
    with pytest.raises(InvalidMessage, match="status"):
        decode(CommandAck, payload.replace(b'"failed"', b'"FAILED"'))


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class ScriptedBroker:
    """The session's side of a download: records requests (with the clock's time) and, once the clock has
    passed ``silent_until``, answers every unanswered one with its chunks, or with ``reply`` when set."""

    def __init__(self, clock: FakeClock, silent_until: float) -> None:
        self.clock = clock
        self.silent_until = silent_until
        self.connected = threading.Event()
        self.connected.set()
        self.granted: dict[str, float] = {}
        self.requests: list[tuple[float, ChunkRequest]] = []
        self.answered = 0
        self.pending: list[WorkerEvent] = []
        #: From the clock's time, the error to answer with instead of chunks (None: answer with chunks).
        self.reply: Callable[[float], ErrorReply] | None = None

    def listen(self, topic: str) -> None:
        self.granted[topic] = self.clock.t

    def wait_granted(self, topic: str, timeout: float) -> bool:
        return True

    def unlisten(self, topic: str) -> None:
        self.granted.pop(topic, None)

    def publish(self, topic: str, payload: bytes) -> int:
        assert topic == device_topic(DEVICE, TopicKind.ARTIFACT_REQUEST)
        self.requests.append((self.clock.t, decode(ChunkRequest, payload)))
        return len(self.requests)

    def next_event(self, timeout: float) -> WorkerEvent:
        self.clock.t += timeout
        if not self.pending and self.clock.t >= self.silent_until:
            for _, req in self.requests[self.answered:]:
                if self.reply is not None:
                    reply = self.reply(self.clock.t).model_copy(update={"request_id": req.request_id})
                    self.pending.append(Message(device_topic(DEVICE, TopicKind.ERROR), encode(reply)))
                    continue
                for off in range(req.offset, req.offset + req.length, CHUNK):
                    frame = encode_chunk(Chunk(request_id=req.request_id, artifact_sha256=SHA, offset=off,
                                               total_size=len(DATA), data=DATA[off:off + CHUNK]))
                    self.pending.append(Message(device_topic(DEVICE, TopicKind.ARTIFACT_CHUNK), frame))
            self.answered = len(self.requests)
        if self.pending:
            return self.pending.pop(0)
        raise queue.Empty


def _downloader(broker: ScriptedBroker, clock: Clock, deferred: list[WorkerEvent],
                progress: list[tuple[int, int]]) -> Downloader:
    return Downloader(broker, DEVICE, CHUNK, 2.0, clock, next_event=broker.next_event,  # type: ignore[arg-type]
                      defer=deferred.append, on_progress=lambda got, size: progress.append((got, size)))


def test_a_silent_server_is_asked_again_with_doubling_back_off_then_the_file_completes(tmp_path):
    clock = FakeClock()
    broker = ScriptedBroker(clock, silent_until=15.6)
    command = Message(device_topic(DEVICE, TopicKind.COMMAND), b"{}")
    broker.pending = [command, Resume()]  # not the download's: handed back, in order, for after it
    deferred: list[WorkerEvent] = []
    progress: list[tuple[int, int]] = []
    halves: list[float] = []
    dl = Download(tmp_path, SHA, len(DATA), CHUNK)
    try:
        _downloader(broker, clock, deferred, progress).fetch(dl, on_half=lambda: halves.append(clock.t))
        assert dl.complete and dl.verify()
    finally:
        dl.close()
    rounds = sorted({t for t, _ in broker.requests})
    # unanswered for the 2 s timeout: asked again (at the first poll past it); still silent: 4 s, then 8 s
    assert rounds[:4] == [0.0, 2.5, 7.0, 15.5]
    assert deferred == [command, Resume()]
    assert len(halves) == 1 and progress[-1] == (len(DATA), len(DATA))
    assert [got for got, _ in progress] == sorted(got for got, _ in progress)


def test_a_busy_server_is_waited_for_on_the_clock_and_a_refusal_fails_the_download(tmp_path):
    clock = FakeClock()
    broker = ScriptedBroker(clock, silent_until=0.0)
    busy = ErrorReply(code=ErrorCode.RATE_LIMITED, message="slow down", retry_after_s=7.0)
    gone = ErrorReply(code=ErrorCode.NOT_FOUND, message="gone")
    broker.reply = lambda t: busy if t < 1.0 else gone
    dl = Download(tmp_path, SHA, len(DATA), CHUNK)
    try:
        with pytest.raises(InstallFailure, match="not_found: gone"):
            _downloader(broker, clock, [], []).fetch(dl)
        assert not dl.have
    finally:
        dl.close()
    # asked at 0 s, answered "busy" at 0.5 s: the device waited the 7 s asked for before asking again
    assert broker.requests[0][0] == 0.0
    assert min(t for t, _ in broker.requests if t > 0) == 7.5
