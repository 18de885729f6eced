"""Models, data and the two ways to train them: over a pipeline, and in one process.

Every multi-process test trains the same specs both ways on the same data and
compares losses and final weights (``torch.testing.assert_close``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import stagewise
from stagewise.models.gpt import GPTConfig, gpt_layer_specs, gpt_loss
from stagewise.models.reference import build_reference
from stagewise.spec import LayerSpec

# -- models -------------------------------------------------------------------------------


class Tanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


def mlp_specs(depth: int = 6, width: int = 16) -> list[Any]:
    """Linear layers with ReLU modules and a plain callable mixed in."""
    layers: list[Any] = [LayerSpec(nn.Linear, 4, width)]
    for i in range(depth - 2):
        layers.append(nn.ReLU() if i % 2 == 0 else torch.tanh)
        layers.append(LayerSpec(nn.Linear, width, width))
    layers.append(LayerSpec(nn.Linear, width, 3))
    return layers


class SplitInts(nn.Module):
    """float (B, 4) -> (float features, int64 class ids, bool mask): three dtypes travel."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.proj(x)
        ids = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()  # (B,) int64 in 0..3
        mask = x[:, 2] > 0  # (B,) bool
        return h, ids, mask


class UseInts(nn.Module):
    """Consumes the tuple: embeds the ids, zeroes masked rows, keeps passing all three."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 8)
        self.lin = nn.Linear(8, 8)

    def forward(
        self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, ids, mask = inputs
        h = self.lin(torch.relu(h)) + self.embed(ids)
        h = h * mask.unsqueeze(-1).to(h.dtype) + 0.1 * h
        return h, ids, mask


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.lin(inputs[0])


def multi_tensor_specs() -> list[Any]:
    return [
        LayerSpec(SplitInts),
        LayerSpec(UseInts),
        LayerSpec(UseInts),
        LayerSpec(UseInts),
        LayerSpec(Head),
    ]


TINY_GPT = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16)


def gpt_specs() -> list[Any]:
    return list(gpt_layer_specs(TINY_GPT))


def inplace_specs() -> list[Any]:
    """Layers that modify their input in place: cut with ``[0, 1, 3, 5]`` (or ``[0, 1, 5]``),
    every later stage starts with one."""
    return [
        LayerSpec(nn.Linear, 4, 16),
        LayerSpec(nn.ReLU, inplace=True),
        LayerSpec(nn.Linear, 16, 16),
        LayerSpec(nn.ReLU, inplace=True),
        LayerSpec(nn.Linear, 16, 3),
    ]


def bad_output_specs() -> list[Any]:
    return [LayerSpec(nn.Linear, 4, 4), lambda x: {"not": x}, LayerSpec(nn.Linear, 4, 3)]


SPECS: dict[str, Callable[[], list[Any]]] = {
    "mlp": mlp_specs,
    "multi": multi_tensor_specs,
    "gpt": gpt_specs,
    "bad_output": bad_output_specs,
    "inplace": inplace_specs,
}

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "mlp": F.cross_entropy,
    "multi": F.cross_entropy,
    "gpt": gpt_loss,
    "bad_output": F.cross_entropy,
    "inplace": F.cross_entropy,
}


# -- data ---------------------------------------------------------------------------------


def micro_batch(model: str, step: int, index: int, size: int, seq: int = 8) -> tuple[Any, Any]:
    """Micro-batch ``index`` of batch ``step``: the same on every rank and in the reference."""
    gen = torch.Generator().manual_seed(1000 * step + index)
    if model == "gpt":
        tokens = torch.randint(0, TINY_GPT.vocab_size, (size, seq + 1), generator=gen)
        return tokens[:, :-1], tokens[:, 1:]
    x = torch.randn(size, 4, generator=gen)
    y = torch.randint(0, 3, (size,), generator=gen)
    return x, y


def seq_len(case: dict[str, Any], step: int) -> int:
    lengths = case.get("seq_lens")
    return int(lengths[step % len(lengths)]) if lengths else 8


def batches_for(case: dict[str, Any], step: int, dp_rank: int) -> list[tuple[Any, Any]]:
    m, dp = case["micro_batches"], case.get("dp", 1)
    return [
        micro_batch(case["model"], step, k * dp + dp_rank, case["mb_size"], seq_len(case, step))
        for k in range(m)
    ]


def ds_config(case: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": case["mb_size"],
        "gradient_accumulation_steps": case["micro_batches"],
        "optimizer": {"type": "SGD", "params": {"lr": case.get("lr", 0.1), "momentum": 0.9}},
        "steps_per_print": 1000,
        "pipeline": {"timeout_s": case.get("timeout_s", 60)},
    }
    if case.get("optimizer_config"):
        config["optimizer"] = case["optimizer_config"]
    if case.get("zero") is not None:
        config["zero_optimization"] = {"stage": case["zero"], **case.get("zero_keys", {})}
    config["gradient_clipping"] = case.get("clip", 0.0)
    if case.get("bf16"):
        config["bf16"] = {"enabled": True}
    config["pipeline"].update(case.get("pipeline", {}))
    return config


# -- the two trainers ---------------------------------------------------------------------


def build_pipeline(case: dict[str, Any]) -> stagewise.PipelineModule:
    return stagewise.PipelineModule(
        layers=SPECS[case["model"]](),
        num_stages=case["stages"],
        loss_fn=LOSSES[case["model"]],
        seed_layers=True,
        base_seed=1234,
        partition_method=case.get("partition", "uniform"),
        activation_checkpoint_interval=case.get("ckpt_interval", 0),
        **case.get("module_kwargs", {}),
    )


def train_pipeline(rank: int, world_size: int, case: dict[str, Any]) -> dict[str, Any]:
    """One rank's share: train ``case["steps"]`` batches; return losses and local weights."""
    module = build_pipeline(case)
    engine, _, _, _ = stagewise.initialize(model=module, config=ds_config(case))
    dp_rank = engine.grid.get_data_parallel_rank()
    losses = []
    for step in range(case["steps"]):
        losses.append(float(engine.train_batch(iter(batches_for(case, step, dp_rank)))))
    result: dict[str, Any] = {
        "losses": losses,
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "stage": engine.stage_id,
        "optim_bytes": sum(
            v.numel() * v.element_size()
            for state in engine.optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor)
        ),
    }
    if case.get("eval"):
        data = batches_for(case, 99, dp_rank)
        result["eval"] = engine.eval_batch(iter(data))
        result["eval_nobcast"] = engine.eval_batch(iter(data), bcast_loss=False)
        result["eval_logits"] = engine.eval_batch(iter(data), return_logits=True)
        result["eval_none"] = engine.eval_batch(iter(data), reduce_output=None)
        result["eval_half"] = engine.eval_batch(iter(data[:2]), num_micro_batches=2)
        result["eval_noloss"] = engine.eval_batch(iter(data), compute_loss=False)
    return result


