"""Lazy tensors: a parameter described as the stored tensors it is made of, read
one slice at a time.

Loading onto a mesh must not build the whole model in every process: each
process reads only the slices its own devices hold. A view knows its shape and
how to read any box of itself (`read(box)`, one (start, stop) pair per axis)
from the views below it, down to `Stored` tensors in a file. The layout changes
between HF's tensors and ours (transposes, split head axes, the fused q/k/v,
the stacked layers) are views too, so a slice of our kernel reads just the
matching slice of HF's. Reading the full box (`read_all`) is the whole-tensor
path that host loading takes; both run the same code.

Only the shapes the layout code needs are here: transposes, splitting one axis
in two, a new axis of size 1, one entry or an interval of an axis, and joining
views along an axis.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

Box = tuple[tuple[int, int], ...]  # (start, stop) per axis


def box_of(index: Sequence[slice], shape: Sequence[int]) -> Box:
    """The box of a tuple of step-1 slices (e.g. a shard's index) in `shape`."""
    box = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        assert step == 1, f"strided slice {s}"
        box.append((start, stop))
    return tuple(box)


def full_box(shape: Sequence[int]) -> Box:
    return tuple((0, n) for n in shape)


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


def _box_shape(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


class View:
    """A tensor of `shape` that reads any box of itself on request."""

    shape: tuple[int, ...]

    def read(self, box: Box) -> np.ndarray:
        raise NotImplementedError

    def read_all(self) -> np.ndarray:
        return self.read(full_box(self.shape))

    def __getitem__(self, i: int) -> "View":
        """x[i] along the first axis, as `unstack_layers` takes one layer of a
        stacked parameter: still a view, so each layer is read on its own."""
        return Entry(self, i)

    @property
    def ndim(self) -> int:
        return len(self.shape)


class Stored(View):
    """A tensor as stored: `read_slices(index)` returns tensor[index], reading
    no more than the store must."""

    def __init__(self, shape: Sequence[int], read_slices: Callable[[tuple[slice, ...]], np.ndarray]):
        self.shape, self._read_slices = tuple(shape), read_slices

    def read(self, box):
        return self._read_slices(_slices(box))


def from_array(array) -> Stored:
    """A view of an array already in memory (GGUF tensors, random init, tests)."""
    return Stored(np.shape(array), lambda index: np.asarray(array)[index])


class Transposed(View):
    """The child with its axes permuted as np.transpose(child, axes) would."""

    def __init__(self, child: View, axes: Sequence[int] = (1, 0)):
        self.child, self.axes = child, tuple(axes)
        self.shape = tuple(child.shape[a] for a in self.axes)

    def read(self, box):
        child_box = [None] * len(box)
        for ours, theirs in enumerate(self.axes):
            child_box[theirs] = box[ours]
        return self.child.read(tuple(child_box)).transpose(self.axes)


class SplitAxis(View):
    """Axis `axis` of the child (size a*b, row-major) as two axes (a, b): a reshape."""

    def __init__(self, child: View, axis: int, sizes: tuple[int, int]):
        axis %= child.ndim
        outer, inner = sizes
        assert outer * inner == child.shape[axis], (child.shape, axis, sizes)
        self.child, self.axis, self.inner = child, axis, inner
        self.shape = child.shape[:axis] + (outer, inner) + child.shape[axis + 1:]

    def read(self, box):
        ax, inner = self.axis, self.inner
        (o0, o1), (i0, i1) = box[ax], box[ax + 1]
        # The outer rows o0..o1 are one interval of the child's axis; the inner
        # slice is cut after reading (weights never shard head_dim, so the inner
        # box is nearly always whole).
        rows = self.child.read(box[:ax] + ((o0 * inner, o1 * inner),) + box[ax + 2:])
        rows = rows.reshape(rows.shape[:ax] + (o1 - o0, inner) + rows.shape[ax + 1:])
        return rows[(slice(None),) * (ax + 1) + (slice(i0, i1),)]


class NewAxis(View):
    """The child with a new axis of size 1 at `axis` (x[..., None, ...])."""

    def __init__(self, child: View, axis: int):
        axis %= child.ndim + 1
        self.child, self.axis = child, axis
        self.shape = child.shape[:axis] + (1,) + child.shape[axis:]

    def read(self, box):
        return np.expand_dims(self.child.read(box[:self.axis] + box[self.axis + 1:]), self.axis)


class Entry(View):
    """child[i] along the first axis (that axis dropped)."""

    def __init__(self, child: View, i: int):
        assert 0 <= i < child.shape[0], (i, child.shape)
        self.child, self.i = child, i
        self.shape = child.shape[1:]

    def read(self, box):
        return self.child.read(((self.i, self.i + 1),) + tuple(box))[0]


class Interval(View):
    """child[start:stop] along `axis` (one part of an np.split)."""

    def __init__(self, child: View, axis: int, start: int, stop: int):
        axis %= child.ndim
        self.child, self.axis, self.start = child, axis, start
        self.shape = child.shape[:axis] + (stop - start,) + child.shape[axis + 1:]

    def read(self, box):
        a, b = box[self.axis]
        return self.child.read(box[:self.axis] + ((a + self.start, b + self.start),) + box[self.axis + 1:])


class Joined(View):
    """Views concatenated along `axis` (np.concatenate)."""

    def __init__(self, parts: Sequence[View], axis: int):
        axis %= parts[0].ndim
        self.parts, self.axis = list(parts), axis
        size = sum(p.shape[axis] for p in self.parts)
        self.shape = parts[0].shape[:axis] + (size,) + parts[0].shape[axis + 1:]

    def read(self, box):
        # Filled in place: the result and one part at a time, never a list of parts.
        out = None
        a, b = box[self.axis]
        offset = 0
        for part in self.parts:
            lo, hi = max(a, offset), min(b, offset + part.shape[self.axis])
            if lo < hi:
                piece = part.read(box[:self.axis] + ((lo - offset, hi - offset),) + box[self.axis + 1:])
                if out is None:
                    out = np.empty(_box_shape(box), piece.dtype)
                out[(slice(None),) * self.axis + (slice(lo - a, hi - a),)] = piece
                del piece
            offset += part.shape[self.axis]
        return out if out is not None else np.empty(_box_shape(box), np.float32)


def stacked(parts: Sequence[View], axis: int = 0) -> View:
    """np.stack of views."""
    return Joined([NewAxis(p, axis) for p in parts], axis)
