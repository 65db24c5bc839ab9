"""Atomic file output: a reader never sees a half-written artifact."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class OutputError(OSError):
    """An output could not be written (disk full, read-only, quota); the message names the file and what to do."""


def _disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save's zip writer reports a failed write as a RuntimeError of its C++ stream
    return isinstance(err, RuntimeError) and ("inline_container" in str(err) or "unexpected pos" in str(err))


def output_error(path: Path, err: BaseException) -> OutputError:
    """``err`` (raised while writing ``path``) as one line naming the file, the space left and what to do."""
    try:
        free = shutil.disk_usage(path.parent).free
        left = f"{free / 2**20:.1f} MiB free there"
    except OSError:
        left = "free space unknown"
    if _disk_full(err):
        return OutputError(errno.ENOSPC, f"no space left to write {path} ({left}); free space on that filesystem "
                                         "or write the output elsewhere (--out, --checkpoint-dir); nothing "
                                         "half-written was kept", str(path))
    code = err.errno if isinstance(err, OSError) and err.errno else errno.EIO
    return OutputError(code, f"cannot write {path}: {getattr(err, 'strerror', None) or err} ({left}); nothing "
                             "half-written was kept", str(path))


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Temporary paths beside ``paths``; all renamed over their targets only once every one was written.

    A set of files that belong together (an artifact and its records) appears whole or not
    at all: a failure while writing any of them (a full disk) removes every temporary and
    raises :class:`OutputError` naming the file. The renames themselves cannot run out of space.
    """
    targets = [Path(p) for p in paths]
    tmps: list[Path] = []
    current = targets[0] if targets else Path(".")
    try:
        for path in targets:
            current = path
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmps.append(Path(tmp))
        yield list(tmps)
        for tmp, path in zip(tmps, targets):
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the usual mode
        for tmp, path in zip(tmps, targets):
            os.replace(tmp, path)
    except BaseException as err:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, OutputError) and (
                _disk_full(err) or isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EIO)):
            raise output_error(_failed_target(err, targets, tmps) or current, err) from None
        raise


def _failed_target(err: BaseException, targets: list[Path], tmps: list[Path]) -> Path | None:
    name = getattr(err, "filename", None)
    for tmp, path in zip(tmps, targets):
        if name and str(tmp) == str(name):
            return path
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success."""
    with atomic_paths(path) as (tmp,):
        yield tmp


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return Path(path)


CONTENT_SHA256 = "content_sha256"


class DamagedArtifactError(ValueError):
    """A file's content does not match the checksum recorded when it was written."""


def content_digest(tensors: dict, meta: dict[str, str]) -> str:
    """sha256 over the metadata (but the digest itself) and every tensor's name, dtype, shape and bytes.

    Recorded in the file at write and recomputed at read: a flipped byte in a value, an
    index or a metadata field is caught on load, where safetensors alone would load it.
    """
    import hashlib

    import torch

    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != CONTENT_SHA256}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict, meta: dict[str, str], fmt: str) -> Path:
    """Write a safetensors artifact atomically, tagged with its format, library version and content checksum."""
    from safetensors.torch import save_file

    from saft.version import __version__

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**meta, "format": fmt}
    meta.setdefault("library_version", __version__)
    meta[CONTENT_SHA256] = content_digest(tensors, meta)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        _sort_metadata(tmp)
    return Path(path)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata in sorted key order, in place.

    safetensors serialises the metadata from a hash map, so its order (and so the file's
    bytes) changes from process to process; the same artifact must have the same bytes,
    because step keys, DVC and the KFP cache hash them. Reordering keeps the header's
    length (same keys and values, same compact JSON); it is padded with spaces, which
    the format allows, should the escaping ever come out shorter.
    """
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) > size:  # never seen: leave the (valid, only unordered) file as written
            return
        fh.seek(8)
        fh.write(new.ljust(size, b" "))


def load_tensors(path: str | os.PathLike, fmt: str | tuple[str, ...], what: str) -> tuple[dict, dict[str, str]]:
    """Read a safetensors artifact of format ``fmt`` (or one of several); a missing or foreign file is a clear error.

    The format stays in the returned metadata only when several are accepted (the caller tells them apart)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    formats = (fmt,) if isinstance(fmt, str) else tuple(fmt)
    if meta.get("format") not in formats:
        raise ValueError(f"{path}: not a SAFT {what} (format={meta.get('format')!r}, expected "
                         f"{' or '.join(map(repr, formats))})")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    recorded = meta.pop(CONTENT_SHA256, None)
    # files written before checksums were recorded carry none: they load as before
    if recorded is not None and content_digest(tensors, meta) != recorded:
        raise DamagedArtifactError(
            f"{path}: damaged {what}: its content does not match the checksum recorded when it was written "
            f"({recorded[:12]}...); restore it from where it came from (the run's output folder or the registry) "
            "or produce it again")
    if isinstance(fmt, str):
        meta.pop("format")
    return tensors, meta


def read_text(path: str | os.PathLike, what: str, error: type[Exception]) -> str:
    """UTF-8 text of a user-supplied file, or ``error`` naming it and saying what went wrong."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{what} {path} cannot be read as UTF-8 text: {err}") from None


def shorten(text: str, width: int = 300) -> str:
    """``text`` on one line, cut at a word boundary with `` ...`` when longer than ``width`` (never mid-word)."""
    import textwrap

    return textwrap.shorten(" ".join(str(text).split()), width=width, placeholder=" ...")
