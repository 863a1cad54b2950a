"""The KV-cache decode loop against the full forward pass, sampling controls against numpy, and the
same decode on a mesh against one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infer.decode import Decoder
from infer.sampling import InferenceError, RowSampling, SamplingParams, processed_logprobs
from model import get_preset, init_model, make_mesh
from model.cache import init_cache
from model.config import Execution

CONFIG = get_preset("tiny").replace(init_std=0.3)  # larger weights: peaked, varied next-token distributions


@pytest.fixture(scope="module")
def model():
    return init_model(CONFIG, seed=3)


@pytest.fixture(scope="module")
def decoder(model):
    graphdef, params = nnx.split(model)
    return Decoder(CONFIG, graphdef, params, prefill_chunk=64)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in lengths]


_FORWARDS = {}


def _full_logprobs(model, ids):
    """Log-probabilities of the full (uncached) forward at every position of `ids`. The ids are padded to
    max_seq_len so that one compiled forward serves every length: causal attention keeps the padding
    from reaching the positions that are read."""
    forward = _FORWARDS.setdefault(id(model), jax.jit(lambda tokens: jax.nn.log_softmax(model(tokens), axis=-1)))
    padded = np.zeros((1, CONFIG.max_seq_len), np.int32)
    padded[0, :len(ids)] = ids
    return np.asarray(forward(jnp.asarray(padded))[0, :len(ids)])


def _cached_against_full(model, config):
    """Prefill 20 tokens in chunks of 7, then feed 12 tokens one by one: each step's logits next to
    those of the full forward over the whole sequence so far."""
    ids = _prompts([32], seed=1)[0]
    full = np.asarray(model(jnp.asarray([ids]))[0])
    cache = init_cache(config, 1, 40, model.execution.compute_jnp_dtype)
    step = jax.jit(lambda tokens, positions, cache: (lambda h_c: (model.logits(h_c[0]), h_c[1]))(
        model.with_cache(tokens, positions, cache)))
    pairs = []
    for start in range(0, 20, 7):
        chunk = ids[start:min(start + 7, 20)]
        logits, cache = step(jnp.asarray([chunk]), jnp.asarray([list(range(start, start + len(chunk)))]), cache)
        pairs.append((np.asarray(logits[0]), full[start:start + len(chunk)]))
    for position in range(20, 32):
        logits, cache = step(jnp.asarray([[ids[position]]]), jnp.asarray([[position]]), cache)
        pairs.append((np.asarray(logits[0, :1]), full[position:position + 1]))
    return pairs


def test_cached_logits_equal_the_full_forward_at_every_step(model):
    """float32: the cached path sums in another order (over the cache's slots, padding included), so
    the two agree to float32 rounding of logits of this size; the float64 test below shows that the
    difference is only rounding."""
    for cached, full in _cached_against_full(model, CONFIG):
        np.testing.assert_allclose(cached, full, rtol=0, atol=1e-5 * np.abs(full).max())


def test_cached_logits_equal_the_full_forward_in_float64(float64):
    """The same comparison with every computation in float64 (the float32 accumulations too): the
    cached path is the full forward's arithmetic, to 1e-12."""
    config = CONFIG.replace(param_dtype="float64")
    model = init_model(config, seed=3, execution=Execution(compute_dtype="float64"))
    for cached, full in _cached_against_full(model, config):
        assert cached.dtype == np.float64
        np.testing.assert_allclose(cached, full, rtol=0, atol=1e-12)


def test_greedy_equals_repeated_argmax_of_the_full_forward(model, decoder):
    prompts = _prompts([5, 17, 70], seed=2)  # different lengths; 70 needs two prefill chunks of 64
    results = decoder.generate_ids(prompts, SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=3))
    for prompt, result in zip(prompts, results, strict=True):
        ids = list(prompt)
        for j in range(12):
            logprobs = _full_logprobs(model, ids)[-1]
            want = int(np.argmax(logprobs))
            assert result.token_ids[j] == want, (j, result.token_ids)
            np.testing.assert_allclose(result.logprobs[j], logprobs[want], rtol=1e-4, atol=1e-4)
            top = sorted(range(len(logprobs)), key=lambda t: -logprobs[t])[:3]
            assert [t for t, _ in result.top_logprobs[j]] == top
            np.testing.assert_allclose([lp for _, lp in result.top_logprobs[j]], logprobs[top], rtol=1e-4, atol=1e-4)
            ids.append(want)
        assert result.finish_reason == "length"


def test_rows_do_not_affect_each_other_and_seeds_repeat(decoder):
    a, b, c = _prompts([9, 30, 12], seed=4)
    sampled = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=50, seed=7)
    other = SamplingParams(max_new_tokens=6, temperature=1.0, seed=99)
    first = decoder.generate_ids([a, b], [sampled, other])
    second = decoder.generate_ids([a, c], [sampled, other])
    assert first[0].token_ids == second[0].token_ids  # same seed, same text, whatever the other row is
    alone = decoder.generate_ids([a, a], [sampled, sampled.__class__(**{**sampled.__dict__, "seed": 8})])
    assert alone[0].token_ids == first[0].token_ids
    assert alone[1].token_ids != alone[0].token_ids  # the seed matters
    assert len(first[1].token_ids) == 6


def test_a_second_call_of_the_same_bucket_does_not_recompile(decoder):
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    decoder.generate_ids(_prompts([10, 20]), params)
    traces = dict(decoder.traces)
    decoder.generate_ids(_prompts([3, 40], seed=9), params)  # same buckets: batch 2, prompt 64, cache 128
    assert decoder.traces == traces
    decoder.generate_ids(_prompts([3, 40, 8], seed=9), params)  # batch bucket 4: compiles once more
    assert decoder.traces["prefill"] == traces["prefill"] + 1


