"""Property tests of the operator API: every operation the server's OpenAPI schema lists, fed random path
parameters, query values, bodies, content types and tokens, answers with a 2xx or a 4xx (never a 5xx, never a
dropped connection), and the server keeps answering.

One real ``edgeherd server run`` serves the whole module. Requests are raw ``http.client`` over the pinned CA
(ApiClient's TLS context), so bodies can be anything: schema-valid JSON (to reach the handlers), the schema's field
names with values of the wrong type, arbitrary JSON, huge strings, deep nesting, bytes that are not JSON, and the
wrong content type. The operations come from the schema (``server.api.docs``), so a new endpoint is fuzzed without
an edit here.

Requests without a valid token come from addresses of their own (127.0.0.2 and up) so that the failed-
authentication limit (10 a minute per address) throttles them, not the admin's requests from 127.0.0.1.
"""

from __future__ import annotations

import gzip
import http.client
import io
import itertools
import json
import os
import re
import socket
import ssl
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.api.docs import Operation, build_app, operations, permissions
from server.governance import Role
from server.registry import Registry
from tests.api_helpers import ApiServer, api_server
from tests.server_helpers import blob_bundle

pytestmark = pytest.mark.integration

APP = build_app()
SCHEMA: dict[str, Any] = APP.openapi()
COMPONENTS: dict[str, Any] = SCHEMA.get("components", {}).get("schemas", {})
OPS = operations(SCHEMA, permissions(APP))
IDS = [op.title.removeprefix("/api/v1") for op in OPS]
#: The body cap for JSON (server/api/app.py MAX_JSON_BODY), for the over-the-cap cases.
JSON_CAP = 64 * 1024
KNOWN_MODEL = "blob:1.0.0"

#: Examples per operation and test; EDGEHERD_API_FUZZ_EXAMPLES=200 for a long hunt.
EXAMPLES = int(os.environ.get("EDGEHERD_API_FUZZ_EXAMPLES", "5"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])

# -- talking to the server ----------------------------------------------------------------------------------


