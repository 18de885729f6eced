"""Entry points: set up torch.distributed and build an engine (``deepspeed.initialize``)."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from stagewise import teardown
from stagewise.config import Config
from stagewise.dist_utils import free_port
from stagewise.engine import PipelineEngine
from stagewise.engine.resilience import resume_if_configured
from stagewise.module import PipelineModule
from stagewise.rendezvous import incarnation_store

__all__ = ["add_config_arguments", "init_distributed", "initialize"]

logger = logging.getLogger(__name__)


def init_distributed(
    dist_backend: str | None = None,
    auto_mpi_discovery: bool = True,
    distributed_port: int = 29500,
    verbose: bool = True,
    timeout: datetime.timedelta = datetime.timedelta(minutes=30),
    init_method: str | None = None,
    dist_init_required: bool | None = None,
    config: Any = None,
    rank: int = -1,
    world_size: int = -1,
) -> None:
    """Set up the default process group (once; later calls do nothing).

    Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` set) it joins that
    job; without them it starts a single-process group on a free port, so a script
    also runs as plain ``python script.py``. The arguments are DeepSpeed's
    (``deepspeed.init_distributed``). Where torchrun's agent hosts the store, which
    outlives ``--max-restarts``, each incarnation of the job meets under a prefix of
    its own (:mod:`stagewise.rendezvous`), so a restarted group never reads a dead
    one's addresses. It also installs the exit hooks of :mod:`stagewise.teardown`.

    Args:
        dist_backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is there, else gloo.
        auto_mpi_discovery: accepted as DeepSpeed's; MPI discovery itself is not
            mirrored, so an ``mpirun`` launch without torchrun's variables is an error.
        distributed_port: the master port when ``MASTER_PORT`` is not set.
        verbose: log the process group on rank 0.
        timeout: the process group's timeout for collectives.
        init_method: a URL for ``init_process_group`` (default: the environment).
        dist_init_required: False: never set up a group here (one must exist).
        config: DeepSpeed passes its config here for the comms logger, which stagewise
            does not have; a config given here is reported, not used.
        rank, world_size: this process's rank and the world size, for an
            ``init_method`` that needs them (``tcp://``); -1: from the environment.

    Raises:
        RuntimeError: ``dist_init_required=False`` without a process group, or an
            MPI launch without torchrun's environment variables.
    """
    if dist.is_initialized():
        teardown.install()
        return
    if dist_init_required is False:
        raise RuntimeError(
            "init_distributed(dist_init_required=False) but torch.distributed is not "
            "initialized; call init_distributed() without it, or set up the group first"
        )
    if config is not None:
        logger.warning(
            "init_distributed(config=...) configures DeepSpeed's comms logger, which "
            "stagewise does not have; the config is not used here"
        )
    backend = dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    env = os.environ
    launched = all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))
    if not launched and rank < 0 and init_method is None and auto_mpi_discovery:
        mpi_size = int(env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", "1")))
        if mpi_size > 1:
            raise RuntimeError(
                f"launched by MPI ({mpi_size} processes) without torchrun's RANK, "
                "WORLD_SIZE and MASTER_ADDR; stagewise does not discover them from MPI: "
                "launch with torchrun, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
            )
    if rank >= 0 and world_size > 0:
        pass
    elif init_method is None and not launched:
        init_method = f"tcp://127.0.0.1:{free_port()}"
        rank, world_size = 0, 1
    else:
        rank, world_size = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        if init_method is None and "MASTER_PORT" not in env:
            init_method = f"tcp://{env['MASTER_ADDR']}:{distributed_port}"
    if backend == "nccl":
        local_rank = int(env.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local_rank)
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_PORT" in env
    if init_method is None and agent_store:
        store = incarnation_store(
            dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size, False, timeout),
            rank,
            world_size,
            timeout.total_seconds(),
        )
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
    if rank == 0 and verbose:
        logger.info("stagewise: %s process group of %d ranks", backend, world_size)


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add DeepSpeed's command-line flags to ``parser`` and return it.

    ``--deepspeed_config PATH`` names the JSON config that
    ``initialize(args=parser.parse_args())`` reads; ``--deepspeed`` is a flag for the
    script's own use (it changes nothing here); ``--deepscale`` and
    ``--deepscale_config`` are DeepSpeed's older spellings of the two.
    """
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed's configuration flags")
    group.add_argument(
        "--deepspeed",
        default=False,
        action="store_true",
        help="a flag for the script itself (stagewise always runs its engine)",
    )
    group.add_argument(
        "--deepspeed_config",
        default=None,
        type=str,
        help="the JSON config that initialize(args=...) reads",
    )
    group.add_argument(
        "--deepscale", default=False, action="store_true", help="the old name of --deepspeed"
    )
    group.add_argument(
        "--deepscale_config",
        default=None,
        type=str,
        help="the old name of --deepspeed_config",
    )
    return parser


def _config_source(config: Any, config_params: Any, args: Any) -> Any:
    """The config given to ``initialize``: ``config``, ``config_params`` or the ``args``'
    ``--deepspeed_config`` (``--deepscale_config``), as DeepSpeed takes it."""
    if config is None:
        config = config_params
    from_args = None
    if args is not None:
        from_args = getattr(args, "deepspeed_config", None) or getattr(
            args, "deepscale_config", None
        )
    if from_args is not None and config is not None:
        raise ValueError(
            f"initialize got a config twice: config={config!r} and "
            f"args.deepspeed_config={from_args!r}; pass one of them"
        )
    return config if config is not None else from_args


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
    if not dist.is_initialized():
        init_distributed()
    parsed = Config.from_any(_config_source(config, config_params, args))
    if dist.get_rank() == 0:
        for notice in parsed.notices:
            logger.warning("%s", notice)
    engine = PipelineEngine(
        module=model,
        config=parsed,
        optimizer=optimizer,
        model_parameters=model_parameters,
        lr_scheduler=lr_scheduler,
        training_data=training_data,
        collate_fn=collate_fn,
    )
    resume_if_configured(engine)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
