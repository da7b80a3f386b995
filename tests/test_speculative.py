"""speculative.py: greedy output token for token equal to the target's own greedy decoding (a
draft that disagrees, one that half agrees, the target itself), sampled output distributed as the
target's (a tiny vocabulary, exact joint of three tokens, with and without top-k/top-p, batched
rounds and one row alone), the accept/resample rule on hand-made distributions, both caches
rolled back after a rejection, and every bad input as a one-line SampleError."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
import sample
import speculative
from configs.base import ModelConfig
from sampling import SampleError, Sampling

GREEDY = Sampling(temperature=0.0)
CFG = ModelConfig(vocab_size=61, vocab_multiple=64, seq_len=48, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2)
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [40]]
NEW = 20


def numpy_params(cfg: ModelConfig, seed: int, std: float, embed_std: float = 1.0, unembed_std: float = 1.0):
    """Random parameters in the model's shapes drawn by numpy: model.init_params would compile a
    program (or, eagerly, one per parameter shape), seconds each on a busy CPU. Norm scales are
    1, hidden matrices N(0, std)."""
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.ones(spec.shape, spec.dtype)
        scale = {"['embed']": embed_std, "['unembed']": unembed_std}.get(name, std)
        return jnp.asarray(rng.normal(0.0, scale, spec.shape), spec.dtype)
    return jax.tree_util.tree_map_with_path(leaf, model.param_specs(cfg), is_leaf=model.is_spec)


@pytest.fixture(scope="module")
def target():
    # Large weights make the next token depend on the context; a wide embedding keeps the argmax
    # clear of near-ties that rounding between one- and many-token forwards could flip.
    return numpy_params(CFG, 0, std=0.5)


@pytest.fixture(scope="module")
def drafts(target):
    """A draft that disagrees (another random model), one that agrees about half the time (the
    target, perturbed), and the target itself."""
    rng = np.random.default_rng(5)
    noisy = jax.tree.map(lambda w: w + 0.03 * jnp.std(w) * rng.normal(size=w.shape).astype(w.dtype), target)
    return {"other": numpy_params(CFG, 1, std=0.5), "noisy": noisy, "same": target}


# --- Greedy: token for token -------------------------------------------------------------------


@pytest.mark.parametrize("lookahead", [1, 2, 4])
def test_greedy_output_is_the_targets_greedy_decoding(target, drafts, lookahead):
    expected = sample.generate(target, CFG, PROMPTS, NEW, GREEDY)
    rates = {}
    for name, draft in drafts.items():
        out, stats = speculative.generate(target, CFG, draft, CFG, PROMPTS, NEW, lookahead, GREEDY)
        assert out == expected, name
        rates[name] = stats["acceptance_rate"]
    assert rates["same"] == 1.0 and stats["rounds"] == -(-(NEW - 1) // (lookahead + 1))
    assert 0.0 < rates["noisy"] < 1.0 and rates["other"] < rates["noisy"]    # rejections happened


def test_eot_cuts_each_row_at_its_own_first_one(target, drafts):
    greedy = sample.generate(target, CFG, PROMPTS, NEW, GREEDY)
    eot = greedy[0][3]
    out, _ = speculative.generate(target, CFG, drafts["noisy"], CFG, PROMPTS, NEW, 4, GREEDY, eot=eot)
    cut = [row[:row.index(eot)] if eot in row else row for row in greedy]
    assert out == cut and 0 < len(cut[0]) < NEW


# --- Sampling: the target's distribution -------------------------------------------------------

# Vocabulary 8, untied small output heads: a spread-out distribution over the 512 3-token
# continuations. The draft is another architecture and far from the target (asserted below).
T8 = ModelConfig(vocab_size=8, seq_len=16, n_layers=2, d_model=32, n_heads=2, tie_embeddings=False)
D8 = ModelConfig(vocab_size=8, seq_len=16, n_layers=1, d_model=16, n_heads=2, tie_embeddings=False)
PROMPT8 = [1, 5, 2]
DRAWS = 20_000


def reference_probs(logits, sampling: Sampling):
    """Float64 numpy filtering, independent of sampling.py: top-k, then the nucleus."""
    logits = np.asarray(logits, np.float64) / sampling.temperature
    if sampling.top_k:
        kth = np.sort(logits, -1)[..., -sampling.top_k, None]
        logits = np.where(logits >= kth, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if sampling.top_p < 1:
        ordered = -np.sort(-p, -1)
        last = np.argmax(np.cumsum(ordered, -1) >= sampling.top_p, -1)
        p = np.where(p >= np.take_along_axis(ordered, last[..., None], -1), p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return p


def conditionals(params, cfg, sampling):
    """P(x1), P(x2 | x1), P(x3 | x1, x2) after PROMPT8 from full forwards of all 64 prefixes."""
    seqs = jnp.array([PROMPT8 + [a, b] for a, b in itertools.product(range(8), repeat=2)])
    p = reference_probs(model.forward(params, seqs, cfg)[0][:, len(PROMPT8) - 1:], sampling)
    return p[0, 0], p[::8, 1], p[:, 2].reshape(8, 8, 8)


def joint(p1, p2, p3):
    return p1[:, None, None] * p2[:, :, None] * p3


def one_row_each(target, draft, lookahead, sampling):
    """DRAWS independent one-row generations (vmapped), so each row's own acceptances, not the
    batch's fewest, set its rounds: every position of a round and the bonus token get used."""
    def one(key):
        prompt_1T, start_1 = jnp.array([PROMPT8]), jnp.zeros((1,), jnp.int32)
        state = speculative.run(target, draft, prompt_1T, start_1, key, T8, D8, sampling, lookahead, 3, None)
        return state["out"][0, 1:4]
    return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), DRAWS)))


