"""The loader: batches of packed rows from a token store — deterministic, resumable, one slice per process.

Rows are split once, independently of the seed, into validation (the first `n_val` rows of a fixed
permutation) and train (the rest). The train split is shuffled per epoch by
`np.random.default_rng([seed, epoch]).permutation` and repeats forever; an epoch yields
`n_train // global_batch_size` batches and a batch never mixes epochs (the at most
global_batch_size - 1 rows left over are skipped that epoch; different rows each epoch). The
validation split is one pass in ascending row order; its last batch is filled up with all-padding
rows of weight 0, so every validation row is seen once and every batch has the same shape.

A batch is a dict of [batch, length] arrays (length = seq_len):

    tokens       int32   row[:, :-1]
    targets      int32   row[:, 1:]   (the next token)
    segment_ids  int32   segment ids of the inputs; 0 = padding
    positions    int32   position within the segment
    weights      float32 1 where the target is the next token of the same document, else 0

Process p of P reads only its rows [p * B / P, (p + 1) * B / P) of each global batch of B rows;
with a `sharding` the rows are those of the process's addressable devices and the batch is a global
`jax.Array`. A background thread reads `prefetch` batches ahead; `state()` describes the next batch
the consumer receives, so `Loader(..., state=loader.state())` continues exactly where it stopped.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from data.errors import DataError
from data.pack import PAD_ID, positions_from_segments
from data.store import TokenStore, open_store

SPLIT_SEED = 0x5EED_5A1D  # the train/validation assignment depends on this constant only, never on `seed`
STATE_VERSION = 1
SPLITS = ("train", "val")


def split_rows(num_rows: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, val_rows) of a store: a fixed assignment; val_rows ascending."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(np.ceil(val_fraction * num_rows))
    order = np.random.default_rng(SPLIT_SEED).permutation(num_rows)
    return order[n_val:], np.sort(order[:n_val])


def batch_from_rows(tokens: np.ndarray, segment_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Rows (tokens, segment_ids), each [batch, seq_len + 1] -> the model's batch of [batch, seq_len] arrays."""
    inputs_seg, targets_seg = segment_ids[:, :-1], segment_ids[:, 1:]
    # a target counts when it continues the input's document: not padding, not the next document's first token
    weights = (targets_seg == inputs_seg) & (inputs_seg != 0)
    return {
        "tokens": np.ascontiguousarray(tokens[:, :-1], dtype=np.int32),
        "targets": np.ascontiguousarray(tokens[:, 1:], dtype=np.int32),
        "segment_ids": np.ascontiguousarray(inputs_seg, dtype=np.int32),
        "positions": positions_from_segments(inputs_seg),
        "weights": weights.astype(np.float32),
    }


