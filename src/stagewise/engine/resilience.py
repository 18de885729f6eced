"""The engine's resilience: periodic and asynchronous checkpoints, resume, liveness, non-finite.

:class:`Resilience` is built by every :class:`~stagewise.engine.PipelineEngine`
and joins the pieces that let a job outlive a dead rank:

* the exit hooks (:mod:`stagewise.teardown`) and the heartbeat that names
  silent ranks (:mod:`stagewise.heartbeat`);
* the non-finite check of fp32/bf16 steps (:mod:`~stagewise.engine.nonfinite`),
  put into the optimizer stepper;
* saves and loads, with the position of the data loader the engine trains from
  (:mod:`stagewise.loader`), synchronous or through an
  :class:`~stagewise.checkpoint.async_save.AsyncSaver` (``checkpoint.async``);
* the periodic save after ``train_batch`` (``checkpoint.every_steps``) with
  rotation (``checkpoint.keep_last``), and :func:`resume_if_configured`, which
  ``initialize`` calls (``checkpoint.resume = "auto"``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from stagewise import checkpoint, heartbeat, teardown
from stagewise.checkpoint.async_save import AsyncSaver
from stagewise.checkpoint.layout import check_tag
from stagewise.checkpoint.periodic import latest_complete
from stagewise.engine.nonfinite import NonFiniteGuard

__all__ = ["Resilience", "resume_if_configured"]

logger = logging.getLogger("stagewise.engine")


def _start_heartbeat(engine: Any) -> None:
    if engine.world_size < 2:
        return
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # a group without a store (or a torch without the helper): no names
        return
    nonce = torch.tensor(
        [int.from_bytes(os.urandom(6), "big") if engine.global_rank == 0 else 0],
        dtype=torch.int64,
        device=engine.device,
    )
    engine.parts.collectives.broadcast(nonce, 0, "starting the heartbeat")
    prefix = f"stagewise/heartbeat/{int(nonce.item()):012x}"
    heartbeat.start(store, prefix, engine.global_rank, engine.world_size, engine._describe_rank)


class Resilience:
    """Checkpoints, resume and the safety nets of one engine (see the module doc)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.config = engine.config.checkpoint
        self.pending_data: Any = None  # a loaded data position waiting for its loader
        teardown.install()
        _start_heartbeat(engine)
        stepper = engine.parts.stepper
        if engine.loss_scaler is None:
            stepper.nonfinite = NonFiniteGuard(
                engine.config.pipeline.nonfinite, engine.parts.collectives, engine.device,
                engine.global_rank, engine.world_size, engine._describe_rank,
            )  # fmt: skip
        self.saver: AsyncSaver | None = None
        if self.config.async_save:
            group = dist.new_group(backend="gloo") if engine.world_size > 1 else None
            self.saver = AsyncSaver(engine.parts.collectives.with_group(group))

    # -- the data position ------------------------------------------------------------------
    def data_state(self) -> Any:
        """The state of the loader the engine trains from, when it can save one."""
        source = self.engine.data_iterator
        return source.state_dict() if hasattr(source, "load_state_dict") else None

    def adopt(self, data_iter: Any) -> Any:
        """The iterator ``train_batch`` was given, moved to a resumed position if one waits."""
        if self.pending_data is not None and data_iter is not None:
            state, self.pending_data = self.pending_data, None
            if hasattr(data_iter, "load_state_dict"):
                data_iter.load_state_dict(state)
            elif self.engine.global_rank == 0:
                logger.warning(
                    "the checkpoint holds a data-loader position but train_batch was given a "
                    "plain iterator: skip engine.global_steps=%d batches of it yourself, or "
                    "pass a stagewise.RepeatingLoader",
                    self.engine.global_steps,
                )
        return data_iter

    # -- saving and loading -----------------------------------------------------------------
    def save(
        self,
        save_dir: str | os.PathLike[str],
        tag: str | None,
        client_state: dict[str, Any],
        save_latest: bool,
    ) -> bool:
        """Save now (``checkpoint.async``: copy, then write in the background)."""
        engine, cfg = self.engine, self.config
        view = dataclasses.replace(engine.checkpoint_view(), data_state=self.data_state())
        save_path = os.fspath(save_dir)
        same_dir = cfg.save_dir is not None and os.path.abspath(save_path) == os.path.abspath(
            cfg.save_dir
        )
        keep_last = cfg.keep_last if same_dir else 0
        if self.saver is None:
            return checkpoint.save_checkpoint(
                view, save_path, tag, client_state, save_latest, keep_last
            )
        if not save_path:
            raise ValueError(f"save_dir must be a non-empty path, got {save_dir!r}")
        tag = f"global_step{engine.global_steps}" if tag is None else str(tag)
        check_tag(tag)
        files = self.saver.capture(view, client_state)  # waits for the save in flight
        self.saver.submit(view, save_path, tag, files, save_latest, keep_last)
        return True

    def wait(self) -> str | None:
        """Wait for an asynchronous save in flight; the tag directory it committed."""
        return self.saver.wait() if self.saver is not None else None

    def load(self, load_dir: str | os.PathLike[str], tag: str | None, *options: bool) -> Any:
        """Load a checkpoint into the engine (``options``: ``load_checkpoint``'s flags, in
        order); ``(path, client_state)`` as DeepSpeed returns."""
        self.wait()
        engine = self.engine
        loaded = checkpoint.load_checkpoint(engine.checkpoint_view(), load_dir, tag, *options)
        if loaded.counters is not None:
            engine.parts.counters.restore(loaded.counters)
        self.pending_data = loaded.data_state
        if loaded.data_state is not None and engine.data_iterator is not None:
            self.adopt(engine.data_iterator)
        return loaded.path, loaded.client_state

    def after_train_batch(self) -> None:
        """The periodic save (every ``checkpoint.every_steps`` steps); an async failure raised."""
        if self.saver is not None and self.saver.failed():
            self.saver.wait()
        every = self.config.every_steps
        if every and self.engine.global_steps % every == 0 and self.config.save_dir:
            self.save(self.config.save_dir, None, {}, True)


def resume_if_configured(engine: Any) -> str | None:
    """With ``checkpoint.resume = "auto"``, load the newest complete checkpoint under
    ``checkpoint.save_dir`` (if any) and log which; the tag directory loaded, or None."""
    cfg = engine.config.checkpoint
    if cfg.resume != "auto" or cfg.save_dir is None:
        return None
    tag = latest_complete(cfg.save_dir)
    if tag is None:
        if engine.global_rank == 0:
            logger.info("no checkpoint under %s: training starts afresh", cfg.save_dir)
        return None
    path, _ = engine.resilience.load(cfg.save_dir, tag)
    if engine.global_rank == 0:
        logger.info("resumed from %s at step %d", path, engine.global_steps)
    return str(path)
