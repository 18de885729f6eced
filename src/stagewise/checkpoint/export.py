"""Export and import: one consolidated state dict from layer files, and back.

:func:`export_checkpoint` writes one state dict (``.pt`` or ``.safetensors``)
whose keys are those of :func:`stagewise.models.reference.build_reference`
(``"3.weight"``, ``"tied_modules.embed.wte.weight"``); :func:`import_state_dict`
splits one back into layer files that ``load_checkpoint(...,
load_module_only=True)`` reads. Both run in one process, without a process
group. The command line is ``stagewise export`` (:mod:`stagewise.cli.export`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from stagewise.checkpoint.files import commit_dir, load_file, save_file
from stagewise.checkpoint.layout import (
    LATEST,
    LAYER_FILE,
    MANIFEST,
    LayerTable,
    check_tag,
    layer_file_name,
    read_latest,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from stagewise.errors import CheckpointError

__all__ = ["export_checkpoint", "import_state_dict", "read_state_dict", "resolve_tag_dir"]

logger = logging.getLogger(__name__)


def resolve_tag_dir(path: str, tag: str | None) -> str:
    """A tag directory from a save directory (with ``latest`` or ``tag``) or a tag directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if tag is not None:
        tag_dir = os.path.join(path, tag)
    elif any(LAYER_FILE.match(n) for n in os.listdir(path)) or os.path.isfile(
        os.path.join(path, MANIFEST)
    ):
        tag_dir = path
    else:
        latest = read_latest(path)
        if latest is None:
            raise CheckpointError(
                f"{path} holds no layer files and no {LATEST} file; give a checkpoint's tag "
                "directory or its save directory"
            )
        tag_dir = os.path.join(path, latest)
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"checkpoint directory {tag_dir} does not exist")
    return tag_dir


def _tied_table(
    layers: Sequence[Any] | None, tied: Mapping[str, Sequence[int]] | None, num_layers: int
) -> LayerTable:
    if layers is not None and tied is not None:
        raise ValueError("give layers= or tied=, not both")
    if layers is not None:
        return LayerTable.from_specs(layers)
    return LayerTable.from_tied(tied or {}, num_layers)


def export_checkpoint(
    ckpt_dir_or_tag_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    tag: str | None = None,
    layers: Sequence[Any] | None = None,
    tied: Mapping[str, Sequence[int]] | None = None,
) -> str:
    """Write a checkpoint's weights as one state dict with ``build_reference``'s keys.

    Args:
        ckpt_dir_or_tag_dir: a save directory (its ``latest``, or ``tag``) or a tag
            directory.
        out_path: ``*.safetensors`` (needs the ``safetensors`` package) or any other
            name for ``torch.save``.
        tag: the tag to export from a save directory (default: ``latest``).
        layers, tied: where the checkpoint has no manifest (DeepSpeed's), the layer
            list or ``{key: [layer indices]}`` telling which files hold tied modules;
            without them every file is exported as a plain layer.

    Returns:
        ``out_path``. Keys read ``"{idx}.{param}"`` and ``"tied_modules.{key}.{param}"``.
    """
    tag_dir = resolve_tag_dir(os.fspath(ckpt_dir_or_tag_dir), tag)
    manifest = read_manifest(tag_dir)
    if manifest is not None:
        verify_manifest(tag_dir, manifest)
    files: dict[int, str] = {}
    for name in sorted(os.listdir(tag_dir)):
        match = LAYER_FILE.match(name)
        if match is None:
            continue
        if match.group(2):
            raise CheckpointError(
                f"{tag_dir} holds model-parallel shards ({name}); exporting one state dict "
                "from tensor-parallel shards is not supported"
            )
        files[int(match.group(1))] = os.path.join(tag_dir, name)
    if not files:
        raise CheckpointError(f"{tag_dir} holds no layer_*-model_states.pt files")
    if manifest is not None and layers is None and tied is None:
        table = LayerTable.from_tied(manifest.get("tied", {}), int(manifest["num_layers"]))
    else:
        if layers is None and tied is None:
            logger.warning(
                "%s has no %s: tied modules cannot be recognised and are exported as plain "
                "layers; pass layers= (or --tied KEY=INDEX) to name them",
                tag_dir,
                MANIFEST,
            )
        table = _tied_table(layers, tied, max(files) + 1)
    state: dict[str, torch.Tensor] = {}
    exported: set[str] = set()
    for idx in sorted(files):
        key = table.tied_key(idx)
        if key is not None and key in exported:
            continue
        prefix = f"tied_modules.{key}." if key is not None else f"{idx}."
        layer_state = load_file(files[idx], f"weights of layer {idx}")
        for name, value in layer_state.items():
            if isinstance(value, torch.Tensor):
                state[prefix + name] = value
        if key is not None:
            exported.add(key)
    out = os.fspath(out_path)
    _write_state_dict(state, out)
    return out


