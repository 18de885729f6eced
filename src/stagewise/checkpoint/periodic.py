"""Periodic checkpoints in one save directory: the newest complete one, rotation (pure files).

A periodic checkpoint is a tag directory named ``global_step<N>`` that holds a
``manifest.json`` (only a committed save has one: the manifest is written into
the temporary directory before it is renamed). Rotation keeps the newest
``keep_last`` of them and the one ``latest`` names, and runs right after a commit,
so an older checkpoint is deleted only once a newer one is complete; a directory
to delete is first renamed out of the way, so a crash mid-delete never leaves a
torn directory under a checkpoint's name.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

from stagewise.checkpoint.layout import MANIFEST, read_latest

__all__ = ["PERIODIC_TAG", "complete_checkpoints", "latest_complete", "rotate"]

logger = logging.getLogger(__name__)

PERIODIC_TAG = re.compile(r"^global_step(\d+)$")


def _complete(save_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(save_dir, tag, MANIFEST))


def complete_checkpoints(save_dir: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """``(step, tag)`` of every complete ``global_step<N>`` checkpoint, oldest first."""
    path = os.fspath(save_dir)
    if not os.path.isdir(path):
        return []
    found = []
    for name in os.listdir(path):
        match = PERIODIC_TAG.match(name)
        if match is not None and _complete(path, name):
            found.append((int(match.group(1)), name))
    return sorted(found)


def latest_complete(save_dir: str | os.PathLike[str]) -> str | None:
    """The tag to resume from: the one ``latest`` names when it is complete, else the
    newest complete ``global_step<N>``; None when there is none (or no directory)."""
    path = os.fspath(save_dir)
    if not os.path.isdir(path):
        return None
    tag = read_latest(path)
    if tag is not None and _complete(path, tag):
        return tag
    found = complete_checkpoints(path)
    if tag is not None and found:
        logger.warning(
            "%s names %s, which is not a complete checkpoint; using %s instead",
            os.path.join(path, "latest"),
            tag,
            found[-1][1],
        )
    return found[-1][1] if found else None


def rotate(save_dir: str | os.PathLike[str], keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete periodic checkpoints (never the one
    ``latest`` names); the tags deleted. ``keep_last`` 0 keeps everything."""
    if keep_last <= 0:
        return []
    path = os.fspath(save_dir)
    keep = {tag for _, tag in complete_checkpoints(path)[-keep_last:]}
    latest = read_latest(path)
    if latest is not None:
        keep.add(latest)
    removed = []
    for _, tag in complete_checkpoints(path):
        if tag not in keep:
            # renamed first (atomic), so a crash mid-delete never leaves a torn "complete" tag;
            # the next commit removes what is left of it
            doomed = os.path.join(path, f".{tag}.old-{os.getpid():x}")
            os.rename(os.path.join(path, tag), doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(tag)
    if removed:
        logger.info("deleted older checkpoints %s (checkpoint.keep_last=%d)", removed, keep_last)
    return removed
