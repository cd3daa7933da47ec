"""Seeded shuffles of documents (a new order each epoch) and of rows (within a window).

They behave like grain's `MapDataset.shuffle` and `WindowShuffleIterDataset`, including
checkpointing, but draw each permutation at once with numpy: grain's index_shuffle walks a
2^16-element domain for every lookup, which costs 0.1-0.7 ms per element for the small sizes
(windows of rows, corpora of a few thousand documents) that are common here.
"""
from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np

# From this size up grain's index_shuffle is fast (~5 us) and needs no permutation in memory.
LARGE = 1 << 16


def _permutation(seed: tuple[int, ...], n: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


class EpochPermutation(grain.MapDataset):
    """`parent` in a seeded random order, a new one each epoch (for use before `repeat`)."""

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed, self._epoch, self._order = seed, -1, np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return "EpochPermutation"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(index, len(self._parent))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, _permutation((self._seed, epoch), len(self))
        # upstream random transforms see the epoch too, as with grain's own shuffle
        return self._parent[int(self._order[i]) + epoch * len(self)]


def shuffle_documents(docs: grain.MapDataset, seed: int) -> grain.MapDataset:
    """A new seeded order of `docs` each epoch."""
    return docs.shuffle(seed=seed) if len(docs) >= LARGE else EpochPermutation(docs, seed)


class WindowShuffle(grain.IterDataset):
    """Elements of `parent` read `window_size` at a time and yielded in a seeded random order
    (each window its own order). The state is the parent's state at the window's start plus the
    position in it, so a restore re-reads one window."""

    def __init__(self, parent: grain.IterDataset, *, window_size: int, seed: int):
        super().__init__(parent)
        self._window_size, self._seed = window_size, seed

    def __iter__(self) -> grain.DatasetIterator:
        return _WindowShuffleIterator(self._parent.__iter__(), self._window_size, self._seed)

    def __str__(self) -> str:
        return "WindowShuffle"


class _WindowShuffleIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, window_size: int, seed: int):
        super().__init__(parent)
        self._window_size, self._seed = window_size, seed
        self._window: list[Any] = []
        self._window_index = self._pos = 0
        self._window_start = parent.get_state()
        self._exhausted = False

    def _fill(self) -> None:
        self._window = []
        for _ in range(self._window_size):
            try:
                self._window.append(next(self._parent))
            except StopIteration:
                self._exhausted = True
                break
        order = _permutation((self._seed, self._window_index), len(self._window))
        self._window = [self._window[i] for i in order[::-1]]   # popped from the end

    def __next__(self) -> Any:
        if not self._window:
            if self._exhausted:
                raise StopIteration
            self._window_start = self._parent.get_state()
            self._fill()
            self._pos = 0
            if not self._window:
                raise StopIteration
        self._pos += 1
        element = self._window.pop()
        if not self._window:
            self._window_index += 1
        return element

    def get_state(self) -> dict[str, Any]:
        return {"parent_window_start_state": copy.deepcopy(self._window_start),
                "window_index": self._window_index, "pos_in_window": self._pos}

    def set_state(self, state: dict[str, Any]) -> None:
        self._window_start = copy.deepcopy(state["parent_window_start_state"])
        self._parent.set_state(self._window_start)
        self._window_index, self._pos = state["window_index"], state["pos_in_window"]
        self._exhausted = False
        self._fill()
        del self._window[len(self._window) - min(self._pos, len(self._window)):]
