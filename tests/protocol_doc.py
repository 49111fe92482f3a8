"""docs/protocol.md read as a device author reads it: its field tables, its types, its canonical form.

Nothing here imports :mod:`protocol`. The tables are parsed from the page; values are checked against
them and messages built from them with plain JSON, so a test that uses this module plays a device written
from the documentation alone.

A field table follows a line ``Fields of `Model`:`` and has the columns field, type, required, meaning.
Types are written in the vocabulary of the page's §3 table (``integer``, ``time``, ``list of T``,
``map of K to T``, ``[T, U]``, `` `literal` ``, alternatives separated by ``|``, or another model's name).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
TABLE = re.compile(r"^Fields of `(\w+)`:\n\n((?:\|.*\|\n)+)", re.M)
_CELL = re.compile(r"(?<!\\)\|")
#: Named types whose rule is not a pattern.
_SCALARS = {"integer", "number", "boolean", "string", "time", "error code"}


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # as written, ``\|`` unescaped to ``|``
    required: bool
    #: The value a receiver assumes when the field is absent (only where the doc gives one).
    default: Any = None
    has_default: bool = False


@dataclass(frozen=True)
class Type:
    """A parsed type expression."""

    kind: str  # scalar, literal, list, map, tuple, model, union
    name: str = ""  # scalar / model name
    value: Any = None  # literal
    args: tuple[Type, ...] = ()

    def __str__(self) -> str:
        match self.kind:
            case "literal":
                return f"`{self.value}`"
            case "list":
                return f"list of {self.args[0]}"
            case "map":
                return f"map of {self.args[0]} to {self.args[1]}"
            case "tuple":
                return "[" + ", ".join(str(a) for a in self.args) + "]"
            case "union":
                return " | ".join(str(a) for a in self.args)
            case _:
                return self.name


def cells(row: str) -> list[str]:
    """The cells of one markdown table row, ``\\|`` unescaped."""
    return [c.strip().replace("\\|", "|") for c in _CELL.split(row.strip())[1:-1]]


def parse_type(text: str) -> Type:
    text = text.strip()
    if text.startswith("list of "):
        return Type("list", args=(parse_type(text[len("list of "):]),))
    if text.startswith("map of "):
        key, _, value = text[len("map of "):].partition(" to ")
        return Type("map", args=(parse_type(key), parse_type(value)))
    parts = [p.strip() for p in text.split("|")]
    if len(parts) > 1:
        return Type("union", args=tuple(parse_type(p) for p in parts))
    if text.startswith("[") and text.endswith("]"):
        return Type("tuple", args=tuple(parse_type(p) for p in text[1:-1].split(",")))
    if text.startswith("`") and text.endswith("`"):
        raw = text[1:-1]
        try:
            parsed: Any = json.loads(raw)
        except ValueError:
            parsed = raw
        return Type("literal", value=parsed if isinstance(parsed, (int, float)) else raw)
    if re.fullmatch(r"[A-Z]\w+", text):
        return Type("model", name=text)
    return Type("scalar", name=text)


def _required(cell: str) -> tuple[bool, Any, bool]:
    if cell == "yes":
        return True, None, False
    if cell == "no":
        return False, None, False
    m = re.fullmatch(r"no, default `(.*)`", cell)
    assert m, f"required cell {cell!r}: write yes, no, or no, default `JSON`"
    return False, json.loads(m.group(1)), True


@dataclass
class ProtocolDoc:
    """The page's schemas: ``tables[model][field]``, the named string types' patterns, the error codes."""

    text: str
    tables: dict[str, dict[str, Field]]
    patterns: dict[str, str]
    error_codes: list[str]

    @classmethod
    def load(cls, path: Path = DOC_PATH) -> ProtocolDoc:
        return cls.parse(path.read_text(encoding="utf-8"))

    @classmethod
    def parse(cls, text: str) -> ProtocolDoc:
        tables: dict[str, dict[str, Field]] = {}
        for m in TABLE.finditer(text):
            rows = m.group(2).strip("\n").split("\n")
            assert cells(rows[0]) == ["field", "type", "required", "meaning"], f"table of {m.group(1)}: {rows[0]}"
            fields: dict[str, Field] = {}
            for row in rows[2:]:
                name, typ, req, _ = cells(row)
                assert re.fullmatch(r"`\w+`", name), f"table of {m.group(1)}: one `field` per row, not {name!r}"
                required, default, has_default = _required(req)
                assert name[1:-1] not in fields, f"table of {m.group(1)}: {name} twice"
                fields[name[1:-1]] = Field(name[1:-1], typ, required, default, has_default)
            assert m.group(1) not in tables, f"two tables of {m.group(1)}"
            tables[m.group(1)] = fields
        patterns = {}
        for row in re.findall(r"^\| [a-z0-9 ]+ \| a string matching `[^`]+`.*\|$", text, re.M):
            name, rule = cells(row)
            pattern = re.search(r"`([^`]+)`", rule)
            assert pattern
            patterns[name] = pattern.group(1)
        codes = re.findall(r"^\| `([a-z_]+)` \| [^|]+ \| [^|]+ \|$", section(text, "## 7."), re.M)
        return cls(text, tables, patterns, codes)

    # -- checking values -------------------------------------------------------------------------

    def check(self, model: str, value: Any, where: str = "") -> None:
        """Raise ValueError, naming the field, unless ``value`` is a valid ``model`` by the tables."""
        where = where or model
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object")
        table = self.tables[model]
        unknown = sorted(set(value) - set(table))
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}")
        for name, f in table.items():
            if name not in value:
                if f.required:
                    raise ValueError(f"{where}: {name} is required")
                continue
            self.check_type(parse_type(f.type), value[name], f"{where}.{name}")

    def check_type(self, t: Type, value: Any, where: str) -> None:
        ok = True
        match t.kind:
            case "literal":
                ok = value == t.value and type(value) is type(t.value)
            case "list":
                ok = isinstance(value, list)
                if ok:
                    for i, item in enumerate(value):
                        self.check_type(t.args[0], item, f"{where}[{i}]")
            case "map":
                ok = isinstance(value, dict)
                if ok:
                    for key, item in value.items():
                        self.check_type(t.args[0], key, f"{where} key")
                        self.check_type(t.args[1], item, f"{where}.{key}")
            case "tuple":
                ok = isinstance(value, list) and len(value) == len(t.args)
                if ok:
                    for i, (a, item) in enumerate(zip(t.args, value, strict=True)):
                        self.check_type(a, item, f"{where}[{i}]")
            case "model":
                self.check(t.name, value, where)
            case "union":
                errors = []
                for alt in t.args:
                    try:
                        self.check_type(alt, value, where)
                        return
                    except ValueError as exc:
                        errors.append(str(exc))
                raise ValueError(f"{where}: matches none of {t}: {'; '.join(errors)}")
            case _:
                ok = self._scalar(t.name, value)
        if not ok:
            raise ValueError(f"{where}: {value!r} is not {t}")

    def _scalar(self, name: str, value: Any) -> bool:
        match name:
            case "integer":
                return isinstance(value, int) and not isinstance(value, bool)
            case "number":
                return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            case "boolean":
                return isinstance(value, bool)
            case "string":
                return isinstance(value, str)
            case "time":
                if not isinstance(value, str):
                    return False
                try:
                    return datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None
                except ValueError:
                    return False
            case "error code":
                return value in self.error_codes
        assert name in self.patterns, f"the doc does not define the type {name!r}"
        return isinstance(value, str) and re.fullmatch(self.patterns[name], value) is not None

    # -- building and canonical form ---------------------------------------------------------------

    def build(self, model: str, **values: Any) -> dict[str, Any]:
        """A ``model`` message from ``values``, its version taken from the table's ``v`` row; checked."""
        msg = dict(values)
        if "v" in self.tables[model] and "v" not in msg:
            version = parse_type(self.tables[model]["v"].type)
            assert version.kind == "literal", "the v row names one version"
            msg["v"] = version.value
        self.check(model, msg)
        return msg

    def canonical(self, model: str, value: dict[str, Any]) -> bytes:
        """§8's canonical JSON of a parsed ``model`` value: defaults filled in, number fields as floats."""
        return json.dumps(self._complete(parse_type(model), value), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False).encode("utf-8")

    def _complete(self, t: Type, value: Any) -> Any:
        match t.kind:
            case "model":
                out = {}
                for name, f in self.tables[t.name].items():
                    if name in value and value[name] is not None:
                        out[name] = self._complete(parse_type(f.type), value[name])
                    elif f.has_default:
                        out[name] = f.default
                return out
            case "list":
                return [self._complete(t.args[0], v) for v in value]
            case "tuple":
                return [self._complete(a, v) for a, v in zip(t.args, value, strict=True)]
            case "map":
                return {k: self._complete(t.args[1], v) for k, v in value.items()}
            case "union":
                for alt in t.args:
                    try:
                        self.check_type(alt, value, "")
                    except ValueError:
                        continue
                    return self._complete(alt, value)
                raise ValueError(f"{value!r} is not {t}")
            case "scalar" if t.name == "number":
                return float(value)
            case _:
                return value


def section(text: str, heading: str) -> str:
    """The section of the page that starts with ``heading`` (e.g. ``## 7.``), up to the next one."""
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def doc_block(text: str, heading: str, lang: str) -> str:
    """The first ```lang code block of the section that starts with ``heading``."""
    m = re.search(rf"^```{lang}\n(.*?)^```", section(text, heading), re.S | re.M)
    assert m, f"no {lang} block in {heading}"
    return m.group(1)