def tv(p, q):
    return 0.5 * np.abs(np.ravel(p) - np.ravel(q)).sum()


@pytest.fixture(scope="module")
def models8():
    return numpy_params(T8, 0, std=0.2, unembed_std=0.25), numpy_params(D8, 1, std=0.2, unembed_std=0.35)


@pytest.mark.parametrize("mode, lookahead, sampling", [
    ("batch", 2, Sampling(1.0)),
    ("one_row_each", 1, Sampling(1.0, top_k=4)),              # the bonus token, top-k
    ("one_row_each", 3, Sampling(1.2, top_k=5, top_p=0.9)),   # deeper rounds, both filters
])
def test_sampled_output_follows_the_targets_distribution(models8, mode, lookahead, sampling):
    target, draft = models8
    if mode == "batch":     # one batch of identical prompts: the shared cache index decides
        run = lambda seed: speculative.generate(target, T8, draft, D8, [PROMPT8] * DRAWS, 3, lookahead,
                                                sampling, seed=seed)
        (out, stats), (again, _), (other, _) = run(0), run(0), run(1)
        assert out == again != other                  # a seed fixes the output
        assert 0 < stats["acceptance_rate"] < 1
        out = np.array(out)
    else:
        out = one_row_each(target, draft, lookahead, sampling)
    counts = np.bincount(out[:, 0] * 64 + out[:, 1] * 8 + out[:, 2], minlength=512)
    p1, p2, p3 = conditionals(target, T8, sampling)
    exact = joint(p1, p2, p3)
    assert exact.sum() == pytest.approx(1.0)
    # The bound: well above the largest of 200 TVs of DRAWS exact draws (about 0.04 here).
    null = np.random.default_rng(0).multinomial(DRAWS, exact.ravel() / exact.sum(), size=200) / DRAWS
    bound = 1.25 * max(tv(row, exact) for row in null)
    assert tv(counts / DRAWS, exact) < bound
    # The test has power: keeping every draft token (the draft's x2, x3 after the target's x1)
    # lands far outside the bound.
    _, q2, q3 = conditionals(draft, D8, sampling)
    assert tv(joint(p1, q2, q3), exact) > 3 * bound


# --- The accept/resample rule and the rollback -------------------------------------------------


def test_verify_keeps_the_batchs_fewest_acceptances_plus_one_token_per_row():
    """K = 3, V = 4, one-hot p and q (greedy): row 0 accepts 2 draft tokens, row 1 only 1, so
    n = 1 and each row emits two tokens: row 0 its accepted d_2, row 1 the target's choice."""
    hot = lambda ids: jax.nn.one_hot(jnp.array(ids), 4)
    d_BK = jnp.array([[1, 2, 3], [1, 2, 3]])
    q_BKV = hot([[1, 2, 3], [1, 2, 3]])
    p_BKV = hot([[1, 2, 0, 1], [1, 0, 0, 2]])
    tokens, n, kept, leading = speculative.verify(jax.random.key(0), d_BK, q_BKV, p_BKV, jnp.array([True, True]))
    assert int(n) == 1 and leading.tolist() == [2, 1] and kept.tolist() == [2, 1]
    assert tokens[:, :2].tolist() == [[1, 2], [1, 0]]
    # A finished row does not hold the others back; all accepted: the bonus from p_{K+1}.
    tokens, n, _, _ = speculative.verify(jax.random.key(0), d_BK, q_BKV, hot([[1, 2, 3, 1], [0, 0, 0, 2]]),
                                         jnp.array([True, False]))
    assert int(n) == 3 and tokens[0].tolist() == [1, 2, 3, 1]


