"""Sample from a trained GPT: python sample.py --run runs/NAME [--prompt TEXT] [--temperature T] ...

    python sample.py --run runs/NAME [--step S] [--prompt TEXT ... | --prompt-file F ...]
        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--num-samples N]
        [--seed S] [--stop-at-eot] [--tokenizer bytes|gpt2|PATH]
    python sample.py --config configs/NAME.py --random-init [section.field=value ...] [...]
    python sample.py --run runs/BIG --draft runs/SMALL [--lookahead K] [...]    # speculative

With --draft (or --draft-config and --random-init), a small model drafts --lookahead tokens
that the target verifies in one forward (speculative.py); the output is distributed as the
target's own sampling. Generation is otherwise two jitted programs around model.forward and its KV cache: a prefill of the whole
(left-padded) prompt batch in one call, then one `lax.while_loop` that decodes every further
token on the device. A single sample is streamed from inside that loop by an ordered io_callback.
How each token is drawn is sampling.py. Sections: generation, loading, streaming, the command line. Decode speed is measured by
`python bench.py decode` (notes/benchmarks.md).
"""
from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

import cli
import model
import quantize
import runs
import speculative
import tokenizer
from configs.base import Config, ConfigError, ModelConfig
from configs.load import load_config
from sampling import SampleError, Sampling, left_pad, sample_next

DEFAULT_NEW_TOKENS = 256    # when --max-new-tokens is not given (fewer if the context is shorter)


# --- Generation ----------------------------------------------------------------------------------


def prefill(params, prompt_BT, cfg: ModelConfig, start_B, key, sampling: Sampling, cache_len: int):
    """Run the whole prompt batch through the model in one call, filling a fresh cache; returns
    the first new token of each row and the cache."""
    cache = model.init_cache(cfg, prompt_BT.shape[0], cache_len, start=start_B)
    logits_BTV, aux = model.forward(params, prompt_BT, cfg, cache=cache)
    cache = aux["cache"]
    return sample_next(jax.random.fold_in(key, 0), logits_BTV[:, -1], sampling), cache


def decode(params, token_B, cfg: ModelConfig, cache, key, sampling: Sampling, steps: int,
           eot: int | None, on_token):
    """`steps` more tokens after token_B, in one while_loop on the device: ([B, steps + 1], cache).

    Token i is drawn with fold_in(key, i), so a seed fixes the output. With `eot`, a row that has
    produced it repeats it, and the loop ends once every row has. `on_token` (host function of
    the [B] new ids) is called from inside the loop by an ordered io_callback, in token order.
    """
    out_BN = jnp.zeros((token_B.shape[0], steps + 1), jnp.int32).at[:, 0].set(token_B)
    done_B = token_B == eot if eot is not None else jnp.zeros_like(token_B, bool)

    def more(carry):
        i, _, _, done_B = carry
        return (i <= steps) & ~jnp.all(done_B)

    def step(carry):
        i, out_BN, cache, done_B = carry
        last_B1 = jax.lax.dynamic_slice_in_dim(out_BN, i - 1, 1, axis=1)
        logits_B1V, aux = model.forward(params, last_B1, cfg, cache=cache)
        cache = aux["cache"]
        token_B = sample_next(jax.random.fold_in(key, i), logits_B1V[:, -1], sampling)
        if eot is not None:
            token_B = jnp.where(done_B, eot, token_B)
            done_B = done_B | (token_B == eot)
        if on_token is not None:
            io_callback(on_token, None, token_B, ordered=True)
        return i + 1, jax.lax.dynamic_update_slice_in_dim(out_BN, token_B[:, None], i, axis=1), cache, done_B
    _, out_BN, cache, _ = jax.lax.while_loop(more, step, (jnp.int32(1), out_BN, cache, done_B))
    return out_BN, cache


prefill_fn = jax.jit(prefill, static_argnames=("cfg", "sampling", "cache_len"))
# The cache is donated and returned, so the loop updates its buffers in place instead of a copy.
decode_fn = jax.jit(decode, static_argnames=("cfg", "sampling", "steps", "eot", "on_token"), donate_argnames="cache")


def generate(params, cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0, eot: int | None = None, on_token=None):
    """Continue each prompt (token ids; lengths may differ) by max_new_tokens tokens, or with
    `eot` until it appears (it is not returned). Returns one list of new ids per prompt.
    `on_token` receives each step's [B] new ids as numpy, while the loop runs."""
    check_lengths(cfg, prompts, max_new_tokens)
    tokens_BT, start_B = left_pad(prompts)
    key = jax.random.key(seed)
    token_B, cache = prefill_fn(params, tokens_BT, cfg, start_B, key, sampling,
                                tokens_BT.shape[1] + max_new_tokens - 1)
    if on_token is not None:
        on_token(np.asarray(token_B))    # before the loop starts, so tokens arrive in order
    out_BN = token_B[:, None]
    if max_new_tokens > 1:
        out_BN, _ = decode_fn(params, token_B, cfg, cache, key, sampling, max_new_tokens - 1, eot, on_token)
    rows = np.asarray(out_BN).tolist()
    return [row[:row.index(eot)] if eot in row else row for row in rows]


