"""Entry points: set up torch.distributed and build an engine (``deepspeed.initialize``)."""

from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from stagewise import teardown
from stagewise.config import Config
from stagewise.engine import PipelineEngine
from stagewise.engine.resilience import resume_if_configured
from stagewise.module import PipelineModule
from stagewise.rendezvous import incarnation_store

__all__ = ["init_distributed", "initialize"]

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed(
    dist_backend: str | None = None,
    timeout: datetime.timedelta = datetime.timedelta(minutes=30),
    init_method: str | None = None,
) -> None:
    """Set up the default process group (once; later calls do nothing).

    Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set)
    it joins that job; without them it starts a single-process group on a free port,
    so a script also runs as plain ``python script.py``. Where torchrun's agent hosts
    the store, which outlives ``--max-restarts``, each incarnation of the job meets
    under a prefix of its own (:mod:`stagewise.rendezvous`), so a restarted group
    never reads a dead one's addresses. It also installs the exit hooks of
    :mod:`stagewise.teardown`.

    Args:
        dist_backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is there, else gloo.
        timeout: the process group's timeout for collectives.
        init_method: a URL for ``init_process_group`` (default: the environment).
    """
    if dist.is_initialized():
        teardown.install()
        return
    backend = dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    env = os.environ
    if init_method is None and not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        rank, world_size = 0, 1
    else:
        rank, world_size = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    if backend == "nccl":
        local_rank = int(env.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local_rank)
    if init_method is None and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        agent_store = dist.TCPStore(
            env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size, False, timeout
        )
        store = incarnation_store(agent_store, rank, world_size, timeout.total_seconds())
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
        teardown.install()
    else:
        dist.init_process_group(
            backend=backend,
            init_method=init_method or "env://",
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
        # rank 0 hosts the store here: after a failure it lingers a second for the others
        teardown.install(linger_s=1.0 if rank == 0 and world_size > 1 else 0.0)
    if rank == 0:
        logger.info("stagewise: %s process group of %d ranks", backend, world_size)


def initialize(
    model: PipelineModule | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    config: dict[str, Any] | str | os.PathLike[str] | None = None,
    lr_scheduler: Any = None,
    training_data: Any = None,
    collate_fn: Any = None,
    args: Any = None,
    config_params: dict[str, Any] | None = None,
    mpu: Any = None,
    dist_init_required: bool | None = None,
) -> tuple[PipelineEngine, Any, Any, Any]:
    """Build the pipeline engine, as ``deepspeed.initialize`` does.

    Args:
        model: the :class:`PipelineModule` to train.
        optimizer: a ``torch.optim`` optimizer; default: the config's ``optimizer``.
        model_parameters: the parameters for a config-built optimizer.
        config: a dict or a path to a JSON file (``args.deepspeed_config`` and
            ``config_params`` are accepted as in DeepSpeed).
        lr_scheduler: a scheduler, or a callable ``optimizer -> scheduler``; default:
            the config's ``scheduler``.
        training_data: a ``torch.utils.data.Dataset`` to read micro-batches from.
        collate_fn: for the DataLoader built over ``training_data``.
        args: an ``argparse`` namespace whose ``deepspeed_config`` names the config.
        config_params: the config, as DeepSpeed's older keyword.
        mpu: must be None: a pipeline's model-parallel unit is its module's grid
            (``model.mpu()``), as in DeepSpeed.
        dist_init_required: False forbids setting up ``torch.distributed`` here (it must
            be up already); None or True set it up when it is not.

    With ``"checkpoint": {"resume": "auto", "save_dir": DIR}`` the newest complete
    checkpoint under ``DIR`` is loaded before returning (weights, optimizer,
    scheduler, loss scale, RNG states, counters, and the position of stagewise's
    loaders); ``engine.global_steps`` then tells how many batches were trained.

    Returns:
        ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    Raises:
        ValueError: no model, an ``mpu`` other than the module's grid, or no process
            group with ``dist_init_required=False``.
    """
    if model is None:
        raise ValueError("stagewise.initialize needs model=<a PipelineModule>")
    if mpu is not None and not (isinstance(model, PipelineModule) and mpu is model.mpu()):
        raise ValueError(
            "initialize(mpu=...) must be None for a pipeline: the PipelineModule's grid "
            "(model.mpu()) is its model-parallel unit; give the topology to PipelineModule "
            "(topology=PipeModelDataParallelTopology(...)) instead"
        )
    if dist_init_required is False and not dist.is_initialized():
        raise ValueError(
            "dist_init_required=False but torch.distributed is not initialized; call "
            "stagewise.init_distributed() first or leave dist_init_required unset"
        )
    if config is None:
        config = config_params
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None) or getattr(args, "stagewise_config", None)
    if not dist.is_initialized():
        init_distributed()
    engine = PipelineEngine(
        module=model,
        config=Config.from_any(config),
        optimizer=optimizer,
        model_parameters=model_parameters,
        lr_scheduler=lr_scheduler,
        training_data=training_data,
        collate_fn=collate_fn,
    )
    resume_if_configured(engine)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
