"""Speculative sampling: greedy output equals the target's greedy output; sampled output follows the
target's distribution (a chi-square test over 16,384 samples), with a decent and with a bad draft."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from infer.decode import Decoder
from infer.sampling import InferenceError, SamplingParams
from infer.speculative import speculative_generate
from model import ModelConfig, get_preset, init_model

TARGET = get_preset("tiny").replace(init_std=0.3)


def _decoder(config, seed):
    graphdef, params = nnx.split(init_model(config, seed))
    return Decoder(config, graphdef, params, prefill_chunk=64)


@pytest.fixture(scope="module")
def target():
    return _decoder(TARGET, seed=3)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, TARGET.vocab_size, n).tolist() for n in lengths]


@pytest.mark.parametrize("draft_kind, k", [("same", 3), ("weak", 4), ("weak", 1)])
def test_greedy_speculative_equals_greedy_target(target, draft_kind, k):
    draft = target if draft_kind == "same" else _decoder(TARGET.replace(n_layers=1), seed=11)
    prompts = _prompts([1, 9, 30], seed=1)
    params = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in (13, 7, 10)]
    plain = target.generate_ids(prompts, params)
    record = []
    spec = speculative_generate(target, draft, prompts, params, k=k, stats=record)
    for a, b in zip(plain, spec, strict=True):
        assert b.token_ids == a.token_ids
        np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=1e-4, atol=1e-4)
    rate = record[0].acceptance_rate
    if draft_kind == "same":
        assert rate == 1.0
    else:
        assert 0.0 <= rate < 1.0  # a different model: some drafts rejected, so rows advance unevenly


def test_stop_ids_and_budget_with_a_draft(target):
    prompt = _prompts([6], seed=2)[0]
    free = target.generate_ids([prompt], SamplingParams(max_new_tokens=10, temperature=0.0))[0]
    stop = free.token_ids[4]
    first = free.token_ids.index(stop)
    draft = _decoder(TARGET.replace(n_layers=1), seed=5)
    [spec] = speculative_generate(target, draft, [prompt], SamplingParams(max_new_tokens=10, temperature=0.0,
                                                                          stop_token_ids=(stop,)), k=3)
    assert spec.token_ids == free.token_ids[:first] and spec.finish_reason == "stop"


# ----------------------------------------------------------------------------- the distribution

SMALL = ModelConfig(vocab_size=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                    init_std=0.6)
PROMPT = [1, 5, 2]
SAMPLES = 16_384  # a power of two: the batch is bucketed to one, so no row is padding


def _exact_joint(model):
    """p(x1, x2 | PROMPT) of the model at temperature 1: [vocab, vocab]."""
    first = jax.nn.softmax(model(jnp.asarray([PROMPT]))[0, -1])
    continued = jnp.asarray([PROMPT + [x] for x in range(SMALL.vocab_size)])
    second = jax.nn.softmax(model(continued)[:, -1], axis=-1)
    joint = np.asarray(first[:, None] * second, np.float64)
    return joint / joint.sum()


def _chi_square_p(samples, joint):
    counts = np.zeros_like(joint)
    np.add.at(counts, (samples[:, 0], samples[:, 1]), 1)
    expected = joint.ravel() * len(samples)
    observed = counts.ravel()
    big = expected >= 5  # pool the rare cells into one
    observed = np.append(observed[big], observed[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    return stats.chisquare(observed, expected).pvalue


@pytest.mark.parametrize("draft_seed, draft_std", [(1, 0.6), (2, 0.02)])  # another model; a near-uniform one
def test_speculative_samples_follow_the_target_distribution(draft_seed, draft_std):
    """16,384 independent two-token continuations (one seed per row). Bound: the chi-square test of the
    speculative samples against the target's exact joint distribution must not reject at p < 1e-3,
    while the same test does reject the draft's own samples (the test can tell the two apart)."""
    target_model = init_model(SMALL, seed=0)
    target = Decoder(SMALL, *nnx.split(target_model))
    draft_config = SMALL.replace(init_std=draft_std)
    draft = Decoder(draft_config, *nnx.split(init_model(draft_config, seed=draft_seed)))
    joint = _exact_joint(target_model)
    params = [SamplingParams(max_new_tokens=2, temperature=1.0, seed=s) for s in range(SAMPLES)]
    record = []
    spec = speculative_generate(target, draft, [PROMPT] * SAMPLES, params, k=2, stats=record)
    samples = np.asarray([r.token_ids for r in spec])
    assert samples.shape == (SAMPLES, 2)
    p_spec = _chi_square_p(samples, joint)
    assert p_spec > 1e-3, (p_spec, record[0])
    own = np.asarray([r.token_ids for r in draft.generate_ids([PROMPT] * SAMPLES, params)])
    assert _chi_square_p(own, joint) < 1e-6
    assert 0.0 < record[0].acceptance_rate < 1.0


def test_a_draft_with_another_vocabulary_is_refused(target):
    other = _decoder(TARGET.replace(vocab_size=300), seed=0)
    with pytest.raises(InferenceError, match="draft: its vocabulary has 300 tokens, the target's 256"):
        speculative_generate(target, other, [[1, 2]], SamplingParams(max_new_tokens=3))