def test_stream_yields_the_same_tokens_as_generate(decoder):
    prompts = _prompts([6, 25], seed=5)
    params = [SamplingParams(max_new_tokens=11, temperature=0.8, seed=1),
              SamplingParams(max_new_tokens=7, temperature=0.0)]
    whole = decoder.generate_ids(prompts, params)
    pieces = [[], []]
    chunks = 0
    for new in decoder.stream_ids(prompts, params, chunk=3):
        chunks += 1
        for i, ids in enumerate(new):
            assert len(ids) <= (1 if chunks == 1 else 3)  # the prefill's token comes alone, at once
            pieces[i] += ids
    assert chunks == 5  # the prefill's token, then ceil(10 / 3) decode calls
    assert pieces == [whole[0].token_ids, whole[1].token_ids]


def test_stop_token_ends_a_row_and_is_not_returned(model, decoder):
    prompt = _prompts([8], seed=6)[0]
    free = decoder.generate_ids([prompt], SamplingParams(max_new_tokens=8, temperature=0.0))[0]
    stop = free.token_ids[3]
    first = free.token_ids.index(stop)
    stopped = decoder.generate_ids([prompt], SamplingParams(max_new_tokens=8, temperature=0.0,
                                                            stop_token_ids=(stop,)))[0]
    assert stopped.token_ids == free.token_ids[:first] and stopped.finish_reason == "stop"


def test_decode_on_a_mesh_equals_one_device(model, decoder):
    mesh = make_mesh({"data": 2, "tensor": 4})
    graphdef, params = nnx.split(model)
    sharded = Decoder(CONFIG, graphdef, params, mesh=mesh, prefill_chunk=64)
    prompts = _prompts([7, 33, 12], seed=8)
    params = [SamplingParams(max_new_tokens=9, temperature=0.0, logprobs=5),
              SamplingParams(max_new_tokens=9, temperature=0.7, seed=3, logprobs=5),
              SamplingParams(max_new_tokens=4, temperature=1.0, top_p=0.9, seed=4, logprobs=5)]
    one, many = decoder.generate_ids(prompts, params), sharded.generate_ids(prompts, params)
    assert sharded.outer["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    for a, b in zip(one, many, strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose([[lp for _, lp in t] for t in a.top_logprobs],
                                   [[lp for _, lp in t] for t in b.top_logprobs], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- sampling


def _numpy_processed(logits, temperature, top_k, top_p, min_p):
    """The filters, one row at a time, as a user would write them."""
    if temperature == 0:
        out = np.full_like(logits, -np.inf)
        out[np.argmax(logits)] = 0.0
        return out
    x = logits / temperature
    keep = np.ones_like(x, dtype=bool)
    order = np.argsort(-x, kind="stable")
    if top_k:
        keep &= x >= x[order[top_k - 1]]
    p = np.exp(x - x.max()) * keep
    p /= p.sum()
    mass = 0.0
    nucleus = np.zeros_like(keep)
    for t in order:
        if mass < top_p and keep[t]:
            nucleus[t] = True
        mass += p[t]
    keep &= x >= min(x[nucleus])
    if min_p:
        keep &= np.exp(x - x.max()) >= min_p
    out = np.where(keep, x, -np.inf)
    return out - (np.log(np.sum(np.exp(out - x.max()))) + x.max())


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1), (0.5, 12, 0.6, 0.05),
    (0.0, 3, 0.5, 0.0), (2.0, 1, 1.0, 0.0)])
def test_sampling_filters_match_numpy(temperature, top_k, top_p, min_p):
    logits = np.random.default_rng(0).normal(0, 2, (3, 40)).astype(np.float32)
    rows = RowSampling.from_params([SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                                   min_p=min_p)] * 3, 3)
    got = np.asarray(processed_logprobs(jnp.asarray(logits), rows))
    for row in range(3):
        want = _numpy_processed(logits[row], temperature, top_k, top_p, min_p)
        np.testing.assert_array_equal(np.isfinite(got[row]), np.isfinite(want))
        np.testing.assert_allclose(got[row][np.isfinite(want)], want[np.isfinite(want)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changes, message", [
    ({"max_new_tokens": 0}, r"max_new_tokens must be a positive integer, got 0"),
    ({"temperature": -0.1}, r"temperature must be a number >= 0"),
    ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\], got 1.5"),
    ({"top_k": -1}, r"top_k must be an integer >= 0"),
    ({"min_p": 2}, r"min_p must be a number in \[0, 1\]"),
])
def test_bad_sampling_options_name_the_argument(changes, message):
    with pytest.raises(InferenceError, match=message):
        SamplingParams(**changes)


def test_prompt_longer_than_the_context(decoder):
    long = _prompts([CONFIG.max_seq_len], seed=1)[0]
    with pytest.raises(InferenceError, match=r"prompt 0 has 128 tokens and max_new_tokens is 8: .* truncate=True"):
        decoder.generate_ids([long], SamplingParams(max_new_tokens=8, temperature=0.0))
    result = decoder.generate_ids([long], SamplingParams(max_new_tokens=8, temperature=0.0), truncate=True)[0]
    assert result.prompt_ids == long[-(CONFIG.max_seq_len - 8):] and len(result.token_ids) == 8
    with pytest.raises(InferenceError, match=r"prompt 0 is empty"):
        decoder.generate_ids([[]], SamplingParams())
    with pytest.raises(InferenceError, match=r"token id 999 outside the vocabulary"):
        decoder.generate_ids([[1, 999]], SamplingParams())
