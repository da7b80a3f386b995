"""How each next token is drawn from logits (temperature, top-k, top-p (nucleus), greedy) and how
prompts of different lengths form one batch: shared by plain decoding (sample.py) and speculative
decoding (speculative.py)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from configs.base import ConfigError


class SampleError(ConfigError):
    """A one-line error naming the flag, file or value at fault and what is valid."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How each next token is drawn: temperature 0 is greedy; top_k keeps the k likeliest tokens;
    top_p keeps the smallest set of likeliest tokens whose probability reaches p (the nucleus,
    never empty). Hashable, so a jitted program is compiled once per setting."""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise SampleError(f"--temperature {self.temperature} must be >= 0 (0 samples greedily)")
        if self.top_k is not None and self.top_k < 1:
            raise SampleError(f"--top-k {self.top_k} must be >= 1 (leave it out to keep every token)")
        if not 0 < self.top_p <= 1:
            raise SampleError(f"--top-p {self.top_p} must be in (0, 1] (1 keeps every token)")


def filter_logits(logits_BV, top_k: int | None, top_p: float):
    """Set every token outside the top-k, then outside the nucleus of what is left, to -inf.
    Ties with the last kept token are kept too."""
    if top_k is not None and top_k < logits_BV.shape[-1]:
        # min, not [:, -1]: XLA:CPU turns a slice of top_k into a full sort (timed: notes/inference.md).
        kth_B1 = jnp.min(jax.lax.top_k(logits_BV, top_k)[0], axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)
    if top_p < 1.0:
        probs_BV = jax.nn.softmax(logits_BV, axis=-1)
        logits_BV = jnp.where(probs_BV >= nucleus_floor(probs_BV, top_p), logits_BV, -jnp.inf)
    return logits_BV


def nucleus_floor(probs_BV, top_p: float):
    """The smallest probability in each row's nucleus [B, 1]: the largest t with
    sum(p >= t) >= top_p, so the top token always stays.

    A bisection on the float bits (non-negative floats order as their int32 bits), exact after
    31 halvings: 31 masked sums over the vocabulary cost far less than a sort (notes/inference.md).
    """
    bits_BV = jax.lax.bitcast_convert_type(probs_BV, jnp.int32)

    def halve(_, bounds):    # invariant: mass(bits >= lo) >= top_p > mass(bits >= hi)
        lo_B, hi_B = bounds
        mid_B = lo_B + (hi_B - lo_B) // 2
        mass_B = jnp.sum(jnp.where(bits_BV >= mid_B[:, None], probs_BV, 0.0), axis=-1)
        return jnp.where(mass_B >= top_p, mid_B, lo_B), jnp.where(mass_B >= top_p, hi_B, mid_B)
    bounds = (jnp.zeros(bits_BV.shape[:1], jnp.int32), jnp.max(bits_BV, axis=-1) + 1)
    lo_B, _ = jax.lax.fori_loop(0, 31, halve, bounds)
    return jax.lax.bitcast_convert_type(lo_B, jnp.float32)[:, None]


def sample_next(key, logits_BV, sampling: Sampling):
    """One token id per row [B] from float32 logits over the real (unpadded) vocabulary."""
    if sampling.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = filter_logits(logits_BV / sampling.temperature, sampling.top_k, sampling.top_p)
    return draw(key, jax.nn.softmax(logits_BV, axis=-1))


def draw(key, weights_BV):
    """One id per row from non-negative, unnormalized weights [B, V], by inverse CDF with one
    uniform per row: jax.random.categorical draws a Gumbel per token, a noticeable part of a small
    model's decode step (notes/inference.md). u lies in (0, total], so a token of weight 0
    (filtered out) is never drawn."""
    cdf_BV = jnp.cumsum(weights_BV, axis=-1)
    u_B1 = (1.0 - jax.random.uniform(key, (cdf_BV.shape[0], 1))) * cdf_BV[:, -1:]
    return jnp.sum(cdf_BV < u_B1, axis=-1).astype(jnp.int32)


def left_pad(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths as one [B, T] batch, right-aligned; and where each row's
    tokens start (the padding is masked out of attention and gets no position)."""
    width = max(map(len, prompts))
    tokens_BT = np.zeros((len(prompts), width), np.int32)
    for row, prompt in zip(tokens_BT, prompts):
        row[width - len(prompt):] = prompt
    return tokens_BT, np.array([width - len(prompt) for prompt in prompts], np.int32)
