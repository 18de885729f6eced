"""Reading a transformers model's weights one layer at a time.

A :class:`WeightSource` answers three questions by Hugging Face tensor name
(``"model.layers.3.mlp.up_proj.weight"``): is the tensor there, what is its
shape, and what are its values. :class:`SafetensorsWeights` answers them from
a model directory's ``*.safetensors`` files (one file, or shards with
``model.safetensors.index.json``) reading only the headers until a layer asks
for its own tensors, and then only those tensors' bytes;
:class:`StateDictWeights` answers them from a model already in memory.

:func:`load_module` builds a layer's ``transformers`` module with its
parameters on the meta device (no memory, no initialisation), then assigns
the tensors read for it (``load_state_dict(assign=True)``): a rank that builds
only its own layers reads only their tensors.
"""

from __future__ import annotations

import abc
import contextlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "SafetensorsWeights",
    "StateDictWeights",
    "TensorEntry",
    "WeightSource",
    "WeightsError",
    "building_on_meta",
    "load_module",
    "parameters_on_meta",
    "read_safetensors_header",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class WeightsError(ValueError):
    """A model's weights are missing, or do not fit its config."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    stop: int


# The safetensors format: 8 bytes (little-endian u64) of header length, a JSON header
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then
# the raw little-endian tensor bytes, offsets counted from the end of the header.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20


def read_safetensors_header(path: str) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file (names, dtypes, shapes, byte ranges); no data read.

    Raises:
        WeightsError: for a file that is not safetensors, or whose header is damaged.
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            length = struct.unpack("<Q", handle.read(8))[0]
            if not 2 <= length <= min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {length} does not fit a {size}-byte file")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise WeightsError(
            f"cannot read the safetensors header of {path} ({type(exc).__name__}: {exc}); "
            "the file is torn or not safetensors"
        ) from exc
    base = 8 + length
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(str(info.get("dtype")))
        begin, end = (int(v) for v in info.get("data_offsets", (-1, -1)))
        shape = tuple(int(d) for d in info.get("shape", ()))
        if dtype is None:
            raise WeightsError(
                f"tensor {name!r} in {path} has dtype {info.get('dtype')!r}, which stagewise.hf "
                f"cannot read (it reads {', '.join(_SAFETENSORS_DTYPES)})"
            )
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if begin < 0 or end - begin != nbytes or base + end > size:
            raise WeightsError(
                f"tensor {name!r} in {path} has byte range {begin}..{end} for shape {shape} "
                f"({nbytes} bytes) in a {size}-byte file; the file is torn or damaged"
            )
        entries[name] = TensorEntry(dtype, shape, base + begin, base + end)
    return entries


class WeightSource(abc.ABC):
    """Tensors by Hugging Face name; subclasses say where they come from.

    ``base_prefix`` is the causal LM's base-model prefix (``"transformer."`` for
    GPT-2, ``"model."`` for Llama): a tensor saved from the base model alone
    (``"h.0.ln_1.weight"``) is found under its full name too, as
    ``from_pretrained`` finds it.
    """

    def __init__(self, base_prefix: str = "") -> None:
        self.base_prefix = base_prefix

    @abc.abstractmethod
    def names(self) -> set[str]:
        """Every stored tensor name."""

    @abc.abstractmethod
    def stored_shape(self, stored_name: str) -> tuple[int, ...]:
        """The shape of a stored tensor."""

    @abc.abstractmethod
    def where(self, stored_name: str) -> str:
        """The file (or object) that holds a tensor, for error messages."""

    @abc.abstractmethod
    def read_stored(self, stored_names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The values of stored tensors, in memory of their own."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the weights come from, for error messages."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r})"

    # -- lookup by Hugging Face name --------------------------------------------------
    def resolve(self, name: str) -> str | None:
        """The stored name of tensor ``name``, or None when it is not there."""
        names = self.names()
        if name in names:
            return name
        if self.base_prefix and name.startswith(self.base_prefix):
            short = name[len(self.base_prefix) :]
            if short in names:
                return short
        return None

    def check(self, name: str, shape: Sequence[int], needed_by: str, fix: str) -> None:
        """Raise :class:`WeightsError` unless tensor ``name`` is there with ``shape``."""
        stored = self.resolve(name)
        if stored is None:
            raise WeightsError(
                f"{self.describe()} has no tensor {name!r} (needed by {needed_by}); {fix}"
            )
        got = self.stored_shape(stored)
        if tuple(got) != tuple(shape):
            raise WeightsError(
                f"tensor {stored!r} in {self.where(stored)} has shape {tuple(got)} but the "
                f"config makes it {tuple(shape)} ({needed_by}); {fix}"
            )

    def read(
        self, names: Mapping[str, str], dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """Read ``{key: hf_name}``; returns ``{key: tensor}``, floats cast to ``dtype``."""
        stored = {}
        for key, name in names.items():
            found = self.resolve(name)
            if found is None:
                raise WeightsError(f"{self.describe()} has no tensor {name!r}")
            stored[key] = found
        values = self.read_stored(sorted(set(stored.values())))
        out: dict[str, torch.Tensor] = {}
        for key, name in stored.items():
            tensor = values[name]
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            out[key] = tensor
        return out


class SafetensorsWeights(WeightSource):
    """The ``*.safetensors`` weights of a model directory, read tensor by tensor.

    Only the files' headers are read here. :meth:`read` reads the bytes of just the
    tensors asked for into memory of their own (no mapping of the file: the file
    may change afterwards, and no page of it stays resident).

    Raises:
        WeightsError: when the directory holds no safetensors weights (naming what it
            holds instead and how to convert it), or its index names a missing file.
    """

    def __init__(self, directory: str | os.PathLike[str], base_prefix: str = "") -> None:
        super().__init__(base_prefix)
        self.directory = os.fspath(directory)
        self._file_of: dict[str, str] = {}
        self._headers: dict[str, dict[str, TensorEntry]] = {}
        index = os.path.join(self.directory, INDEX_FILE)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as handle:
                weight_map = json.load(handle).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise WeightsError(
                    f"{index} has no 'weight_map'; the sharded checkpoint is damaged"
                )
            for name, file in weight_map.items():
                path = os.path.join(self.directory, file)
                if not os.path.isfile(path):
                    raise WeightsError(
                        f"{index} maps tensor {name!r} to {file}, which is missing from "
                        f"{self.directory}; copy every shard of the checkpoint"
                    )
                self._file_of[name] = path
        else:
            files = sorted(
                f
                for f in os.listdir(self.directory)
                if f.endswith(".safetensors") and os.path.isfile(os.path.join(self.directory, f))
            )
            if not files:
                raise WeightsError(self._no_weights_message())
            for file in files:
                path = os.path.join(self.directory, file)
                for name in self._header(path):
                    self._file_of.setdefault(name, path)

    def _no_weights_message(self) -> str:
        present = sorted(os.listdir(self.directory))
        pickles = [f for f in present if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        if pickles:
            return (
                f"{self.directory} holds {', '.join(pickles)} but no *.safetensors weights: "
                "stagewise.hf reads safetensors only; convert once with "
                "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR) "
                "(safetensors is its default)"
            )
        return (
            f"{self.directory} holds no weights (no *.safetensors file; it has "
            f"{', '.join(present) or 'nothing'}); save the model with save_pretrained(DIR), "
            "or pass the config (AutoConfig.from_pretrained(DIR)) to start from random weights"
        )

    def _header(self, path: str) -> dict[str, TensorEntry]:
        if path not in self._headers:
            self._headers[path] = read_safetensors_header(path)
        return self._headers[path]

    def _entry(self, stored_name: str) -> TensorEntry:
        path = self._file_of[stored_name]
        entries = self._header(path)
        if stored_name not in entries:
            raise WeightsError(
                f"{os.path.join(self.directory, INDEX_FILE)} puts tensor {stored_name!r} in "
                f"{path}, which does not hold it; the sharded checkpoint is damaged"
            )
        return entries[stored_name]

    def names(self) -> set[str]:
        return set(self._file_of)

    def stored_shape(self, stored_name: str) -> tuple[int, ...]:
        return self._entry(stored_name).shape

    def where(self, stored_name: str) -> str:
        return self._file_of[stored_name]

    def describe(self) -> str:
        return self.directory

    def read_stored(self, stored_names: Sequence[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for name in stored_names:
            by_file.setdefault(self._file_of[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, names in sorted(by_file.items()):
            with open(path, "rb") as handle:
                for name in sorted(names, key=lambda n: self._entry(n).start):
                    entry = self._entry(name)
                    raw = torch.empty(entry.stop - entry.start, dtype=torch.uint8)
                    handle.seek(entry.start)
                    buffer: Any = raw.numpy()  # a writable view of raw's bytes
                    if handle.readinto(buffer) != raw.numel():
                        raise WeightsError(f"{path} ended inside tensor {name!r}; it is torn")
                    out[name] = raw.view(entry.dtype).reshape(entry.shape)
        return out


class StateDictWeights(WeightSource):
    """Tensors of a model in memory (``model.state_dict()``); :meth:`read` clones them."""

    def __init__(self, state: Mapping[str, torch.Tensor], what: str, base_prefix: str = "") -> None:
        super().__init__(base_prefix)
        self._state = dict(state)
        self._what = what

    def names(self) -> set[str]:
        return set(self._state)

    def stored_shape(self, stored_name: str) -> tuple[int, ...]:
        return tuple(self._state[stored_name].shape)

    def where(self, stored_name: str) -> str:
        return self._what

    def describe(self) -> str:
        return self._what

    def read_stored(self, stored_names: Sequence[str]) -> dict[str, torch.Tensor]:
        return {name: self._state[name].detach().to("cpu", copy=True) for name in stored_names}


# -- building a module on the meta device and assigning its tensors ----------------------


def building_on_meta() -> bool:
    """True inside ``with torch.device("meta")``: a probe build (partitioning), read nothing."""
    return torch.get_default_device().type == "meta"


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers stay real.

    Parameters are moved as they are registered, so constructors' initialisers run
    on meta tensors (no work, no memory); buffers computed in constructors (rotary
    frequencies, causal tables) keep their values, as they are not in a checkpoint.
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    setattr(nn.Module, "register_parameter", register)  # noqa: B010 (a method swap, undone below)
    try:
        yield
    finally:
        setattr(nn.Module, "register_parameter", original)  # noqa: B010


def load_module(
    build: Callable[[], nn.Module],
    weights: WeightSource | None,
    hf_prefix: str,
    dtype: torch.dtype | None,
    init: Callable[[nn.Module], None],
    needed_by: str,
) -> nn.Module:
    """Build one ``transformers`` module and give it its weights.

    Args:
        build: constructs the module (e.g. ``lambda: LlamaDecoderLayer(config, 3)``).
        weights: where its tensors are; None initialises it at random with ``init``
            (under the caller's seed).
        hf_prefix: the module's name in the causal LM (``"model.layers.3."``).
        dtype: the floating dtype of its parameters (None: as stored).
        init: the random initialisation for ``weights=None``.
        needed_by: the layer, for error messages.

    Under ``with torch.device("meta")`` (a probe build) nothing is read.
    """
    if building_on_meta():
        return build()
    if weights is None:
        module = build()
        init(module)
        if dtype is not None:
            for param in module.parameters():
                if param.is_floating_point():
                    param.data = param.data.to(dtype)
        return module
    with parameters_on_meta():
        module = build()
    names = {key: hf_prefix + key for key in module.state_dict()}
    expected = module.state_dict()
    fix = "the weights do not fit the config: save them together with save_pretrained"
    for key, name in names.items():
        weights.check(name, expected[key].shape, needed_by, fix)
    state = weights.read(names, dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return module
