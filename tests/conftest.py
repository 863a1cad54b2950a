"""Every test session sees 8 simulated CPU devices: the flag must be set before JAX is imported.

Compiled programs go to a persistent compilation cache in a fresh directory for this session (inherited
by the `meshlm` processes the tests start): many tests compile the same programs (the tiny train step in
a dozen training processes, one engine's step in several servers), and a cache hit skips the compiler.
The directory is new for every session, so nothing carries over from an earlier run.
"""

import atexit
import os
import shutil
import tempfile

from model.runtime import set_xla_flags

set_xla_flags(cpu_devices=8)  # and the XLA:CPU flags the CLI uses, so tests run what users run
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="meshlm-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402

assert jax.device_count() == 8, f"tests expect 8 simulated devices, got {jax.devices()}"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def stdlib_texts() -> list[str]:
    """The embedded corpus's documents that are UTF-8, in corpus order (a few stdlib test files
    deliberately are not)."""
    import datasets

    from data.sources import load_documents

    datasets.disable_progress_bars()
    texts = []
    for raw in load_documents("stdlib")["raw"]:
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


@pytest.fixture
def float64(monkeypatch):
    """Models built inside the test may use param/compute dtype "float64", and the model's float32
    accumulations (norms, scores, logits) run in float64 too: two computations that differ only in
    the order of their sums then agree to ~1e-12, which tells rounding from a bug."""
    import jax.numpy as jnp

    import model.config as model_config
    import model.transformer as transformer

    with jax.enable_x64(True):
        monkeypatch.setitem(model_config.DTYPES, "float64", jnp.float64)
        monkeypatch.setattr(transformer, "F32", jnp.float64)
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A small token store of the embedded corpus with a trained 512-token BPE, rows of 32 tokens (the
    training-loop and multi-process tests train the tiny preset on it)."""
    import datasets

    from data.pipeline import PrepareConfig, prepare

    datasets.disable_progress_bars()
    path = str(tmp_path_factory.mktemp("data") / "store")
    prepare(PrepareConfig(out=path, limit=120, tokenizer="bpe:512", seq_len=32, num_proc=1), verbose=False)
    return path
