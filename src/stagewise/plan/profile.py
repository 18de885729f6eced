"""Measure each layer of a model on this machine: :func:`profile` -> :class:`ModelCosts`.

Every layer is built as the pipeline builds it (same seeds, tied layers sharing
one module) and run on the output of the layer before it, at each micro-batch
size asked for (the sample input's rows repeated or cut along dimension 0). For
each layer and size, after ``warmup`` untimed sweeps over the model, the median
of ``repeats`` sweeps (a sweep runs all layers, so no layer is timed with its
weights left warm in the cache by its own run just before):

* the forward (autograd recording, as in training), every layer in model order;
* the whole backward (``torch.autograd.backward`` into the input's and the
  parameters' ``.grad``, accumulating as the engine does), every layer in reverse
  order, and the input-gradient half alone (into the input only): the
  weight-gradient half is the difference;
* the bytes the forward saves for the backward (``saved_tensors_hooks``: each
  storage once, parameters and the layer's own input left out unless the layer
  before did not keep it), and the bytes of the output.

The loss (forward and gradient) is timed as a last layer; one optimizer step
over all parameters, with the norm over the gradients that the engine's
non-finite check takes every step, is timed per parameter byte. Each value is then fitted as ``intercept + slope * rows``
(:class:`~stagewise.plan.costs.Linear`). Profiling runs at ``threads`` torch threads
(1 by default: one thread per rank, as the pipeline runs here).
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from stagewise.errors import PlanError
from stagewise.models.reference import build_reference
from stagewise.plan.costs import EngineCosts, LayerCosts, Linear, ModelCosts, fingerprint
from stagewise.spec import TiedLayerSpec

__all__ = ["profile"]

logger = logging.getLogger(__name__)

_STATE_FACTOR = {"sgd": 0.0, "adam": 2.0, "adamw": 2.0}


def _rows(value: Any, rows: int) -> Any:
    """``value`` with ``rows`` rows along dimension 0 (repeated or cut); tuples element-wise."""
    if isinstance(value, tuple):
        return tuple(_rows(v, rows) for v in value)
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    have = value.shape[0]
    if have < rows:
        value = value.repeat(-(-rows // have), *([1] * (value.dim() - 1)))
    return value[:rows].clone()


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        out = value.detach()
        return out.requires_grad_(True) if out.is_floating_point() else out
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _median_time(func: Callable[[], Any], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        func()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Saved:
    """The storages saved for backward during a forward: ``(key, bytes)`` each once."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def _layer_modules(model: Any, layers: Sequence[Any]) -> list[tuple[nn.Module | None, str | None]]:
    """Per layer, the module holding its parameters and its tied key."""
    out: list[tuple[nn.Module | None, str | None]] = []
    for index, layer in enumerate(layers):
        if isinstance(layer, TiedLayerSpec):
            out.append((model.tied_modules[layer.key], layer.key))
        elif hasattr(model, str(index)):
            out.append((getattr(model, str(index)), None))
        else:
            out.append((None, None))
    return out


def _param_bytes(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())


class _LayerRun:
    """One layer at one micro-batch size: its input, and the timings of its passes."""

    def __init__(self, func: Callable[[Any], Any], module: nn.Module | None, x: Any) -> None:
        self.func, self.x = func, _detach(x)
        self.params: list[torch.Tensor] = [
            p for p in (module.parameters() if module else ()) if p.requires_grad
        ]
        self.inputs = [t for t in _tensors(self.x) if t.requires_grad]

    def forward(self) -> Any:
        return self.func(self.x)


def _saved_bytes(run: _LayerRun, kept_output: bool) -> tuple[Any, int, bool]:
    """One forward under ``saved_tensors_hooks``: its output, the bytes it keeps for the
    backward (parameters left out; its input left out when the layer before keeps it),
    and whether it keeps its own output."""
    saved = _Saved()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        out = run.forward()
    params = {p.untyped_storage().data_ptr() for p in run.params}
    own_input = {t.untyped_storage().data_ptr() for t in _tensors(run.x)}
    outputs = {t.untyped_storage().data_ptr() for t in _tensors(out)}
    act = sum(
        nbytes
        for ptr, nbytes in saved.storages.items()
        if ptr not in params and not (ptr in own_input and kept_output)
    )
    return out, act, bool(outputs & set(saved.storages))


