"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes
`lookahead` (K) tokens, the large target scores all of them in one forward, and an accept/resample
rule keeps the output distributed exactly as sampling the target with the same Sampling (greedy:
token for token the target's greedy decoding). It pays because a decoding step reads every weight
once whether it scores 1 token or K + 1, so a round of K cheap draft steps and one target step
emits up to K + 1 tokens.

A round, c being the target-cache slot of the last emitted token `last`:
- the draft, whose cache ends one slot earlier, reads [prev, last] and then its own proposals,
  drawing d_1..d_K from its filtered distributions q_1..q_K (K forwards);
- the target reads [last, d_1..d_K] in one forward: p_1..p_{K+1};
- d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); the batch shares one cache index,
  so every row emits n + 1 tokens, n the fewest leading acceptances among its unfinished rows
  (`verify` says why that stays exact);
- both caches roll back by their "index" alone: slots at or after it are masked out of attention
  (model._cache_positions: key slot <= query slot) and the next writes overwrite them.
The whole generation is one program, the rounds one lax.while_loop on the device (sample.decode).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import model
from configs.base import ModelConfig
from sampling import SampleError, Sampling, draw, filter_logits, left_pad, sample_next


def probs(logits_xV, sampling: Sampling):
    """The filtered distribution a token is drawn from, over any leading axes. Greedy is the
    one-hot of the argmax, so one accept/resample rule serves both: a draft token is accepted iff
    it is the target's argmax, and the residual of a rejection is that argmax."""
    if sampling.temperature == 0:
        return jax.nn.one_hot(jnp.argmax(logits_xV, -1), logits_xV.shape[-1], dtype=jnp.float32)
    flat_NV = logits_xV.reshape(-1, logits_xV.shape[-1])     # filter_logits takes [N, V]
    flat_NV = filter_logits(flat_NV / sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.nn.softmax(flat_NV, axis=-1).reshape(logits_xV.shape)


def propose(params, cfg: ModelConfig, cache, prev_B, last_B, key, sampling: Sampling, lookahead: int):
    """K draft tokens d [B, K], the distributions q [B, K, V] they were drawn from, and the cache.

    The draft cache starts one slot before `last` and re-reads `prev`: after a fully accepted
    round d_K was never fed to the draft, and re-reading one token costs far less than an extra
    draft step to cache it."""
    logits_BTV, aux = model.forward(params, jnp.stack([prev_B, last_B], axis=1), cfg, cache=cache)

    def step(carry, i):
        cache, logits_BV = carry
        q_BV = probs(logits_BV, sampling)
        d_B = draw(jax.random.fold_in(key, i), q_BV)
        logits_B1V, aux = model.forward(params, d_B[:, None], cfg, cache=cache)
        return (aux["cache"], logits_B1V[:, 0]), (d_B, q_BV)
    # K - 1 steps that feed their token back; the K-th proposal needs no draft forward.
    (cache, logits_BV), (d_KB, q_KBV) = jax.lax.scan(step, (aux["cache"], logits_BTV[:, -1]),
                                                     jnp.arange(lookahead - 1))
    q_BV = probs(logits_BV, sampling)
    d_B = draw(jax.random.fold_in(key, lookahead - 1), q_BV)
    d_BK = jnp.concatenate([d_KB.T, d_B[:, None]], axis=1)
    q_BKV = jnp.concatenate([q_KBV.transpose(1, 0, 2), q_BV[:, None]], axis=1)
    return d_BK, q_BKV, cache


def verify(key, d_BK, q_BKV, p_BKV, active_B):
    """Accept/resample a round: (tokens [B, K+1] whose first n + 1 are the output, n, per row the
    draft tokens kept, per row the leading acceptances). p has K + 1 positions.

    Every row keeps d_1..d_n and one token x at position n + 1: its residual sample
    norm(max(p - q, 0)) if it rejected there, d_{n+1} if it accepted it, and past K (all
    accepted) a bonus from p_{K+1}. Exact although n depends on every row: whatever the stopping
    rule saw, each emitted token, given the tokens and coin flips before it, is distributed as
    the target's p at its position, as in the one-row algorithm; the stopping decision only
    decides which later tokens are drawn afresh next round. Finished rows do not hold n down.
    """
    K = d_BK.shape[1]
    at_draft = lambda x_BKV: jnp.take_along_axis(x_BKV[:, :K], d_BK[..., None], axis=-1)[..., 0]
    u_BK = jax.random.uniform(jax.random.fold_in(key, 0), d_BK.shape)
    ok_BK = u_BK * at_draft(q_BKV) < at_draft(p_BKV)              # probability min(1, p / q)
    leading_B = jnp.sum(jnp.cumprod(ok_BK.astype(jnp.int32), axis=1), axis=1)
    n = jnp.min(jnp.where(active_B, leading_B, K))
    # q_{K+1} = 0: the residual at the bonus position is p_{K+1} itself.
    q_BKV = jnp.pad(q_BKV, ((0, 0), (0, 1), (0, 0)))
    p_BV, q_BV = (jax.lax.dynamic_index_in_dim(x, n, axis=1, keepdims=False) for x in (p_BKV, q_BKV))
    residual_BV = jnp.maximum(p_BV - q_BV, 0.0)
    # All zero only when rounding rejected a token with p == q; p is then the residual's limit.
    residual_BV = jnp.where(jnp.sum(residual_BV, -1, keepdims=True) > 0, residual_BV, p_BV)
    d_BK = jnp.pad(d_BK, ((0, 0), (0, 1)))
    took_B = leading_B > n
    x_B = jnp.where(took_B, d_BK[:, n], draw(jax.random.fold_in(key, 1), residual_BV))
    tokens_BK = jnp.where(jnp.arange(K + 1) == n, x_B[:, None], d_BK)
    return tokens_BK, n, n + took_B.astype(jnp.int32), leading_B


def prefill(target_params, draft_params, prompt_BT, start_B, key, target_cfg: ModelConfig,
            draft_cfg: ModelConfig, sampling: Sampling, lookahead: int, max_new: int, eot: int | None):
    """Both models read the left-padded prompts; the target draws the first new token (as
    sample.prefill does, with the same key) and the draft cache is rolled back one slot, its
    round starting at [prev, last]. Returns the loop state.

    `out` [B, max_new + K + 1] holds the prompt's last token, then the new tokens: `count` of
    them so far; a round writes K + 1 columns, of which the first n + 1 count."""
    (b, w), width = prompt_BT.shape, max_new + lookahead + 1
    cache_len = w + max_new + lookahead - 1     # the last round writes up to slot w + max_new + K - 2
    caches = []
    for params, cfg in ((target_params, target_cfg), (draft_params, draft_cfg)):
        cache = model.init_cache(cfg, b, cache_len, start=start_B)
        logits_BTV, aux = model.forward(params, prompt_BT, cfg, cache=cache)
        caches.append((logits_BTV, aux["cache"]))
    (logits_BTV, target), (_, draft) = caches
    first_B = sample_next(jax.random.fold_in(key, 0), logits_BTV[:, -1], sampling)
    out_BW = jnp.zeros((b, width), jnp.int32).at[:, 0].set(prompt_BT[:, -1]).at[:, 1].set(first_B)
    done_B = first_B == eot if eot is not None else jnp.zeros((b,), bool)
    zero = jnp.zeros((), jnp.int32)
    return {"out": out_BW, "count": jnp.ones((), jnp.int32), "target": target,
            "draft": {**draft, "index": draft["index"] - 1}, "done": done_B,
            "rounds": zero, "proposed": zero, "accepted": zero, "verified": zero}


def spec_round(target_params, draft_params, state, key, target_cfg: ModelConfig, draft_cfg: ModelConfig,
               sampling: Sampling, lookahead: int, eot: int | None):
    """One round: propose, score in one target forward, verify, write n + 1 tokens, roll back."""
    count, K = state["count"], lookahead
    prev_B, last_B = (jax.lax.dynamic_index_in_dim(state["out"], count + j, axis=1, keepdims=False)
                      for j in (-1, 0))
    key = jax.random.fold_in(key, state["rounds"] + 1)       # 0 drew the first token
    d_BK, q_BKV, draft = propose(draft_params, draft_cfg, state["draft"], prev_B, last_B,
                                 jax.random.fold_in(key, 0), sampling, K)
    logits_BKV, aux = model.forward(target_params, jnp.concatenate([last_B[:, None], d_BK], axis=1),
                                    target_cfg, cache=state["target"])
    active_B = ~state["done"]
    tokens_BK, n, kept_B, leading_B = verify(jax.random.fold_in(key, 1), d_BK, q_BKV,
                                             probs(logits_BKV, sampling), active_B)
    done_B = state["done"]
    if eot is not None:
        done_B = done_B | jnp.any((tokens_BK == eot) & (jnp.arange(K + 1) <= n), axis=1)
    c = state["target"]["index"]                             # the slot of last_B
    tally = lambda x_B: jnp.sum(jnp.where(active_B, x_B, 0))
    return {"out": jax.lax.dynamic_update_slice_in_dim(state["out"], tokens_BK, count + 1, axis=1),
            "count": count + n + 1, "target": {**aux["cache"], "index": c + n + 1},
            "draft": {**draft, "index": c + n}, "done": done_B, "rounds": state["rounds"] + 1,
            "proposed": state["proposed"] + K * tally(jnp.ones_like(kept_B)),
            "accepted": state["accepted"] + tally(kept_B), "verified": state["verified"] + tally(leading_B)}


def decode(target_params, draft_params, state, key, target_cfg: ModelConfig, draft_cfg: ModelConfig,
           sampling: Sampling, lookahead: int, max_new: int, eot: int | None):
    """Rounds until max_new tokens are out or every row has produced `eot`, on the device."""
    def more(state):
        return (state["count"] < max_new) & ~jnp.all(state["done"])
    return jax.lax.while_loop(more, lambda state: spec_round(target_params, draft_params, state, key, target_cfg,
                                                             draft_cfg, sampling, lookahead, eot), state)


def run(target_params, draft_params, prompt_BT, start_B, key, target_cfg: ModelConfig, draft_cfg: ModelConfig,
        sampling: Sampling, lookahead: int, max_new: int, eot: int | None):
    """The whole generation as one program: the caches never leave it, so the loop updates them in
    place with nothing to donate, and there is one compile per setting, not two."""
    args = (target_cfg, draft_cfg, sampling, lookahead, max_new, eot)
    state = prefill(target_params, draft_params, prompt_BT, start_B, key, *args)
    return decode(target_params, draft_params, state, key, *args)


run_fn = jax.jit(run, static_argnames=("target_cfg", "draft_cfg", "sampling", "lookahead", "max_new", "eot"))


def generate(target_params, target_cfg: ModelConfig, draft_params, draft_cfg: ModelConfig,
             prompts: list[list[int]], max_new_tokens: int, lookahead: int, sampling: Sampling = Sampling(),
             seed: int = 0, eot: int | None = None):
    """As sample.generate, drafting `lookahead` tokens a round: (one list of new ids per prompt,
    cut before `eot`; stats). Stats: rounds; proposed and accepted, draft tokens over unfinished
    rows and those of them kept in the output; acceptance_rate, their ratio; verified, those
    that passed the accept test before the batch's shortest acceptance cut them."""
    if not prompts or not all(prompts):
        raise SampleError("every prompt needs at least one token (e.g. a leading end-of-text)")
    check_draft(target_cfg, draft_cfg, lookahead, max(map(len, prompts)), max_new_tokens)
    prompt_BT, start_B = left_pad(prompts)
    key, static = jax.random.key(seed), dict(target_cfg=target_cfg, draft_cfg=draft_cfg, sampling=sampling,
                                             lookahead=lookahead, eot=eot)
    state = run_fn(target_params, draft_params, prompt_BT, start_B, key, max_new=max_new_tokens, **static)
    rows = np.asarray(state["out"])[:, 1:1 + max_new_tokens].tolist()
    stats = {name: int(state[name]) for name in ("rounds", "proposed", "accepted", "verified")}
    stats["acceptance_rate"] = stats["accepted"] / max(stats["proposed"], 1)
    return [row[:row.index(eot)] if eot in row else row for row in rows], stats


def check_draft(target_cfg: ModelConfig, draft_cfg: ModelConfig, lookahead: int, longest_prompt: int,
                max_new_tokens: int) -> None:
    """Every speculative input, before anything compiles. A round drafts and scores up to K
    positions past the last kept token, so both models must place prompt + max_new + K positions:
    slightly more than strictly needed (tokens past max_new are cut), but no model is ever run
    at a position outside its context."""
    if lookahead < 1:
        raise SampleError(f"--lookahead {lookahead} must be >= 1 (draft tokens proposed per round)")
    if max_new_tokens < 1:
        raise SampleError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise SampleError(f"draft vocabulary mismatch: the draft's model.vocab_size is {draft_cfg.vocab_size} "
                          f"but the target's is {target_cfg.vocab_size}; the draft must share the target's tokenizer")
    need = longest_prompt + max_new_tokens + lookahead
    for name, cfg in (("draft", draft_cfg), ("target", target_cfg)):
        if cfg.max_len < need:
            raise SampleError(f"{name} context mismatch: prompt ({longest_prompt} tokens) + {max_new_tokens} new "
                              f"tokens + --lookahead {lookahead} = {need} > the {name}'s context of {cfg.max_len} "
                              f"tokens; shorten the prompt or lower --max-new-tokens or --lookahead")
