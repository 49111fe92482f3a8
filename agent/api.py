"""The local inference API on 127.0.0.1.

=============  ==========================================================
``POST /v1/predict``  ``application/json`` ``{"inputs": [...]}`` (one sample or a batch)
                      or ``application/x-npy`` (a .npy array); answers JSON
                      (:func:`answer`: classes, or a regression model's values)
``GET /v1/health``    ``{"status": "ok" | "no_model", "connected": ..., "broker_error": ..., ...}``
``GET /v1/model``     the running model: name, version, artifact, slot, input shape
``GET /metrics``      Prometheus text format
=============  ==========================================================

Bad input (wrong shape or dtype, malformed JSON, oversize body, unknown
content type) is answered with a 4xx and a message naming what the model
expects; a model that fails at run time on a well-formed input
(:class:`~agent.errors.InferenceError`) with a 500 and the runtime's message;
anything else a handler lets out with a 500 (its traceback logged), never a
dropped connection. Error bodies are ``{"error": <status phrase>, "message":
<what went wrong>}``. The server keeps serving.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol

from agent.errors import AgentError, InputError

if TYPE_CHECKING:
    import numpy as np

    from agent.predictor import Predictor

__all__ = ["ApiServer", "ModelHost", "answer"]

log = logging.getLogger(__name__)
#: A model failing on many requests logs one line per this many seconds, with the number left out.
_FAILURE_LOG_INTERVAL_S = 10.0


class ModelHost(Protocol):
    def predictor(self) -> Predictor | None: ...

    def model_info(self) -> dict[str, Any]: ...

    def health_info(self) -> dict[str, Any]: ...

    def metrics_text(self) -> str: ...


def _expected(pred: Predictor) -> str:
    dims = ", ".join("?" if d < 0 else str(d) for d in pred.input_shape[1:])
    return f"float32 inputs shaped ({dims}) or a batch shaped (n, {dims})"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api %s - " + format, self.client_address[0], *args)

    def _send(self, status: int, body: dict[str, Any] | str, content_type: str = "application/json") -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode("utf-8")
        self._answered = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._send(status, {"error": status.phrase, "message": message})

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _guarded(self, handler: Callable[[], None]) -> None:
        """Run ``handler``; what it lets out is logged and answered with a 500, never a dropped connection."""
        self._answered = False
        try:
            handler()
        except (BrokenPipeError, ConnectionResetError) as exc:  # the client left before the answer
            self.close_connection = True
            log.debug("api: %s went away: %s", self.client_address[0], exc)
        except Exception:
            self.close_connection = True  # the body may not have been read
            log.exception("api: %s %s failed", self.command, self.path[:100])
            if not self._answered:
                with contextlib.suppress(OSError):  # the client may have gone too
                    self._error(HTTPStatus.INTERNAL_SERVER_ERROR,
                                "the agent failed while answering this request; its log has the details")

    def _get(self) -> None:
        host = self.server.host
        if self.path == "/v1/health":
            pred = host.predictor()
            self._send(200, {"status": "ok" if pred else "no_model", **host.model_info(), **host.health_info()})
        elif self.path == "/v1/model":
            if host.predictor() is None:
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, "no model is installed yet")
            else:
                self._send(200, host.model_info())
        elif self.path == "/metrics":
            self._send(200, host.metrics_text(), "text/plain; version=0.0.4")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path[:100]!r}; see /v1/health, /v1/model, "
                        "/v1/predict, /metrics")

    def _post(self) -> None:
        if self.path != "/v1/predict":
            self._error(HTTPStatus.NOT_FOUND, f"POST goes to /v1/predict, not {self.path[:100]!r}")
            return
        length_header = self.headers.get("Content-Length")
        if length_header is None or not length_header.isdigit():
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header")
            return
        length = int(length_header)
        if length > self.server.max_body:
            self.close_connection = True  # the body is not read
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"body of {length} bytes exceeds the limit of {self.server.max_body}")
            return
        body = self.rfile.read(length)
        pred = self.server.host.predictor()
        if pred is None:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "no model is installed yet")
            return
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        try:
            x = self._decode(ctype, body, pred)
            out = pred.predict(x)
        except InputError as exc:
            self._error(HTTPStatus.BAD_REQUEST, f"{exc}; the model takes {_expected(pred)}")
            return
        except AgentError as exc:  # InferenceError: the model failed on a well-formed input (already counted)
            self.server.note_failure(str(exc))
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))
            return
        except _Unsupported as exc:
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, str(exc))
            return
        self._send(200, answer(pred, out))

    def _decode(self, ctype: str, body: bytes, pred: Predictor) -> np.ndarray:
        import numpy as np  # with a model to serve (the idle agent does not load numpy)

        if ctype == "application/json":
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError) as exc:
                raise InputError(f"body is not valid JSON ({str(exc)[:80]})") from None
            if not isinstance(doc, dict) or "inputs" not in doc:
                raise InputError('JSON body must be an object with "inputs"')
            try:
                x = np.asarray(doc["inputs"], dtype=np.float32)
            except (ValueError, TypeError):
                raise InputError('"inputs" must be a rectangular array of numbers') from None
        elif ctype in ("application/x-npy", "application/octet-stream"):
            try:
                x = np.load(io.BytesIO(body), allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise InputError(f"body is not a .npy array ({str(exc)[:80]})") from None
            if x.dtype.kind not in "fiu":
                raise InputError(f"array dtype {x.dtype} is not numeric")
        else:
            raise _Unsupported(f"Content-Type {ctype or '(none)'!r} is not supported; "
                               "use application/json or application/x-npy")
        if x.ndim == len(pred.input_shape) - 1:
            x = x[None]
        return x


def answer(pred: Predictor, out: np.ndarray) -> dict[str, Any]:
    """The body of a ``/v1/predict`` answer: the raw ``outputs`` always; a classifier's top-1 ``classes`` (and
    their ``labels``), or a regression model's predicted ``values``, one per input row, in the target's units
    (a model with several outputs per row: one list per row)."""
    body: dict[str, Any] = {"model": pred.manifest.model, "version": pred.manifest.version, "outputs": out.tolist()}
    if pred.manifest.task == "regression":
        flat = out.reshape(len(out), -1)
        body["values"] = flat[:, 0].tolist() if flat.shape[1] == 1 else flat.tolist()
        return body
    labels = pred.manifest.labels
    classes = out.argmax(axis=1).tolist()
    body["classes"] = classes
    if labels:
        body["labels"] = [labels[c] if c < len(labels) else str(c) for c in classes]
    return body


class _Unsupported(Exception):
    pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    host: ModelHost
    max_body: int

    def __init__(self, address: tuple[str, int], handler: type[_Handler]) -> None:
        self._failures_lock = threading.Lock()
        self._failures_logged_at = float("-inf")
        self._failures_unlogged = 0
        super().__init__(address, handler)

    def note_failure(self, message: str) -> None:
        """Log a failed inference: the first one, then one line per interval naming how many were left out."""
        with self._failures_lock:
            now = time.monotonic()
            if now - self._failures_logged_at < _FAILURE_LOG_INTERVAL_S:
                self._failures_unlogged += 1
                return
            unlogged, self._failures_unlogged, self._failures_logged_at = self._failures_unlogged, 0, now
        log.warning("api: inference failed: %s%s", message,
                    f" ({unlogged} more failures since the last line)" if unlogged else "")


class ApiServer:
    """The HTTP server in a background thread."""

    def __init__(self, host: ModelHost, address: str = "127.0.0.1", port: int = 8470, *,
                 max_body: int = 8 * 1024 * 1024) -> None:
        self._server = _Server((address, port), _Handler)
        self._server.host = host
        self._server.max_body = max_body
        self._thread = threading.Thread(target=self._server.serve_forever, name="edgeherd-api", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> ApiServer:
        self._thread.start()
        log.info("local API listening on http://%s:%d", *self._server.server_address[:2])
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
