"""The CUDA/NCCL path of the engine, checked on a GPU machine: one rank per GPU.

Every registered schedule trains a small GPT over as many stages as there are
ranks (one GPU each) under an NCCL process group and is compared with the same
model trained in one process without a pipeline. NCCL matches point-to-point
messages by order alone, so this checks the engine's order-only transfers
(one process group per link direction, receives posted in link order). With one
GPU the stages are 1 and the chunked schedules' transfers go through the
same-rank path. A bf16 + checkpointing run of each split-backward schedule and a
throughput figure close the check::

    torchrun --nproc_per_node "$(nvidia-smi -L | wc -l)" benchmarks/cuda_check.py
    PYTHONPATH=src python3 benchmarks/cuda_check.py          # one GPU, no torchrun
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

import stagewise
from stagewise.models.gpt import DEMO_CONFIG, gpt_layer_specs, gpt_loss
from stagewise.models.reference import build_reference

CONFIG = replace(DEMO_CONFIG, vocab_size=96, n_layer=4, n_embd=128, block_size=64)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a dry run on gloo
CHUNKS = {"interleaved": (2, "loop"), "zbv": (2, "v"), "dualpipev": (2, "v")}
SPLIT = ("zb-h1", "zb-h2", "zbv", "dualpipev")


def batches(
    step: int, device: torch.device, m: int = 4, b: int = 8
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(step)
    out = []
    for _ in range(m):
        tokens = torch.randint(0, CONFIG.vocab_size, (b, CONFIG.block_size + 1), generator=gen)
        out.append((tokens[:, :-1].to(device), tokens[:, 1:].to(device)))
    return out


def train(schedule: str, steps: int, bf16: bool = False, ckpt: bool = False) -> list[float]:
    chunks, placement = CHUNKS.get(schedule, (1, "loop"))
    model = stagewise.PipelineModule(
        gpt_layer_specs(CONFIG),
        num_stages=torch.distributed.get_world_size(),
        loss_fn=gpt_loss,
        seed_layers=True,
        virtual_stages=chunks,
        placement=placement,
        partition_method="uniform",
        activation_checkpoint_interval=1 if ckpt else 0,
    )
    engine, *_ = stagewise.initialize(
        model=model,
        config={
            "train_micro_batch_size_per_gpu": 8,
            "gradient_accumulation_steps": 4,
            "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
            "gradient_clipping": 0.0,
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
            "pipeline": {"schedule": schedule},
        },
    )
    if next(model.parameters()).device.type != DEVICE.type:
        raise RuntimeError(f"the engine placed the model on {next(model.parameters()).device}")
    return [float(engine.train_batch(iter(batches(s, engine.device)))) for s in range(steps)]


def reference(steps: int) -> list[float]:
    model = build_reference(gpt_layer_specs(CONFIG)).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for s in range(steps):
        total = 0.0
        for x, y in batches(s, DEVICE):
            loss = gpt_loss(model(x), y)
            (loss / 4).backward()
            total += float(loss.detach())
        opt.step()
        opt.zero_grad()
        losses.append(total / 4)
    return losses


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    stagewise.init_distributed(dist_backend="nccl" if DEVICE.type == "cuda" else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    show = print if rank == 0 else (lambda *args, **kwargs: None)
    from stagewise.schedule.registry import schedule_names

    show(
        "device:",
        torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu",
        "| torch",
        torch.__version__,
        "| backend",
        torch.distributed.get_backend(),
        f"| {world} rank(s)",
    )
    ref = reference(3)
    show(f"reference (no pipeline): {[round(v, 6) for v in ref]}")
    for schedule in schedule_names():
        got = train(schedule, 3)
        worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True))
        show(
            f"{schedule:12s} {[round(v, 6) for v in got]}  max rel diff {worst:.2e}  "
            f"{'OK' if worst < 1e-4 else 'MISMATCH'}"
        )
    for schedule in ("1f1b", *(s for s in SPLIT if s in schedule_names())):
        got = train(schedule, 3, bf16=True, ckpt=True)
        worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True))
        show(
            f"{schedule:12s} bf16+ckpt {[round(v, 4) for v in got]}  rel diff to fp32 "
            f"{worst:.1e} (finite: {all(torch.isfinite(torch.tensor(got)).tolist())})"
        )
    model = stagewise.PipelineModule(gpt_layer_specs(CONFIG), num_stages=world, loss_fn=gpt_loss)
    engine, *_ = stagewise.initialize(
        model=model,
        config={
            "train_micro_batch_size_per_gpu": 8,
            "gradient_accumulation_steps": 4,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "steps_per_print": 10**9,
        },
    )
    data = batches(0, engine.device)
    for _ in range(3):
        engine.train_batch(iter(data))
    sync()
    start = time.perf_counter()
    for _ in range(20):
        engine.train_batch(iter(data))
    sync()
    step = (time.perf_counter() - start) / 20
    show(
        f"train_batch (1f1b, {world} stage(s)) on {DEVICE.type}: {step * 1e3:.1f} ms/step, "
        f"{4 * 8 * CONFIG.block_size / step:,.0f} tokens/s"
    )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
