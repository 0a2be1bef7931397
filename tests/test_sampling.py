"""One sampling implementation: `sample_rows` over per-row arrays, which `Sample` and the
server both use. A uniform batch equals `Sample`; a mixed batch equals each row's own `Sample`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dami_jax as dj
from dami_jax.generate.sampling import filter_rows, sample_rows, top_p_cut

B, V, STEPS = 6, 40, 12


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.normal(size=(B, V)) * 2.5, jnp.float32)


def _keys(step):
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(jax.random.key(7), r), step))(jnp.arange(B))


SETTINGS = [dj.Sample(), dj.Sample(0.7, 5), dj.Sample(1.3, 0, 0.8), dj.Sample(0.6, 20, 0.95), dj.Sample(0.9, 60, 0.3)]


@pytest.mark.parametrize("sampling", SETTINGS, ids=str)
def test_uniform_rows_equal_sample(logits, sampling):
    rows, alone = jax.jit(sample_rows), jax.jit(sampling.next_tokens)
    temp, top_k, cut = (np.full(B, sampling.temperature, np.float32), np.full(B, sampling.top_k, np.int32),
                        np.full(B, top_p_cut(sampling.top_p)))
    filtered = sampling.filtered_logits(logits)
    draw = jax.jit(jax.vmap(jax.random.categorical))
    for step in range(STEPS):
        keys = _keys(step)
        ours = np.asarray(rows(logits, keys, temp, top_k, cut))
        np.testing.assert_array_equal(ours, np.asarray(alone(logits, keys)))
        # ... which is a draw from the filtered logits with the row's own key
        np.testing.assert_array_equal(ours, np.asarray(draw(keys, filtered)))


def test_mixed_rows_each_equal_their_own_sample(logits):
    per_row = [None, *SETTINGS]  # None: greedy (temperature 0)
    temp = np.asarray([0.0 if s is None else s.temperature for s in per_row], np.float32)
    top_k = np.asarray([0 if s is None else s.top_k for s in per_row], np.int32)
    cut = np.asarray([0.0 if s is None else top_p_cut(s.top_p) for s in per_row], np.float32)
    rows = jax.jit(sample_rows)
    alone = [jax.jit((dj.Greedy() if s is None else s).next_tokens) for s in per_row]
    seen = set()
    for step in range(STEPS):
        keys = _keys(step)
        ours = np.asarray(rows(logits, keys, temp, top_k, cut))
        for r, s in enumerate(per_row):
            assert ours[r] == int(alone[r](logits[r: r + 1], keys[r: r + 1])[0]), (step, r, s)
        seen.add(tuple(ours.tolist()))
    assert len(seen) > 5  # the draws really vary with the key


def test_filters_off_leave_the_logits_and_top_k_top_p_cut(logits):
    x = logits / 0.8
    off = filter_rows(x, jnp.zeros(B, jnp.int32), jnp.zeros(B, jnp.float32))
    np.testing.assert_array_equal(np.asarray(off), np.asarray(x))
    kept = np.isfinite(np.asarray(filter_rows(x, jnp.full(B, 3, jnp.int32), jnp.zeros(B, jnp.float32))))
    assert (kept.sum(1) == 3).all()
    kept = np.isfinite(np.asarray(filter_rows(x, jnp.zeros(B, jnp.int32), jnp.full(B, top_p_cut(0.5)))))
    probs = np.asarray(jax.nn.softmax(x, -1))
    assert ((probs * kept).sum(1) >= 0.5).all() and (kept.sum(1) < V).all()
