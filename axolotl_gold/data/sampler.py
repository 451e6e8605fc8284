"""The window sampler: whole optimizer windows of repeated prompts, rank by rank.

One optimizer window on one process holds ``micro_batch_size x
gradient_accumulation_steps`` rows: ``generation_batch_size`` distinct prompts, each
repeated ``num_generations`` times, consecutive. Accelerate hands global batch ``k``
to process ``k % num_processes``, so the sampler interleaves the processes' micro
batches; each process then reads exactly its own window, in order.

The order depends only on ``(seed, epoch)``: resuming from a checkpoint replays the
same prompts once the trainer skips the batches already consumed.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class WindowSampler(Sampler[int]):
    def __init__(
        self,
        num_rows: int,
        micro_batch_size: int,
        gradient_accumulation_steps: int,
        num_generations: int,
        num_processes: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        window = micro_batch_size * gradient_accumulation_steps
        if window % num_generations:
            raise ValueError(
                f"window {window} is not a multiple of num_generations {num_generations}"
            )
        self.num_rows = num_rows
        self.micro_batch_size = micro_batch_size
        self.accum = gradient_accumulation_steps
        self.num_generations = num_generations
        self.num_processes = num_processes
        self.prompts_per_window = window // num_generations
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.num_windows = num_rows // (self.prompts_per_window * num_processes)
        if self.num_windows == 0:
            raise ValueError(
                f"the training set has {num_rows} prompts but one optimizer window needs "
                f"{self.prompts_per_window * num_processes} distinct prompts "
                f"(`generation_batch_size` {self.prompts_per_window} x {num_processes} "
                "processes): add data or lower `micro_batch_size` / "
                "`gradient_accumulation_steps`."
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def window_rows(self, order: list[int], window: int, rank: int) -> list[int]:
        """Row indices of one process's window: each prompt ``num_generations`` times."""
        per_window = self.prompts_per_window * self.num_processes
        start = window * per_window + rank * self.prompts_per_window
        prompts = order[start : start + self.prompts_per_window]
        return [i for i in prompts for _ in range(self.num_generations)]

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_rows, generator=generator).tolist()
        else:
            order = list(range(self.num_rows))
        mbs = self.micro_batch_size
        for window in range(self.num_windows):
            local = [self.window_rows(order, window, r) for r in range(self.num_processes)]
            for step in range(self.accum):
                for rank in range(self.num_processes):
                    yield from local[rank][step * mbs : (step + 1) * mbs]

    def __len__(self) -> int:
        return self.num_windows * self.num_processes * self.accum * self.micro_batch_size
