"""Every batch as a pure function of the step, and a prefetching iterator over them.

`batch_at(dataset, split, step, batch_size, seed=...)` turns (seed, step) into the batch of that
step, so the training loop's data position is the step number itself: a resumed run reads
exactly the batches it would have read, with no iterator state to checkpoint. Each example's
random flip and dequantization noise are seeded by its position in the split's endless stream,
so they do not depend on how a batch is split over processes.

    batch = batch_at(dataset, "train", step, 128, seed=seed, random_flip=True)
    batch["x"]      # float32 (128, *dataset.data_shape) in data space ([-1, 1] images if centered)
    batch["label"]  # int32 (128,)
    with BatchIterator(dataset, "train", start_step, 128, seed=seed) as batches:
        for batch in batches: ...      # batch_at(start_step), batch_at(start_step + 1), ...
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from diffusion.data.sources import SPLITS, ArraySource, Dataset

# Streams of randomness derived from the seed (never reused for two purposes).
_PERMUTATION_STREAM = 0
_AUGMENT_STREAM = 1


def data_scaler(centered: bool) -> Callable:
    """Maps images in [0, 1] to data space: [-1, 1] if centered, else unchanged."""
    return (lambda x: x * 2.0 - 1.0) if centered else (lambda x: x)


def inverse_scaler(centered: bool) -> Callable:
    """Maps data space back to [0, 1] images (the inverse of `data_scaler`)."""
    return (lambda x: (x + 1.0) / 2.0) if centered else (lambda x: x)


@functools.lru_cache(maxsize=16)
def _permutation(seed: int, split: str, epoch: int, n: int) -> np.ndarray:
    rng = np.random.default_rng([seed, _PERMUTATION_STREAM, SPLITS.index(split), epoch])
    order = rng.permutation(n)
    order.setflags(write=False)
    return order


def _check_batch_args(step: int, batch_size: int, seed: int, process_index: int,
                      process_count: int) -> None:
    if batch_size <= 0 or process_count <= 0:
        raise ValueError(f"batch_size ({batch_size}) and process_count ({process_count}) must be "
                         f"positive.")
    if batch_size % process_count:
        raise ValueError(f"The global batch size {batch_size} is not divisible by the "
                         f"{process_count} processes: choose a batch size that is a multiple of "
                         f"{process_count}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    if step < 0 or seed < 0:
        raise ValueError(f"step ({step}) and seed ({seed}) must be non-negative.")


def _positions(step: int, batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """Positions in the endless stream of examples that this process reads at `step`."""
    local = batch_size // process_count
    start = int(step) * int(batch_size) + int(process_index) * local
    return np.arange(start, start + local, dtype=np.int64)


def batch_indices(n: int, split: str, step: int, batch_size: int, *, seed: int,
                  process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """Indices (batch_size // process_count,) into a split of `n` examples read at `step`.

    The examples form an endless stream: epoch e is the permutation of range(n) drawn from
    np.random.default_rng([seed, 0, split, e]), and global batch `step` is stream positions
    [step * batch_size, (step + 1) * batch_size), of which process p reads the p-th contiguous
    part. So every example appears once per epoch, batches may straddle epochs, and the result
    depends only on its arguments (resuming at any step reads the same examples).
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
    if n <= 0:
        raise ValueError(f"The {split} split is empty.")
    _check_batch_args(step, batch_size, seed, process_index, process_count)
    return _stream_indices(n, split, _positions(step, batch_size, process_index, process_count),
                           seed)


def _stream_indices(n: int, split: str, positions: np.ndarray, seed: int) -> np.ndarray:
    """Example indices at stream `positions`: permutation_e[p mod n] of epoch e = p // n."""
    epochs, offsets = np.divmod(positions, n)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):   # one or two epochs per batch: a permutation each
        here = epochs == epoch
        indices[here] = _permutation(int(seed), split, int(epoch), int(n))[offsets[here]]
    return indices


