"""Multiple-choice tasks scored completion-style, as llm.c scores HellaSwag: each ending follows
its context, and the model's log-loss over the ending's own tokens ranks the endings. acc_norm
picks the lowest mean loss, acc the lowest total. evaluate.py is the command line; train.py runs
the eval.tasks at its evaluation steps. notes/evaluation.md has the schema and the details.

Rows (context + one ending) are sorted by length and batched at a few bucket lengths (powers of
two up to the model's context), so scoring compiles once per bucket, not per item; the rows of a
batch are split over the mesh's data axes like a training batch.
"""
from __future__ import annotations

import functools
import json
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import model
import sharding
import tokenizer
from configs.base import Config, ConfigError, ModelConfig

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
SCHEMAS = {"hellaswag": "ctx", "mc": "context"}     # schema -> its context field
MIN_BUCKET = 32


class TaskError(ConfigError):
    """A one-line problem with a task file or its tokenizer, naming the file, line and field."""


@dataclass(frozen=True)
class Item:
    context: tuple[int, ...]
    endings: tuple[tuple[int, ...], ...]
    label: int


# --- Reading items -------------------------------------------------------------------------------


def _tokens(value, enc, why: str, where: str, vocab_size: int) -> tuple[int, ...]:
    """Text (encoded by the run's tokenizer) or a list of token ids, checked."""
    if isinstance(value, str):
        if enc is None:
            raise TaskError(f"{where} is text but the run has no tokenizer ({why}); give token ids")
        ids = enc.encode(value, allowed_special="all")
    elif isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        ids = value
    else:
        raise TaskError(f"{where} must be text or a list of token ids, got {type(value).__name__}")
    if not ids:
        raise TaskError(f"{where} is empty")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise TaskError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return tuple(ids)


def parse_item(record, schema: str, enc, why: str, where: str, cfg: ModelConfig) -> Item:
    """One jsonl record: {ctx|context, endings, label}. HellaSwag's text endings get a leading
    space (llm.c). Rows longer than the context are cut from the left of the context."""
    fields = (SCHEMAS[schema], "endings", "label")
    if not isinstance(record, dict):
        raise TaskError(f"{where}: expected a JSON object with fields {', '.join(fields)}")
    for field in fields:
        if field not in record:
            raise TaskError(f"{where}: no {field!r} field; the {schema} schema is {{{', '.join(fields)}}}")
    endings, label = record["endings"], record["label"]
    if not isinstance(endings, list) or len(endings) < 2:
        raise TaskError(f"{where}: 'endings' must be a list of at least 2 endings")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise TaskError(f"{where}: label {label!r} must be an integer in [0, {len(endings)})")
    prefix = " " if schema == "hellaswag" else ""
    context = _tokens(record[fields[0]], enc, why, f"{where}: {fields[0]}", cfg.vocab_size)
    rows = []
    for k, ending in enumerate(endings):
        ending = prefix + ending if isinstance(ending, str) else ending
        rows.append(_tokens(ending, enc, why, f"{where}: endings[{k}]", cfg.vocab_size))
        if len(rows[-1]) >= cfg.max_len:
            raise TaskError(f"{where}: endings[{k}] has {len(rows[-1])} tokens, leaving no room for context "
                            f"in the model's {cfg.max_len}")
    return Item(context, tuple(rows), label)


def read_items(path, schema: str, enc, why: str, cfg: ModelConfig, max_items: int | None = None) -> list[Item]:
    """The items of a jsonl file (blank lines skipped), the first `max_items` if given."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such file")
    items = []
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            if max_items is not None and len(items) >= max_items:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            items.append(parse_item(record, schema, enc, why, f"{path}:{number}", cfg))
    if not items:
        raise TaskError(f"{path}: no items")
    return items


def download_hellaswag(path) -> None:
    """Fetch the official HellaSwag validation set (10,042 items) to `path`; needs a network."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        urllib.request.urlretrieve(HELLASWAG_URL, part)
    except OSError as e:
        raise TaskError(f"downloading {HELLASWAG_URL} failed: {e}") from None
    part.replace(path)


# --- Scoring -------------------------------------------------------------------------------------


def score_rows(params, tokens_RT, mask_RT, cfg: ModelConfig):
    """Summed next-token loss over each row's masked targets, and their count: ([R], [R])."""
    logits_RTV, _ = model.forward(params, tokens_RT, cfg)
    logits_RTV = logits_RTV[:, :-1]
    target_RT = jnp.take_along_axis(logits_RTV, tokens_RT[:, 1:, None], axis=-1)[..., 0]
    nll_RT = jax.nn.logsumexp(logits_RTV, axis=-1) - target_RT
    mask_RT = mask_RT[:, 1:]
    return jnp.sum(nll_RT * mask_RT, axis=1), jnp.sum(mask_RT, axis=1)