def check_lengths(cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Prompt + new tokens must fit the positions the model supports (YaRN stretches RoPE)."""
    longest = max(map(len, prompts))
    if max_new_tokens < 1:
        raise SampleError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    if longest + max_new_tokens > cfg.max_len:
        why = (f"YaRN: {cfg.yarn_factor:g} x {cfg.yarn_original_len or cfg.seq_len}" if cfg.yarn_factor > 1
               else "model.seq_len")
        raise SampleError(f"prompt ({longest} tokens with its leading end-of-text) + {max_new_tokens} new "
                          f"tokens = {longest + max_new_tokens} > the context of {cfg.max_len} tokens "
                          f"({why}); shorten the prompt or lower --max-new-tokens")


# --- Loading -------------------------------------------------------------------------------------
# A run's parameters come from runs.find_checkpoint and runs.load_params (the
# parameters alone, no optimizer built; a damaged newest step falls back to an older one).


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """The parameters train.py would start from with train.seed = seed."""
    key = jax.random.fold_in(jax.random.key(seed), 0)
    return jax.jit(model.init_params, static_argnums=0)(cfg, key)


# --- Streaming -----------------------------------------------------------------------------------


def token_bytes(enc, token: int) -> bytes:
    """A token's bytes; an id the tokenizer lacks (a model vocabulary wider than its tokenizer,
    whose extra rows an untrained model draws freely) shows as the text <|id:N|>."""
    try:
        return enc.decode_single_token_bytes(token)
    except KeyError:
        return f"<|id:{token}|>".encode()


class Streamer:
    """Prints one sample's tokens as they arrive. Bytes are decoded incrementally, so a UTF-8
    character split over byte-level tokens prints once whole."""

    def __init__(self, enc, stop_at: int | None):
        self.enc, self.stop_at, self.stopped = enc, stop_at, False
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token_B) -> None:
        token = int(token_B[0])
        self.stopped = self.stopped or token == self.stop_at
        if not self.stopped:
            print(self.utf8.decode(token_bytes(self.enc, token)), end="", flush=True)

    def close(self) -> None:
        print(self.utf8.decode(b"", final=True), flush=True)


# --- The command line ----------------------------------------------------------------------------


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", help="a train.py run directory, e.g. runs/quickstart")
    source.add_argument("--config", help="a preset, with --random-init: an untrained model")
    parser.add_argument("--step", type=int, help="the checkpoint step to load (default: the latest)")
    parser.add_argument("--random-init", action="store_true", help="with --config: parameters as at step 0")
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--prompt", action="append", help="text to continue; repeat for a batch of prompts")
    text.add_argument("--prompt-file", action="append", help="a file whose text is a prompt; may repeat")
    parser.add_argument("--max-new-tokens", type=int,
                        help=f"default: up to {DEFAULT_NEW_TOKENS}, as the context allows")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, help="keep the k likeliest tokens")
    parser.add_argument("--top-p", type=float, default=1.0, help="keep the nucleus of probability p")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per prompt; one is streamed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-at-eot", action="store_true", help="end a sample at the end-of-text token")
    parser.add_argument("--tokenizer", help="bytes | gpt2 | PATH.tiktoken (default: the run's data's)")
    draft = parser.add_mutually_exclusive_group()
    draft.add_argument("--draft", help="speculative decoding: a smaller run with the same tokenizer")
    draft.add_argument("--draft-config", help="with --random-init: an untrained draft from a preset")
    parser.add_argument("--lookahead", type=int, help="with a draft: tokens it proposes per round (default 4)")
    parser.add_argument("--quantize", help=f"weight-only quantization of the matmul weights: {', '.join(quantize.SCHEMES)}")
    parser.add_argument("overrides", nargs="*", help="with --config: section.field=value")
    return parser.parse_intermixed_args(argv)     # overrides may come before or after the flags


def prompt_texts(args) -> list[str]:
    """The prompts' texts; none given: one empty prompt (sampling from the end-of-text alone)."""
    if args.prompt_file:
        texts = []
        for path in args.prompt_file:
            if not Path(path).is_file():
                raise SampleError(f"--prompt-file {path}: no such file")
            try:
                texts.append(Path(path).read_text(encoding="utf-8"))
            except UnicodeDecodeError as err:
                raise SampleError(f"--prompt-file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} "
                                  f"at offset {err.start}); save it as UTF-8") from None
            except OSError as err:
                raise SampleError(f"--prompt-file {path}: {err.strerror}") from None
            if not texts[-1]:
                raise SampleError(f"--prompt-file {path} is empty; give some text to continue")
        return texts
    for text in args.prompt or []:
        if not text:
            raise SampleError("--prompt is empty; give some text, or leave --prompt out to sample "
                              "from the end-of-text token alone")
    return args.prompt or [""]


