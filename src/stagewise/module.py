"""PipelineModule: a model written as a list of layers, cut into stages.

Each rank builds only the layers of its own stage (or, for interleaved and V
schedules, of its own model chunks). ``forward`` runs those layers in order,
each layer receiving the previous one's output (a tensor or a tuple of
tensors, passed as one argument, as in DeepSpeed).

Layer names follow DeepSpeed, so state dicts and checkpoints line up: the
module built for layer ``i`` is registered as ``str(i)``; a tied module lives
in ``tied_modules[key]``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from stagewise.backward.recompute import checkpoint as recompute_checkpoint
from stagewise.dist_utils import default_device, require_dist
from stagewise.errors import ConfigError
from stagewise.grid import PipelineParallelGrid
from stagewise.layer_digest import check_same_layers
from stagewise.partition import PartitionMethod, compute_boundaries
from stagewise.schedule.placement import Placement, PlacementKind
from stagewise.spec import LayerSpec, TiedLayerSpec, get_attr_path, seed_everything
from stagewise.tied import check_tied_specs, synchronize_tied_weights, tied_groups
from stagewise.topology import PipeDataParallelTopology, ProcessTopology

__all__ = ["PipelineModule", "non_reentrant_checkpoint"]

logger = logging.getLogger(__name__)


def non_reentrant_checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    """``torch.utils.checkpoint`` without re-entry: works when no input needs a gradient.

    The default is :func:`stagewise.backward.checkpoint`, which also works when no
    input needs a gradient and recomputes once per backward when it is split.
    """
    return torch_checkpoint(function, *args, use_reentrant=False)


def _layer_name(layer: Any) -> str:
    if isinstance(layer, LayerSpec):
        return layer.typename.__name__
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return str(getattr(layer, "__name__", type(layer).__name__))


def _trainable_params(layer: Any) -> int:
    """Trainable parameters of a layer; specs are built on the meta device (no memory)."""
    if isinstance(layer, LayerSpec):
        with torch.device("meta"):
            built = layer.build()
        return sum(p.numel() for p in built.parameters() if p.requires_grad)
    if isinstance(layer, nn.Module):
        return sum(p.numel() for p in layer.parameters() if p.requires_grad)
    return 0


def _is_tensor_output(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return (
        isinstance(value, tuple)
        and len(value) > 0
        and all(isinstance(v, torch.Tensor) for v in value)
    )


class PipelineModule(nn.Module):
    """A sequence of layers partitioned over pipeline stages.

    Args:
        layers: ``LayerSpec``/``TiedLayerSpec`` objects, built ``nn.Module`` s and plain
            callables, in execution order.
        num_stages: the number of pipeline stages (or give ``topology``).
        topology: a ``ProcessTopology`` with a ``pipe`` axis (and ``data``/``model``).
        loss_fn: ``loss_fn(outputs, labels)`` on the last stage.
        seed_layers: seed with ``base_seed + i`` right before building layer ``i``.
        seed_fn: the seeding function (default: Python, NumPy and torch).
        base_seed: the first layer's seed.
        partition_method: ``'parameters'``, ``'uniform'``, ``'type:REGEX'``,
            ``'profile'`` or an explicit list of boundaries.
        activation_checkpoint_interval: checkpoint every this many layers (0: off).
        activation_checkpoint_func: the checkpoint function (default:
            :func:`stagewise.backward.checkpoint`, non-reentrant, recomputing once).
        checkpointable_layers: class names that may be checkpointed (default: any
            layer with parameters).
        dynamic_shape: accepted for DeepSpeed compatibility; shapes between stages are
            re-learned whenever they change, with or without it.
        virtual_stages: model chunks per stage for interleaved and V schedules.
        placement: ``'loop'`` (stage s holds virtual stages s, s+S, ...; interleaved)
            or ``'v'`` (stage s holds s and 2S-1-s; zbv).
        profile_input: a sample micro-batch input for ``partition_method='profile'``.
    """

    def __init__(
        self,
        layers: Sequence[Any],
        num_stages: int | None = None,
        topology: ProcessTopology | None = None,
        loss_fn: Callable[..., Any] | None = None,
        seed_layers: bool = False,
        seed_fn: Callable[[int], Any] | None = None,
        base_seed: int = 1234,
        partition_method: str | Sequence[int] = "parameters",
        activation_checkpoint_interval: int = 0,
        activation_checkpoint_func: Callable[..., Any] = recompute_checkpoint,
        checkpointable_layers: Sequence[str] | None = None,
        dynamic_shape: bool = False,
        virtual_stages: int = 1,
        placement: str | PlacementKind = "loop",
        profile_input: Any = None,
    ) -> None:
        super().__init__()
        require_dist("PipelineModule")
        if num_stages is None and topology is None:
            raise ValueError("PipelineModule needs num_stages or topology (e.g. num_stages=2)")
        if activation_checkpoint_interval < 0:
            raise ValueError(
                f"activation_checkpoint_interval must be >= 0, got {activation_checkpoint_interval}"
            )
        if not isinstance(virtual_stages, int) or virtual_stages < 1:
            raise ValueError(f"virtual_stages must be an integer >= 1, got {virtual_stages!r}")
        kind = PlacementKind.parse(placement)
        Placement(1, virtual_stages, kind)  # the kind and its chunk count, checked early

        self.global_rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if topology is None:
            num_stages = int(num_stages or 0)  # given: checked above
            if num_stages < 1 or self.world_size % num_stages:
                raise ValueError(
                    f"num_stages={num_stages} must divide the world size {self.world_size} "
                    "(the rest of the ranks become data-parallel replicas)"
                )
            topology = PipeDataParallelTopology(
                num_pp=num_stages, num_dp=self.world_size // num_stages
            )
        elif num_stages is not None and num_stages != topology.get_dim("pipe"):
            raise ValueError(
                f"num_stages={num_stages} disagrees with the topology's pipe dimension "
                f"{topology.get_dim('pipe')}; give one of them"
            )
        self._topo = topology
        self.num_stages = max(topology.get_dim("pipe"), 1)
        self.num_chunks = virtual_stages
        # Where each chunk's virtual stage lives: the value the schedules use too.
        self.placement = Placement(self.num_stages, virtual_stages, kind)
        self._layer_specs = list(layers)
        self._num_layers = len(self._layer_specs)
        self.loss_fn = loss_fn
        self.seed_layers = seed_layers
        self.seed_fn = seed_fn
        self.base_seed = base_seed
        self.activation_checkpoint_interval = activation_checkpoint_interval
        self.activation_checkpoint_func = activation_checkpoint_func
        self.checkpointable_layers = (
            list(checkpointable_layers) if checkpointable_layers is not None else None
        )
        self.dynamic_shape = dynamic_shape
        # JSON-able facts about the model that save_checkpoint writes into the manifest
        # under "metadata" (e.g. stagewise.hf's config, for export).
        self.checkpoint_metadata: dict[str, Any] = {}

        num_parts = self.num_stages * self.num_chunks
        if self._num_layers < num_parts:
            raise ValueError(
                f"cannot cut {self._num_layers} layers into {num_parts} pipeline parts "
                f"({self.num_stages} stages x {self.num_chunks} chunks): every part needs at "
                "least one layer; use fewer stages or add layers"
            )

        self._grid = PipelineParallelGrid(process_group=None, topology=topology)
        self.stage_id = self._grid.get_stage_id()

        check_tied_specs(self._layer_specs)
        check_same_layers(self._layer_specs)  # a rank with another layer list fails here
        self.partition_method = PartitionMethod.parse(partition_method)
        self.parts = self._partition(self.partition_method, num_parts, profile_input)
        self.tied_modules = nn.ModuleDict()
        self.tied_weight_attrs: dict[str, list[str]] = {}
        self._chunk_funcs: list[list[Callable[..., Any]]] = []
        self._chunk_layer_ids: list[list[int]] = []
        for chunk in range(self.num_chunks):
            start, stop = self.chunk_bounds(chunk)
            funcs, ids = self._build(start, stop)
            self._chunk_funcs.append(funcs)
            self._chunk_layer_ids.append(ids)
        self.forward_funcs = [f for funcs in self._chunk_funcs for f in funcs]

        self.to(default_device())
        owners: dict[str, set[int]] = {}
        for idx, spec in enumerate(self._layer_specs):
            if isinstance(spec, TiedLayerSpec):
                owners.setdefault(spec.key, set()).add(self.stage_owner(idx))
        self.tied_comms = tied_groups(
            {key: sorted(stages) for key, stages in owners.items()},
            self._topo,
            self.global_rank,
            dict(self.tied_modules.items()),
            self.tied_weight_attrs,
        )
        synchronize_tied_weights(self.tied_comms)

    # -- partitioning -------------------------------------------------------------------
    def virtual_stage(self, stage_id: int, chunk_id: int) -> int:
        """The part of the layers that ``chunk_id`` of ``stage_id`` holds."""
        return self.placement.virtual_stage(stage_id, chunk_id)

    def chunk_bounds(self, chunk_id: int, stage_id: int | None = None) -> tuple[int, int]:
        """``(start, stop)`` layer indices of a chunk of a stage (this stage by default)."""
        part = self.virtual_stage(self.stage_id if stage_id is None else stage_id, chunk_id)
        return self.parts[part], self.parts[part + 1]

    def _partition(self, method: PartitionMethod, num_parts: int, profile_input: Any) -> list[int]:
        class_names = [_layer_name(layer) for layer in self._layer_specs]
        param_counts: list[int] = []
        profile_costs: list[float] | None = None
        if method.kind == "parameters":
            param_counts = [_trainable_params(layer) for layer in self._layer_specs]
        elif method.kind == "profile":
            profile_costs = self._profile_layers(profile_input)
        parts = compute_boundaries(
            method,
            num_parts,
            class_names=class_names,
            param_counts=param_counts,
            profile_costs=profile_costs,
        )
        if self.global_rank == 0:
            for part in range(num_parts):
                logger.info(
                    "part %d: layers %d..%d (%s)",
                    part,
                    parts[part],
                    parts[part + 1] - 1,
                    ", ".join(class_names[parts[part] : parts[part + 1]]),
                )
        return parts

    def _profile_layers(self, profile_input: Any) -> list[float]:
        """Time forward+backward of every layer on ``profile_input`` (rank 0's timings win)."""
        if profile_input is None:
            raise ValueError(
                "partition_method='profile' needs profile_input=<a sample micro-batch input> "
                "to time each layer's forward and backward"
            )
        costs = torch.zeros(self._num_layers, dtype=torch.float64)
        if self.global_rank == 0:
            tied: dict[str, nn.Module] = {}
            x = profile_input
            for idx, layer in enumerate(self._layer_specs):
                func = self._make_func(idx, layer, tied)
                x = (
                    x.detach().requires_grad_(x.is_floating_point())
                    if isinstance(x, torch.Tensor)
                    else x
                )
                best = float("inf")
                for _ in range(3):
                    start = time.perf_counter()
                    out = func(x)
                    leaves = [out] if isinstance(out, torch.Tensor) else list(out or ())
                    floats = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
                    if floats:
                        torch.autograd.backward(floats, [torch.ones_like(t) for t in floats])
                    best = min(best, time.perf_counter() - start)
                costs[idx] = best
                x = out
        dist.broadcast(costs, src=0)
        return costs.tolist()

    # -- building -----------------------------------------------------------------------
    def _make_func(self, idx: int, layer: Any, tied: dict[str, nn.Module]) -> Callable[..., Any]:
        if isinstance(layer, TiedLayerSpec):
            if layer.key not in tied:
                tied[layer.key] = layer.build()
            module = tied[layer.key]
            if layer.forward_fn is None:
                return module
            return functools.partial(layer.forward_fn, module)
        if isinstance(layer, LayerSpec):
            return layer.build()
        if isinstance(layer, nn.Module) or callable(layer):
            return layer
        raise TypeError(
            f"layer {idx} is {type(layer).__name__} ({layer!r}); a layer must be a LayerSpec, "
            "a TiedLayerSpec, an nn.Module or a callable"
        )

    def _build(self, start: int, stop: int) -> tuple[list[Callable[..., Any]], list[int]]:
        funcs: list[Callable[..., Any]] = []
        ids: list[int] = []
        tied: dict[str, nn.Module] = dict(self.tied_modules.items())
        for idx in range(start, stop):
            layer = self._layer_specs[idx]
            if self.seed_layers:
                (self.seed_fn or seed_everything)(self.base_seed + idx)
            func = self._make_func(idx, layer, tied)
            if isinstance(layer, TiedLayerSpec):
                if layer.key not in self.tied_modules:
                    self.tied_modules[layer.key] = tied[layer.key]
                    self.tied_weight_attrs[layer.key] = layer.tied_weight_attr
            elif isinstance(func, nn.Module):
                self.add_module(str(idx), func)
            funcs.append(func)
            ids.append(idx)
        return funcs, ids

    # -- tied weights ---------------------------------------------------------------------
    def tied_weights(self) -> list[tuple[torch.Tensor, Any, list[int]]]:
        """``(weight, group, ranks)`` for each tied weight this rank shares with others."""
        return [
            (get_attr_path(comm["module"], attr), comm["group"], comm["ranks"])
            for comm in self.tied_comms.values()
            for attr in comm["weight_attr"]
        ]

    def allreduce_tied_weight_gradients(self) -> None:
        """Sum the gradients of tied weights over the stages that share them."""
        for weight, group, _ in self.tied_weights():
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            dist.all_reduce(weight.grad, group=group)

    def get_tied_weights_and_groups(self) -> list[tuple[torch.Tensor, Any]]:
        return [(weight, group) for weight, group, _ in self.tied_weights()]

    # -- running ----------------------------------------------------------------------
    def _is_checkpointable(self, funcs: Sequence[Callable[..., Any]]) -> bool:
        if self.checkpointable_layers is not None:
            return any(type(f).__name__ in self.checkpointable_layers for f in funcs)
        return any(isinstance(f, nn.Module) and any(True for _ in f.parameters()) for f in funcs)

    def _run_range(self, chunk_id: int, lo: int, hi: int) -> Callable[..., Any]:
        funcs = self._chunk_funcs[chunk_id][lo:hi]

        def run(*inputs: Any) -> Any:
            x: Any = inputs[0] if len(inputs) == 1 else inputs
            for func in funcs:
                x = func(x)
            return x

        return run

    def forward(self, forward_input: Any, chunk_id: int = 0) -> Any:
        """Run this stage's layers (of model chunk ``chunk_id``) on ``forward_input``."""
        funcs = self._chunk_funcs[chunk_id]
        interval = self.activation_checkpoint_interval
        if interval == 0 or not self.training:
            x = self._run_range(chunk_id, 0, len(funcs))(forward_input)
        else:
            x = forward_input
            for lo in range(0, len(funcs), interval):
                hi = min(lo + interval, len(funcs))
                args = x if isinstance(x, tuple) else (x,)
                run = self._run_range(chunk_id, lo, hi)
                if self._is_checkpointable(funcs[lo:hi]):
                    x = self.activation_checkpoint_func(run, *args)
                else:
                    x = run(*args)
        if not self.is_last_virtual_stage(chunk_id) and not _is_tensor_output(x):
            idx = self._chunk_layer_ids[chunk_id][-1]
            raise TypeError(
                f"layer {idx} ({_layer_name(self._layer_specs[idx])}) is the last of stage "
                f"{self.stage_id} and returned {type(x).__name__}; what passes between stages "
                "must be a tensor or a tuple of tensors"
            )
        return x

    def is_last_virtual_stage(self, chunk_id: int = 0) -> bool:
        return self.placement.is_last(self.stage_id, chunk_id)

    def is_first_virtual_stage(self, chunk_id: int = 0) -> bool:
        return self.placement.is_first(self.stage_id, chunk_id)

    # -- DeepSpeed's accessors -----------------------------------------------------------
    @property
    def layer_specs(self) -> list[Any]:
        """Every layer of the model as given (specs, modules, callables), in order."""
        return list(self._layer_specs)

    def partitions(self) -> list[int]:
        """The layer boundaries of every part (stage, or virtual stage with chunks)."""
        return list(self.parts)

    def stage_owner(self, layer_idx: int) -> int:
        """The stage that holds layer ``layer_idx``."""
        if not 0 <= layer_idx < self._num_layers:
            raise ValueError(f"layer_idx must be in [0, {self._num_layers}), got {layer_idx}")
        for stage in range(self.num_stages):
            for chunk in range(self.num_chunks):
                start, stop = self.chunk_bounds(chunk, stage)
                if start <= layer_idx < stop:
                    return stage
        raise RuntimeError(f"layer {layer_idx} is owned by no stage; parts={self.parts}")

    def topology(self) -> ProcessTopology:
        return self._topo

    def mpu(self) -> PipelineParallelGrid:
        return self._grid

    def num_pipeline_stages(self) -> int:
        return self.num_stages

    def local_layer_ids(self, chunk_id: int | None = None) -> list[int]:
        """The indices of the layers this rank holds (of one chunk, or of all)."""
        if chunk_id is not None:
            return list(self._chunk_layer_ids[chunk_id])
        return [idx for ids in self._chunk_layer_ids for idx in ids]

    def layer_module(self, layer_idx: int) -> nn.Module | None:
        """The module that holds layer ``layer_idx``'s weights here (None for plain callables)."""
        layer = self._layer_specs[layer_idx]
        if isinstance(layer, TiedLayerSpec):
            return self.tied_modules[layer.key] if layer.key in self.tied_modules else None
        return self._modules.get(str(layer_idx))

    def apply_pipeline_config(self, cfg: Any) -> None:
        """Take the config's ``pipeline`` section (a ``PipelineConfig``) into account.

        ``activation_checkpoint_interval`` overrides the module's; ``partition_method``
        must agree with the module's, which already cut the layers; a ``seed_layers``
        that differs from the module's is a warning (the layers are built already).

        Raises:
            ConfigError: a ``partition_method`` that disagrees with the module's.
        """
        if cfg.activation_checkpoint_interval is not None:
            self.set_checkpoint_interval(cfg.activation_checkpoint_interval)
        if cfg.partition_method is not None:
            try:
                wanted = PartitionMethod.parse(cfg.partition_method)
            except ValueError as exc:
                raise ConfigError(f"pipeline.partition_method: {exc}") from None
            if wanted != self.partition_method:
                raise ConfigError(
                    f"pipeline.partition_method={cfg.partition_method!r} but the PipelineModule "
                    f"was partitioned with {str(self.partition_method)!r}; layers are cut "
                    "before the engine, so pass partition_method to PipelineModule (or drop the "
                    "key)"
                )
        if cfg.seed_layers is not None and cfg.seed_layers != self.seed_layers:
            if self.global_rank == 0:
                logger.warning(
                    "pipeline.seed_layers=%s is not used: the PipelineModule was built with "
                    "seed_layers=%s (layers are built before the engine, and DeepSpeed never "
                    "reads this key either); pass seed_layers to PipelineModule",
                    cfg.seed_layers,
                    self.seed_layers,
                )

    def set_checkpoint_interval(self, interval: int) -> None:
        if interval < 0:
            raise ValueError(f"activation checkpoint interval must be >= 0, got {interval}")
        self.activation_checkpoint_interval = interval