def train_reference(case: dict[str, Any]) -> dict[str, Any]:
    """The same training in one process: losses per step and final weights."""
    torch.set_num_threads(1)
    model = build_reference(SPECS[case["model"]](), base_seed=1234, seed_layers=True)
    loss_fn = LOSSES[case["model"]]
    opt = torch.optim.SGD(model.parameters(), lr=case.get("lr", 0.1), momentum=0.9)
    m, dp = case["micro_batches"], case.get("dp", 1)
    losses = []
    for step in range(case["steps"]):
        total = 0.0
        for d in range(dp):
            for x, y in batches_for(case, step, d):
                if case.get("bf16"):
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss = loss_fn(model(x), y)
                else:
                    loss = loss_fn(model(x), y)
                (loss / (m * dp)).backward()
                total += float(loss.detach())
        if case.get("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), case["clip"])
        opt.step()
        opt.zero_grad()
        losses.append(total / (m * dp))
    result: dict[str, Any] = {"losses": losses, "state": copy.deepcopy(model.state_dict())}
    if case.get("eval"):
        with torch.no_grad():
            data = batches_for(case, 99, 0)
            outs = [model(x) for x, _ in data]
            result["eval_losses"] = [loss_fn(o, y) for o, (_, y) in zip(outs, data, strict=True)]
            result["eval_logits"] = outs
    return result