@dataclass
class Raw:
    """Raw HTTPS requests over one kept-alive connection from ``source``: any method, target, headers and bytes."""

    host: str
    port: int
    context: ssl.SSLContext
    source: str = "127.0.0.1"
    conn: http.client.HTTPSConnection | None = field(default=None, repr=False)

    def _connect(self) -> http.client.HTTPSConnection:
        self.close()
        self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=30,
                                                source_address=(self.source, 0))
        return self.conn

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def send(self, method: str, target: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body); a connection the server dropped is retried once on a fresh one, then fails the test."""
        for attempt in range(2):
            reused = self.conn is not None
            conn = self.conn or self._connect()
            try:
                conn.request(method, target, body=body, headers=headers or {})
                response = conn.getresponse()
                data = response.read()
                if response.will_close:
                    self.close()
                return response.status, data
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine, ssl.SSLError) as exc:
                self.close()
                if not reused or attempt:
                    raise AssertionError(f"{method} {target[:200]}: the server dropped the connection ({exc!r})"
                                         ) from None
        raise AssertionError("unreachable")


@dataclass
class Fuzzed:
    """The server under test and what the fuzz tests share."""

    srv: ApiServer = field(repr=False)
    raw: Raw = field(repr=False)
    token: dict[str, str] = field(repr=False)
    sources: Iterator[str] = field(repr=False)

    def other_source(self) -> Raw:
        """A client from a loopback address of its own (its failed authentications count there)."""
        return Raw(self.raw.host, self.raw.port, self.raw.context, next(self.sources))

    def log_tail(self) -> str:
        return self.srv.log.read_text(errors="replace")[-4000:]

    def check(self, status: int, data: bytes, what: str) -> None:
        assert status < 500, f"{what} → {status}: {data[:500]!r}\nserver log:\n{self.log_tail()}"

    def healthy(self) -> None:
        status, data = self.raw.send("GET", "/api/v1/health")
        assert (status, json.loads(data)) == (200, {"status": "ok"}), self.log_tail()
        assert self.srv.proc.poll() is None, f"server exited {self.srv.proc.returncode}:\n{self.log_tail()}"


@pytest.fixture(scope="module")
def fz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    tmp = tmp_path_factory.mktemp("api-fuzz")
    os.chmod(tmp, 0o701)  # the managed broker (user mosquitto) reaches the data directory inside
    with api_server(tmp, {"vera": Role.VIEWER}) as srv:
        bundle, _, _ = blob_bundle(tmp / "bundle", srv.key, model="blob", version="1.0.0", size=1024)
        registry = Registry(srv.data)
        try:
            registry.push_model(bundle, actor="admin")
        finally:
            registry.engine.dispose()
        parts = urlsplit(srv.url)
        raw = Raw(parts.hostname or "127.0.0.1", parts.port or 443, srv.client("admin").context)
        sources = (f"127.0.{b}.{c}" for b, c in itertools.cycle(itertools.product(range(1, 4), range(2, 255))))
        yield Fuzzed(srv, raw, dict(srv.tokens), sources)
        raw.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- strategies ---------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)
#: Text that survives URL quoting (no lone surrogates), from any script.
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)
pattern_breakers = st.sampled_from(["", ".", "..", "%", "%00", "a:b:c", ":", "A" * 65, "a" * 300, "x" * 20_000,
                                    "tok_", "tok_ABCDEFGHIJKL", "-leading", "trailing-", "ünïcödé", "名前:1",
                                    "a\x00b", "a/b", "a?b", "a#b", "a b", "\n", "../../etc/passwd", "1e309", "NaN",
                                    "-1", "0", "true", "null", "[]", "{}"])
numberish = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e309", "0x10", "1_000", " 1", "", "٣"])


def valid(s: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values a JSON schema accepts (as far as these fields go), to reach the handlers behind validation."""
    if "$ref" in s:
        target = COMPONENTS.get(s["$ref"].rsplit("/", 1)[-1], {})
        return st.deferred(lambda: valid(target, depth + 1)) if depth < 6 else st.just({})
    for key in ("anyOf", "oneOf"):
        if key in s:
            return st.one_of([valid(x, depth + 1) for x in s[key]])
    if "const" in s:
        return st.just(s["const"])
    if "enum" in s:
        return st.sampled_from(s["enum"])
    match s.get("type"):
        case "string":
            lo, hi = s.get("minLength", 0), s.get("maxLength")
            if "pattern" not in s:
                return st.text(min_size=lo, max_size=min(hi or 40, 2000))
            return st.from_regex(s["pattern"], fullmatch=True).filter(lambda v: lo <= len(v) <= (hi or len(v)))
        case "integer":
            lo = s["minimum"] if "minimum" in s else s["exclusiveMinimum"] + 1 if "exclusiveMinimum" in s else None
            hi = s["maximum"] if "maximum" in s else s["exclusiveMaximum"] - 1 if "exclusiveMaximum" in s else None
            return st.integers(None if lo is None else int(lo), None if hi is None else int(hi))
        case "number":
            return st.floats(s.get("minimum", s.get("exclusiveMinimum")), s.get("maximum", s.get("exclusiveMaximum")),
                             exclude_min="exclusiveMinimum" in s, exclude_max="exclusiveMaximum" in s,
                             allow_nan=False, allow_infinity=False)
        case "boolean":
            return st.booleans()
        case "null":
            return st.none()
        case "array":
            items = s.get("items", {})
            return st.lists(valid(items, depth + 1), min_size=s.get("minItems", 0),
                            max_size=min(s.get("maxItems", 4), 4))
        case "object":
            props = s.get("properties", {})
            required = set(s.get("required", []))
            return st.fixed_dictionaries({k: valid(v, depth + 1) for k, v in props.items() if k in required},
                                         optional={k: valid(v, depth + 1) for k, v in props.items()
                                                   if k not in required})
    return json_values


def fields_of(s: dict[str, Any]) -> list[str]:
    if "$ref" in s:
        return fields_of(COMPONENTS.get(s["$ref"].rsplit("/", 1)[-1], {}))
    return list(s.get("properties", {}))


def body_schema(op: Operation) -> dict[str, Any] | None:
    content = (op.spec.get("requestBody") or {}).get("content", {})
    return content.get("application/json", {}).get("schema") if content else None


def _deep(n: int) -> bytes:
    return ("[" * n + "]" * n).encode()


def _deep_object(n: int) -> bytes:
    return ('{"a":' * n + "1" + "}" * n).encode()