def _backward(out: Any, wrt: list[torch.Tensor]) -> float:
    """Seconds of one backward of ``out`` into ``wrt``'s ``.grad`` (as the engine accumulates)."""
    outs = [t for t in _tensors(out) if t.requires_grad]
    if not outs or not wrt:
        return 0.0
    grads = [torch.ones_like(t) for t in outs]
    start = time.perf_counter()
    torch.autograd.backward(outs, grads, inputs=wrt)
    return time.perf_counter() - start


def _sweeps(
    runs: list[_LayerRun], warmup: int, repeats: int
) -> tuple[list[float], list[float], list[float]]:
    """Per layer, the median forward, whole backward and input-gradient seconds.

    Each repeat runs every layer's forward in model order, then every backward in
    reverse order, as a training step does: a layer's weights are not left warm in
    the cache by a timing of the same layer just before.
    """
    count = len(runs)
    f: list[list[float]] = [[] for _ in range(count)]
    b: list[list[float]] = [[] for _ in range(count)]
    i: list[list[float]] = [[] for _ in range(count)]
    for repeat in range(warmup + repeats):
        outs = []
        for k, run in enumerate(runs):
            start = time.perf_counter()
            outs.append(run.forward())
            if repeat >= warmup:
                f[k].append(time.perf_counter() - start)
        for k in reversed(range(count)):
            seconds = _backward(outs[k], runs[k].inputs + runs[k].params)
            if repeat >= warmup:
                b[k].append(seconds)
        outs = [run.forward() for run in runs]
        for k in reversed(range(count)):
            seconds = _backward(outs[k], runs[k].inputs)
            if repeat >= warmup:
                i[k].append(seconds)
        for run in runs:
            for tensor in run.inputs:
                tensor.grad = None
    return (
        [statistics.median(t) for t in f],
        [statistics.median(t) for t in b],
        [statistics.median(t) for t in i],
    )


