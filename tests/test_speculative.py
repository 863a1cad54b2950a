"""Speculative sampling: greedy output equals the target's greedy output; sampled output follows the
target's distribution (a chi-square test over 16,384 three-token samples), with a decent and with a bad draft."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from infer.decode import Decoder
from infer.sampling import InferenceError, SamplingParams
from infer.speculative import SpeculativeDecoder
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
    spec = SpeculativeDecoder(target, draft, k=k).generate_ids(prompts, params, stats=record)
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
    [spec] = SpeculativeDecoder(target, draft, k=3).generate_ids(
        [prompt], SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=(stop,)))
    assert spec.token_ids == free.token_ids[:first] and spec.finish_reason == "stop"


# ----------------------------------------------------------------------------- the distribution

SMALL = ModelConfig(vocab_size=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                    init_std=0.6)
PROMPT = [1, 5, 2]
SAMPLES = 16_384  # a power of two: the batch is bucketed to one, so no row is padding


def _exact_joint(model):
    """p(x1, x2, x3 | PROMPT) of the model at temperature 1: [vocab, vocab, vocab]. x1 is drawn at prefill
    (from the target); x2 and x3 come from the first speculative round (k = 2: both drafts accepted, or a
    rejection and the residual, or the bonus), so the test covers every branch of a round."""
    vocab = SMALL.vocab_size
    first = jax.nn.softmax(model(jnp.asarray([PROMPT]))[0, -1])
    second = jax.nn.softmax(model(jnp.asarray([PROMPT + [a] for a in range(vocab)]))[:, -1], axis=-1)
    pairs = [(a, b) for a in range(vocab) for b in range(vocab)]
    third = jax.nn.softmax(model(jnp.asarray([PROMPT + [a, b] for a, b in pairs]))[:, -1], axis=-1)
    joint = (np.asarray(first, np.float64)[:, None, None] * np.asarray(second, np.float64)[:, :, None]
             * np.asarray(third, np.float64).reshape(vocab, vocab, vocab))
    return joint / joint.sum()


def _chi_square_p(samples, joint):
    counts = np.zeros_like(joint)
    np.add.at(counts, tuple(samples.T), 1)
    expected = joint.ravel() * len(samples)
    observed = counts.ravel()
    big = expected >= 5  # pool the rare cells into one
    observed = np.append(observed[big], observed[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    return stats.chisquare(observed, expected).pvalue


@pytest.mark.parametrize("draft_seed, draft_std", [(1, 0.6), (2, 0.02)])  # another model; a near-uniform one
def test_speculative_samples_follow_the_target_distribution(draft_seed, draft_std):
    """16,384 independent three-token continuations (one seed per row). Bound: the chi-square test of the
    speculative samples against the target's exact joint distribution must not reject at p < 1e-3,
    while the same test does reject the draft's own samples (the test can tell the two apart)."""
    target_model = init_model(SMALL, seed=0)
    target = Decoder(SMALL, *nnx.split(target_model))
    draft_config = SMALL.replace(init_std=draft_std)
    draft = Decoder(draft_config, *nnx.split(init_model(draft_config, seed=draft_seed)))
    joint = _exact_joint(target_model)
    params = [SamplingParams(max_new_tokens=3, temperature=1.0, seed=s) for s in range(SAMPLES)]
    record = []
    spec = SpeculativeDecoder(target, draft, k=2).generate_ids([PROMPT] * SAMPLES, params, stats=record)
    samples = np.asarray([r.token_ids for r in spec])
    assert samples.shape == (SAMPLES, 3)
    p_spec = _chi_square_p(samples, joint)
    assert p_spec > 1e-3, (p_spec, record[0])
    own = np.asarray([r.token_ids for r in draft.generate_ids([PROMPT] * SAMPLES, params)])
    assert _chi_square_p(own, joint) < 1e-6
    assert 0.0 < record[0].acceptance_rate < 1.0


def test_a_draft_with_another_vocabulary_is_refused(target):
    other = _decoder(TARGET.replace(vocab_size=300), seed=0)
    with pytest.raises(InferenceError, match="draft: its vocabulary has 300 tokens, the target's 256"):
        SpeculativeDecoder(target, other).generate_ids([[1, 2]], SamplingParams(max_new_tokens=3))