def _write_state_dict(state: Mapping[str, torch.Tensor], out: str) -> None:
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    if out.endswith(".safetensors"):
        try:
            from safetensors.torch import save_file as save_safetensors
        except ImportError as exc:
            raise ImportError(
                f"writing {out} needs the safetensors package (pip install safetensors); or "
                "give a .pt name"
            ) from exc
        save_safetensors(
            {k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
            tmp,
            metadata={"format": "pt"},
        )
    else:
        save_file({k: v.detach().cpu().clone() for k, v in state.items()}, tmp)
    os.replace(tmp, out)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise CheckpointError(f"state dict {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file as load_safetensors

            state: Any = load_safetensors(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"cannot read state dict {path} ({type(exc).__name__}: {exc}); the file is torn "
            "or not a state dict"
        ) from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise CheckpointError(f"{path} is not a flat state dict of tensors")
    return dict(state)


_PLAIN_KEY = re.compile(r"^(\d+)\.(.+)$")
_TIED_KEY = re.compile(r"^tied_modules\.([^.]+)\.(.+)$")


def import_state_dict(
    state_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    tag: str = "global_step0",
    layers: Sequence[Any] | None = None,
    tied: Mapping[str, Sequence[int]] | None = None,
    save_latest: bool = True,
) -> str:
    """Split a consolidated state dict into layer files a pipeline can start from.

    The inverse of :func:`export_checkpoint`: keys ``"{idx}.{param}"`` go to
    ``layer_{idx:02d}-model_states.pt`` and ``"tied_modules.{key}.{param}"`` to
    the files of the key's layers, which ``layers`` (the layer list) or ``tied``
    (``{key: [layer indices]}``) tell. Read it with
    ``engine.load_checkpoint(out_dir, load_module_only=True)``.

    Returns:
        The tag directory written (atomically; ``latest`` names it when ``save_latest``).
    """
    check_tag(tag)
    state = read_state_dict(os.fspath(state_path))
    plain: dict[int, dict[str, torch.Tensor]] = {}
    tied_states: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in state.items():
        match = _PLAIN_KEY.match(name)
        if match is not None:
            plain.setdefault(int(match.group(1)), {})[match.group(2)] = value
            continue
        match = _TIED_KEY.match(name)
        if match is not None:
            tied_states.setdefault(match.group(1), {})[match.group(2)] = value
            continue
        raise CheckpointError(
            f"key {name!r} of {os.fspath(state_path)} is neither '<layer index>.<name>' nor "
            "'tied_modules.<key>.<name>'; export the model built by build_reference"
        )
    top = max([*plain, *(i for ids in (tied or {}).values() for i in ids), -1]) + 1
    table = _tied_table(layers, tied, top)
    missing = sorted(set(tied_states) - set(table.tied))
    if missing:
        raise CheckpointError(
            f"tied module(s) {missing} in {os.fspath(state_path)} have no layer indices; pass "
            "layers=<the layer list> (or --tied KEY=INDEX,...) to place them"
        )
    for key, indices in table.tied.items():
        clash = sorted(set(indices) & set(plain))
        if clash:
            raise CheckpointError(
                f"{os.fspath(state_path)} has plain weights for layer(s) {clash}, which tie "
                f"module {key!r}; a layer is either plain ('{clash[0]}.<name>') or tied "
                f"('tied_modules.{key}.<name>'), so check the tied layer indices"
            )
    out_path = os.fspath(out_dir)
    os.makedirs(out_path, exist_ok=True)
    tmp_dir = os.path.join(out_path, f".{tag}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    for idx, layer_state in sorted(plain.items()):
        if idx >= table.num_layers:
            raise CheckpointError(
                f"{os.fspath(state_path)} has weights for layer {idx} but the layer list has "
                f"{table.num_layers} layers"
            )
        save_file(layer_state, os.path.join(tmp_dir, layer_file_name(idx)))
    for key, layer_state in tied_states.items():
        indices = [i for i in table.tied[key] if i in table.module_files] or [table.canonical[key]]
        for idx in indices:
            save_file(layer_state, os.path.join(tmp_dir, layer_file_name(idx)))
    write_manifest(tmp_dir, tag, "module", table)
    return commit_dir(tmp_dir, out_path, tag, save_latest)
