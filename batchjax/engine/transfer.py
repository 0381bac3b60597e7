"""A step's host arrays as one buffer, so that they cross to the device in one transfer.

A step takes two dozen small arrays (token ids, positions, the ragged attention metadata,
the sampled rows' settings). Sent one by one, each is a transfer of its own with its own
dispatch on the host, which costs more than the arrays' bytes (BENCHMARKS.md, "The host's
work per step"). `pack` lays every leaf's 32-bit words end to end in one int32 buffer; the jitted step
takes the buffer and `TransferLayout.unpack`s it, the layout being a static argument (the same
for every step of one compiled shape).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class TransferLayout:
    """Where each leaf of a tree of host arrays lies in the packed buffer (hashable)."""

    treedef: Any
    leaves: tuple[tuple[tuple[int, ...], np.dtype], ...]  # (shape, dtype) of each leaf

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape)) for shape, _ in self.leaves)

    def unpack(self, flat: jax.Array):
        """flat: [size] int32 (traced) -> the tree of arrays `pack` was given."""
        out, at = [], 0
        for shape, dtype in self.leaves:
            n = int(np.prod(shape))
            words = flat[at: at + n].reshape(shape)
            at += n
            if dtype == np.bool_:
                out.append(words != 0)
            elif dtype == np.int32:
                out.append(words)
            else:
                out.append(jax.lax.bitcast_convert_type(words, dtype))
        return jax.tree.unflatten(self.treedef, out)


def _words(x) -> np.ndarray:
    """A leaf as int32 words: 32-bit types by their bits, booleans as 0 or 1."""
    x = np.asarray(x)
    if x.dtype == np.bool_:
        return x.astype(np.int32).reshape(-1)
    if x.dtype.itemsize != 4:
        raise TypeError(f"a step input of dtype {x.dtype} cannot be packed into 32-bit words")
    return np.ascontiguousarray(x).view(np.int32).reshape(-1)


def pack(*trees) -> tuple[np.ndarray, tuple[TransferLayout, ...]]:
    """Every leaf of `trees` (numpy arrays and scalars) in one int32 buffer, and each tree's
    layout in it, in order."""
    layouts, words = [], []
    for tree in trees:
        leaves, treedef = jax.tree.flatten(tree)
        arrays = [np.asarray(x) for x in leaves]
        layouts.append(TransferLayout(treedef, tuple((a.shape, a.dtype) for a in arrays)))
        words.extend(_words(a) for a in arrays)
    flat = np.concatenate(words) if words else np.zeros(0, np.int32)
    return flat, tuple(layouts)


def unpack(flat: jax.Array, layouts: tuple[TransferLayout, ...]) -> tuple:
    """The trees `pack` was given, from its buffer (traced) and layouts."""
    trees, at = [], 0
    for layout in layouts:
        trees.append(layout.unpack(flat[at: at + layout.size]))
        at += layout.size
    return tuple(trees)
