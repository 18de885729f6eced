"""Checkpoint files: written durably and atomically, read with errors that name them.

Atomicity: every rank writes into a hidden temporary directory; once every rank
reports success, rank 0 writes the manifest and :func:`commit_dir` renames the
directory to its tag and then replaces ``latest`` (a temporary file moved into
place with ``os.replace``). A crash at any point leaves the previous checkpoint
loadable and ``latest`` naming it. Re-saving an existing tag moves the old
directory aside and the new one into place in two renames; a crash between them
leaves that tag missing (loading then names it).

A commit also removes what earlier saves that died left behind (``.TAG.tmp-*``,
``.TAG.old-*``, ``latest.tmp-*``), whatever their tag.

Content hashes: :func:`save_file` returns the SHA-256 of what it wrote; the
manifest records one per file, and :func:`load_file` checks the hash of every
file it reads against the manifest beside it, so a file corrupted at the same
size is named, never loaded.

Files are read with ``torch.load(weights_only=False)``, as DeepSpeed reads them:
load checkpoints you trust.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import torch

from stagewise.errors import CheckpointError

__all__ = [
    "LATEST",
    "MANIFEST",
    "HostPool",
    "commit_dir",
    "cpu_copy",
    "file_digest",
    "fsync_dir",
    "load_file",
    "recorded_digest",
    "remove_leftovers",
    "save_file",
    "staging",
    "write_text_atomic",
]

LATEST = "latest"
MANIFEST = "manifest.json"
# what a save or commit that died leaves in a save directory
LEFTOVER = re.compile(r"^(\..+\.(tmp|old)-[0-9a-f]+|latest\.tmp-\d+)$")
_CHUNK = 1 << 22


class HostPool:
    """Host buffers kept from one checkpoint copy to the next, by shape and dtype.

    An asynchronous saver copies the same tensors at every save; taking the buffers
    of the previous (finished) save saves allocating and faulting in fresh memory.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """A CPU buffer of ``like``'s shape and dtype (pinned when ``like`` is on a GPU)."""
        free = self._free.get((tuple(like.shape), like.dtype))
        if free:
            return free.pop()
        pin = like.device.type == "cuda"
        return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)

    def give_back(self, value: Any) -> None:
        """Return every tensor in ``value`` (the objects of a finished save) to the pool."""
        if isinstance(value, torch.Tensor):
            if value.device.type == "cpu" and value.is_contiguous():
                self._free.setdefault((tuple(value.shape), value.dtype), []).append(value)
        elif isinstance(value, dict):
            for item in value.values():
                self.give_back(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                self.give_back(item)


_staging: contextvars.ContextVar[HostPool | None] = contextvars.ContextVar(
    "stagewise_staging", default=None
)


@contextlib.contextmanager
def staging(pool: HostPool | None) -> Iterator[None]:
    """Within the block, :func:`cpu_copy` copies into buffers of ``pool`` (None: fresh ones)."""
    token = _staging.set(pool)
    try:
        yield
    finally:
        _staging.reset(token)


def cpu_copy(value: Any) -> Any:
    """Tensors cloned to the CPU (compact storage); containers walked; the rest as is.

    Inside :func:`staging`, the copies go into the pool's buffers.
    """
    if isinstance(value, torch.Tensor):
        pool = _staging.get()
        if pool is None:
            return value.detach().to("cpu", copy=True)
        return pool.take(value).copy_(value.detach())
    if isinstance(value, dict):
        return type(value)((k, cpu_copy(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(v) for v in value)
    return value


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_digest(path: str) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(functools.partial(handle.read, _CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_file(obj: Any, path: str) -> str:
    """``torch.save`` to ``path``, flushed to disk before returning; its SHA-256."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    return file_digest(path)  # read back from the page cache


@functools.lru_cache(maxsize=16)
def _manifest_digests(manifest_path: str, mtime_ns: int, size: int) -> dict[str, str]:
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            digests = json.load(handle).get("sha256", {})
    except (OSError, ValueError, AttributeError):
        return {}  # reading the manifest itself names its problems elsewhere
    return dict(digests) if isinstance(digests, dict) else {}


def recorded_digest(path: str) -> str | None:
    """The SHA-256 that the manifest beside ``path`` records for it, or None."""
    manifest = os.path.join(os.path.dirname(os.path.abspath(path)), MANIFEST)
    try:
        stat = os.stat(manifest)
    except OSError:
        return None
    return _manifest_digests(manifest, stat.st_mtime_ns, stat.st_size).get(os.path.basename(path))


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and move it into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def load_file(path: str, what: str) -> Any:
    """``torch.load`` a checkpoint file on the CPU; a missing or unreadable file is named."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: {path} is missing")
    expected = recorded_digest(path)
    if expected is not None:
        actual = file_digest(path)
        if actual != expected:
            raise CheckpointError(
                f"{what}: checkpoint file {path} does not match its content hash in {MANIFEST} "
                f"(sha256 recorded {expected[:16]}..., found {actual[:16]}...): the file is "
                "corrupt or was changed since the save; load an earlier tag (pass tag=) or "
                "save again"
            )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(
            f"{what}: cannot read {path} ({type(exc).__name__}: {exc}); the file is torn or "
            "corrupt: load an earlier checkpoint (pass tag=) or save again"
        ) from exc


def commit_dir(tmp_dir: str, save_dir: str, tag: str, save_latest: bool) -> str:
    """Move a complete temporary directory to ``save_dir/tag``, then point ``latest`` at it."""
    final = os.path.join(save_dir, tag)
    old: str | None = None
    if os.path.exists(final):
        old = os.path.join(save_dir, f".{tag}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp_dir, final)
    fsync_dir(save_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if save_latest:
        write_text_atomic(os.path.join(save_dir, LATEST), tag)
    remove_leftovers(save_dir)
    return final


def remove_leftovers(save_dir: str) -> list[str]:
    """Remove what saves that died left in ``save_dir`` (of any tag); the names removed.

    Call it only when no save into ``save_dir`` is in flight (a commit is the moment).
    """
    removed = []
    for entry in sorted(os.listdir(save_dir)):
        if LEFTOVER.match(entry):
            path = os.path.join(save_dir, entry)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except OSError:
                    continue
            removed.append(entry)
    return removed
