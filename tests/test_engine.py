"""The serving engine with a real (tiny) model: whatever the scheduling (continuous or static batching, prefix
cache hits, slots shared with other requests, a mesh), every request gets the tokens the decode loop gives it
alone (infer/decode.py, itself checked against the full forward pass)."""

import jax
import numpy as np
import pytest
from flax import nnx

from infer.decode import Decoder
from infer.engine import Engine
from infer.sampling import InferenceError, SamplingParams
from infer.scheduler import Request, Scheduler
from model import get_preset, init_model, make_mesh


@pytest.fixture(scope="module")
def model():
    config = get_preset("tiny").replace(init_std=0.2)
    graphdef, params = nnx.split(init_model(config, seed=0))
    return config, graphdef, params


@pytest.fixture(scope="module")
def engine(model):
    """One engine for the single-device tests (its functions compile once)."""
    return Engine(*model, slots=3, max_length=128)


@pytest.fixture(scope="module")
def reference(model):
    """Each request's tokens from the decode loop (one batch: its rows do not depend on each other)."""
    decoder = Decoder(*model)

    def tokens(work):
        prompts, params = zip(*work, strict=True)
        return [r.token_ids for r in decoder.generate_ids(prompts, params)]
    return tokens


def requests(seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    """Varied prompt lengths (one past a 64-token prefill bucket), budgets, greedy and sampled rows, stop ids."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate((3, 17, 70, 1, 33, 9, 50, 24)):
        prompt = [int(t) for t in rng.integers(0, 256, n)]
        params = SamplingParams(max_new_tokens=int(rng.integers(1, 30)), temperature=(0.0, 0.9)[i % 2], seed=i,
                                top_k=(0, 40)[i % 3 == 0], stop_token_ids=(7, 11) if i == 5 else ())
        out.append((prompt, params))
    return out


def serve(engine: Engine, work, **options) -> tuple[list[list[int]], Scheduler]:
    """Run requests through a Scheduler to the end; each request's tokens (a final stop id included)."""
    scheduler = Scheduler(engine, **options)
    tokens = [[] for _ in work]
    for i, (prompt, params) in enumerate(work):
        def emit(event, i=i):
            tokens[i].extend(event.token_ids)
        scheduler.submit(Request(prompt, params, emit))
    while scheduler.queue or scheduler.busy:
        scheduler.step()
    return tokens, scheduler


def strip(tokens: list[int], params: SamplingParams) -> list[int]:
    """Without a final stop id (the decode loop leaves it out)."""
    return tokens[:-1] if tokens and tokens[-1] in params.stop_token_ids else tokens


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_batched_serving_equals_each_request_alone(engine, reference, batching):
    work = requests()
    tokens, _ = serve(engine, work, batching=batching, static_wait=0.0)
    for got, expected, (_, params) in zip(tokens, reference(work), work, strict=True):
        assert strip(got, params) == expected
    # one compiled step per attention length (16, 32, 64, 128 positions) serves every mix of requests
    assert engine.traces["generate"] <= 4


def test_prefix_cache_hits_give_the_same_tokens(engine, reference):
    rng = np.random.default_rng(1)
    system = [int(t) for t in rng.integers(0, 256, 40)]
    first = (system + [5, 6, 7], SamplingParams(max_new_tokens=20, temperature=0.0))
    tokens, scheduler = serve(engine, [first], prefix_cache_bytes=1 << 24)
    work = [(system + [9], SamplingParams(max_new_tokens=12, temperature=0.0)),  # the shared system prompt
            (system + [1, 2, 3, 4], SamplingParams(max_new_tokens=10, temperature=0.8, seed=4)),
            (first[0] + tokens[0] + [8, 9], SamplingParams(max_new_tokens=15, temperature=0.0))]  # the next turn
    for prompt, params in work:
        scheduler.submit(Request(prompt, params, lambda e, out=[]: out))
    cached = []
    original = scheduler._admit

    def admit(request, slot):
        original(request, slot)
        cached.append(request.cached_tokens)

    scheduler._admit = admit
    results = [[] for _ in work]
    for request, out in zip(list(scheduler.queue), results, strict=True):
        request.emit = lambda e, out=out: out.extend(e.token_ids)
    while scheduler.queue or scheduler.busy:
        scheduler.step()
    assert cached == [40, 40, len(first[0]) + 19]
    assert results == reference(work)
    # a reused prefix gives the first token's log-probability of a full prefill, to float32 rounding
    full = engine.prefill(work[1][0], work[1][1])
    hit = scheduler.prefix_cache.lookup(work[1][0])
    reused = engine.prefill(work[1][0], work[1][1], reuse=(hit.entry.cache, hit.length))
    assert reused.reused == 43 and reused.token == full.token
    np.testing.assert_allclose(reused.logprob, full.logprob, rtol=0, atol=1e-5)


def test_engine_on_a_mesh_equals_one_device(model, reference):
    mesh = make_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4])
    engine = Engine(*model, slots=3, max_length=128, mesh=mesh)
    assert engine.slots == 4  # rounded up to the batch shards
    work = requests(2)[:5]
    tokens, _ = serve(engine, work, prefix_cache_bytes=1 << 24)
    for got, expected, (_, params) in zip(tokens, reference(work), work, strict=True):
        assert strip(got, params) == expected
    layout = engine.init_state().cache.k[0].sharding.spec
    assert tuple(layout)[:2] == (("data", "fsdp"), "tensor")  # slots over data, kv heads over tensor


def test_engine_refuses_what_it_cannot_serve(model):
    with pytest.raises(InferenceError, match="max_length"):
        Engine(*model, max_length=4096)
    with pytest.raises(InferenceError, match="slots"):
        Engine(*model, slots=0)
    engine = Engine(*model, slots=2, max_length=64)
    with pytest.raises(InferenceError, match="60 tokens and max_new_tokens is 8"):
        engine.prefill([1] * 60, SamplingParams(max_new_tokens=8))
    with pytest.raises(InferenceError, match="slot 2"):
        engine.insert(engine.prefill([1], SamplingParams(max_new_tokens=4)), engine.init_state(), 2)