def take(source: Sequence, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stored examples at `indices`: (pixel levels or points, labels), no augmentation."""
    return _gather(source, np.asarray(indices))


def _gather(source: Sequence, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(source, ArraySource):
        return source.take(indices)
    # A tfds source reads and decodes one record at a time; the batch's records are read by
    # worker processes ahead of the step (`BatchIterator`), not vectorised here.
    records = [source[int(i)] for i in indices]
    return (np.stack([np.asarray(r["x"]) for r in records]),
            np.asarray([r.get("label", 0) for r in records]))


def _to_unit_interval(pixels: np.ndarray, num_levels: int, positions: np.ndarray, seed: int,
                      split: str, dequantize: bool, flip: bool) -> np.ndarray:
    """Pixel levels (b, H, W, C) -> float32 in [0, 1], with per-example dequantization / flips.

    Without dequantization x / (L - 1), so levels 0 and L - 1 map to 0 and 1; with it (x + u) / L,
    u ~ U[0, 1). Each example's coin and noise come from its own generator seeded by its stream
    position, so they do not depend on the batch size's split over processes.
    """
    if not (dequantize or flip):
        return pixels.astype(np.float32) / np.float32(num_levels - 1)
    x = np.empty(pixels.shape, np.float32)
    # One generator per example (seeded by its stream position: its noise does not depend on the
    # batch), hence a loop over the batch's examples, ~10 us each; the tfds path runs it in the
    # worker processes ahead of the step.
    for i, position in enumerate(positions):
        rng = np.random.default_rng([seed, _AUGMENT_STREAM, SPLITS.index(split), int(position)])
        mirrored = rng.random() < 0.5                            # drawn always: noise stays put
        image = pixels[i].astype(np.float32)
        if dequantize:
            x[i] = (image + rng.random(image.shape, np.float32)) / np.float32(num_levels)
        else:
            x[i] = image / np.float32(num_levels - 1)
        if flip and mirrored:
            x[i] = x[i, :, ::-1]
    return x


def batch_at(dataset: Dataset, split: str, step: int, batch_size: int, *, seed: int,
             process_index: int = 0, process_count: int = 1, train: bool = True,
             centered: bool = True, uniform_dequantization: bool = False,
             random_flip: bool = False) -> dict[str, np.ndarray]:
    """This process's part of global batch `step`: a pure function of (seed, step).

    Args:
      dataset: from `get_dataset`.
      split: "train" or "eval".
      step: the global batch number (the training step); examples per `batch_indices`.
      batch_size: the global batch size; must be divisible by process_count.
      seed: the data seed (non-negative).
      process_index, process_count: this process reads the process_index-th of process_count
        contiguous parts, so the parts concatenated in process order are the global batch.
      train: random flips only happen when True.
      centered: images in [-1, 1] (else [0, 1]).
      uniform_dequantization: images (x + u) / levels with u ~ U[0, 1) (else x / (levels - 1)).
      random_flip: mirror each image left-right with probability 1/2 (train only).
      The last four apply to images only; points are returned as stored.

    Returns:
      {"x": float32 (batch_size // process_count, *data_shape), "label": int32 (same,)}.
    """
    _check_batch_args(step, batch_size, seed, process_index, process_count)
    return examples_at(dataset, split, _positions(step, batch_size, process_index, process_count),
                       seed=seed, centered=centered,
                       uniform_dequantization=uniform_dequantization,
                       random_flip=random_flip and train)


def examples_at(dataset: Dataset, split: str, positions: np.ndarray, *, seed: int,
                centered: bool = True, uniform_dequantization: bool = False,
                random_flip: bool = False) -> dict[str, np.ndarray]:
    """The examples at `positions` (b,) of the split's endless stream (see `batch_indices`).

    Position p is example permutation_e[p mod n] of epoch e = p // n, with its own flip coin and
    dequantization noise (seeded by p), so the same example at two positions gets two noises.
    Returns {"x": float32 (b, *data_shape) in data space, "label": int32 (b,)}; the options are
    `batch_at`'s (images only).
    """
    source = dataset.split(split)
    positions = np.asarray(positions, np.int64)
    n = len(source)
    if n <= 0:
        raise ValueError(f"The {split} split is empty.")
    x, label = _gather(source, _stream_indices(n, split, positions, seed))
    if dataset.is_image:
        x = _to_unit_interval(x, dataset.num_levels, positions, seed, split,
                              uniform_dequantization, random_flip)
        x = data_scaler(centered)(x)
    return {"x": np.asarray(x, np.float32), "label": np.asarray(label, np.int32)}


# --------------------------------------------------------------------------- prefetching


_WORKER_DATASET: Dataset | None = None   # the dataset of a BatchIterator worker process


def _set_worker_dataset(dataset: Dataset) -> None:
    global _WORKER_DATASET
    _WORKER_DATASET = dataset


def _worker_batch(split: str, **kwargs) -> dict[str, np.ndarray]:
    return batch_at(_WORKER_DATASET, split, **kwargs)


class BatchIterator(Iterator):
    """`batch_at(dataset, split, step, batch_size, **kwargs)` for step = start_step, +1, ...

    The next `prefetch` batches are prepared in the background and come back in step order:
    with num_workers=0 by one thread (enough for in-memory data), with num_workers=N by N
    spawned worker processes, each holding its own copy of `dataset` (which must pickle, as tfds
    sources and arrays do). Use processes for tfds datasets: reading and decoding their records
    is Python code holding the GIL, so threads do not add throughput (measured in
    benchmarks/train_throughput.py --pipeline). Iteration ends before `stop_step` (never when
    None); `step` is the step of the next batch returned. An error while preparing a batch is
    raised by the `next()` that would have returned it. Call `close()`, or use it as a context
    manager, to stop the workers.
    """

    def __init__(self, dataset: Dataset, split: str, start_step: int, batch_size: int, *,
                 prefetch: int = 4, num_workers: int = 0, stop_step: int | None = None,
                 **batch_kwargs):
        dataset.split(split)                                     # fail here, not in a worker
        _check_batch_args(start_step, batch_size, batch_kwargs.get("seed", 0),
                          batch_kwargs.get("process_index", 0),
                          batch_kwargs.get("process_count", 1))
        self.step = start_step
        if num_workers > 0:
            import multiprocessing

            # spawn, not fork: forking a process that runs JAX's threads can deadlock.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                num_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_set_worker_dataset, initargs=(dataset,))
            self._make = functools.partial(_worker_batch, split, batch_size=batch_size,
                                           **batch_kwargs)
        else:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"BatchIterator-{dataset.name}-{split}")
            self._make = functools.partial(batch_at, dataset, split, batch_size=batch_size,
                                           **batch_kwargs)
        self._prefetch = max(1, prefetch, 2 * num_workers)
        self._stop_step = stop_step
        self._pending: collections.deque = collections.deque()   # futures of steps in order
        self._next_step = start_step
        self._closed = False
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self._prefetch and (
                self._stop_step is None or self._next_step < self._stop_step):
            self._pending.append(self._pool.submit(self._make, step=self._next_step))
            self._next_step += 1

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed or not self._pending:
            self.close()
            raise StopIteration
        future = self._pending.popleft()
        try:
            batch = future.result()
        except BaseException:
            self.close()
            raise
        self.step += 1
        self._fill()
        return batch

    def close(self) -> None:
        """Stops the workers and drops the batches they prepared; idempotent."""
        self._closed = True
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
