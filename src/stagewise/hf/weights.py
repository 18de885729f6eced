"""Reading a transformers model's weights one layer at a time.

A :class:`WeightSource` answers three questions by Hugging Face tensor name
(``"model.layers.3.mlp.up_proj.weight"``): is the tensor there, what is its
shape, and what are its values. :class:`SafetensorsWeights` answers them from
a model directory's ``*.safetensors`` files (one file, or shards with
``model.safetensors.index.json``) reading only the headers until a layer asks
for its own tensors; :class:`StateDictWeights` answers them from a model
already in memory.

:func:`load_module` builds a layer's ``transformers`` module with its
parameters on the meta device (no memory, no initialisation), then assigns
the tensors read for it (``load_state_dict(assign=True)``): a rank that builds
only its own layers reads only their tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from stagewise.hf._deps import require

__all__ = [
    "SafetensorsWeights",
    "StateDictWeights",
    "WeightSource",
    "WeightsError",
    "building_on_meta",
    "load_module",
    "parameters_on_meta",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class WeightsError(ValueError):
    """A model's weights are missing, or do not fit its config."""


class WeightSource:
    """Tensors by Hugging Face name; subclasses say where they come from.

    ``base_prefix`` is the causal LM's base-model prefix (``"transformer."`` for
    GPT-2, ``"model."`` for Llama): a tensor saved from the base model alone
    (``"h.0.ln_1.weight"``) is found under its full name too, as
    ``from_pretrained`` finds it.
    """

    def __init__(self, base_prefix: str = "") -> None:
        self.base_prefix = base_prefix

    # -- what subclasses provide ------------------------------------------------------
    def names(self) -> set[str]:
        """Every stored tensor name."""
        raise NotImplementedError(f"{type(self).__name__} must implement names()")

    def stored_shape(self, stored_name: str) -> tuple[int, ...]:
        raise NotImplementedError(f"{type(self).__name__} must implement stored_shape()")

    def where(self, stored_name: str) -> str:
        """The file (or object) that holds a tensor, for error messages."""
        raise NotImplementedError(f"{type(self).__name__} must implement where()")

    def read_stored(self, stored_names: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement read_stored()")

    def describe(self) -> str:
        """Where the weights come from, for error messages."""
        raise NotImplementedError(f"{type(self).__name__} must implement describe()")

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

    Only the files' headers are read here; :meth:`read` opens each file with
    ``safetensors.safe_open`` and copies out the tensors asked for.

    Raises:
        WeightsError: when the directory holds no safetensors weights (naming what it
            holds instead and how to convert it), or its index names a missing file.
    """

    def __init__(self, directory: str | os.PathLike[str], base_prefix: str = "") -> None:
        super().__init__(base_prefix)
        self.directory = os.fspath(directory)
        self._file_of: dict[str, str] = {}
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
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

    def _header(self, path: str) -> dict[str, tuple[int, ...]]:
        if path not in self._shapes:
            safetensors = require("safetensors")
            try:
                with safetensors.safe_open(path, framework="pt") as handle:
                    self._shapes[path] = {
                        name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()
                    }
            except Exception as exc:
                raise WeightsError(
                    f"cannot read the safetensors header of {path} ({type(exc).__name__}: "
                    f"{exc}); the file is torn or not safetensors"
                ) from exc
        return self._shapes[path]

    def names(self) -> set[str]:
        return set(self._file_of)

    def stored_shape(self, stored_name: str) -> tuple[int, ...]:
        path = self._file_of[stored_name]
        shapes = self._header(path)
        if stored_name not in shapes:
            raise WeightsError(
                f"{os.path.join(self.directory, INDEX_FILE)} puts tensor {stored_name!r} in "
                f"{path}, which does not hold it; the sharded checkpoint is damaged"
            )
        return shapes[stored_name]

    def where(self, stored_name: str) -> str:
        return self._file_of[stored_name]

    def describe(self) -> str:
        return self.directory

    def read_stored(self, stored_names: Sequence[str]) -> dict[str, torch.Tensor]:
        safetensors = require("safetensors")
        by_file: dict[str, list[str]] = {}
        for name in stored_names:
            by_file.setdefault(self._file_of[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, names in sorted(by_file.items()):
            with safetensors.safe_open(path, framework="pt", device="cpu") as handle:
                for name in names:
                    out[name] = handle.get_tensor(name)
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
