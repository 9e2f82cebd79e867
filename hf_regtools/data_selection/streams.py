"""The source stream of two-head fine-tuning: batches of the selected pre-training data, cycled without end.

The official code restarts the selected-data loader whenever it is exhausted, while the target loader sets the epoch.
`SourceStream` does the same with its own seeded order: cycle `c` is the permutation `randperm(n, seed + c)`, each
process keeps its own strided share of it (distinct shards), and batches are full (`drop_last`). Its whole state is
one integer, `position` (batches drawn so far), so a resumed run continues the stream exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader


class SourceStream:
    """Endless batches of a map-style dataset, in a seeded order that is a pure function of the position.

    Args:
        dataset: a map-style dataset (`datasets.Dataset`, a torch `Dataset`) of the selected source examples.
        batch_size (`int`): examples per batch on this process (`mu * B`).
        seed (`int`, *optional*, defaults to 0): the order of cycle `c` is `torch.randperm(len(dataset))` drawn from
            a generator seeded `seed + c`.
        rank (`int`, *optional*, defaults to 0), world_size (`int`, *optional*, defaults to 1): this process reads
            `order[rank::world_size]` of every cycle (the first `len(dataset) // world_size` of them).
        collate_fn (`Callable`, *optional*): joins a list of examples into a batch (default: torch's).
        num_workers (`int`, *optional*, defaults to 0): `DataLoader` workers reading the examples.

    In a custom loop: `batch = stream.next_batch()` once per target batch, and save `stream.position` with the
    checkpoint (`stream.position = saved` to resume).
    """

    def __init__(self, dataset, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 collate_fn: Callable | None = None, num_workers: int = 0):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError(f"the source dataset must be map-style (with __len__ and __getitem__), got "
                             f"{type(dataset).__name__}; materialise a streamed selection first, e.g. "
                             "datasets.Dataset.from_generator(...)")
        if batch_size < 1:
            raise ValueError(f"the source batch size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in range(world_size={world_size})")
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.rank, self.world_size = rank, world_size
        self.collate_fn, self.num_workers = collate_fn, num_workers
        self.per_process = len(dataset) // world_size
        self.batches_per_cycle = self.per_process // self.batch_size
        if self.batches_per_cycle < 1:
            raise ValueError(f"the source dataset has {len(dataset)} examples, fewer than one source batch of "
                             f"{self.batch_size} per process on {world_size} process(es); select more source data, "
                             "or lower mu or the gradient accumulation steps")
        self._position = 0
        self._iterator = None

    @property
    def position(self) -> int:
        """Batches drawn so far (all cycles)."""
        return self._position

    @position.setter
    def position(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"position must be >= 0, got {value}")
        self._position, self._iterator = int(value), None

    @property
    def cycle(self) -> int:
        return self._position // self.batches_per_cycle

    def order(self, cycle: int) -> torch.Tensor:
        """This process's indices of cycle `cycle` (`per_process` of them)."""
        generator = torch.Generator().manual_seed(self.seed + cycle)
        permutation = torch.randperm(len(self.dataset), generator=generator)
        return permutation[self.rank::self.world_size][:self.per_process]

    def _start(self):
        cycle, batch = divmod(self._position, self.batches_per_cycle)
        indices = self.order(cycle)[batch * self.batch_size:self.batches_per_cycle * self.batch_size].tolist()
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=indices, drop_last=True,
                            collate_fn=self.collate_fn, num_workers=self.num_workers)
        return iter(loader)

    def next_batch(self):
        """The next batch; a new cycle (a new order) starts when this process's share is used up."""
        if self._iterator is None:
            self._iterator = self._start()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._iterator = self._start()
            batch = next(self._iterator)
        self._position += 1
        if self._position % self.batches_per_cycle == 0:
            self._iterator = None
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"position": self._position, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("batch_size", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"the saved source stream has {key}={state[key]}, this run {getattr(self, key)}: "
                                 "resume with the same per-device batch size, mu, gradient accumulation steps and "
                                 "number of processes")
        self.position = state["position"]
