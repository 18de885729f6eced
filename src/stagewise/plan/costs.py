"""Measured costs of a model, per layer: what the planner reads, saved as JSON.

A :class:`ModelCosts` holds one :class:`LayerCosts` per layer, in model order, and
what a training step costs outside the layers' passes (the loss, the optimizer
step, the link between devices, the engine's own work per pass and per step).

Times and bytes that depend on the micro-batch size are :class:`Linear` values,
``intercept + slope * rows``, fitted from measurements at two micro-batch sizes
(:func:`~stagewise.plan.profile.profile`); a value measured at one size only is
a line through the origin. Times are seconds on the device that was profiled;
:meth:`ModelCosts.scaled` turns them into another device's (``speed`` times as
fast) and sets the link's bandwidth and latency.

The file carries the model's *fingerprint*: one hash per layer of
:func:`~stagewise.layer_digest.layer_text` (class and arguments). Loading a file
against a list of layers whose fingerprint differs is an error that names the
first layer that differs (:meth:`ModelCosts.check_layers`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from stagewise.errors import PlanError

__all__ = ["FORMAT", "EngineCosts", "LayerCosts", "Linear", "ModelCosts", "fingerprint"]

#: the ``format`` field of a costs file this version reads and writes.
FORMAT = "stagewise-costs/1"


@dataclass(frozen=True)
class Linear:
    """``intercept + slope * rows``: a time or a size as a function of micro-batch rows."""

    intercept: float = 0.0
    slope: float = 0.0

    def at(self, rows: int) -> float:
        """The value for a micro-batch of ``rows`` rows (never below 0)."""
        return max(0.0, self.intercept + self.slope * rows)

    def scaled(self, factor: float) -> Linear:
        """Both terms times ``factor``."""
        return Linear(self.intercept * factor, self.slope * factor)

    @staticmethod
    def fit(rows: Sequence[int], values: Sequence[float]) -> Linear:
        """The line through two measurements (one: through the origin).

        More than two points get a least-squares fit. A negative intercept from noise
        is kept (``at`` clips at 0), a negative slope becomes a constant.
        """
        if len(rows) != len(values) or not rows:
            raise ValueError("Linear.fit needs as many values as rows, at least one")
        if len(set(rows)) == 1:
            mean = sum(values) / len(values)
            return Linear(0.0, mean / rows[0])
        n = len(rows)
        mx, my = sum(rows) / n, sum(values) / n
        sxx = sum((x - mx) ** 2 for x in rows)
        slope = sum((x - mx) * (y - my) for x, y in zip(rows, values, strict=True)) / sxx
        if slope < 0:
            return Linear(my, 0.0)
        return Linear(my - slope * mx, slope)

    def to_json(self) -> list[float]:
        return [self.intercept, self.slope]

    @staticmethod
    def from_json(value: Any, label: str) -> Linear:
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
        ):
            raise PlanError(f"costs file: {label} must be [intercept, slope], got {value!r}")
        return Linear(float(value[0]), float(value[1]))


@dataclass(frozen=True)
class LayerCosts:
    """One layer's measured costs.

    Attributes:
        name: the layer's class name (for tables and errors).
        digest: the layer's hash (:func:`~stagewise.layer_digest.layer_digests`), hex.
        forward: seconds of one forward.
        backward_input: seconds of the gradient with respect to the layer's input.
        backward_weight: seconds of the gradient with respect to its parameters
            (the whole backward, less ``backward_input``).
        activation_bytes: bytes the forward keeps for the backward (saved tensors and
            the output), per micro-batch.
        output_bytes: bytes of the output: what is sent to the next layer's device.
        param_bytes: bytes of the parameters (0 for a layer that reuses another's).
        tied_key: the key shared by tied layers (their parameters are held once per
            stage and their gradients summed over the stages that hold them).
        tied_bytes: the bytes of the tied parameters (for the tied all-reduce).
    """

    name: str
    digest: str
    forward: Linear
    backward_input: Linear
    backward_weight: Linear
    activation_bytes: Linear
    output_bytes: Linear
    param_bytes: int = 0
    tied_key: str | None = None
    tied_bytes: int = 0

    def compute(self, rows: int, checkpointing: bool = False) -> float:
        """Forward plus backward seconds (with the recompute under checkpointing)."""
        total = self.forward.at(rows) + self.backward_input.at(rows) + self.backward_weight.at(rows)
        return total + (self.forward.at(rows) if checkpointing else 0.0)


@dataclass(frozen=True)
class EngineCosts:
    """What a step costs outside the layers' passes, measured on the profiled machine.

    Attributes:
        per_pass: seconds the engine spends per compute pass (dispatch, load, the
            bookkeeping of a forward or backward), fitted from runs of a model whose
            layers cost almost nothing.
        per_step: seconds per step that do not depend on the micro-batches (the
            loss all-reduce, the end-of-batch synchronisation).
        per_step_data_parallel: seconds a step's collectives add when the pipeline is
            replicated (the loss, the reports and the reduction's own synchronisation,
            as the engine runs them), beyond the reduction's bytes.
        latency: seconds per message between two devices (through the engine).
        bandwidth: bytes per second between two devices.
        reduce_bandwidth: bytes of buffer per second of an all-reduce over two devices.
        concurrency: how much slower the profiled passes run while every device
            computes at once (>= 1; CPU "devices" share caches and memory bandwidth).
    """

    per_pass: float = 0.0
    per_step: float = 0.0
    per_step_data_parallel: float = 0.0
    latency: float = 0.0
    bandwidth: float = 1e9
    reduce_bandwidth: float = 1e9
    concurrency: float = 1.0


@dataclass(frozen=True)
class ModelCosts:
    """A model's measured costs (see the module doc).

    Attributes:
        layers: one :class:`LayerCosts` per layer, in model order.
        input_bytes: bytes of the model's input (the first layer's).
        loss_forward, loss_backward: seconds of the loss and its gradient.
        optimizer: the optimizer timed (``"sgd"``, ``"adamw"``...).
        optimizer_seconds_per_byte: seconds of its step per byte of parameters (with
            the engine's non-finite check: a norm over the gradients).
        optimizer_state_factor: optimizer state bytes per parameter byte (0 for plain
            SGD, 2 for Adam's two moments).
        engine: the step's costs outside the passes.
        micro_batch_sizes: the sizes profiled.
        device: a description of the device profiled (and of any scaling applied).
        threads: torch threads while profiling.
    """

    layers: tuple[LayerCosts, ...]
    input_bytes: Linear
    loss_forward: Linear = Linear()
    loss_backward: Linear = Linear()
    optimizer: str = "sgd"
    optimizer_seconds_per_byte: float = 0.0
    optimizer_state_factor: float = 0.0
    engine: EngineCosts = field(default_factory=EngineCosts)
    micro_batch_sizes: tuple[int, ...] = ()
    device: str = "cpu"
    threads: int = 1

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def fingerprint(self) -> list[str]:
        """The per-layer digests."""
        return [layer.digest for layer in self.layers]

    def check_layers(self, layers: Sequence[Any]) -> None:
        """Raise :class:`PlanError` unless these costs were measured on ``layers``.

        The message names the first layer that differs and says to profile the model.
        """
        theirs = fingerprint(layers)
        ours = self.fingerprint
        if theirs == ours:
            return
        if len(theirs) != len(ours):
            raise PlanError(
                f"the costs file is of another model: it has {len(ours)} layers, the model "
                f"{len(theirs)}; profile this model (stagewise.plan.profile) and plan with "
                "its costs file"
            )
        index = next(i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b)
        raise PlanError(
            f"the costs file is of another model: layer {index} was "
            f"{self.layers[index].name} with other arguments (digest {ours[index]}, the "
            f"model's is {theirs[index]}); profile this model (stagewise.plan.profile) and "
            "plan with its costs file"
        )

    def scaled(
        self,
        speed: float = 1.0,
        bandwidth: float | None = None,
        latency: float | None = None,
    ) -> ModelCosts:
        """These costs on a device ``speed`` times as fast, over another link.

        Every time divides by ``speed`` (the engine's per-pass and per-step work
        included); ``bandwidth`` (bytes/s) and ``latency`` (s) replace the link's.
        """
        if not speed > 0 or not math.isfinite(speed):
            raise PlanError(f"speed must be a finite number > 0, got {speed!r}")
        if bandwidth is not None and (not bandwidth > 0 or not math.isfinite(bandwidth)):
            raise PlanError(f"bandwidth must be a finite number of bytes/s > 0, got {bandwidth!r}")
        if latency is not None and (not latency >= 0 or not math.isfinite(latency)):
            raise PlanError(f"latency must be a finite number of seconds >= 0, got {latency!r}")
        f = 1.0 / speed
        layers = tuple(
            replace(
                layer,
                forward=layer.forward.scaled(f),
                backward_input=layer.backward_input.scaled(f),
                backward_weight=layer.backward_weight.scaled(f),
            )
            for layer in self.layers
        )
        engine = EngineCosts(
            per_pass=self.engine.per_pass * f,
            per_step=self.engine.per_step * f,
            per_step_data_parallel=self.engine.per_step_data_parallel,
            latency=self.engine.latency if latency is None else latency,
            bandwidth=self.engine.bandwidth if bandwidth is None else bandwidth,
            reduce_bandwidth=self.engine.reduce_bandwidth if bandwidth is None else bandwidth,
            concurrency=self.engine.concurrency,
        )
        device = self.device if speed == 1 else f"{self.device} x{speed:g} speed"
        return replace(
            self,
            layers=layers,
            loss_forward=self.loss_forward.scaled(f),
            loss_backward=self.loss_backward.scaled(f),
            optimizer_seconds_per_byte=self.optimizer_seconds_per_byte * f,
            engine=engine,
            device=device,
        )

    # -- JSON --------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready values (``format`` first)."""
        return {
            "format": FORMAT,
            "device": self.device,
            "threads": self.threads,
            "micro_batch_sizes": list(self.micro_batch_sizes),
            "input_bytes": self.input_bytes.to_json(),
            "loss_forward": self.loss_forward.to_json(),
            "loss_backward": self.loss_backward.to_json(),
            "optimizer": self.optimizer,
            "optimizer_seconds_per_byte": self.optimizer_seconds_per_byte,
            "optimizer_state_factor": self.optimizer_state_factor,
            "engine": asdict(self.engine),
            "layers": [
                {
                    "name": layer.name,
                    "digest": layer.digest,
                    "forward": layer.forward.to_json(),
                    "backward_input": layer.backward_input.to_json(),
                    "backward_weight": layer.backward_weight.to_json(),
                    "activation_bytes": layer.activation_bytes.to_json(),
                    "output_bytes": layer.output_bytes.to_json(),
                    "param_bytes": layer.param_bytes,
                    "tied_key": layer.tied_key,
                    "tied_bytes": layer.tied_bytes,
                }
                for layer in self.layers
            ],
        }

    @classmethod
    def from_json(cls, data: Any) -> ModelCosts:
        """Read :meth:`to_json`'s values; :class:`PlanError` names what is wrong."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise PlanError(
                f"not a stagewise costs file (format {found!r}, expected {FORMAT!r}); "
                "write one with stagewise.plan.profile(...).save(path)"
            )
        try:
            layers = tuple(
                LayerCosts(
                    name=str(item["name"]),
                    digest=str(item["digest"]),
                    forward=Linear.from_json(item["forward"], f"layers[{i}].forward"),
                    backward_input=Linear.from_json(
                        item["backward_input"], f"layers[{i}].backward_input"
                    ),
                    backward_weight=Linear.from_json(
                        item["backward_weight"], f"layers[{i}].backward_weight"
                    ),
                    activation_bytes=Linear.from_json(
                        item["activation_bytes"], f"layers[{i}].activation_bytes"
                    ),
                    output_bytes=Linear.from_json(
                        item["output_bytes"], f"layers[{i}].output_bytes"
                    ),
                    param_bytes=int(item["param_bytes"]),
                    tied_key=item.get("tied_key"),
                    tied_bytes=int(item.get("tied_bytes", 0)),
                )
                for i, item in enumerate(data["layers"])
            )
            engine = EngineCosts(**{k: float(v) for k, v in data["engine"].items()})
            out = cls(
                layers=layers,
                input_bytes=Linear.from_json(data["input_bytes"], "input_bytes"),
                loss_forward=Linear.from_json(data["loss_forward"], "loss_forward"),
                loss_backward=Linear.from_json(data["loss_backward"], "loss_backward"),
                optimizer=str(data["optimizer"]),
                optimizer_seconds_per_byte=float(data["optimizer_seconds_per_byte"]),
                optimizer_state_factor=float(data["optimizer_state_factor"]),
                engine=engine,
                micro_batch_sizes=tuple(int(m) for m in data["micro_batch_sizes"]),
                device=str(data["device"]),
                threads=int(data["threads"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, PlanError):
                raise
            raise PlanError(f"costs file: a field is missing or malformed ({error!r})") from None
        if not layers:
            raise PlanError("costs file: it has no layers")
        return out

    def save(self, path: str | Path) -> None:
        """Write the costs as JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path, layers: Sequence[Any] | None = None) -> ModelCosts:
        """Read a costs file; with ``layers``, check that it was measured on them."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(f"no costs file at {str(path)!r}") from None
        except json.JSONDecodeError as error:
            raise PlanError(f"costs file {str(path)!r} is not JSON: {error}") from None
        costs = cls.from_json(data)
        if layers is not None:
            costs.check_layers(layers)
        return costs


def fingerprint(layers: Sequence[Any]) -> list[str]:
    """One hex digest per layer (:func:`~stagewise.layer_digest.layer_digests`)."""
    from stagewise.layer_digest import layer_digests

    return [f"{d:016x}" for d in layer_digests(layers)]