def profile(
    layers: Sequence[Any],
    sample_input: Any,
    *,
    sample_labels: Any = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    micro_batch_sizes: Sequence[int] | None = None,
    optimizer: str = "sgd",
    engine: EngineCosts | None = None,
    warmup: int = 2,
    repeats: int = 7,
    threads: int = 1,
    base_seed: int = 1234,
) -> ModelCosts:
    """Measure every layer of ``layers`` (see the module doc) on this machine.

    Args:
        layers: the model as ``PipelineModule`` takes it (specs, modules, callables).
        sample_input: one micro-batch's input (a tensor or a tuple of tensors, rows
            along dimension 0).
        sample_labels: one micro-batch's labels, with ``loss_fn``, to time the loss.
        loss_fn: ``loss_fn(outputs, labels)``.
        micro_batch_sizes: the sizes to measure (default: the sample's rows and half
            of them); two or more give each value's intercept and slope.
        optimizer: ``"sgd"`` (no momentum), ``"adam"`` or ``"adamw"``: timed for one
            step, and its state's bytes per parameter byte recorded.
        engine: the step's costs outside the passes
            (:func:`~stagewise.plan.calibrate.measure_engine`); default all zero.
        warmup, repeats: untimed runs, then timed ones (the median is kept).
        threads: torch threads while profiling (restored afterwards).
        base_seed: the layers are built with the pipeline's seeding.

    Raises:
        PlanError: no layers, a sample without rows, an unknown optimizer, or
            micro-batch sizes below 1.
    """
    if len(layers) == 0:
        raise PlanError("profile needs at least one layer")
    tensors = _tensors(sample_input)
    if not tensors or tensors[0].dim() == 0:
        raise PlanError(
            "profile needs sample_input as a tensor (or tuple of tensors) with the "
            "micro-batch's rows along dimension 0"
        )
    rows = int(tensors[0].shape[0])
    sizes = sorted(set(micro_batch_sizes or {max(1, rows // 2), rows}))
    if sizes[0] < 1:
        raise PlanError(f"micro_batch_sizes must be >= 1, got {list(micro_batch_sizes or [])}")
    key = optimizer.lower()
    if key not in _STATE_FACTOR:
        raise PlanError(f"unknown optimizer {optimizer!r}: use one of {', '.join(_STATE_FACTOR)}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _profile(
            layers, sample_input, sample_labels, loss_fn, sizes, key, engine, warmup,
            repeats, threads, base_seed,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)


def _profile(
    layers: Sequence[Any],
    sample_input: Any,
    sample_labels: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    sizes: list[int],
    optimizer: str,
    engine: EngineCosts | None,
    warmup: int,
    repeats: int,
    threads: int,
    base_seed: int,
) -> ModelCosts:
    model = build_reference(layers, base_seed=base_seed, seed_layers=True)
    modules = _layer_modules(model, layers)
    digests = fingerprint(layers)
    count = len(layers)
    measured: list[dict[str, list[float]]] = [
        {k: [] for k in ("f", "b", "i", "act", "out")} for _ in range(count)
    ]
    inputs, loss_f, loss_b = [], [], []
    for size in sizes:
        x = _rows(sample_input, size)
        inputs.append(float(_nbytes(x)))
        runs: list[_LayerRun] = []
        kept_output = True  # the model's input is held by the first stage
        for index, func in enumerate(model.forward_funcs):
            module, _ = modules[index]
            run = _LayerRun(func, module, x)
            out, act, kept_output = _saved_bytes(run, kept_output)
            measured[index]["act"].append(float(act))
            measured[index]["out"].append(float(_nbytes(out)))
            runs.append(run)
            x = _detach(out)
        timed_loss = loss_fn is not None and sample_labels is not None
        if loss_fn is not None and timed_loss:
            labels = _rows(sample_labels, size)
            runs.append(_LayerRun(functools.partial(_loss_of, loss_fn, labels), None, x))
        f, b, i = _sweeps(runs, warmup, repeats)
        for index in range(count):
            row = measured[index]
            row["f"].append(f[index])
            row["b"].append(b[index])
            row["i"].append(b[index] if not runs[index].params else i[index])
        if timed_loss:
            loss_f.append(f[-1])
            loss_b.append(b[-1])

    result = []
    for index in range(count):
        row = measured[index]
        module, tied = modules[index]
        weight = [max(0.0, b - i) for b, i in zip(row["b"], row["i"], strict=True)]
        result.append(
            LayerCosts(
                name=_layer_name(layers[index]),
                digest=digests[index],
                forward=Linear.fit(sizes, row["f"]),
                backward_input=Linear.fit(sizes, row["i"]),
                backward_weight=Linear.fit(sizes, weight),
                activation_bytes=Linear.fit(sizes, row["act"]),
                output_bytes=Linear.fit(sizes, row["out"]),
                param_bytes=_param_bytes(module),
                tied_key=tied,
                tied_bytes=_param_bytes(module) if tied else 0,
            )
        )
    seconds_per_byte = _optimizer_seconds_per_byte(model, optimizer, warmup, repeats)
    logger.info("profiled %d layers at micro-batch sizes %s", count, sizes)
    return ModelCosts(
        layers=tuple(result),
        input_bytes=Linear.fit(sizes, inputs),
        loss_forward=Linear.fit(sizes, loss_f) if loss_f else Linear(),
        loss_backward=Linear.fit(sizes, loss_b) if loss_b else Linear(),
        optimizer=optimizer,
        optimizer_seconds_per_byte=seconds_per_byte,
        optimizer_state_factor=_STATE_FACTOR[optimizer],
        engine=engine or EngineCosts(),
        micro_batch_sizes=tuple(sizes),
        device="cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        threads=threads,
    )


def _loss_of(loss_fn: Callable[[Any, Any], torch.Tensor], labels: Any, head: Any) -> torch.Tensor:
    return loss_fn(head, labels)


def _optimizer_seconds_per_byte(model: nn.Module, name: str, warmup: int, repeats: int) -> float:
    """One optimizer step over every parameter, with the engine's non-finite check (a norm
    over the gradients), per parameter byte."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() * p.element_size() for p in params)
    if not total:
        return 0.0
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt: torch.optim.Optimizer
    if name == "sgd":
        opt = torch.optim.SGD(params, lr=1e-4)
    elif name == "adam":
        opt = torch.optim.Adam(params, lr=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4)

    grads = [p.grad for p in params if p.grad is not None]

    def step() -> None:
        # the engine's non-finite check of an fp32 step: one norm over the gradients
        torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
        opt.step()

    return _median_time(step, warmup, repeats) / total


def _layer_name(layer: Any) -> str:
    typename = getattr(layer, "typename", None)
    if typename is not None:
        return str(getattr(typename, "__name__", typename))
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return str(getattr(layer, "__name__", type(layer).__name__))
