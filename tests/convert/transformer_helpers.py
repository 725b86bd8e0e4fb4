"""Comparisons shared by the transformer converter tests (test_dit.py, test_sd3.py)."""

import numpy as np

from ldm_jax.convert.common import flatten


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def tree_equal(a, b):
    """Asserts two parameter trees have the same paths and bitwise-equal leaves."""
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)
