"""What the resilience tests run in each process: one function per group of cases.

``guarded_cases`` runs, in the same two processes, a layer list that differs between the
ranks, the non-finite checks (a NaN loss in fp32, the same in bf16 with ``"skip"``, a
NaN gradient behind a finite loss) and, last (it leaves a receive unanswered), a data
iterator that runs out mid-step. ``mismatch_case`` feeds stage 1 an activation its first
layer cannot take. ``periodic_case`` trains with periodic asynchronous saves and resumes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import stagewise
from resilient_train import dataset, specs
from stagewise.pipe import LayerSpec, PipelineModule

MICRO, MB = 4, 3


class NaNGrad(nn.Module):
    """The identity forward; its backward turns the gradient into NaN while ``armed``."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Poison.apply(x, self) if self.armed else x


class _Poison(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, owner: Any) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        return grad * float("nan"), None


def mlp(extra: bool = False) -> list[Any]:
    layers: list[Any] = [
        LayerSpec(nn.Linear, 4, 8),
        nn.ReLU(),
        LayerSpec(NaNGrad),
        LayerSpec(nn.Linear, 8, 3),
    ]
    return [*layers, LayerSpec(nn.Linear, 3, 3)] if extra else layers


def batch(step: int, nan_at: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(step)
    out = []
    for k in range(MICRO):
        x = torch.randn(MB, 4, generator=gen)
        if k == nan_at:
            x[0, 0] = float("nan")
        out.append((x, torch.randint(0, 3, (MB,), generator=gen)))
    return out


def _engine(
    layers: list[Any], pipeline: dict[str, Any], bf16: bool = False, clip: float = 0.0
) -> Any:
    module = PipelineModule(
        layers=layers, num_stages=2, loss_fn=nn.functional.cross_entropy, seed_layers=True,
        partition_method="uniform",
    )  # fmt: skip
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": MICRO,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "gradient_clipping": clip,
        "pipeline": {"timeout_s": 5, **pipeline},
    }
    if bf16:
        config["bf16"] = {"enabled": True}
    engine, *_ = stagewise.initialize(model=module, config=config)
    return engine


def _outcome(fn: Any) -> str:
    try:
        return f"ok: {fn()}"
    except Exception as exc:  # the message is what the test pins
        return f"{type(exc).__name__}: {exc}"


def guarded_cases(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["layers"] = _outcome(lambda: _engine(mlp(extra=rank == 1), {}))

    for clip, name in ((0.0, "nan_loss"), (1.0, "nan_loss_clipped")):
        # with clipping the global norm is the check, and the guard's report names the culprit
        engine = _engine(mlp(), {}, clip=clip)
        engine.train_batch(iter(batch(0)))
        out[name] = _outcome(lambda engine=engine: engine.train_batch(iter(batch(1, nan_at=1))))

    engine = _engine(mlp(), {"nonfinite": "skip"}, bf16=True, clip=1.0)
    engine.train_batch(iter(batch(0)))
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    engine.train_batch(iter(batch(1, nan_at=2)))
    unchanged = all(torch.equal(v, before[k]) for k, v in engine.module.state_dict().items())
    engine.train_batch(iter(batch(2)))
    finite = all(bool(torch.isfinite(v).all()) for v in engine.module.state_dict().values())
    out["skip"] = (unchanged, finite, engine.global_steps, engine.skipped_steps)

    engine = _engine(mlp(), {})
    engine.train_batch(iter(batch(0)))
    poison = engine.module.layer_module(2)  # on stage 1: what it sends back is NaN
    if poison is not None:
        poison.armed = True
    out["nan_grad"] = _outcome(lambda: engine.train_batch(iter(batch(1))))

    engine = _engine(mlp(), {})
    out["ran_out"] = _outcome(lambda: engine.train_batch(iter(batch(0)[:3])))
    return out


def mismatch_case(rank: int, world_size: int) -> str:
    layers = [LayerSpec(nn.Linear, 4, 16), LayerSpec(nn.Linear, 8, 3)]
    engine = _engine(layers, {})
    return _outcome(lambda: engine.train_batch(iter(batch(0))))


def periodic_cases(rank: int, world_size: int, runs: list[dict[str, Any]]) -> list[Any]:
    """Several :func:`periodic_case` runs one after the other in the same processes."""
    return [periodic_case(rank, world_size, options) for options in runs]


def periodic_case(rank: int, world_size: int, options: dict[str, Any]) -> dict[str, Any]:
    """Train to ``options["steps"]`` with periodic saves (and resume, per the options)."""
    module = PipelineModule(
        layers=specs(), num_stages=2, loss_fn=nn.functional.cross_entropy, seed_layers=True,
        partition_method="uniform",
    )  # fmt: skip
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
        "pipeline": {"timeout_s": 30},
    }
    if options.get("checkpoint"):
        config["checkpoint"] = options["checkpoint"]
    engine, *_ = stagewise.initialize(model=module, config=config, training_data=dataset())
    resumed_at = engine.global_steps
    while engine.global_steps < options["steps"]:
        engine.train_batch()
    engine.wait_for_checkpoint()
    return {
        "resumed_at": resumed_at,
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
    }
