"""Back to Hugging Face: a stagewise checkpoint as a ``from_pretrained`` directory.

A checkpoint saved from :func:`stagewise.hf.pipeline_module` (at any number of
stages) records the model's config in its ``manifest.json`` (``"metadata"`` ->
``"hf"``). :func:`export_hf` reads the layer files one at a time
(``layer_XX-model_states.pt``), renames their tensors to the causal LM's names
(``"2.block.ln_1.weight"`` -> ``"transformer.h.0.ln_1.weight"``), checks each
against the config, and writes ``config.json`` and ``model.safetensors``
(shards with ``model.safetensors.index.json`` past ``max_shard_size``)::

    stagewise export --hf CKPT_DIR OUT_DIR          # --tag TAG, default: latest
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('OUT_DIR')"

A tied LM head is not written (``from_pretrained`` ties it to the embedding,
as ``save_pretrained`` leaves it out). At most one shard is in memory at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import torch

from stagewise.checkpoint import (
    MANIFEST,
    layer_file_name,
    read_manifest,
    resolve_tag_dir,
    verify_manifest,
)
from stagewise.errors import CheckpointError
from stagewise.hf._deps import require
from stagewise.hf.architectures import ARCHITECTURES, architecture_of
from stagewise.hf.build import METADATA_KEY, expected_tensors, resolve
from stagewise.hf.weights import INDEX_FILE, SINGLE_FILE, WeightsError

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "export_hf", "export_hf_main", "parse_size"]

DEFAULT_MAX_SHARD_SIZE = 5 * 1000**3  # bytes, as save_pretrained's default "5GB"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """Bytes from ``"5GB"``, ``"500MB"``, ``"64KiB"`` or a plain number of bytes."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 5GB, 500MB or 1048576")
    return int(float(match[1]) * _UNITS[(match[2] or "B").lower()])


def _tag_dir(checkpoint: str, tag: str | None) -> str:
    tag_dir = resolve_tag_dir(checkpoint, tag)
    if not os.path.isfile(os.path.join(tag_dir, MANIFEST)):
        raise CheckpointError(
            f"{tag_dir} has no {MANIFEST}: it is not a checkpoint written by "
            "engine.save_checkpoint (or it is incomplete)"
        )
    return tag_dir