def bucket_length(n: int, max_len: int) -> int:
    """The padded length of a row of n tokens: a power of two from MIN_BUCKET, at most max_len."""
    width = MIN_BUCKET
    while width < n:
        width *= 2
    return min(width, max_len)


class Scorer:
    """score_rows jitted for one model config on one mesh, compiled once per batch shape; rows
    are split over the mesh's data axes, results come back replicated."""

    def __init__(self, cfg: ModelConfig, mesh):
        self.cfg = cfg
        self.rows = sharding.batch_sharding(mesh)
        self.devices = sharding.data_parallel_size(mesh)
        self.jitted = jax.jit(functools.partial(score_rows, cfg=cfg), out_shardings=sharding.replicated(mesh))
        self.compiled, self.compile_seconds = {}, 0.0

    def __call__(self, params, tokens_RT: np.ndarray, mask_RT: np.ndarray):
        # Every process holds the whole batch, so each device takes its rows from it.
        args = [jax.make_array_from_callback(x.shape, self.rows, lambda index, x=x: x[index])
                for x in (tokens_RT, mask_RT)]
        if tokens_RT.shape not in self.compiled:
            start = time.perf_counter()
            self.compiled[tokens_RT.shape] = self.jitted.lower(params, *args).compile()
            self.compile_seconds += time.perf_counter() - start
        nll_R, count_R = self.compiled[tokens_RT.shape](params, *args)
        return np.asarray(nll_R), np.asarray(count_R)


def score_items(scorer: Scorer, params, items: list[Item], batch_size: int) -> list[np.ndarray]:
    """Per item, [endings, 2]: each ending's summed loss and token count. Batches hold
    batch_size items' worth of rows (rounded up to the data-parallel devices), padded with
    masked rows; every row is padded on the right to its batch's bucket length."""
    max_len = scorer.cfg.max_len
    rows = [(j, k, (item.context + ending)[-max_len:], len(ending))
            for j, item in enumerate(items) for k, ending in enumerate(item.endings)]
    rows.sort(key=lambda row: len(row[2]))
    per_batch = batch_size * max(len(item.endings) for item in items)
    per_batch = -(-per_batch // scorer.devices) * scorer.devices
    scores = [np.zeros((len(item.endings), 2)) for item in items]
    for start in range(0, len(rows), per_batch):
        chunk = rows[start:start + per_batch]
        width = bucket_length(len(chunk[-1][2]), max_len)
        tokens_RT = np.zeros((per_batch, width), np.int32)
        mask_RT = np.zeros((per_batch, width), np.float32)
        for r, (_, _, row, n_ending) in enumerate(chunk):
            tokens_RT[r, :len(row)] = row
            mask_RT[r, len(row) - n_ending:len(row)] = 1.0
        nll_R, count_R = scorer(params, tokens_RT, mask_RT)
        for r, (j, k, _, _) in enumerate(chunk):
            scores[j][k] = nll_R[r], count_R[r]
    return scores


def accuracy(items: list[Item], scores: list[np.ndarray]) -> dict[str, float]:
    """acc_norm: the lowest mean loss per ending token is the label; acc: the lowest total loss."""
    labels = np.array([item.label for item in items])
    norm = np.array([np.argmin(s[:, 0] / s[:, 1]) for s in scores])
    total = np.array([np.argmin(s[:, 0]) for s in scores])
    return {"acc_norm": float(np.mean(norm == labels)), "acc": float(np.mean(total == labels))}


# --- Tasks during training -----------------------------------------------------------------------


def task_schema(name: str) -> str:
    """A task named hellaswag* reads HellaSwag's format; any other name the mc schema."""
    return "hellaswag" if name.startswith("hellaswag") else "mc"


class TaskRunner:
    """A run's eval.tasks (NAME=PATH), read and tokenized once when built, so a bad file fails
    before training; called with the parameters, returns {NAME/acc_norm, NAME/acc}."""

    def __init__(self, cfg: Config, mesh):
        self.tasks, self.batch_size = [], cfg.eval.batch_size
        enc, why = tokenizer.for_model_or_reason(cfg) if cfg.eval.tasks else (None, "")
        for entry in cfg.eval.tasks:
            name, _, path = entry.partition("=")
            try:
                self.tasks.append((name, read_items(path, task_schema(name), enc, why, cfg.model, cfg.eval.max_items)))
            except TaskError as e:
                raise TaskError(f"eval.tasks {name}: {e}") from None
        self.scorer = Scorer(cfg.model, mesh) if self.tasks else None

    def __call__(self, params) -> dict[str, float]:
        metrics = {}
        for name, items in self.tasks:
            result = accuracy(items, score_items(self.scorer, params, items, self.batch_size))
            metrics |= {f"{name}/{key}": value for key, value in result.items()}
        return metrics
