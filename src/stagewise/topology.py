"""Process topologies: n-dimensional coordinates mapped to ranks, row-major.

A :class:`ProcessTopology` names the axes of a grid of processes (for example
``pipe``, ``data`` and ``model``) and maps every coordinate to a rank in
row-major order: the last axis varies fastest. Every answer is computed by
arithmetic on the axis strides, so a topology of 65,536 ranks costs no more to
build than one of 8, and :meth:`~ProcessTopology.get_coord` is O(number of
axes), not a scan. Nothing here touches a process group.

The results equal DeepSpeed's ``deepspeed.runtime.pipe.topology`` for the same
arguments; where DeepSpeed asserts or answers silently wrong (a rank outside
the topology, an unknown axis, dims that do not match the axes) this module
raises a ``ValueError`` that names the values instead.

>>> topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)
>>> topo.get_coord(5)
ProcessCoord(pipe=1, data=0, model=1)
>>> topo.get_rank(pipe=1, data=0, model=1)
5
>>> topo.get_axis_comm_lists("pipe")
[[0, 4], [1, 5], [2, 6], [3, 7]]
"""

from __future__ import annotations

import operator
from collections import namedtuple
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

__all__ = [
    "PipeDataParallelTopology",
    "PipeModelDataParallelTopology",
    "ProcessTopology",
]


@cache
def _coord_class(axes: tuple[str, ...]) -> type[Any]:
    """The ``ProcessCoord`` namedtuple class for ``axes`` (one class per axes tuple).

    The class pickles by value (axes and coordinates), so coordinates can cross
    process boundaries even though the class is made at run time.
    """
    cls = namedtuple("ProcessCoord", axes)  # type: ignore[misc]  # fields known at run time only

    def __reduce__(self: tuple[int, ...]) -> tuple[Any, tuple[Any, ...]]:
        return _make_coord, (axes, tuple(self))

    cls.__reduce__ = __reduce__  # type: ignore[method-assign,assignment]
    return cls


def _make_coord(axes: tuple[str, ...], values: tuple[int, ...]) -> Any:
    """Rebuild a ``ProcessCoord`` (the pickle hook of :func:`_coord_class`)."""
    return _coord_class(axes)(*values)


def _as_int(value: object, what: str) -> int:
    """``value`` as an ``int`` (anything with ``__index__``), else a ValueError naming ``what``."""
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


