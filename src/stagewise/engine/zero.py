"""ZeRO stage 1: each data-parallel rank of a stage keeps and steps a share of the optimizer state.

With ``zero_optimization.stage`` 1, :class:`ZeroOptimizer` takes the engine's
optimizer and, per param group and dtype, lays its trainable parameters end to
end (:class:`~stagewise.engine.flat_shards.FlatSpace`) and cuts them into one
equal part per data-parallel rank. The optimizer's param groups then hold this
rank's part (a flat tensor) in place of the parameters, so its state (Adam's
moments, SGD's momentum) covers only that part: 1/dp of the stage's. Each step:

1. gradients are averaged over the replicas as without ZeRO (``ReduceGrads``),
   so the loss scale, the overflow vote and clipping by the global norm see
   every gradient whole (tied weights included) and act as before;
2. this rank copies its part of the parameters and of their gradients into the
   flat part, and the optimizer steps it;
3. the updated parts are all-gathered over the replicas (at most
   ``allgather_bucket_size`` elements per all-gather, each wait bounded by
   ``pipeline.timeout_s``) and written back into the parameters.

The sharding is our own rather than ``torch.distributed.optim.ZeroRedundancyOptimizer``:
that one assigns whole parameters to ranks (a stage of few large tensors splits
unevenly) and waits on its broadcasts without a bound, and its consolidated state
is keyed by position; here parts are equal to the element, every wait is
bounded, and checkpoints gather the state into the files of an unsharded run
(by layer and parameter name). Cutting parameters mid-tensor needs an optimizer
that updates each element on its own (SGD, the Adam family, Adagrad, RMSprop,
...); another is a ConfigError unless ``zero_allow_untested_optimizer`` is true.
A parameter without a gradient steps with a zero gradient, as DeepSpeed's does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from stagewise.collectives import Collectives
from stagewise.config import ZeroConfig
from stagewise.engine.flat_shards import FlatSpace, shard_state, unshard_state
from stagewise.errors import CheckpointError, ConfigError
from stagewise.grid import PipelineParallelGrid

__all__ = ["ELEMENTWISE_OPTIMIZERS", "UnshardedOptimizer", "ZeroOptimizer", "build_zero"]

logger = logging.getLogger(__name__)

# torch.optim's optimizers whose update of an element reads only that element's state.
ELEMENTWISE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
    torch.optim.Adadelta,
    torch.optim.ASGD,
    torch.optim.Rprop,
)


@dataclass
class _Space:
    group: int  # the optimizer's param group
    flat: FlatSpace
    shard: torch.Tensor  # this rank's part: what the optimizer steps


@dataclass
class UnshardedOptimizer:
    """An optimizer's state as an unsharded optimizer holds it (what checkpoints read/write).

    Attributes:
        param_groups: the groups over the model's parameters, with their hyperparameters.
        state: per parameter, its state (empty on a loader).
        owner: the sharded optimizer, for :meth:`load_state_dict`.
    """

    param_groups: list[dict[str, Any]]
    state: dict[torch.Tensor, dict[str, Any]]
    owner: ZeroOptimizer

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take an unsharded optimizer's state dict; keep this replica's share."""
        self.owner.load_unsharded(state_dict)


