"""Documents -> their examples, drawn round robin from `cycle_length` documents at a time.

A long document yields many consecutive examples; drawing from several documents at once (then
shuffling rows in a window) keeps every batch a mix of many documents. This does what grain's
InterleaveIterDataset does for our case without its per-document thread pools, which cost more
than tokenizing a document: documents come from a random-access dataset, so the state is just
which document each slot holds and how far it got, and a restore re-makes those few documents.
"""
from __future__ import annotations

from typing import Any, Callable

import grain


class InterleaveExamples(grain.IterDataset):
    """`make(docs[i])` (a list of examples) for each document, `cycle_length` at a time."""

    def __init__(self, docs: grain.MapDataset, make: Callable[[Any], list], cycle_length: int):
        super().__init__()
        self._docs, self._make, self._cycle_length = docs, make, max(1, cycle_length)

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Grain's worker processes each take a slice of the documents."""
        del sequential_slice
        self._docs = self._docs[sl]

    def __iter__(self) -> grain.DatasetIterator:
        return _InterleaveIterator(self._docs, self._make, self._cycle_length)

    def __str__(self) -> str:
        return f"InterleaveExamples(cycle_length={self._cycle_length})"


class _InterleaveIterator(grain.DatasetIterator):

    def __init__(self, docs: grain.MapDataset, make: Callable[[Any], list], cycle_length: int):
        super().__init__()
        self._docs, self._make, self._cycle_length = docs, make, cycle_length
        self._num_docs = len(docs)  # (a MapDataset's len walks its whole chain)
        self._next_doc = 0          # next document to open
        self._turn = 0              # slot whose turn it is
        # per slot: document index, position in its examples, the examples
        self._indices: list[int] = []
        self._positions: list[int] = []
        self._examples: list[list] = []

    def _open(self) -> tuple[int, list] | None:
        while self._next_doc < self._num_docs:
            index = self._next_doc
            self._next_doc += 1
            examples = self._make(self._docs[index])
            if examples:
                return index, examples
        return None

    def __next__(self) -> Any:
        while len(self._indices) < self._cycle_length and (opened := self._open()):
            self._indices.append(opened[0])
            self._positions.append(0)
            self._examples.append(opened[1])
        if not self._indices:
            raise StopIteration
        turn = self._turn % len(self._indices)
        examples, position = self._examples[turn], self._positions[turn]
        self._positions[turn] = position + 1
        if position + 1 == len(examples):    # exhausted: the next document takes its place
            opened = self._open()
            if opened is None:
                del self._indices[turn], self._positions[turn], self._examples[turn]
                self._turn = turn
                return examples[position]
            self._indices[turn], self._positions[turn], self._examples[turn] = \
                opened[0], 0, opened[1]
        self._turn = turn + 1
        return examples[position]

    def get_state(self) -> dict[str, Any]:
        return {"next_doc": self._next_doc, "turn": self._turn,
                "indices": list(self._indices), "positions": list(self._positions)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._next_doc, self._turn = state["next_doc"], state["turn"]
        self._indices, self._positions = list(state["indices"]), list(state["positions"])
        self._examples = [self._make(self._docs[i]) for i in self._indices]
