"""The one draw, the one request check and the one row-done rule (infer/sampling.py), against plain numpy
and python: masked token ids are never drawn and the rest follow the renormalised distribution; any 64-bit
seed maps to a key; top-k past the vocabulary is no filter; and the Decoder honours a token mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from infer.decode import Decoder
from infer.engine import Engine
from infer.sampling import (
    InferenceError,
    RequestError,
    RowSampling,
    SamplingParams,
    check_request,
    draw,
    finish_reason,
    row_done,
    row_keys,
    seed_words,
)
from model import get_preset, init_model

VOCAB = 12


def _rows(n, **options):
    return RowSampling.from_params([SamplingParams(seed=s, **options) for s in range(n)], n)


def test_masked_ids_are_never_drawn_and_the_rest_follow_the_renormalised_distribution():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, VOCAB).astype(np.float32)
    logits[3] = 8.0  # the model's favourite: not allowed
    allowed = np.ones(VOCAB, bool)
    allowed[[3, 7]] = False
    n = 8192
    rows = _rows(n)
    drawn = jax.jit(lambda lg: draw(lg, rows, row_keys(rows, jnp.zeros(n, jnp.int32)), jnp.asarray(allowed)))(
        jnp.broadcast_to(jnp.asarray(logits), (n, VOCAB)))
    tokens = np.asarray(drawn.tokens)
    assert not np.isin(tokens, [3, 7]).any()
    p = np.where(allowed, np.exp(logits - logits.max()), 0.0)
    p /= p.sum()
    counts = np.bincount(tokens, minlength=VOCAB)
    assert stats.chisquare(counts[allowed], p[allowed] * n).pvalue > 1e-3
    # the reported log-probability is the model's over the allowed ids
    np.testing.assert_allclose(np.asarray(drawn.logprobs), np.log(p[tokens]), rtol=1e-5, atol=1e-5)
    greedy = RowSampling.from_params([SamplingParams(temperature=0.0)], 1)
    best = draw(jnp.asarray(logits)[None], greedy, row_keys(greedy, jnp.zeros(1, jnp.int32)), jnp.asarray(allowed))
    assert int(best.tokens[0]) == int(np.argmax(np.where(allowed, logits, -np.inf)))


def test_top_k_past_the_vocabulary_is_no_filter_and_huge_values_do_not_overflow():
    logits = jnp.asarray(np.random.default_rng(1).normal(0, 1, (2, VOCAB)).astype(np.float32))
    off = RowSampling.from_params([SamplingParams(top_k=0)] * 2, 2)
    huge = RowSampling.from_params([SamplingParams(top_k=10**12), SamplingParams(top_k=VOCAB)], 2)
    keys = row_keys(off, jnp.zeros(2, jnp.int32))
    np.testing.assert_array_equal(np.asarray(draw(logits, off, keys).distribution),
                                  np.asarray(draw(logits, huge, keys).distribution))


@pytest.mark.parametrize("seed", [-1, -(1 << 63), (1 << 64) - 1, 10**12, 2**32, 0, 5, 2**32 - 1])
def test_every_64_bit_seed_maps_to_a_key_and_32_bit_seeds_keep_their_keys(seed):
    low, high = seed_words(seed)
    assert 0 <= low < 2**32 and 0 <= high < 2**32
    rows = RowSampling.from_params([SamplingParams(seed=seed)], 1)
    key = jax.random.key_data(rows.keys)[0]
    if 0 <= seed < 2**32:
        np.testing.assert_array_equal(key, jax.random.key_data(jax.random.key(seed)))
    again = RowSampling.from_params([SamplingParams(seed=seed)], 1)
    np.testing.assert_array_equal(key, jax.random.key_data(again.keys)[0])


def test_distinct_large_seeds_give_distinct_keys():
    seeds = [-1, -2, 2**32, 2**32 + 1, 10**12, 2**63 - 1, 1]
    rows = RowSampling.from_params([SamplingParams(seed=s) for s in seeds], len(seeds))
    keys = {tuple(k) for k in np.asarray(jax.random.key_data(rows.keys))}
    assert len(keys) == len(seeds)
    assert seed_words(-1) == seed_words((1 << 64) - 1)  # one 64-bit pattern, read signed or unsigned
    with pytest.raises(InferenceError, match="seed must be a 64-bit integer"):
        SamplingParams(seed=1 << 64)


def test_check_request_names_the_field():
    params = SamplingParams(max_new_tokens=8)
    assert check_request([1, 2], params, vocab_size=10, context=16) == [1, 2]
    cases = [
        (([], params), {}, "prompt", "prompt is empty"),
        (([1, 12], params), {}, "prompt", "token id 12 outside the vocabulary"),
        (([1] * 9, params), {"truncate": False}, "prompt", "9 tokens and max_new_tokens is 8.*truncate=True"),
        (([1], SamplingParams(max_new_tokens=16)), {}, "max_tokens", r"max_tokens \(16\) leaves no room"),
        (([1], SamplingParams(stop_token_ids=tuple(range(9)))), {}, "stop_token_ids", "at most 8"),
        (([1], SamplingParams(stop=tuple("abcdefghi"))), {}, "stop", "at most 8"),
    ]
    for (prompt, p), options, param, message in cases:
        with pytest.raises(RequestError, match=message) as error:
            check_request(prompt, p, vocab_size=10, context=16, budget_name="max_tokens"
                          if param == "max_tokens" else "max_new_tokens", **options)
        assert error.value.param == param
    assert check_request(list(range(10)), params, vocab_size=10, context=16, truncate=True) == [2, 3, 4, 5, 6, 7,
                                                                                                 8, 9]


def test_the_row_done_rule_is_the_same_on_the_host_and_the_device():
    stop_ids = np.array([[4, -1], [-1, -1], [2, 9]], np.int32)
    tokens, generated, budget = np.array([4, 4, 9]), np.array([1, 5, 2]), np.array([5, 5, 8])
    host = row_done(tokens, generated, stop_ids, budget)
    device = jax.jit(row_done)(jnp.asarray(tokens), jnp.asarray(generated), jnp.asarray(stop_ids),
                               jnp.asarray(budget))
    np.testing.assert_array_equal(host, [True, True, True])
    np.testing.assert_array_equal(np.asarray(device), host)
    assert not row_done(3, 1, [4], 5)
    assert finish_reason(4, 1, SamplingParams(stop_token_ids=(4,))) == "stop"
    assert finish_reason(4, 3, SamplingParams(max_new_tokens=3)) == "length"
    assert finish_reason(4, 2, SamplingParams(max_new_tokens=3)) is None


@pytest.fixture(scope="module")
def tiny():
    config = get_preset("tiny").replace(init_std=0.3)
    graphdef, params = nnx.split(init_model(config, seed=3))
    return config, graphdef, params


def test_the_decoder_never_draws_an_id_it_may_not(tiny):
    config, graphdef, params = tiny
    prompts = [[5, 9, 1], [200, 3]]
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    free = Decoder(config, graphdef, params).generate_ids(prompts, greedy)
    banned = {t for r in free for t in r.token_ids}
    allowed = np.ones(config.vocab_size, bool)
    allowed[list(banned)] = False
    masked = Decoder(config, graphdef, params, allowed=allowed)
    sampled = [SamplingParams(max_new_tokens=12, temperature=1.5, seed=s) for s in range(2)]
    for results in (masked.generate_ids(prompts, greedy), masked.generate_ids(prompts, sampled)):
        assert all(t not in banned for r in results for t in r.token_ids)
    with pytest.raises(ValueError, match="no token id"):
        Decoder(config, graphdef, params, allowed=np.zeros(config.vocab_size, bool))


def test_an_engine_says_clearly_that_it_keeps_no_stacked_parameters(tiny):
    engine = Engine(*tiny, slots=1, max_length=32)
    with pytest.raises(InferenceError, match="does not keep the stacked parameters"):
        _ = engine.params
