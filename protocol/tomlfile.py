"""Reading a TOML file with one error type and messages that name the file (configs, profiles, schemas,
operators, feature definitions)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["read_toml"]


def read_toml(path: Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """The parsed contents of ``path``; ``error`` saying "<what> <path> does not exist", "cannot read …" or
    "… is not valid TOML: …" otherwise (``what`` may be empty: the message then starts with the path)."""
    name = f"{what} {path}" if what else str(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{name} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {name}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{name} is not valid TOML: {exc}") from None
