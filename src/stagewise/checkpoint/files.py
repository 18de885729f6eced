"""Checkpoint files: written durably and atomically, read with errors that name them.

Atomicity: every rank writes into a hidden temporary directory; once every rank
reports success, rank 0 writes the manifest and :func:`commit_dir` renames the
directory to its tag and then replaces ``latest`` (a temporary file moved into
place with ``os.replace``). A crash at any point leaves the previous checkpoint
loadable and ``latest`` naming it. Re-saving an existing tag moves the old
directory aside and the new one into place in two renames; a crash between them
leaves that tag missing (loading then names it).

Files are read with ``torch.load(weights_only=False)``, as DeepSpeed reads them:
load checkpoints you trust.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch

from stagewise.errors import CheckpointError

__all__ = ["commit_dir", "cpu_copy", "fsync_dir", "load_file", "save_file", "write_text_atomic"]

LATEST = "latest"


def cpu_copy(value: Any) -> Any:
    """Tensors cloned to the CPU (compact storage); containers walked; the rest as is."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
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


def save_file(obj: Any, path: str) -> None:
    """``torch.save`` to ``path``, flushed to disk before returning."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


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
    for entry in os.listdir(save_dir):  # leftovers of earlier saves of this tag that died
        if entry.startswith(f".{tag}.tmp-"):
            shutil.rmtree(os.path.join(save_dir, entry), ignore_errors=True)
    if save_latest:
        write_text_atomic(os.path.join(save_dir, LATEST), tag)
    return final