def test_a_rejected_round_rolls_both_caches_back_to_the_accepted_length(target, drafts):
    lookahead, static = 4, dict(target_cfg=CFG, draft_cfg=CFG, sampling=GREEDY, lookahead=4, eot=None)
    prompt_BT = np.array([[0] * (9 - len(p)) + p for p in PROMPTS], np.int32)
    start_B = np.array([9 - len(p) for p in PROMPTS], np.int32)
    key, draft = jax.random.key(0), drafts["other"]
    # One round on its own, jitted as run_fn jits the whole loop.
    state = jax.jit(speculative.prefill, static_argnames=(*static, "max_new"))(
        target, draft, prompt_BT, start_B, key, max_new=NEW, **static)
    state = jax.jit(speculative.spec_round, static_argnames=tuple(static))(target, draft, state, key, **static)
    count = int(state["count"])
    assert count - 1 < lookahead + 1                       # a rejection: fewer than K + 1 emitted
    assert int(state["target"]["index"]) == 9 + count - 1  # through the token before the last
    assert int(state["draft"]["index"]) == 9 + count - 2   # one earlier: it re-reads [prev, last]
    # Continuing from the rolled-back caches sees the kept tokens alone, not the rejected drafts
    # still sitting in the slots past the index.
    out_BW = np.asarray(state["out"])
    seq_BT = np.concatenate([prompt_BT, out_BW[:, 1:count + 1]], axis=1)

    @jax.jit
    def continued_and_recomputed(params, new_BT, cache):
        """The next logits from the rolled-back cache, and from a fresh prefill of the kept tokens."""
        fresh = model.init_cache(CFG, len(PROMPTS), seq_BT.shape[1], start=start_B)
        return (model.forward(params, new_BT, CFG, cache)[0][:, -1],
                model.forward(params, jnp.asarray(seq_BT), CFG, fresh)[0][:, -1])
    for params, new_BT, cache in ((target, out_BW[:, count:count + 1], state["target"]),
                                  (draft, out_BW[:, count - 1:count + 1], state["draft"])):
        np.testing.assert_allclose(*continued_and_recomputed(params, new_BT, cache), atol=1e-4)


# --- Bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("draft_cfg, lookahead, prompt, new, match", [
    (CFG, 0, 3, 10, r"--lookahead 0 must be >= 1"),
    (CFG, -2, 3, 10, r"--lookahead -2 must be >= 1"),
    (CFG, 2, 3, 0, r"--max-new-tokens 0 must be >= 1"),
    (dataclasses.replace(CFG, vocab_size=50), 2, 3, 10,
     r"draft vocabulary mismatch: the draft's model.vocab_size is 50 but the target's is 61"),
    (dataclasses.replace(CFG, seq_len=16), 4, 3, 10,
     r"draft context mismatch: prompt \(3 tokens\) \+ 10 new tokens \+ --lookahead 4 = 17 > the draft's context of 16"),
    (dataclasses.replace(CFG, seq_len=64), 4, 30, 15, r"target context mismatch: .* = 49 > the target's context of 48"),
])
def test_bad_inputs_fail_in_one_line_before_anything_runs(draft_cfg, lookahead, prompt, new, match):
    with pytest.raises(SampleError, match=match) as err:
        speculative.check_draft(CFG, draft_cfg, lookahead, prompt, new)
    assert "\n" not in str(err.value)
    with pytest.raises(SampleError, match=match):     # generate checks first: no parameters needed
        speculative.generate(None, CFG, None, draft_cfg, [[1] * prompt], new, lookahead)


def test_an_empty_prompt_fails_in_one_line():
    with pytest.raises(SampleError, match="every prompt needs at least one token"):
        speculative.generate(None, CFG, None, CFG, [[1, 2], []], 5, 2)
