"""``POST /models/upload``: a signed bundle, sent as a tar (plain or gzip) of its directory (server/api/app.py).

The body is streamed to a file in a temporary directory under ``<data>/uploads`` (never held in memory), capped
at ``app.state.max_bundle`` bytes, and unpacked by :func:`unpack_bundle`, which takes regular files and
directories only::

    manifest.json, MODEL_CARD.md, artifacts/<sha256>, …    at the top of the archive (``edgeherd`` packs it so),
    <one directory>/manifest.json, …                        or in one top-level directory (``tar czf b.tgz b/``)

Refused, before anything is written outside the temporary directory: absolute names, ``..``, links, devices,
sparse files, a name given twice, more than :data:`MAX_MEMBERS` members, more than the cap in all, and archive
metadata (pax or GNU long-name headers) over :data:`MAX_META` bytes, which the tar reader would load into memory.
Then :meth:`server.registry.Registry.push_model` checks the signature against the server key and every artifact's
hash, as ``edgeherd model push`` does; a refusal is 422 with its reason.

Errors: :class:`ArchiveError` (the archive cannot be used; the message says why).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from server.api.auth import Operator, permit
from server.api.routes_base import invalid
from server.errors import ServerError
from server.governance import Permission
from server.registry import RegistryError
from toolchain.bundle import MANIFEST

__all__ = ["MAX_MEMBERS", "MAX_META", "ArchiveError", "unpack_bundle", "upload"]

#: Most members (files and directories) a bundle archive may have.
MAX_MEMBERS = 64
#: Largest pax or GNU long-name header, bytes (a name, a few attributes).
MAX_META = 64 * 1024
#: Most path components of a member's name (a top-level directory, ``artifacts``, the file).
MAX_DEPTH = 3
UPLOADS = "uploads"
CHUNK = 1 << 20
#: Content types the upload takes (or none given).
ACCEPTED = ("application/octet-stream", "application/x-tar", "application/gzip", "application/x-gzip")
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_BLOCK = 512
#: pax records that change where members lie (their size, a sparse map), which this module's walk would not follow.
_PAX_LAYOUT = re.compile(rb"(?:^|\n)\d+ (?:size|GNU\.sparse\.[a-z.]+)=")


class ArchiveError(ServerError):
    """The uploaded archive is not a usable bundle archive; the message says why."""


# -- unpacking (files in, files out; no network, no database) ---------------------------------------


def _gunzip(source: Path, dest: Path, cap: int) -> None:
    total = 0
    try:
        with gzip.open(source, "rb") as src, dest.open("wb") as out:
            while chunk := src.read(CHUNK):
                total += len(chunk)
                if total > cap:
                    raise ArchiveError(f"the archive unpacks to more than {cap} bytes")
                out.write(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise ArchiveError(f"not a valid gzip stream: {exc}") from None


def _octal(field: bytes) -> int:
    """A tar header's numeric field: octal digits, or base-256 when its first byte has the high bit."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] and field[0] & 0x80:
        raise ArchiveError("a tar header holds a negative size")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits or b"0", 8)
    except ValueError:
        raise ArchiveError("not a tar archive (a header's size field is not a number)") from None


def _scan_headers(tar: BinaryIO, size: int) -> None:
    """Walk the tar's headers without reading their contents: refuse oversized metadata (pax headers and GNU long
    names are read whole into memory by :mod:`tarfile`) and too many headers, before :mod:`tarfile` sees it."""
    headers = 0
    position = 0
    while position + _BLOCK <= size:
        tar.seek(position)
        block = tar.read(_BLOCK)
        if block == b"\0" * _BLOCK:
            return
        headers += 1
        if headers > 4 * MAX_MEMBERS:
            raise ArchiveError(f"more than {MAX_MEMBERS} members")
        length = _octal(block[124:136])
        kind = block[156:157]
        if kind in (b"x", b"g", b"L", b"K") and length > MAX_META:
            raise ArchiveError(f"a tar metadata header of {length} bytes (at most {MAX_META})")
        if kind in (b"x", b"g") and _PAX_LAYOUT.search(tar.read(length)):
            # tarfile would take the next member's size (or sparse map) from here, not from its header: this walk
            # would no longer see what tarfile reads, so such archives are refused (bundles never need them)
            raise ArchiveError("a pax header that sets a member's size or sparse layout; pack the bundle with "
                               "`edgeherd bundle` or a plain `tar cf`")
        position += _BLOCK + -(-length // _BLOCK) * _BLOCK
    if position > size:
        raise ArchiveError("the archive is truncated")


def _relative(name: str) -> tuple[str, ...]:
    """A member's name as safe path parts; ArchiveError naming it otherwise."""
    if name.startswith("/") or "\\" in name or "\0" in name:
        raise ArchiveError(f"member {name[:200]!r}: only relative names with '/' are allowed")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"member {name[:200]!r}: '..' is not allowed")
    if len(parts) > MAX_DEPTH:
        raise ArchiveError(f"member {name[:200]!r}: nested deeper than {MAX_DEPTH} levels")
    for part in parts:
        if not _PART.fullmatch(part):
            raise ArchiveError(f"member {name[:200]!r}: names use A-Z, a-z, 0-9, '.', '_' and '-' only")
    return parts


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a FIFO"
    if member.issparse():
        return "a sparse file"
    return f"of tar type {member.type!r}"


