"""sample.py's prefill and decode tokens/s per preset and batch (greedy, random weights and prompt
tokens), next to the bound of reading every weight once per decode step at the copy bandwidth
measured beside each row: `python bench.py decode [--quantize int8]`. With --target and --draft
(two trained runs), speculative decoding's acceptance rate and speedup per --lookahead instead."""
from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import data
import model
import quantize
import sample
import sampling
import speculative
from benchmarks import common
from cli import format_table
from configs.base import ConfigError, ModelConfig
from configs.load import load_config, preset_path

PRESETS = ("quickstart", "design_40m")


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s read + written by a jitted in-place x + 1 over a float32 array far larger than the
    caches (donated, so no fresh output pages are faulted in): the memory's streaming rate as
    XLA's threads see it."""
    box = [jnp.zeros(mib * 2**20 // 4, jnp.float32)]
    bump = jax.jit(lambda x: x + 1, donate_argnums=0)

    def run():
        box[0] = bump(box[0]).block_until_ready()
    return 2 * mib * 2**20 / common.time_steps(run, repeats, warmup=0)[1]


def weight_bytes_per_step(params, cfg: ModelConfig) -> int:
    """Parameter bytes one decode step reads: every matrix, norm and the unembedding (the whole
    padded table); of the input embedding and learned positions only a few rows, ignored."""
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    lookups = params["pos_embed"].nbytes if "pos_embed" in params else 0
    return total - lookups - (0 if cfg.tie_embeddings else params["embed"].nbytes)


def measure(params, cfg: ModelConfig, batch: int, args) -> tuple[float, float]:
    """Prefill and decode tokens/s of one batch of random prompts, greedy."""
    greedy, key = sampling.Sampling(temperature=0.0), jax.random.key(0)
    prompt_BT = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, args.prompt), np.int32)
    prefill_args = (params, prompt_BT, cfg, np.zeros(batch, np.int32), key, greedy, args.prompt + args.new - 1)
    prefill = lambda: jax.block_until_ready(sample.prefill_fn(*prefill_args))
    prefill_s = common.time_steps(prefill, args.repeats, warmup=0)[1]

    def decode_seconds():
        token_B, cache = prefill()
        start = time.perf_counter()
        jax.block_until_ready(sample.decode_fn(params, token_B, cfg, cache, key, greedy, args.new - 1, None, None))
        return time.perf_counter() - start
    decode_seconds()   # the compile
    decode_s = statistics.median(decode_seconds() for _ in range(args.repeats))
    return batch * args.prompt / prefill_s, batch * (args.new - 1) / decode_s


def models(args) -> list[tuple[str, ModelConfig]]:
    """(name, model config): the --config model, or PRESETS; config errors fail in one line."""
    if args.config:
        cfg = load_config(args.config, args.overrides)
        return [(cfg.name, cfg.model)]
    return [(name, load_config(preset_path(name), args.overrides).model) for name in PRESETS]


def run(args) -> list[dict]:
    """`bench.py decode`: one row per model, weight format and batch size."""
    if args.target:
        return speculative_rows(args)
    specs = models(args)
    for name, cfg in specs:
        if args.prompt + args.new > cfg.max_len:
            raise ConfigError(f"--prompt {args.prompt} + --new {args.new} tokens exceed {name}'s context of "
                              f"{cfg.max_len} tokens (model.seq_len)")
    print(common.header("decode", common.hardware(("jax",)),
                        f"greedy, random weights · prompt {args.prompt}, "
                        f"{args.new} new tokens · median of {args.repeats}"), flush=True)
    rows = []
    for name, cfg, weights, params in weight_formats(specs, args.quantize):
        weight_bytes = weight_bytes_per_step(params, cfg)
        for batch in args.batches:
            bandwidth = copy_bandwidth()    # beside each row: other load on the machine drifts
            prefill_rate, decode_rate = measure(params, cfg, batch, args)
            rows.append({"config": name, "dtype": cfg.compute_dtype, "weights": weights, "batch": batch,
                         "weight_bytes": weight_bytes,
                         "copy_bandwidth": bandwidth, "prefill_tokens_per_s": prefill_rate,
                         "decode_tokens_per_s": decode_rate, "bound_tokens_per_s": batch * bandwidth / weight_bytes})
    table = [("preset", "dtype", "weights", "weights read / step", "copy bandwidth", "batch", "prefill tok/s",
              "decode tok/s", "bound tok/s", "decode / bound")]
    table += [(r["config"], r["dtype"], r["weights"], f"{r['weight_bytes'] / 1e6:.1f} MB", f"{r['copy_bandwidth'] / 1e9:.1f} GB/s",
               r["batch"], f"{r['prefill_tokens_per_s']:,.0f}", f"{r['decode_tokens_per_s']:,.0f}",
               f"{r['bound_tokens_per_s']:,.0f}", f"{r['decode_tokens_per_s'] / r['bound_tokens_per_s']:.0%}")
              for r in rows]
    print(format_table(table, right=range(3, 10)))
    return rows


