"""docs/api.md and docs/openapi.json stay true to the API: the generated reference is current, the prose names
only endpoints that exist, its error table covers every status the app documents, and the generator keeps the
prose around the reference."""

from __future__ import annotations

import inspect
import re

import pytest

from server.api import app as api_app
from server.api.docs import BEGIN, DOC, END, build_app, main, operations, permissions, render_doc

APP = build_app()
SCHEMA = APP.openapi()
OPS = operations(SCHEMA, permissions(APP))
TEXT = DOC.read_text(encoding="utf-8")
PROSE = TEXT[: TEXT.find(BEGIN)] if BEGIN in TEXT else TEXT


def test_reference_and_schema_are_current(capsys: pytest.CaptureFixture[str]) -> None:
    """Fails after an endpoint changes until `python -m server.api.docs` is run and its output committed."""
    assert main(["--check"]) == 0, capsys.readouterr().err


def test_every_operation_that_needs_a_token_names_its_permission() -> None:
    unnamed = [op.title for op in OPS if op.secured and op.permission is None]
    assert not unnamed, f"no permit(Permission.X) dependency found for {unnamed}"
    assert [op.title for op in OPS if not op.secured] == ["GET /api/v1/health"]


def _matches(path: str) -> list[str]:
    """The schema's operations whose path template matches ``path``."""
    return [op.title for op in OPS
            if re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(op.path)), path)]


def test_prose_names_only_endpoints_that_exist() -> None:
    named = {(m.group(1), m.group(2)) for m in re.finditer(r"\b(GET|POST|PUT|DELETE|PATCH) (/api/v1/[^\s`\"),]+)",
                                                          PROSE)}
    named |= {("", m.group(1).rstrip(".")) for m in re.finditer(r"\$EDGEHERD_URL(/api/v1/[^\s\"']+)", PROSE)}
    assert len(named) >= 10
    for method, path in sorted(named):
        concrete = path.replace("NAME:VERSION", "m:1").replace("tok_…", "tok_x")
        found = _matches(concrete)
        assert found, f"docs/api.md names {method} {path}, which the API does not have"
        if method:
            assert f"{method} " in " ".join(t[: len(method) + 1] for t in found), f"{method} {path}: {found}"


def test_error_table_covers_what_the_app_documents() -> None:
    documented = set(re.findall(r"^- (\d{3}) ", inspect.getdoc(api_app) or "", re.M))
    table = set(re.findall(r"^\| (\d{3}) \|", PROSE, re.M))
    assert documented and documented <= table, f"docs/api.md's error table lacks {sorted(documented - table)}"


def test_generator_keeps_the_prose_around_the_reference() -> None:
    page = f"# Title\n\nprose before\n\n{BEGIN}\nold reference\n{END}\nprose after\n"
    once = render_doc(page, "## Reference\n\nnew\n")
    assert once.startswith("# Title\n\nprose before\n\n") and once.endswith(f"{END}\nprose after\n")
    assert "old reference" not in once and "new" in once
    assert render_doc(once, "## Reference\n\nnew\n") == once
    assert render_doc("# Only prose\n", "R\n") == f"# Only prose\n\n{BEGIN}\n\nR\n\n{END}\n"
