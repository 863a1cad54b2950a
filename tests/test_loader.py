"""The loader: determinism, epoch coverage and the train/validation split, exact resume with prefetch,
per-process slices against the one-process batch, loss weights and positions on a hand-made store,
the sharded global jax.Array path, and a real two-process run with jax.distributed."""

import gc
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data.errors import DataError
from data.loader import Loader, batch_from_rows, split_rows
from data.store import StoreWriter, open_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 16
ROWS = 405  # val_fraction 0.05 -> 21 validation rows, 384 = 48 * 8 train rows
VAL_FRACTION = 0.05
KEYS = ("tokens", "targets", "segment_ids", "positions", "weights")


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    """ROWS rows whose tokens name the row: tokens[r, j] = r * 100 + j + 1; a few documents per row."""
    rng = np.random.default_rng(0)
    tokens = np.arange(ROWS)[:, None] * 100 + np.arange(SEQ_LEN + 1)[None] + 1
    segment_ids = np.sort(rng.integers(1, 4, (ROWS, SEQ_LEN + 1)), axis=1)
    segment_ids[ROWS - 1, 10:] = 0  # the last row ends in padding
    path = str(tmp_path_factory.mktemp("loader") / "store")
    with StoreWriter(path, SEQ_LEN, {"tokenizer": {"name": "t", "hash": "h"}}, rows_per_shard=64,
                     rows_per_chunk=8) as writer:
        for start in range(0, ROWS, 50):
            writer.append(tokens[start:start + 50], segment_ids[start:start + 50])
    return path


@pytest.fixture(scope="module")
def store(store_path):
    return open_store(store_path)


def row_ids(batch: dict) -> np.ndarray:
    """The store rows of a batch [batch] (-1 for the validation split's padding rows)."""
    first = np.asarray(batch["tokens"])[:, 0]
    return np.where(first == 0, -1, (first - 1) // 100)


def take(loader: Loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in KEYS:
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


def loader(store, batch_size=8, **kwargs) -> Loader:
    kwargs = {"val_fraction": VAL_FRACTION, "process_index": 0, "process_count": 1, **kwargs}
    return Loader(store, batch_size, **kwargs)


def test_same_seed_same_batches_other_seed_other_order(store):
    with loader(store, seed=3) as a, loader(store, seed=3, prefetch=0) as b, loader(store, seed=4) as c:
        first, second, third = take(a, 60), take(b, 60), take(c, 60)  # past the first epoch's 48 batches
    assert_same_batches(first, second)
    assert not np.array_equal(row_ids(first[0]), row_ids(third[0]))
    assert {tuple(sorted(row_ids(b))) for b in first} != {tuple(sorted(row_ids(b))) for b in third}


def test_every_train_row_once_per_epoch_and_never_a_validation_row(store):
    train_rows, val_rows = split_rows(ROWS, VAL_FRACTION)
    assert len(val_rows) == 21 and len(set(train_rows) | set(val_rows)) == ROWS
    with loader(store, seed=1) as train:
        assert len(train) == 48
        epochs = [np.concatenate([row_ids(b) for b in take(train, 48)]) for _ in range(3)]
    for rows in epochs:
        np.testing.assert_array_equal(np.sort(rows), np.sort(train_rows))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    with loader(store, batch_size=10, seed=1) as train:  # 384 rows: 38 batches, 4 rows skipped per epoch
        rows = np.concatenate([row_ids(b) for b in take(train, 38)])
    assert len(set(rows)) == 380 and set(rows) <= set(train_rows)


def test_validation_split_is_fixed_ordered_and_padded(store):
    _, val_rows = split_rows(ROWS, VAL_FRACTION)
    passes = []
    for seed in (0, 7):
        with loader(store, split="val", seed=seed) as val:
            assert len(val) == 3
            passes.append(list(val))  # one pass, then StopIteration
    assert_same_batches(passes[0], passes[1])
    rows = np.concatenate([row_ids(b) for b in passes[0]])
    np.testing.assert_array_equal(rows[:21], val_rows)  # ascending, each once
    assert (rows[21:] == -1).all()  # the last batch is filled with padding of weight 0
    last = passes[0][-1]
    assert (last["weights"][5:] == 0).all() and (last["segment_ids"][5:] == 0).all()
    for seed in (0, 7):  # the split does not depend on the seed
        with loader(store, seed=seed) as train:
            rows = np.concatenate([row_ids(b) for b in take(train, 48)])
        assert not set(rows) & set(val_rows)


def test_state_restore_is_exact_across_an_epoch_boundary(store):
    with loader(store, seed=5, prefetch=4) as reference:
        take(reference, 46)
        time.sleep(0.2)  # let the prefetch thread run ahead
        state = json.loads(json.dumps(reference.state()))
        assert (state["epoch"], state["batch"]) == (0, 46)  # the consumer's position, not the thread's
        expected = take(reference, 6)  # crosses into epoch 1
        assert (reference.state()["epoch"], reference.state()["batch"]) == (1, 4)
        reference.restore(state)
        assert_same_batches(take(reference, 6), expected)
    with loader(store, seed=5, prefetch=2, state=state) as resumed:
        assert_same_batches(take(resumed, 6), expected)
    with loader(store, seed=5, prefetch=0, state=state) as resumed:
        assert_same_batches(take(resumed, 6), expected)
    with pytest.raises(DataError, match=r"seed is 5 in the state, 6 here"):
        loader(store, seed=6, state=state)
    with pytest.raises(DataError, match="global_batch_size"):
        loader(store, batch_size=4, seed=5, state=state)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_make_up_the_global_batch(store, process_count):
    with loader(store, seed=2) as one:
        global_batches = take(one, 3)
    locals_ = []
    for p in range(process_count):
        with loader(store, seed=2, process_index=p, process_count=process_count) as part:
            locals_.append(take(part, 3))
            assert locals_[-1][0]["tokens"].shape == (8 // process_count, SEQ_LEN)
    for i, expected in enumerate(global_batches):
        joined = {k: np.concatenate([local[i][k] for local in locals_]) for k in KEYS}
        assert_same_batches([joined], [expected])


def test_batch_size_must_divide_by_process_count(store):
    with pytest.raises(DataError, match=r"global_batch_size=6 must be divisible by process_count=4"):
        loader(store, batch_size=6, process_index=0, process_count=4)


def test_weights_and_positions_on_a_hand_made_store(tmp_path):
    eos = 99
    tokens = np.array([
        [5, 6, 7, eos, 8, 9, eos, 10, 11],  # three documents; the third goes on in the next row
        [12, 13, eos, 0, 0, 0, 0, 0, 0],  # a document, then padding
        [21, 22, 23, 24, 25, 26, 27, 28, 29],  # the middle of a long document
    ])
    segment_ids = np.array([
        [1, 1, 1, 1, 2, 2, 2, 3, 3],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
    ])
    with StoreWriter(tmp_path / "tiny", 8, {}) as writer:
        writer.append(tokens, segment_ids)
    with Loader(str(tmp_path / "tiny"), 3, val_fraction=0.0, process_index=0, process_count=1) as tiny:
        batch = next(tiny)
    order = np.argsort(batch["tokens"][:, 0])  # back to the rows' order
    batch = {k: v[order] for k, v in batch.items()}
    np.testing.assert_array_equal(batch["tokens"], tokens[:, :8])
    np.testing.assert_array_equal(batch["targets"], tokens[:, 1:])
    np.testing.assert_array_equal(batch["segment_ids"], segment_ids[:, :8])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 0, 1, 2, 0],
                                                       [0, 1, 2, 0, 1, 2, 3, 4],
                                                       [0, 1, 2, 3, 4, 5, 6, 7]])
    # eos is predicted (weight 1); what follows eos is the next document's first token (0); padding is 0
    np.testing.assert_array_equal(batch["weights"], [[1, 1, 1, 0, 1, 1, 0, 1],
                                                     [1, 1, 0, 0, 0, 0, 0, 0],
                                                     [1, 1, 1, 1, 1, 1, 1, 1]])
    assert batch["weights"].dtype == np.float32
    assert all(batch[k].dtype == np.int32 for k in KEYS[:4])
    assert_same_batches([batch], [batch_from_rows(tokens, segment_ids)])


