"""Partition methods: the ``partition_method`` option parsed once, and its boundaries.

:class:`PartitionMethod` parses the option (``'uniform'``, ``'parameters'``,
``'type:REGEX'``, ``'profile'`` or an explicit list of boundaries), and
:func:`compute_boundaries` turns it into boundaries for a list of layers.

>>> compute_boundaries("type:linear", 2, class_names=["Embedding", "Linear", "Linear", "ReLU"])
[0, 2, 4]
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union, cast

from stagewise.partition.balanced import check_num_parts, partition_balanced, partition_uniform

__all__ = ["PartitionKind", "PartitionMethod", "PartitionMethodLike", "compute_boundaries"]

PartitionKind = Literal["uniform", "parameters", "type", "profile", "explicit"]

#: What ``partition_method`` may be: a method string, explicit boundaries, or a parsed method.
PartitionMethodLike = Union[str, Sequence[int], "PartitionMethod"]

_VALID_FORMS = (
    "'uniform', 'parameters', 'type:REGEX' (e.g. 'type:transformer'), 'profile', "
    "or an explicit list of boundaries such as [0, 4, 8]"
)


@dataclass(frozen=True)
class PartitionMethod:
    """A parsed ``partition_method``: how to place layers on pipeline stages.

    Build one with :meth:`parse`; a ``PartitionMethod`` is always valid.

    Attributes:
        kind: ``'uniform'`` (equal layer counts), ``'parameters'`` (balance the
            trainable parameter counts), ``'type'`` (balance the number of
            layers whose class name matches ``pattern``), ``'profile'``
            (balance measured costs) or ``'explicit'`` (``boundaries`` as given).
        pattern: the regular expression of ``'type'`` (searched in each class
            name, case-insensitive).
        boundaries: the boundaries of ``'explicit'``.

    >>> PartitionMethod.parse("type:Transformer")
    PartitionMethod(kind='type', pattern='Transformer', boundaries=None)
    >>> str(PartitionMethod.parse([0, 2, 5]))
    '[0, 2, 5]'
    """

    kind: PartitionKind
    pattern: str | None = None
    boundaries: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "parameters", "type", "profile", "explicit"):
            raise ValueError(f"unknown partition kind {self.kind!r}; valid forms: {_VALID_FORMS}")
        if (self.kind == "type") != (self.pattern is not None):
            raise ValueError(
                f"a pattern goes with kind 'type' only (kind {self.kind!r}, pattern {self.pattern!r})"
            )
        if (self.kind == "explicit") != (self.boundaries is not None):
            raise ValueError(
                "boundaries go with kind 'explicit' only "
                f"(kind {self.kind!r}, boundaries {self.boundaries!r})"
            )
        if self.pattern is not None:
            if not self.pattern:
                raise ValueError(
                    "partition method 'type:' needs a regular expression after the colon, "
                    "e.g. 'type:transformer'"
                )
            try:
                re.compile(self.pattern, re.IGNORECASE)
            except re.error as error:
                raise ValueError(
                    f"partition method 'type:{self.pattern}': {self.pattern!r} is not a valid "
                    f"regular expression ({error})"
                ) from None
        if self.boundaries is not None:
            _check_boundaries(self.boundaries)

    @classmethod
    def parse(cls, method: PartitionMethodLike) -> PartitionMethod:
        """Parse a ``partition_method`` option (case-insensitive keywords).

        Raises:
            ValueError: for an unknown method (listing the valid forms), an
                invalid regular expression, or explicit boundaries that do not
                start at 0 or decrease.

        >>> PartitionMethod.parse("Parameters").kind
        'parameters'
        >>> PartitionMethod.parse((0, 3, 6)).boundaries
        (0, 3, 6)
        """
        if isinstance(method, PartitionMethod):
            return method
        if isinstance(method, str):
            text = method.strip()
            keyword, colon, pattern = text.partition(":")
            keyword = keyword.strip().lower()
            if colon and keyword == "type":
                return cls("type", pattern=pattern)
            if not colon and keyword in ("uniform", "parameters", "profile"):
                return cls(keyword)  # type: ignore[arg-type]
            raise ValueError(f"unknown partition method {method!r}; valid forms: {_VALID_FORMS}")
        if isinstance(method, Sequence) and not isinstance(method, (bytes, bytearray)):
            return cls("explicit", boundaries=tuple(_boundary_ints(cast(Sequence[int], method))))
        raise ValueError(
            f"unknown partition method {method!r} of type {type(method).__name__}; "
            f"valid forms: {_VALID_FORMS}"
        )

    @property
    def needs_param_counts(self) -> bool:
        """Whether :func:`compute_boundaries` needs ``param_counts`` for this method."""
        return self.kind == "parameters"

    @property
    def needs_profile(self) -> bool:
        """Whether :func:`compute_boundaries` needs ``profile_costs`` for this method."""
        return self.kind == "profile"

    def __str__(self) -> str:
        if self.kind == "type":
            return f"type:{self.pattern}"
        if self.kind == "explicit":
            return str(list(self.boundaries or ()))
        return self.kind


def _boundary_ints(values: Sequence[int]) -> list[int]:
    result = []
    for index, value in enumerate(values):
        if isinstance(value, bool):
            raise ValueError(f"partition boundaries must be integers, got {values!r}")
        try:
            result.append(operator.index(value))
        except TypeError:
            raise ValueError(
                f"partition boundaries must be integers, got {value!r} at index {index} "
                f"of {list(values)!r}"
            ) from None
    return result


def _check_boundaries(boundaries: Sequence[int]) -> None:
    if not boundaries or boundaries[0] != 0:
        raise ValueError(
            f"explicit partition boundaries {list(boundaries)} must start at 0, "
            "e.g. [0, 4, 8] for layers 0-3 on stage 0 and 4-7 on stage 1"
        )
    for index in range(1, len(boundaries)):
        if boundaries[index] < boundaries[index - 1]:
            raise ValueError(
                f"explicit partition boundaries {list(boundaries)} must never decrease, but "
                f"{boundaries[index - 1]} at index {index - 1} is followed by "
                f"{boundaries[index]}"
            )


def _check_weights_length(name: str, values: Sequence[float], num_layers: int) -> None:
    if len(values) != num_layers:
        raise ValueError(
            f"{name} has {len(values)} entries but there are {num_layers} layers; "
            "give one value per layer"
        )


def compute_boundaries(
    method: PartitionMethodLike,
    num_parts: int,
    *,
    class_names: Sequence[str | None],
    param_counts: Sequence[int] | None = None,
    profile_costs: Sequence[float] | None = None,
) -> list[int]:
    """The stage boundaries of a list of layers under a partition method.

    Args:
        method: a ``partition_method`` (see :meth:`PartitionMethod.parse`).
        num_parts: the number of pipeline stages.
        class_names: one per layer, its class name (``LayerSpec.typename``'s,
            a module's class, or a function's ``__name__``; ``None`` for a layer
            without one). Its length is the number of layers.
        param_counts: the trainable parameter count of each layer; needed by
            ``'parameters'`` only.
        profile_costs: the measured cost of each layer; needed by
            ``'profile'`` only.

    Returns:
        ``num_parts + 1`` boundaries from 0 to the number of layers:
        ``'uniform'`` gives :func:`partition_uniform`; ``'parameters'``,
        ``'type:REGEX'`` (weight 1 for a layer whose class name the regex
        matches anywhere, case-insensitive, else 0) and ``'profile'`` give
        :func:`partition_balanced` of their weights; explicit boundaries are
        checked and returned.

    Raises:
        ValueError: for an invalid method, a regex that matches no layer, a
            missing or mis-sized ``param_counts``/``profile_costs``, or explicit
            boundaries of the wrong length or end.

    >>> compute_boundaries("uniform", 2, class_names=["A", "B", "C"])
    [0, 2, 3]
    >>> compute_boundaries("parameters", 2, class_names=["A", "B", "C"], param_counts=[10, 1, 9])
    [0, 1, 3]
    """
    parsed = PartitionMethod.parse(method)
    parts = check_num_parts(num_parts)
    num_layers = len(class_names)
    if parsed.kind == "uniform":
        return partition_uniform(num_layers, parts)
    if parsed.kind == "parameters":
        if param_counts is None:
            raise ValueError("partition method 'parameters' needs param_counts, one per layer")
        _check_weights_length("param_counts", param_counts, num_layers)
        return partition_balanced(param_counts, parts)
    if parsed.kind == "profile":
        if profile_costs is None:
            raise ValueError(
                "partition method 'profile' needs profile_costs (the measured cost of each "
                "layer); profile the layers on a sample micro-batch first"
            )
        _check_weights_length("profile_costs", profile_costs, num_layers)
        return partition_balanced(profile_costs, parts)
    if parsed.kind == "type":
        regex = re.compile(parsed.pattern or "", re.IGNORECASE)
        flags = [int(name is not None and regex.search(name) is not None) for name in class_names]
        if not any(flags):
            seen = sorted({name for name in class_names if name is not None})
            raise ValueError(
                f"partition method 'type:{parsed.pattern}': the regex {parsed.pattern!r} "
                f"matches none of the layer class names {seen}"
            )
        return partition_balanced(flags, parts)
    boundaries = list(parsed.boundaries or ())
    if len(boundaries) != parts + 1:
        raise ValueError(
            f"explicit partition boundaries {boundaries} give {len(boundaries) - 1} stages "
            f"but there are {parts}; give {parts + 1} boundaries"
        )
    if boundaries[-1] != num_layers:
        raise ValueError(
            f"explicit partition boundaries {boundaries} must end at the number of layers, "
            f"{num_layers}, not {boundaries[-1]}"
        )
    return boundaries