def weight_formats(specs, scheme: str | None):
    """(name, cfg, weight format, parameters in sample.py's decode layout): float, and with
    `scheme` the same random weights quantized (quantize.py) beside them."""
    for name, cfg in specs:
        params = sample.random_params(cfg)
        yield name, cfg, cfg.param_dtype, model.decode_layout(params, cfg)
        if scheme:
            yield name, cfg, scheme, model.decode_layout(quantize.quantize_params(params, cfg, scheme), cfg)


def speculative_rows(args) -> list[dict]:
    """Plain decoding of --target against speculative decoding with --draft at each --lookahead,
    greedy and at temperature 1, from prompts cut from the target's validation shard."""
    (cfg, load), (draft_cfg, draft_load) = (sample.model_source(argparse.Namespace(
        run=run, config=None, step=None, overrides=[], random_init=False)) for run in (args.target, args.draft))
    tokens = data.read_shard(sorted(Path(cfg.data.path).glob("val_*.bin"))[0])
    prompts = [[int(t) for t in tokens[i * 4096: i * 4096 + args.prompt]] for i in range(max(args.batches))]
    for k in args.lookahead:
        speculative.check_draft(cfg.model, draft_cfg.model, k, args.prompt, args.new)
    params, draft = model.decode_layout(load(), cfg.model), model.decode_layout(draft_load(), draft_cfg.model)
    print(common.header("decode", common.hardware(("jax",)), f"speculative: target {args.target}, draft "
                        f"{args.draft} · prompt {args.prompt}, {args.new} new tokens · median of {args.repeats}"))
    rows = []
    for batch, temperature in itertools.product(args.batches, (0.0, 1.0)):
        how = sampling.Sampling(temperature=temperature)
        plain = lambda: sample.generate(params, cfg.model, prompts[:batch], args.new, how)
        plain_s = common.time_steps(plain, args.repeats, warmup=0)[1]
        for k in args.lookahead:
            stats = {}    # the timed runs' own statistics (a seed fixes them), not an extra run

            def spec():
                stats.update(speculative.generate(params, cfg.model, draft, draft_cfg.model, prompts[:batch],
                                                  args.new, k, how)[1])
            spec_s = common.time_steps(spec, args.repeats, warmup=0)[1]
            rows.append({"batch": batch, "temperature": temperature, "lookahead": k,
                         "acceptance_rate": stats["acceptance_rate"], "plain_tokens_per_s": batch * args.new / plain_s,
                         "speculative_tokens_per_s": batch * args.new / spec_s, "speedup": plain_s / spec_s})
    table = [("batch", "temperature", "lookahead K", "acceptance", "plain tok/s", "speculative tok/s", "speedup")]
    table += [(r["batch"], f"{r['temperature']:g}", r["lookahead"], f"{r['acceptance_rate']:.0%}",
               f"{r['plain_tokens_per_s']:,.0f}", f"{r['speculative_tokens_per_s']:,.0f}", f"{r['speedup']:.2f}x")
              for r in rows]
    print(format_table(table, right=range(7)))
    return rows