def model_source(args) -> tuple[Config, Callable[[], dict]]:
    """The config, and how to get its parameters (called only once every input is checked)."""
    if args.run:
        if args.overrides or args.random_init:
            raise SampleError("--run takes no overrides or --random-init; those go with --config")
        cfg, directory, _ = runs.find_checkpoint(args.run, args.step)
        # Without --step: the newest step whose parameters read back whole (damaged ones are named).
        return cfg, lambda: runs.load_params(cfg, directory, args.step)[1]
    if not args.config or not args.random_init:
        raise SampleError("give --run runs/NAME, or --config configs/NAME.py --random-init")
    if args.step is not None:
        raise SampleError("--step needs --run (a random init has no steps)")
    cfg = load_config(args.config, args.overrides)
    return cfg, lambda: random_params(cfg.model, cfg.train.seed)


def draft_source(args, cfg: Config, enc) -> tuple[Config, Callable[[], dict]] | None:
    """The draft's config and loader, or None; it must decode with the target's tokenizer."""
    if not (args.draft or args.draft_config):
        if args.lookahead is not None:
            raise SampleError("--lookahead needs a draft: --draft runs/SMALL or --draft-config configs/NAME.py")
        return None
    if args.draft_config and not args.random_init:
        raise SampleError("--draft-config gives an untrained draft: add --random-init, or pass --draft runs/SMALL")
    draft = argparse.Namespace(run=args.draft, config=args.draft_config, random_init=not args.draft,
                               step=None, overrides=[])
    draft_cfg, load = model_source(draft)
    draft_enc = tokenizer.for_model(draft_cfg, args.tokenizer, tokenizer.FLAG_HINT)
    if (draft_enc.name, draft_enc.n_vocab, draft_enc.eot_token) != (enc.name, enc.n_vocab, enc.eot_token):
        raise SampleError(f"draft tokenizer mismatch: the draft decodes with {draft_enc.name!r} "
                          f"({draft_enc.n_vocab} ids) but the target with {enc.name!r} ({enc.n_vocab} ids); "
                          f"the draft must be trained on the target's tokenizer")
    return draft_cfg, load


def sample_main(args) -> None:
    """Check every input, then load, generate and print (streaming a single plain sample)."""
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    if args.quantize is not None:
        quantize.check_scheme(args.quantize)
    if args.num_samples < 1:
        raise SampleError(f"--num-samples {args.num_samples} must be >= 1")
    texts = prompt_texts(args)
    cfg, load = model_source(args)
    enc = tokenizer.for_model(cfg, args.tokenizer, tokenizer.FLAG_HINT)
    draft = draft_source(args, cfg, enc)
    eot = enc.eot_token
    # Every training document follows an end-of-text token, so a prompt starts where documents do.
    prompts = [[eot] + enc.encode(text, allowed_special="all") for text in texts]
    room = cfg.model.max_len - max(map(len, prompts))
    max_new = args.max_new_tokens if args.max_new_tokens is not None else max(min(DEFAULT_NEW_TOKENS, room), 1)
    check_lengths(cfg.model, prompts, max_new)
    lookahead = 4 if args.lookahead is None else args.lookahead
    if draft:
        speculative.check_draft(cfg.model, draft[0].model, lookahead, max(map(len, prompts)), max_new)
    params = prepare(load(), cfg.model, args.quantize)
    rows = [(text, prompt) for text, prompt in zip(texts, prompts) for _ in range(args.num_samples)]
    stop = eot if args.stop_at_eot else None
    if draft:
        draft_params = prepare(draft[1](), draft[0].model, args.quantize)
        outs, stats = speculative.generate(params, cfg.model, draft_params, draft[0].model,
                                           [prompt for _, prompt in rows], max_new, lookahead, sampling,
                                           args.seed, stop)
        print(f"speculative: {stats['rounds']} rounds, {stats['accepted']} of {stats['proposed']} draft "
              f"tokens accepted ({stats['acceptance_rate']:.0%})", file=sys.stderr)
        return print_samples(enc, rows, outs)
    streamer = Streamer(enc, stop) if len(rows) == 1 else None
    if streamer:
        print(texts[0], end="", flush=True)
    outs = generate(params, cfg.model, [prompt for _, prompt in rows], max_new, sampling, args.seed, stop,
                    streamer)
    return streamer.close() if streamer else print_samples(enc, rows, outs)


def prepare(params, cfg: ModelConfig, scheme: str | None) -> dict:
    """Loaded parameters as decoding reads them: quantized (the stacked layout), then split."""
    if scheme:
        quantized = quantize.quantize_params(params, cfg, scheme)
        print(quantize.memory_line(params, quantized), file=sys.stderr)
        params = quantized
    return model.decode_layout(params, cfg)


def print_samples(enc, rows: list[tuple[str, list[int]]], outs: list[list[int]]) -> None:
    for i, ((text, _), out) in enumerate(zip(rows, outs)):
        new = b"".join(token_bytes(enc, token) for token in out)
        print(("---\n" if i else "") + text + new.decode("utf-8", errors="replace"))


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        sample_main(args)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