def _hf_metadata(tag_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    manifest = read_manifest(tag_dir) or {}
    verify_manifest(tag_dir, manifest)
    meta = (manifest.get("metadata") or {}).get(METADATA_KEY)
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(
            f"{os.path.join(tag_dir, MANIFEST)} records no Hugging Face model (no "
            f"metadata.{METADATA_KEY}): the checkpoint was not saved from "
            "stagewise.hf.pipeline_module; build the PipelineModule with "
            "stagewise.hf.pipeline_module(...) to export it, or use 'stagewise export' for a "
            "plain state dict"
        )
    return manifest, meta


def _load_layer(path: str, idx: int) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{path} is missing: the checkpoint has no weights for layer {idx}; it is "
            "incomplete (restore the file or export an earlier tag)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {path} ({type(exc).__name__}: {exc}); the file is torn or corrupt"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a layer state dict")
    return state


class _ShardWriter:
    """Collects tensors and writes safetensors shards of at most ``max_bytes`` each."""

    def __init__(self, out_dir: str, max_bytes: int) -> None:
        self.out_dir = out_dir
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []  # (temporary file, names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.detach().contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        save_file = require("safetensors.torch").save_file
        tmp = os.path.join(self.out_dir, f".shard-{len(self.written):05d}.tmp-{os.getpid()}")
        save_file(self.pending, tmp, metadata={"format": "pt"})
        self.written.append((tmp, sorted(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Name the shards as save_pretrained does; returns the file names."""
        self.flush()
        count = len(self.written)
        if count == 1:
            os.replace(self.written[0][0], os.path.join(self.out_dir, SINGLE_FILE))
            return [SINGLE_FILE]
        names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map: dict[str, str] = {}
        for (tmp, tensors), final in zip(self.written, names, strict=True):
            os.replace(tmp, os.path.join(self.out_dir, final))
            weight_map.update(dict.fromkeys(tensors, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        with open(os.path.join(self.out_dir, INDEX_FILE), "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2, sort_keys=True)
            handle.write("\n")
        return [*names, INDEX_FILE]


def export_hf(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    tag: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> str:
    """Write a stagewise.hf checkpoint as a ``from_pretrained`` directory.

    Args:
        checkpoint: a save directory (its ``latest``, or ``tag``) or a tag directory,
            saved from a :func:`~stagewise.hf.pipeline_module` at any stage count.
        out_dir: the directory to write (created; must hold no weights yet).
        tag: the checkpoint's tag (default: the one ``latest`` names).
        max_shard_size: bytes (or ``"5GB"``) per safetensors file.

    Returns:
        ``out_dir``, holding ``config.json`` and ``model.safetensors`` (or shards and
        ``model.safetensors.index.json``).

    Raises:
        CheckpointError: the checkpoint is missing, incomplete, not from stagewise.hf, or
            a tensor does not fit the recorded config (naming the file and the tensor).
    """
    transformers = require("transformers")
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    if max_bytes < 1:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    tag_dir = _tag_dir(os.fspath(checkpoint), tag)
    manifest, meta = _hf_metadata(tag_dir)
    model_type = meta.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"{tag_dir}/{MANIFEST} records model_type {model_type!r}, which stagewise.hf "
            f"cannot export (it knows {sorted(ARCHITECTURES)})"
        )
    config = transformers.CONFIG_MAPPING[model_type].from_dict(dict(meta["config"]))
    arch = architecture_of(config, f"{tag_dir}/{MANIFEST}")
    model = resolve(config, dtype=None)
    if meta.get("layers") != model.hf_prefixes or manifest.get("num_layers") != len(model.specs):
        raise CheckpointError(
            f"{tag_dir}/{MANIFEST} records {manifest.get('num_layers')} layers named "
            f"{meta.get('layers')}, but its config makes {len(model.specs)} layers named "
            f"{model.hf_prefixes}; it was written by another version of stagewise.hf"
        )
    expected = expected_tensors(model)
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    present = [f for f in os.listdir(out) if f.endswith(".safetensors") or f == INDEX_FILE]
    if present:
        raise FileExistsError(
            f"{out} already holds weights ({', '.join(sorted(present))}); export into an empty "
            "directory or delete them"
        )
    writer = _ShardWriter(out, max_bytes)
    seen: set[str] = set()
    dtype: torch.dtype | None = None
    for idx, prefixes in enumerate(model.hf_prefixes):
        if prefixes is None:
            continue
        local, hf_prefix = prefixes
        path = os.path.join(tag_dir, layer_file_name(idx))
        for key, value in sorted(_load_layer(path, idx).items()):
            name = hf_prefix + key[len(local) :] if key.startswith(local) else None
            if name is None or name not in expected:
                raise CheckpointError(
                    f"{path} holds tensor {key!r}, which layer {idx} of the recorded "
                    f"{arch.causal_lm} config has no place for; the checkpoint does not "
                    "match its manifest"
                )
            shape = expected[name][0]
            if tuple(value.shape) != shape:
                raise CheckpointError(
                    f"tensor {key!r} in {path} ({name!r}) has shape {tuple(value.shape)} but "
                    f"the config recorded in {MANIFEST} makes it {shape}; the checkpoint and "
                    "its manifest disagree: export the checkpoint it was saved with"
                )
            if dtype is None and value.is_floating_point():
                dtype = value.dtype
            writer.add(name, value)
            seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(
            f"{tag_dir} lacks {len(missing)} tensor(s) of the model, first {missing[0]!r}; "
            "the checkpoint is incomplete"
        )
    writer.finish()
    config.architectures = [arch.causal_lm]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(out)
    return out


def build_parser(prog: str = "stagewise export --hf") -> argparse.ArgumentParser:
    """The argument parser of ``stagewise export --hf``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Write a checkpoint saved from stagewise.hf.pipeline_module (any stage count) as "
            "a Hugging Face directory that AutoModelForCausalLM.from_pretrained loads."
        ),
    )
    parser.add_argument("checkpoint", help="the checkpoint's save directory or tag directory")
    parser.add_argument("out_dir", help="the directory to write (must hold no weights yet)")
    parser.add_argument("--tag", help="the checkpoint tag (default: the one 'latest' names)")
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file, e.g. 5GB or 500MB (default: 5GB)",
    )
    return parser


def export_hf_main(argv: Sequence[str] | None = None) -> int:
    """Run ``stagewise export --hf CKPT OUT_DIR`` with ``argv``; return the exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        out = export_hf(
            args.checkpoint, args.out_dir, tag=args.tag, max_shard_size=args.max_shard_size
        )
    except (CheckpointError, WeightsError, ValueError, OSError, ImportError) as error:
        print(f"stagewise export --hf: {error}", file=sys.stderr)
        return 1
    print(f"Hugging Face model written to {out}")
    return 0