def _extract_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise ArchiveError(f"member {member.name!r} cannot be read")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    written = 0
    with source, os.fdopen(fd, "wb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > member.size:
                break
            out.write(chunk)
    if written != member.size:
        raise ArchiveError(f"member {member.name!r}: {written} bytes where its header says {member.size}")


def unpack_bundle(archive: Path, dest: Path, *, cap: int) -> Path:
    """Unpack a bundle archive (tar, or gzip of a tar) into the empty directory ``dest``; the bundle directory
    (``dest`` itself, or its one top-level directory) holding ``manifest.json``. At most ``cap`` bytes unpacked."""
    with archive.open("rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:
        plain = archive.with_name(archive.name + ".tar")
        _gunzip(archive, plain, cap)
        archive = plain
    size = archive.stat().st_size
    if size < _BLOCK:
        raise ArchiveError("not a tar archive (shorter than one tar header); send the bundle directory as a tar")
    with archive.open("rb") as f:
        _scan_headers(f, size)
    seen: set[tuple[str, ...]] = set()
    total = members = 0
    try:
        with tarfile.open(archive, "r:") as tar:
            for member in tar:
                members += 1
                if members > MAX_MEMBERS:
                    raise ArchiveError(f"more than {MAX_MEMBERS} members")
                parts = _relative(member.name)
                if not parts:
                    continue  # "." itself
                if parts in seen:
                    raise ArchiveError(f"member {member.name!r} is given twice")
                seen.add(parts)
                target = dest.joinpath(*parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True, mode=0o700)
                    continue
                if not member.isreg() or member.issparse():
                    raise ArchiveError(f"member {member.name!r} is {_kind(member)}: a bundle holds regular files "
                                       f"and directories only")
                total += member.size
                if total > cap:
                    raise ArchiveError(f"the archive's files add up to more than {cap} bytes")
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                _extract_file(tar, member, target)
    except tarfile.TarError as exc:
        raise ArchiveError(f"not a valid tar archive: {exc}") from None
    except OSError as exc:
        raise ArchiveError(f"cannot unpack the archive: {exc.strerror or exc}") from None
    if (dest / MANIFEST).is_file():
        return dest
    top = list(dest.iterdir())
    if len(top) == 1 and top[0].is_dir() and (top[0] / MANIFEST).is_file():
        return top[0]
    raise ArchiveError(f"the archive holds no {MANIFEST}, at its top or in its one top-level directory; send a tar "
                       f"of the bundle directory")


# -- the route ------------------------------------------------------------------------------------

upload = APIRouter(prefix="/models", tags=["models"])


def _workdir(data: Path) -> Path:
    root = data / UPLOADS
    root.mkdir(mode=0o700, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="upload-", dir=root))


def _register(op: Operator, archive: Path, work: Path, cap: int) -> dict[str, Any]:
    unpacked = work / "bundle"
    unpacked.mkdir(mode=0o700)
    try:
        bundle = unpack_bundle(archive, unpacked, cap=cap)
        version = op.registry.push_model(bundle, actor=op.name)
    except (ArchiveError, RegistryError) as exc:  # said without the server's own paths
        message = str(exc).replace(f"{unpacked}/", "").replace(f"{unpacked}: ", "").replace(str(unpacked), "it")
        raise invalid("", message, "bundle") from None
    return {"model": version.name, "version": version.version, "stage": version.stage,
            "manifest_sha256": version.manifest_sha256}


@upload.post("/upload", summary="Register a signed bundle, sent as a tar (or .tar.gz) of its directory",
             openapi_extra={"requestBody": {"required": True, "content": {
                 t: {"schema": {"type": "string", "format": "binary"}} for t in ACCEPTED}}})
async def upload_model(request: Request,
                       op: Annotated[Operator, Depends(permit(Permission.PUSH_MODEL))]) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type and content_type not in ACCEPTED:
        raise HTTPException(415, f"send the bundle as {' or '.join(ACCEPTED)}, not {content_type}")
    cap: int = request.app.state.max_bundle
    work = await run_in_threadpool(_workdir, op.registry.data)
    try:
        archive = work / "upload"
        received = 0
        with archive.open("wb") as out:
            async for chunk in request.stream():
                received += len(chunk)
                if received > cap:
                    raise HTTPException(413, f"request body over {cap} bytes")
                await run_in_threadpool(out.write, chunk)
        if received == 0:
            raise invalid("", "empty body: send the bundle directory as a tar", "bundle")
        return await run_in_threadpool(_register, op, archive, work, cap)
    finally:
        await run_in_threadpool(shutil.rmtree, work, True)