class ZeroOptimizer:
    """ZeRO stage 1 around ``optimizer`` over this stage's data-parallel replicas.

    Args:
        optimizer: a fresh ``torch.optim`` optimizer over this stage's parameters; its
            param groups are rewritten to hold this rank's flat part (its hyperparameters
            and its scheduler keep working).
        grid: the process groups (the data-parallel group is the one sharded over).
        collectives: bounded waits.
        config: the ``zero_optimization`` section.

    Raises:
        ConfigError: for an optimizer that is not elementwise (see the module doc), or
            one that already has state.
    """

    def __init__(
        self,
        optimizer: Any,
        grid: PipelineParallelGrid,
        collectives: Collectives,
        config: ZeroConfig,
    ) -> None:
        name = type(optimizer).__name__
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"zero_optimization.stage=1 needs a torch.optim optimizer, got {name}; pass one "
                "(or set optimizer in the config)"
            )
        if (
            not isinstance(optimizer, ELEMENTWISE_OPTIMIZERS)
            and not config.allow_untested_optimizer
        ):
            known = ", ".join(c.__name__ for c in ELEMENTWISE_OPTIMIZERS)
            raise ConfigError(
                f"zero_optimization.stage=1 shards parameters mid-tensor, which is exact only for "
                f"optimizers that update each element on its own ({known}); {name} is not known "
                'to: use one of those, or set "zero_allow_untested_optimizer": true if it is'
            )
        if any(optimizer.state.values()):
            raise ConfigError(
                f"the {name} optimizer already has state; zero_optimization.stage=1 shards a "
                "fresh optimizer: build it anew for stagewise.initialize (and load a checkpoint "
                "after)"
            )
        self.optimizer = optimizer
        self.collectives = collectives
        self.dp_size = grid.get_data_parallel_world_size()
        self.dp_rank = grid.get_data_parallel_rank()
        self.dp_group = grid.get_data_parallel_group()
        self.dp_ranks = grid.get_data_parallel_group_ranks()
        self.bucket = config.allgather_bucket_size
        # Each group's parameters as given (frozen ones included), for checkpoints.
        self.full_params: list[list[torch.Tensor]] = []
        self.spaces: list[_Space] = []
        for g, group in enumerate(optimizer.param_groups):
            params = list(group["params"])
            self.full_params.append(params)
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for param in params:
                if param.requires_grad:
                    by_dtype.setdefault(param.dtype, []).append(param)
            shards = []
            for dtype, trainable in by_dtype.items():
                flat = FlatSpace(trainable, self.dp_size)
                shard = torch.zeros(flat.part_size, dtype=dtype, device=trainable[0].device)
                flat.read(trainable, flat.bounds(self.dp_rank)[0], shard)
                self.spaces.append(_Space(g, flat, shard))
                shards.append(shard)
            group["params"] = shards

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's param groups (holding this rank's flat parts)."""
        return list(self.optimizer.param_groups)

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Step this rank's part with its gradients, then share every part with every replica."""
        for space in self.spaces:
            flat, shard = space.flat, space.shard
            lo = flat.bounds(self.dp_rank)[0]
            flat.read(flat.params, lo, shard)  # as they are now: a load may have changed them
            grad = shard.grad if shard.grad is not None else torch.empty_like(shard)
            flat.read([p.grad for p in flat.params], lo, grad)
            shard.grad = grad
        self.optimizer.step()
        for space in self.spaces:
            self._share(space)

    def _share(self, space: _Space) -> None:
        """All-gather the updated parts into the parameters, a bucket at a time."""
        flat, shard = space.flat, space.shard
        if self.dp_size == 1:
            flat.write(shard, 0)
            return
        size = flat.part_size
        chunk = max(1, self.bucket // self.dp_size)
        for start in range(0, size, chunk):
            n = min(chunk, size - start)
            pieces = [torch.empty(n, dtype=shard.dtype, device=shard.device) for _ in self.dp_ranks]
            work = dist.all_gather(
                pieces, shard[start : start + n], group=self.dp_group, async_op=True
            )
            self.collectives.wait(work, "all-gathering ZeRO-1's updated parameters")
            for part, piece in enumerate(pieces):
                flat.write(piece, part * size + start)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameters' gradients and the flat parts'."""
        for params in self.full_params:
            for param in params:
                if set_to_none:
                    param.grad = None
                elif param.grad is not None:
                    param.grad.detach_()
                    param.grad.zero_()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- checkpoints (stagewise.checkpoint.ShardedOptimizer) ----------------------------------
    def _groups(self) -> list[dict[str, Any]]:
        return [
            {**{k: v for k, v in group.items() if k != "params"}, "params": list(params)}
            for group, params in zip(self.optimizer.param_groups, self.full_params, strict=True)
        ]

    def _gather_to_writer(self, value: torch.Tensor) -> torch.Tensor | None:
        """Every replica's part of one state tensor, end to end, on data-parallel rank 0."""
        if self.dp_size == 1:
            return value
        writer = self.dp_rank == 0
        parts = [torch.empty_like(value) for _ in self.dp_ranks] if writer else None
        work = dist.gather(
            value.contiguous(), parts, dst=self.dp_ranks[0], group=self.dp_group, async_op=True
        )
        self.collectives.wait(work, "gathering ZeRO-1 optimizer state for a checkpoint")
        return torch.cat(parts) if parts is not None else None

    def gather_unsharded(self) -> UnshardedOptimizer | None:
        """Every replica calls it: the whole state on data-parallel rank 0, None elsewhere."""
        writer = self.dp_rank == 0
        state: dict[torch.Tensor, dict[str, Any]] = {}
        for space in self.spaces:
            mine = self.optimizer.state.get(space.shard, {})
            elementwise = {
                key
                for key, value in mine.items()
                if isinstance(value, torch.Tensor) and value.shape == space.shard.shape
            }
            full: dict[str, Any] = {}
            for key in sorted(mine):  # the same order on every replica
                value = mine[key]
                full[key] = self._gather_to_writer(value) if key in elementwise else value
            if writer:
                states = unshard_state(space.flat, full, elementwise)
                state.update(zip(space.flat.params, states, strict=True))
        return UnshardedOptimizer(self._groups(), state, self) if writer else None

    def unsharded_loader(self) -> UnshardedOptimizer:
        """What loads an unsharded optimizer's state dict into this replica's share."""
        return UnshardedOptimizer(self._groups(), {}, self)

    def load_unsharded(self, state_dict: dict[str, Any]) -> None:
        """Load an unsharded optimizer's (position-keyed) state dict: this rank's share of it."""
        groups, saved = state_dict["param_groups"], state_dict["state"]
        if len(groups) != len(self.full_params):
            raise CheckpointError(
                f"the optimizer state has {len(groups)} param groups but the optimizer has "
                f"{len(self.full_params)}; build the optimizer as when it was saved"
            )
        by_param: dict[int, dict[str, Any]] = {}
        for group, params in zip(groups, self.full_params, strict=True):
            for position, param in zip(group["params"], params, strict=True):
                by_param[id(param)] = saved.get(position, {})
        inner_state: dict[int, dict[str, Any]] = {}
        inner_groups = []
        index = 0
        for g, group in enumerate(groups):
            ids = []
            for space in (s for s in self.spaces if s.group == g):
                states = [by_param[id(p)] for p in space.flat.params]
                part = shard_state(space.flat, self.dp_rank, states, space.shard.device)
                if part:
                    inner_state[index] = part
                ids.append(index)
                index += 1
            inner_groups.append(
                {**{k: v for k, v in group.items() if k != "params"}, "params": ids}
            )
        self.optimizer.load_state_dict({"state": inner_state, "param_groups": inner_groups})


def build_zero(
    config: ZeroConfig, optimizer: Any, grid: PipelineParallelGrid, collectives: Collectives
) -> ZeroOptimizer | None:
    """ZeRO-1 around ``optimizer`` at stage 1 (None at stage 0, or without an optimizer).

    The section's keys that do not act as given are named in a warning (rank 0).
    """
    if config.not_applied and grid.get_global_rank() == 0:
        what = (
            "only stage 1 reads the other keys"
            if config.stage == 0
            else "stagewise has no such behaviour"
        )
        logger.warning(
            "zero_optimization at stage %d: %s ignored (%s; see stagewise.config.zero)",
            config.stage,
            ", ".join(config.not_applied),
            what,
        )
    if config.stage == 0 or optimizer is None:
        return None
    return ZeroOptimizer(optimizer, grid, collectives, config)