def test_sharded_batches_are_global_arrays(store):
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    for batch_size in (8, 16):
        with loader(store, batch_size, seed=9) as plain:
            expected = take(plain, 2)
        with Loader(store, batch_size, seed=9, val_fraction=VAL_FRACTION, sharding=sharding) as sharded:
            got = take(sharded, 2)
        for batch in got:
            for key in KEYS:
                assert isinstance(batch[key], jax.Array)
                assert batch[key].sharding == sharding and batch[key].shape == (batch_size, SEQ_LEN)
        assert_same_batches(got, expected)
    with pytest.raises(DataError, match="global_batch_size divisible"):
        Loader(store, 4, val_fraction=VAL_FRACTION, sharding=sharding)


def test_an_error_in_the_prefetch_thread_reaches_the_consumer(store_path):
    broken = open_store(store_path)
    calls = []

    def read_rows(indices):
        calls.append(1)
        if len(calls) > 2:
            raise OSError("disk went away")
        return open_store(store_path).read_rows(indices)

    broken.read_rows = read_rows
    with loader(broken) as failing:
        take(failing, 2)
        with pytest.raises(OSError, match="disk went away"):
            next(failing)
        with pytest.raises(OSError, match="disk went away"):
            next(failing)


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "meshlm-loader"]


def test_prefetch_thread_stops(store):
    before = len(loader_threads())
    with loader(store, prefetch=2) as running:
        next(running)
        assert len(loader_threads()) == before + 1
    assert len(loader_threads()) == before
    dropped = loader(store, prefetch=2)
    next(dropped)
    del dropped  # never closed: collected, and its thread stops
    deadline = time.time() + 5
    while len(loader_threads()) > before and time.time() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert len(loader_threads()) == before


TWO_PROCESS_WORKER = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    store, port, process_id, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from jax.experimental.multihost_utils import process_allgather
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from data.loader import Loader
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    with Loader(store, 16, seed=11, val_fraction=0.05, sharding=sharding) as loader:
        local_rows = loader._local_rows
        batches = [next(loader) for _ in range(2)]
    result = {"local_rows": local_rows}
    for i, batch in enumerate(batches):
        for key, array in batch.items():
            result[f"{i}/{key}"] = process_allgather(array, tiled=True)
    np.savez(out, **result)
    jax.distributed.shutdown()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_build_the_one_process_batch(store, store_path, tmp_path):
    """Two jax.distributed CPU processes of 4 devices each read half a batch each; gathered, it is the batch."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = ROOT
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_WORKER, store_path, str(port), str(i),
                               str(tmp_path / f"out{i}.npz")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]
    with loader(store, 16, seed=11) as one:
        expected = take(one, 2)
    for i in range(2):
        result = np.load(tmp_path / f"out{i}.npz")
        np.testing.assert_array_equal(result["local_rows"], np.arange(8 * i, 8 * i + 8))  # its half only
        got = [{k: result[f"{b}/{k}"] for k in KEYS} for b in range(2)]
        assert_same_batches(got, expected)