class _Failure:
    """An exception raised in the prefetch thread, handed to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


_END = object()  # the validation pass is over


class Loader:
    """Iterates over batches of one split of a token store, for this process.

    store: a TokenStore or a path for `open_store`. global_batch_size: rows per global batch B.
    split: "train" (shuffled by (seed, epoch), forever) or "val" (ascending order, one pass).
    sharding: a NamedSharding for [batch, length] arrays -> global jax.Arrays; None -> numpy.
    process_index / process_count: default jax.process_index() / jax.process_count().
    prefetch: batches read ahead by a background thread (0: read in the caller's thread).
    state: a `state()` dict to resume from.
    """

    def __init__(self, store: TokenStore | str, global_batch_size: int, seed: int = 0, split: str = "train",
                 val_fraction: float = 0.01, sharding=None, process_index: int | None = None,
                 process_count: int | None = None, prefetch: int = 2, state: dict[str, Any] | None = None):
        self.store = store if isinstance(store, TokenStore) else open_store(store)
        self.global_batch_size, self.seed, self.split = int(global_batch_size), int(seed), split
        self.val_fraction, self.sharding, self.prefetch = float(val_fraction), sharding, int(prefetch)
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        if self.global_batch_size < 1:
            raise DataError(f"global_batch_size must be positive, got {global_batch_size}")
        train_rows, val_rows = split_rows(self.store.num_rows, self.val_fraction)
        self._rows = train_rows if split == "train" else val_rows  # [rows of the split]
        self.batches_per_epoch = self._count_batches()
        self._local_rows, self._local_cols = self._local_slice(process_index, process_count)
        self._epoch, self._batch = 0, 0  # the next batch the consumer receives
        self._permutation: tuple[int, np.ndarray] | None = None  # (epoch, its order), used by one thread at a time
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        if state is not None:
            self._set_state(state)

    # -- iteration

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.prefetch <= 0:
            if self._finished(self._epoch, self._batch):
                raise StopIteration
            item = (self._epoch, self._batch, self._build(self._epoch, self._batch))
        else:
            item = self._take()
        epoch, batch, arrays = item
        self._epoch, self._batch = self._following(epoch, batch)
        return arrays

    def __len__(self) -> int:
        """Batches per epoch (the validation split has exactly one epoch)."""
        return self.batches_per_epoch

    # -- resumption

    def state(self) -> dict[str, Any]:
        """JSON-serialisable position: the next batch the consumer will receive."""
        return {"version": STATE_VERSION, "store": self._store_identity(), "path": self.store.path, "split": self.split,
                "val_fraction": self.val_fraction, "global_batch_size": self.global_batch_size,
                "seed": self.seed, "epoch": self._epoch, "batch": self._batch}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next batches are those the saved loader would have given."""
        self.close()
        self._set_state(state)

    def _set_state(self, state: dict[str, Any]) -> None:
        mine = self.state()
        for key in ("version", "store", "split", "val_fraction", "global_batch_size", "seed"):
            if state.get(key) != mine[key]:
                raise DataError(f"loader state does not fit this loader: {key} is {state.get(key)!r} in the state, "
                                f"{mine[key]!r} here. Resume with the same store and settings, or start afresh")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        last = self.batches_per_epoch if self.split == "val" else self.batches_per_epoch - 1
        if epoch < 0 or not 0 <= batch <= last or (self.split == "val" and epoch != 0):
            raise DataError(f"loader state has an impossible position epoch={epoch}, batch={batch}")
        self._epoch, self._batch = epoch, batch

    def _store_identity(self) -> dict[str, Any]:
        """What identifies the store's content (the path may change between runs)."""
        return {"rows": self.store.num_rows, "seq_len": self.store.seq_len,
                "created": self.store.metadata.get("created")}

    # -- shutdown

    def close(self) -> None:
        """Stop the prefetch thread and drop what it read ahead; iterating again restarts it."""
        if self._thread is None:
            return
        self._stop.set()
        if threading.current_thread() is self._thread:  # dropped by the thread itself (__del__): it stops on its own
            return
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)  # unblock a producer waiting on a full queue
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = self._queue = self._stop = None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- positions

    def _count_batches(self) -> int:
        rows, size = len(self._rows), self.global_batch_size
        if self.split == "val":
            if rows == 0:
                raise DataError(f"the validation split of {self.store.path} is empty (val_fraction="
                                f"{self.val_fraction}, {self.store.num_rows} rows); raise val_fraction")
            return -(-rows // size)
        if rows < size:
            raise DataError(f"the train split of {self.store.path} has {rows} rows, fewer than global_batch_size="
                            f"{size}; use a smaller batch or a bigger store")
        return rows // size

    def _following(self, epoch: int, batch: int) -> tuple[int, int]:
        batch += 1
        if batch == self.batches_per_epoch and self.split == "train":
            return epoch + 1, 0
        return epoch, batch

    def _finished(self, epoch: int, batch: int) -> bool:
        return self.split == "val" and batch >= self.batches_per_epoch

    def _order(self, epoch: int) -> np.ndarray:
        """The split's rows in the order of `epoch`."""
        if self.split == "val":
            return self._rows
        if self._permutation is None or self._permutation[0] != epoch:
            shuffle = np.random.default_rng([self.seed, epoch]).permutation(len(self._rows))
            self._permutation = (epoch, self._rows[shuffle])
        return self._permutation[1]

    # -- this process's slice

    def _local_slice(self, process_index: int | None, process_count: int | None,
                     ) -> tuple[np.ndarray, slice | np.ndarray]:
        """Positions within the global batch this process reads [local_batch], and its columns of length."""
        size = self.global_batch_size
        if self.sharding is not None:
            if process_index is not None or process_count is not None:
                raise DataError("pass either a sharding (rows follow its addressable devices) or process_index/"
                                "process_count (numpy batches), not both")
            return _addressable(self.sharding, (size, self.store.seq_len))
        import jax

        index = jax.process_index() if process_index is None else int(process_index)
        count = jax.process_count() if process_count is None else int(process_count)
        if count < 1 or not 0 <= index < count:
            raise DataError(f"process_index must be in [0, process_count), got {index} of {count}")
        if size % count:
            raise DataError(f"global_batch_size={size} must be divisible by process_count={count}; "
                            "each process reads an equal slice of every batch")
        local = size // count
        return np.arange(index * local, (index + 1) * local), slice(None)

    # -- reading

    def _build(self, epoch: int, batch: int) -> dict:
        """This process's part of batch `batch` of `epoch`: numpy arrays, or global jax.Arrays with a sharding."""
        order = self._order(epoch)
        positions = batch * self.global_batch_size + self._local_rows  # [local_batch] into the split's order
        valid = positions < len(order)  # False only in the padded last validation batch
        tokens, segment_ids = self.store.read_rows(order[positions[valid]])  # [valid, seq_len + 1]
        if not valid.all():
            tokens, segment_ids = _pad_rows(tokens, segment_ids, valid)
        arrays = batch_from_rows(tokens, segment_ids)  # [local_batch, seq_len] each
        arrays = {k: v[:, self._local_cols] for k, v in arrays.items()}
        if self.sharding is None:
            return arrays
        import jax

        shape = (self.global_batch_size, self.store.seq_len)
        return {k: jax.make_array_from_process_local_data(self.sharding, v, shape) for k, v in arrays.items()}

    # -- prefetch thread

    def _take(self) -> tuple[int, int, dict]:
        if self._thread is None:
            self._start()
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the loader's prefetch thread ended without a batch or an error") from None
        if item is _END:
            self._queue.put(_END)  # stay finished
            raise StopIteration
        if isinstance(item, _Failure):
            self._queue.put(item)  # stay failed
            raise item.error
        return item

    def _start(self) -> None:
        self._queue, self._stop = queue.Queue(maxsize=self.prefetch), threading.Event()
        args = (weakref.ref(self), self._epoch, self._batch, self._queue, self._stop)
        self._thread = threading.Thread(target=_produce, args=args, name="meshlm-loader", daemon=True)
        self._thread.start()


def _produce(loader_ref: weakref.ref, epoch: int, batch: int, out: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread: build batches from (epoch, batch) on into `out` until stopped.

    It holds the loader only while building, so a loader that is dropped without close() is
    collected and its __del__ stops the thread."""
    try:
        while not stop.is_set():
            loader = loader_ref()
            if loader is None:
                return
            if loader._finished(epoch, batch):
                item = _END
            else:
                item = (epoch, batch, loader._build(epoch, batch))
                epoch, batch = loader._following(epoch, batch)
            del loader
            _put(out, item, stop)
            if item is _END:
                return
    except BaseException as error:  # handed to the consumer, raised there
        _put(out, _Failure(error), stop)


def _put(out: queue.Queue, item: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.05)
            return
        except queue.Full:
            pass


def _pad_rows(tokens: np.ndarray, segment_ids: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Put rows where `valid` is True, all-padding rows (PAD_ID, segment 0) elsewhere: [len(valid), seq_len + 1]."""
    full_tokens = np.full((len(valid), tokens.shape[1]), PAD_ID, np.int32)
    full_segments = np.zeros((len(valid), tokens.shape[1]), np.int32)
    full_tokens[valid], full_segments[valid] = tokens, segment_ids
    return full_tokens, full_segments


def _addressable(sharding, shape: tuple[int, int]) -> tuple[np.ndarray, slice | np.ndarray]:
    """Rows [local_batch] and columns of a [batch, length] array this process's devices hold, ascending.

    `jax.make_array_from_process_local_data` expects the local data to be exactly these rows and
    columns, concatenated in ascending order."""
    try:
        sharding.shard_shape(shape)
    except ValueError as e:
        raise DataError(f"a [batch, length] = {list(shape)} batch cannot be split by the sharding {sharding}: {e}. "
                        "Choose a global_batch_size divisible by the mesh axes of the batch dimension") from e
    index_map = sharding.addressable_devices_indices_map(shape)
    rows, cols = np.zeros(shape[0], bool), np.zeros(shape[1], bool)
    for index in index_map.values():
        rows[index[0]] = True
        if len(index) > 1:
            cols[index[1]] = True
        else:
            cols[:] = True
    col_index = slice(None) if cols.all() else np.flatnonzero(cols)
    return np.flatnonzero(rows), col_index
