"""The device side must not drag in the server or training stacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "textual", "sqlmodel", "sqlalchemy", "alembic", "server", "toolchain", "onnx", "sklearn"]


DEVICE_MODULES = ["protocol", "agent", "agent.cli", "agent.runtime", "hardware", "hardware.mosquitto"]


@pytest.mark.parametrize("module", DEVICE_MODULES)
def test_device_side_imports_stay_light(module):
    code = (
        f"import sys, {module}\n"
        f"print(','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} pulled in: {out.stdout.strip()}"


def test_protocol_imports_no_numpy_or_paho():
    code = "import sys, protocol; print([m for m in ('numpy', 'paho') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_import_linter_contracts_hold():
    """The layer table of the design, as import-linter contracts in pyproject.toml."""
    exe = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(exe), "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    from graphlib import CycleError, TopologicalSorter

    try:
        TopologicalSorter(graph).prepare()
    except CycleError as exc:
        return list(exc.args[1])
    return None


def test_no_import_cycle():
    """No module imports, directly or through others, a module that imports it back: not at the top of a file and
    not inside a function either (grimp reads both), so a lazy import cannot hide a cycle."""
    import grimp

    packages = ("protocol", "agent", "toolchain", "server", "hardware")
    g = grimp.build_graph(*packages, cache_dir=None)  # a cache can outlive a module that became a package
    graph = {m: set(g.find_modules_directly_imported_by(m)) for m in g.modules}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_sees_a_lazy_import_cycle():
    assert _cycle({"a": {"b"}, "b": {"a"}}) in (["a", "b", "a"], ["b", "a", "b"])
    assert _cycle({"a": {"b"}, "b": set()}) is None


#: package: (its root exception, what is exempt: modules (the other side of the wire, the UI, migrations) and
#: control flow that must not be caught as a failure).
ROOTS = {
    "server": ("server.errors:ServerError", ("server.api.client", "server.tui", ".migrations")),
    "agent": ("agent.errors:AgentError", ("agent.events.Stopping",)),
    "toolchain": ("toolchain.errors:ToolchainError", ()),
    "hardware": ("hardware.errors:HardwareError", ()),
    "protocol": ("protocol.errors:ProtocolError", ()),
}


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_every_exception_a_package_defines_derives_from_its_root(package):
    """The CLI, the TUI and the API catch one root per package: each public exception class a module defines is
    under it."""
    import importlib
    import pkgutil

    root_ref, exempt = ROOTS[package]
    module_name, _, root_name = root_ref.partition(":")
    root = getattr(importlib.import_module(module_name), root_name)
    top = importlib.import_module(package)
    strays, seen = [], 0
    for info in pkgutil.walk_packages(top.__path__, f"{package}."):
        if info.name.endswith("__main__") or any(e in info.name for e in exempt):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == info.name
                    and not name.startswith("_") and f"{info.name}.{name}" not in exempt):
                seen += 1
                if not issubclass(obj, root):
                    strays.append(f"{info.name}.{name}")
    assert seen > 1, f"no exception classes found in {package}"
    assert strays == [], f"not derived from {root_ref}: {strays}"


def test_nobody_outside_protocol_imports_its_private_modules():
    """protocol's underscore modules are its own; everyone else imports what ``protocol`` exports."""
    import grimp

    g = grimp.build_graph("protocol", "agent", "toolchain", "server", "hardware", "tests", "benchmarks",
                          cache_dir=None)
    private = [m for m in g.modules if m.startswith("protocol.") and m.rsplit(".", 1)[1].startswith("_")]
    assert private, "protocol has no private module left to check"
    strays = sorted(f"{importer} -> {m}" for m in private for importer in g.find_modules_that_directly_import(m)
                    if not importer.startswith("protocol"))
    assert strays == []
