"""Float comparisons that hold on any x86-64 CPU.

Summation order differs with SIMD width (AVX2 vs AVX-512) and thread split, so a float32 result
may differ in its last bits from machine to machine, and an elementwise rtol fails wherever an
element happens to be near zero. These tolerances scale with the compared tensors instead.
"""
import numpy as np


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| over the whole tensor (float64)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"shapes differ: {actual.shape} vs {expected.shape}"
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), np.finfo(np.float64).tiny))


def assert_close(actual, expected, rel: float = 1e-5, what: str = "") -> None:
    """Relative norm error at most `rel`, and every element within 10 x rel of the tensor's
    largest magnitude (so one wild element cannot hide in a large norm)."""
    err = relative_error(actual, expected)
    assert err <= rel, f"{what} relative error {err:.3g} > {rel:.3g}"
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    worst = float(np.max(np.abs(actual - expected), initial=0.0))
    scale = float(np.max(np.abs(expected), initial=0.0))
    assert worst <= 10 * rel * scale, f"{what} max error {worst:.3g} > {10 * rel:.3g} x max |expected| {scale:.3g}"


def assert_trees_close(actual, expected, rel: float = 1e-5) -> None:
    """assert_close on every leaf of two pytrees with the same structure."""
    import jax
    paths = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, want), got in zip(paths, jax.tree.leaves(actual)):
        assert_close(got, want, rel, what=jax.tree_util.keystr(path))