@st.composite
def bodies(draw: st.DrawFn, op: Operation) -> tuple[bytes | None, str | None]:
    """(body bytes or None, Content-Type or None): anything from schema-valid to not JSON at all."""
    s = body_schema(op)
    names = fields_of(s) if s else []
    kind = draw(st.sampled_from(["valid", "wrong types", "json", "bytes", "deep", "huge", "encoding", "none"]))
    data: bytes | None
    if kind == "valid" and s is not None:
        data = json.dumps(draw(valid(s))).encode()
    elif kind in ("valid", "wrong types"):
        keys = names + draw(st.lists(st.text(max_size=12), max_size=2))
        obj = {k: draw(json_values | any_text | numberish) for k in keys if draw(st.booleans())}
        data = json.dumps(obj).encode()
    elif kind == "json":
        data = json.dumps(draw(json_values)).encode()  # NaN and Infinity included: Python writes them
    elif kind == "bytes":
        data = draw(st.binary(max_size=300))
    elif kind == "deep":
        data = draw(st.sampled_from([_deep, _deep_object]))(draw(st.integers(100, 30_000)))
    elif kind == "huge":
        size = draw(st.sampled_from([1001, 5000, JSON_CAP - 100, JSON_CAP + 1, 3 * JSON_CAP]))
        key = draw(st.sampled_from(names or ["x"]))
        data = json.dumps({key: "x" * size}).encode()
    elif kind == "encoding":
        data = draw(st.sampled_from([b'{"reason": "\xff\xfe"}', '{"name": "é"}'.encode("utf-16"),
                                     b'\xef\xbb\xbf{"reason": "x"}', b'{"reason":"a","reason":1}', b"{", b"[1,",
                                     b'{"reason": "\\ud800"}', b"\x00" * 10, b"null"]))
    else:
        data = None
    ctype = draw(st.sampled_from(["application/json", "application/json", "text/plain", "application/octet-stream",
                                  "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                  "application/json; charset=utf-16", "application/merge-patch+json", None]))
    return data, ctype


def path_value(name: str, s: dict[str, Any]) -> st.SearchStrategy[str]:
    """Any text, text that breaks the parameter's pattern, text that keeps it, and (for a version) one that exists,
    so that actions reach their handlers."""
    options = [any_text, pattern_breakers, valid(s) if s.get("type") == "string" else any_text]
    return st.one_of(*options, *([st.just(KNOWN_MODEL)] if name == "ref" else []))


def query_value(s: dict[str, Any]) -> st.SearchStrategy[str]:
    return st.one_of(valid(s).map(str), any_text, numberish, pattern_breakers)


@st.composite
def targets(draw: st.DrawFn, op: Operation) -> str:
    """The operation's path with random parameters, and a random query string."""
    path = op.path
    query: list[tuple[str, str]] = []
    for p in op.spec.get("parameters", []):
        s = p.get("schema", {})
        if p.get("in") == "path":
            path = path.replace("{" + p["name"] + "}", quote(draw(path_value(p["name"], s)), safe=""))
        elif p.get("in") == "query" and draw(st.booleans()):
            query += [(p["name"], draw(query_value(s))) for _ in range(draw(st.integers(1, 2)))]
    query += draw(st.lists(st.tuples(any_text, any_text), max_size=2))
    return path + ("?" + urlencode(query) if query else "")


@st.composite
def well_formed(draw: st.DrawFn, op: Operation) -> tuple[str, bytes | None]:
    """A request the schema accepts: valid path parameters, queries and body."""
    path = op.path
    for p in op.spec.get("parameters", []):
        if p.get("in") == "path":
            path = path.replace("{" + p["name"] + "}", quote(str(draw(valid(p.get("schema", {})))), safe=""))
    s = body_schema(op)
    return path, None if s is None else json.dumps(draw(valid(s))).encode()


def _headers(token: str | None, ctype: str | None) -> dict[str, str]:
    headers = bearer(token) if token else {}
    if ctype is not None:
        headers["Content-Type"] = ctype
    return headers


# -- the tests ----------------------------------------------------------------------------------------------


def test_the_schema_served_is_the_one_fuzzed(fz: Fuzzed) -> None:
    status, data = fz.raw.send("GET", "/api/v1/openapi.json")
    assert status == 200
    served = json.loads(data)
    assert [(m, p) for p, item in served["paths"].items() for m in item] == \
           [(op.method.lower(), op.path) for op in OPS]
    assert len(OPS) >= 20


@pytest.mark.parametrize("op", OPS, ids=IDS)
@FUZZ
@given(data=st.data())
def test_random_parameters(fz: Fuzzed, op: Operation, data: st.DataObject) -> None:
    """Random path parameters and query strings, as the admin, with a schema-valid body: never a 5xx."""
    target = data.draw(targets(op), label="target")
    s = body_schema(op)
    body = None if s is None else json.dumps(data.draw(valid(s), label="body")).encode()
    status, answer = fz.raw.send(op.method, target, body, _headers(fz.token["admin"], "application/json"))
    fz.check(status, answer, f"{op.method} {target[:300]}")


@pytest.mark.parametrize("op", OPS, ids=IDS)
@FUZZ
@given(data=st.data())
def test_random_bodies(fz: Fuzzed, op: Operation, data: st.DataObject) -> None:
    """Random bodies and content types, as the admin: never a 5xx, and 413 for JSON over its cap."""
    target = data.draw(st.one_of(targets(op), well_formed(op).map(lambda t: t[0])), label="target")
    body, ctype = data.draw(bodies(op), label="body")
    status, answer = fz.raw.send(op.method, target, body, _headers(fz.token["admin"], ctype))
    fz.check(status, answer, f"{op.method} {target[:300]} ({ctype}, {body[:200] if body else body!r})")
    if body is not None and len(body) > JSON_CAP and not op.path.endswith("/models/upload"):
        assert status == 413, f"{op.method} {target}: a {len(body)}-byte body got {status}, not 413"


def test_other_methods_are_refused(fz: Fuzzed) -> None:
    declared: dict[str, set[str]] = {}
    for op in OPS:
        declared.setdefault(op.path, set()).add(op.method)
    for path, methods in declared.items():
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE"} - methods)[:2]:
            status, answer = fz.raw.send(method, concrete, b"{}", _headers(fz.token["admin"], "application/json"))
            fz.check(status, answer, f"{method} {concrete}")
            assert status in (404, 405, 422), f"{method} {concrete} (not in the schema) → {status}: {answer[:200]!r}"
    fz.healthy()


def _min_role(op: Operation) -> Role | None:
    return op.permission.min_role if op.permission is not None else None


SECURED = [op for op in OPS if op.secured]


@pytest.mark.parametrize("op", SECURED, ids=[i for i, op in zip(IDS, OPS, strict=True) if op.secured])
def test_no_token_no_action(fz: Fuzzed, op: Operation) -> None:
    """A request without a token, or with an unknown one: 401, whatever the operation."""
    path = re.sub(r"\{[^}]+\}", "x", op.path)
    body = b"{}" if body_schema(op) is not None else None
    with fz.other_source() as client:
        for headers in ({}, bearer("eh_aaaaaaaaaaaa_" + "A" * 43)):
            status, answer = client.send(op.method, path, body, headers | {"Content-Type": "application/json"})
            assert status == 401, f"{op.method} {path} with {headers!r:.60} → {status}: {answer[:200]!r}"
            assert fz.token["admin"].encode() not in answer, "a 401 echoed the token back"


def test_malformed_credentials(fz: Fuzzed) -> None:
    """Tokens that are not bearer tokens of ours: 401, and the answer does not echo them."""
    with fz.other_source() as client:
        admin = fz.token["admin"]
        for headers in ({"Authorization": "Bearer"}, bearer("x" * 5000), {"Authorization": f"Basic {admin}"},
                        {"Authorization": admin}, bearer(admin + "x"), bearer(admin.upper()),
                        {"authorization": "bearer " + admin[:-1]}):
            status, answer = client.send("GET", "/api/v1/whoami", None, headers)
            assert status == 401, f"GET /api/v1/whoami with {headers!r:.60} → {status}: {answer[:200]!r}"
            assert fz.token["admin"][16:].encode() not in answer, "a 401 echoed the token back"


@settings(FUZZ, max_examples=EXAMPLES * 5)
@given(data=st.data())
def test_random_credentials(fz: Fuzzed, data: st.DataObject) -> None:
    """Random Authorization headers on random operations: never a 2xx, never a 5xx."""
    op = data.draw(st.sampled_from([op for op in OPS if op.secured]), label="operation")
    target, body = data.draw(well_formed(op), label="request")
    value = data.draw(st.one_of(st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=200),
                                st.from_regex(r"Bearer eh_[a-z0-9]{12}_[A-Za-z0-9_-]{43}", fullmatch=True),
                                st.just("Bearer " + fz.token["admin"] + "x")), label="authorization")
    with fz.other_source() as client:
        status, answer = client.send(op.method, target, body, {"Authorization": value,
                                                               "Content-Type": "application/json"})
    fz.check(status, answer, f"{op.method} {target} with Authorization {value!r:.80}")
    assert not 200 <= status < 300, f"{op.method} {target} with Authorization {value!r:.80} → {status}"


@pytest.mark.parametrize("op", [op for op in OPS if _min_role(op) not in (None, Role.VIEWER)],
                         ids=[i for i, op in zip(IDS, OPS, strict=True) if _min_role(op) not in (None, Role.VIEWER)])
@settings(FUZZ, max_examples=max(EXAMPLES // 2, 1))
@given(data=st.data())
def test_viewer_is_refused_actions(fz: Fuzzed, op: Operation, data: st.DataObject) -> None:
    """A viewer's well-formed request for an action: 403, before anything runs; with a random body, never a 2xx."""
    target, body = data.draw(well_formed(op), label="request")
    status, answer = fz.raw.send(op.method, target, body, _headers(fz.token["vera"], "application/json"))
    assert status == 403, f"viewer: {op.method} {target} → {status}: {answer[:300]!r}"
    junk, ctype = data.draw(bodies(op), label="junk")
    status, answer = fz.raw.send(op.method, target, junk, _headers(fz.token["vera"], ctype))
    fz.check(status, answer, f"viewer: {op.method} {target}")
    assert not 200 <= status < 300, f"viewer: {op.method} {target} → {status}"


def test_a_first_token_under_a_minute_is_refused(fz: Fuzzed) -> None:
    """Found by the fuzzing above: a new operator whose first token would live under a minute (ttl_days > 0 but
    tiny) is a 422 naming the field, not a 500 after the operator was already written to operators.toml."""
    body = json.dumps({"name": "brief-ttl", "role": "viewer", "ttl_days": 1e-5}).encode()
    status, answer = fz.raw.send("POST", "/api/v1/operators", body, _headers(fz.token["admin"], "application/json"))
    fz.check(status, answer, "POST /api/v1/operators with ttl_days 1e-5")
    assert status == 422, answer
    assert "brief-ttl" not in (fz.srv.data / "operators.toml").read_text()


UPLOADS = [op for op in OPS if op.path.endswith("/models/upload")]


@pytest.fixture(scope="module")
def bundle_tar(fz: Fuzzed, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A signed bundle, as the tar ``edgeherd model push`` sends."""
    root = tmp_path_factory.mktemp("upload")
    bundle, _, _ = blob_bundle(root / "b", fz.srv.key, model="upfuzz", version="1.0.0", size=512)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(bundle.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(bundle)), recursive=False)
    return buf.getvalue()


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few random byte-level edits."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "header"]))
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "delete" and buf:
            del buf[pos : pos + draw(st.integers(1, 600))]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=600))
        elif op == "truncate":
            del buf[pos:]
        elif op == "header" and len(buf) >= 512:  # a field of the first tar header: name, mode, size, type, link
            start, size = draw(st.sampled_from([(0, 100), (100, 8), (124, 12), (156, 1), (157, 100), (345, 155)]))
            buf[start:start + size] = draw(st.binary(min_size=size, max_size=size))
    return bytes(buf)


@pytest.mark.skipif(not UPLOADS, reason="the schema has no /models/upload")
def test_upload_unmutated_bundle_registers(fz: Fuzzed, bundle_tar: bytes) -> None:
    """The bundle the next test mutates is one the server takes, so the mutations start from a valid upload."""
    status, answer = fz.raw.send("POST", UPLOADS[0].path, bundle_tar, _headers(fz.token["admin"], "application/x-tar"))
    assert 200 <= status < 300, answer
    assert json.loads(answer)["model"] == "upfuzz"


@pytest.mark.skipif(not UPLOADS, reason="the schema has no /models/upload")
@settings(FUZZ, max_examples=EXAMPLES * 5)
@given(data=st.data())
def test_upload_mutated_bundles(fz: Fuzzed, bundle_tar: bytes, data: st.DataObject) -> None:
    """A bundle's tar (or its gzip) with random edits: registered, or refused with a 4xx; never a 5xx."""
    body = data.draw(mutated(bundle_tar), label="tar")
    if data.draw(st.booleans(), label="gzip"):
        body = gzip.compress(body, mtime=0)
    media = list((UPLOADS[0].spec.get("requestBody") or {}).get("content") or {"application/x-tar": {}})
    ctype = data.draw(st.sampled_from(media), label="content type")
    status, answer = fz.raw.send("POST", UPLOADS[0].path, body, _headers(fz.token["admin"], ctype))
    fz.check(status, answer, f"POST {UPLOADS[0].path} ({ctype}, {len(body)} bytes)")


def test_push_token_is_refused_actions(fz: Fuzzed) -> None:
    """An admin's push-scoped token (what CI holds) may read and push, nothing else."""
    from server.api.auth import PUSH_SCOPE

    status, answer = fz.raw.send("POST", "/api/v1/operators/tokens", json.dumps({"scope": "push"}).encode(),
                                 _headers(fz.token["admin"], "application/json"))
    assert status == 201, answer
    push = json.loads(answer)["token"]
    for op in OPS:
        if op.permission is None or op.permission in PUSH_SCOPE:
            continue
        path = re.sub(r"\{[^}]+\}", "x", op.path)
        status, answer = fz.raw.send(op.method, path, b"{}", _headers(push, "application/json"))
        assert status == 403, f"push token: {op.method} {path} → {status}: {answer[:200]!r}"
        assert b"full-scope" in answer


def test_bodies_over_the_cap_streamed(fz: Fuzzed) -> None:
    """A chunked body (no Content-Length) that grows past the JSON cap: 413, and the server still answers."""
    conn = fz.raw._connect()
    conn.putrequest("POST", "/api/v1/rollouts")
    for name, value in (bearer(fz.token["admin"]) | {"Content-Type": "application/json",
                                                       "Transfer-Encoding": "chunked"}).items():
        conn.putheader(name, value)
    conn.endheaders()
    try:
        for _ in range(8):
            piece = b" " * 16384
            conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before reading it all
    response = conn.getresponse()
    assert response.status == 413, response.read()
    fz.raw.close()
    fz.healthy()


def _exchange(fz: Fuzzed, request: bytes) -> bytes:
    """``request`` as raw bytes over TLS; the first bytes of the answer (b"" if the server just closed)."""
    with socket.create_connection((fz.raw.host, fz.raw.port), timeout=10) as plain, \
            fz.raw.context.wrap_socket(plain, server_hostname=fz.raw.host) as sock:
        sock.sendall(request)
        try:
            return sock.recv(100)
        except (ConnectionResetError, ssl.SSLEOFError, TimeoutError):
            return b""


@pytest.mark.parametrize("request_bytes", [
    b"POST /api/v1/rollouts HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /api/v1/rollouts HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
    b"POST /api/v1/rollouts HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n{}",
    b"POST /api/v1/rollouts HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}\r\n\r\n",
    b"GET /api/v1/whoami HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n",
    b"GET /api/v1/" + b"a" * 40_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00\x01garbage\r\n\r\n",
    b"GET /api/v1/health HTTP/9.9\r\n\r\n",
    b"GET /api/v1/health\xff HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["length-abc", "length-negative", "length-huge", "length-and-chunked", "huge-header", "huge-path", "garbage",
        "http-9.9", "bad-byte"])
def test_malformed_http(fz: Fuzzed, request_bytes: bytes) -> None:
    """Requests HTTP itself refuses (or reads leniently): an answer below 500 or a closed connection, never a 5xx;
    the server keeps answering."""
    reply = _exchange(fz, request_bytes)
    assert reply == b"" or re.match(rb"HTTP/1\.1 [1-4]\d\d ", reply), reply
    fz.healthy()


def test_server_survived(fz: Fuzzed) -> None:
    """After all of the above: the server answers, its admin still works, and its log holds no traceback."""
    fz.healthy()
    status, answer = fz.raw.send("GET", "/api/v1/whoami", None, bearer(fz.token["admin"]))
    assert status == 200 and json.loads(answer)["operator"] == "admin"
    log = fz.srv.log.read_text(errors="replace")
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-6000:]