class ProcessTopology:
    """Maps n-dimensional coordinates over named axes to linear ranks.

    The layout is row-major in the order of ``axes``: with ``axes=['x', 'y']``
    the coordinates ``(x, y)`` and ``(x, y + 1)`` have adjacent ranks.

    Args:
        axes: the names of the axes, outermost first; they become the fields of
            this topology's ``ProcessCoord`` namedtuple, so they must be valid,
            distinct Python identifiers.
        dims: the length of each axis, one positive integer per axis.

    Raises:
        ValueError: when ``axes`` and ``dims`` differ in length, a dim is not a
            positive integer, or an axis name cannot be a namedtuple field.

    >>> topo = ProcessTopology(axes=["x", "y"], dims=[2, 3])
    >>> topo.world_size()
    6
    >>> topo.get_rank(x=1, y=0)
    3
    >>> topo.get_coord(4)
    ProcessCoord(x=1, y=1)
    """

    def __init__(self, axes: Sequence[str], dims: Sequence[int]) -> None:
        axes = list(axes)
        dims = list(dims)
        if len(axes) != len(dims):
            raise ValueError(
                f"ProcessTopology needs one dim per axis, got {len(axes)} axes {axes} "
                f"and {len(dims)} dims {dims}"
            )
        checked: list[int] = []
        for axis, dim in zip(axes, dims, strict=True):
            size = _as_int(dim, f"the dim of axis {axis!r}")
            if size < 1:
                raise ValueError(
                    f"the dim of axis {axis!r} must be at least 1, got {dim!r} "
                    f"(axes {axes}, dims {dims})"
                )
            checked.append(size)
        #: The names of the axes, outermost first (as DeepSpeed names the attribute).
        self.axes: list[str] = axes
        #: The length of each axis.
        self.dims: list[int] = checked
        #: The coordinate namedtuple of this topology, fields in the order of ``axes``.
        self.ProcessCoord = _coord_class(tuple(axes))
        self._index = {axis: i for i, axis in enumerate(axes)}
        strides = [1] * len(checked)
        for i in range(len(checked) - 2, -1, -1):
            strides[i] = strides[i + 1] * checked[i + 1]
        self._strides = strides
        self._world = strides[0] * checked[0] if checked else 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}(axes={self.axes!r}, dims={self.dims!r})"

    def __getstate__(self) -> dict[str, Any]:
        # The run-time namedtuple class cannot be pickled by reference: rebuild it.
        state = self.__dict__.copy()
        del state["ProcessCoord"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.ProcessCoord = _coord_class(tuple(self.axes))

    def __str__(self) -> str:
        """The coordinate-to-rank mapping as text, as DeepSpeed prints it."""
        return str(self.mapping)

    @property
    def mapping(self) -> dict[tuple[int, ...], int]:
        """Every ``ProcessCoord`` mapped to its rank (built on each call: O(world size)).

        Kept for code written against DeepSpeed's ``topo.mapping``; prefer
        :meth:`get_rank` and :meth:`get_coord`, which cost O(number of axes).

        >>> PipeDataParallelTopology(num_pp=1, num_dp=2).mapping
        {ProcessCoord(pipe=0, data=0): 0, ProcessCoord(pipe=0, data=1): 1}
        """
        return {self.get_coord(rank): rank for rank in range(self._world)}

    def _axis_index(self, axis: str, caller: str) -> int:
        try:
            return self._index[axis]
        except (KeyError, TypeError):
            raise ValueError(
                f"{caller}: unknown axis {axis!r}; this topology has axes {self.axes}"
            ) from None

    def get_rank(self, **coord_kwargs: int) -> int:
        """The rank of the process at a full coordinate, one keyword per axis.

        Raises:
            ValueError: when an axis is missing or unknown (use
                :meth:`filter_match` for partial coordinates), or a value is
                not an integer in ``range(dim)``.

        >>> ProcessTopology(axes=["x", "y"], dims=[2, 3]).get_rank(x=0, y=1)
        1
        """
        missing = [axis for axis in self.axes if axis not in coord_kwargs]
        unknown = [key for key in coord_kwargs if key not in self._index]
        if missing or unknown:
            raise ValueError(
                f"get_rank() needs exactly one value per axis {self.axes}; "
                f"missing {missing}, unknown {unknown} (given {coord_kwargs}); "
                "use filter_match() for a partial coordinate"
            )
        rank = 0
        for axis, dim, stride in zip(self.axes, self.dims, self._strides, strict=True):
            raw = coord_kwargs[axis]
            value = _as_int(raw, f"get_rank(): coordinate {axis}")
            if not 0 <= value < dim:
                raise ValueError(
                    f"get_rank(): coordinate {axis}={raw!r} is outside range({dim}) "
                    f"(topology axes {self.axes}, dims {self.dims})"
                )
            rank += value * stride
        return rank

    def get_axis_names(self) -> list[str]:
        """The axis names, outermost first.

        >>> PipeModelDataParallelTopology(1, 1, 1).get_axis_names()
        ['pipe', 'data', 'model']
        """
        return list(self.axes)

    def get_rank_repr(
        self,
        rank: int,
        omit_axes: Iterable[str] = ("data", "pipe"),
        inner_sep: str = "_",
        outer_sep: str = "-",
    ) -> str:
        """A rank's coordinate as text, e.g. for checkpoint file names.

        Each axis not in ``omit_axes`` gives ``f"{axis}{inner_sep}{value:02d}"``;
        the parts are joined with ``outer_sep``.

        Raises:
            ValueError: when ``rank`` is outside the topology.

        >>> topo = ProcessTopology(axes=["a", "b"], dims=[2, 2])
        >>> topo.get_rank_repr(rank=3)
        'a_01-b_01'
        >>> topo.get_rank_repr(rank=3, omit_axes=["a"])
        'b_01'
        >>> PipeModelDataParallelTopology(2, 2, 2).get_rank_repr(5)
        'model_01'
        """
        omit = frozenset(omit_axes)
        coord = self.get_coord(rank)
        return outer_sep.join(
            f"{axis}{inner_sep}{value:02d}"
            for axis, value in zip(self.axes, coord, strict=True)
            if axis not in omit
        )

    def get_dim(self, axis: str) -> int:
        """The number of processes along ``axis``; 0 for an axis the topology lacks.

        >>> topo = ProcessTopology(axes=["x", "y"], dims=[2, 3])
        >>> topo.get_dim("y"), topo.get_dim("z")
        (3, 0)
        """
        index = self._index.get(axis) if isinstance(axis, str) else None
        return 0 if index is None else self.dims[index]

    def get_coord(self, rank: int) -> Any:
        """The ``ProcessCoord`` namedtuple of ``rank`` (O(number of axes)).

        Raises:
            ValueError: when ``rank`` is not an integer in ``range(world_size())``.

        >>> coord = ProcessTopology(axes=["x", "y"], dims=[2, 3]).get_coord(rank=1)
        >>> coord.x, coord.y
        (0, 1)
        """
        try:
            index = operator.index(rank)
        except TypeError:
            index = -1
        if not 0 <= index < self._world:
            raise ValueError(
                f"rank {rank!r} not found in topology: ranks are 0..{self._world - 1} "
                f"(axes {self.axes}, dims {self.dims})"
            )
        values = [0] * len(self.dims)
        for i in range(len(self.dims) - 1, -1, -1):
            index, values[i] = divmod(index, self.dims[i])
        return self.ProcessCoord(*values)

    def get_axis_comm_lists(self, axis: str) -> list[list[int]]:
        """The groups of ranks that differ only in ``axis``, for communicators.

        One list per coordinate of the other axes, in row-major order of those
        axes; each list runs along ``axis``. An axis the topology lacks gives
        ``[]`` (so code for hybrid parallelism can ask for any axis).

        >>> topo = ProcessTopology(axes=["pipe", "data", "model"], dims=[2, 2, 2])
        >>> topo.get_axis_comm_lists("pipe")
        [[0, 4], [1, 5], [2, 6], [3, 7]]
        >>> topo.get_axis_comm_lists("model")
        [[0, 1], [2, 3], [4, 5], [6, 7]]
        """
        index = self._index.get(axis) if isinstance(axis, str) else None
        if index is None:
            return []
        dim = self.dims[index]
        stride = self._strides[index]
        block = stride * dim
        outer = self._world // block
        # The first rank of each list has coordinate 0 along `axis`; ascending
        # rank order of those is row-major order over the other axes.
        return [
            list(range(base, base + block, stride))
            for start in range(0, outer * block, block)
            for base in range(start, start + stride)
        ]

    def filter_match(self, **filter_kwargs: int) -> list[int]:
        """The ranks whose coordinates match every given ``axis=value``, ascending.

        Built as the product of the matching coordinates (cost proportional to
        the answer, not to the world size). A value outside an axis's range
        matches nothing.

        Raises:
            ValueError: for an axis the topology lacks or a value that is not an
                integer.

        >>> topo = ProcessTopology(axes=["pipe", "data", "model"], dims=[2, 2, 2])
        >>> topo.filter_match(pipe=0, data=1)
        [2, 3]
        >>> [topo.get_coord(rank) for rank in topo.filter_match(pipe=0, data=1)]
        [ProcessCoord(pipe=0, data=1, model=0), ProcessCoord(pipe=0, data=1, model=1)]
        """
        fixed: dict[int, int] = {}
        for key, raw in filter_kwargs.items():
            index = self._axis_index(key, "filter_match()")
            value = _as_int(raw, f"filter_match(): coordinate {key}")
            if not 0 <= value < self.dims[index]:
                return []
            fixed[index] = value
        ranks = [0]
        for index, dim in enumerate(self.dims):
            if index in fixed:
                value = fixed[index]
                ranks = [rank * dim + value for rank in ranks]
            else:
                ranks = [rank * dim + value for rank in ranks for value in range(dim)]
        return ranks

    def get_axis_list(self, axis: str, idx: int) -> list[int]:
        """The ranks whose coordinate along ``axis`` is ``idx``, ascending.

        Raises:
            ValueError: for an axis the topology lacks.

        >>> topo = ProcessTopology(axes=["x", "y"], dims=[2, 3])
        >>> topo.get_axis_list(axis="x", idx=0)
        [0, 1, 2]
        >>> topo.get_axis_list(axis="y", idx=0)
        [0, 3]
        """
        self._axis_index(axis, "get_axis_list()")
        return self.filter_match(**{axis: idx})

    def world_size(self) -> int:
        """The number of ranks: the product of the dims.

        >>> PipeModelDataParallelTopology(num_pp=64, num_mp=32, num_dp=32).world_size()
        65536
        """
        return self._world


class PipeDataParallelTopology(ProcessTopology):
    """Pipeline and data parallelism: axes ``['pipe', 'data']``.

    Data parallelism is the last (fastest) axis, so the gradient all-reduce
    runs between neighbouring ranks (typically inside one node) and the lighter
    pipeline traffic crosses nodes.

    >>> PipeDataParallelTopology(num_pp=2, num_dp=2).get_axis_comm_lists("data")
    [[0, 1], [2, 3]]
    """

    def __init__(self, num_pp: int, num_dp: int) -> None:
        super().__init__(axes=["pipe", "data"], dims=[num_pp, num_dp])


class PipeModelDataParallelTopology(ProcessTopology):
    """Pipeline, model and data parallelism: axes ``['pipe', 'data', 'model']``.

    Note the argument order (``num_pp, num_mp, num_dp``) differs from the axis
    order (dims ``[num_pp, num_dp, num_mp]``), as in DeepSpeed.

    >>> PipeModelDataParallelTopology(num_pp=2, num_mp=4, num_dp=1).dims
    [2, 1, 4]
    """

    def __init__(self, num_pp: int, num_mp: int, num_dp: int) -> None:
        super().__init__(axes=["pipe", "data", "model"], dims=[num_pp, num_dp, num_mp])
