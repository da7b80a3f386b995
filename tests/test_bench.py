"""Smoke tests of bench.py: every subcommand runs end to end on a tiny model or shard and prints
its table, and --json holds its rows. Speed is never asserted, only the tables' structure."""
import gzip
import json
import os
import re
import subprocess
import sys
from unittest import mock

import pytest

import bench
from benchmarks import common, profile, train_step
from configs.load import load_config, preset_path
from conftest import REPO

TINY = ["--config", "configs/quickstart.py", "model.n_layers=1", "model.d_model=32", "model.n_heads=2"]
CANNED = {"cpu": "a test CPU", "isa": ["avx2"], "cores": 2, "thp": "madvise", "python": "3.11", "gpu": False,
          "peak": 1e11, "frameworks": {"jax": {"version": "0", "gpu": False, "device": "cpu", "peak": 1e11}}}


@pytest.fixture
def canned_hardware(monkeypatch):
    """A fixed hardware description: measuring the matmul peaks takes seconds per framework, and
    test_train_runs_both_frameworks measures them for real."""
    monkeypatch.setattr(common, "hardware", lambda frameworks=(): CANNED)


def run_bench(args, tmp_path, capsys) -> tuple[str, list[dict]]:
    """bench.main in this process: (what it printed, the rows it wrote with --json). The
    environment it sets for its workers (XLA_FLAGS, GLIBC_TUNABLES) is put back afterwards."""
    rows = tmp_path / "rows.json"
    with mock.patch.dict(os.environ):
        bench.main([*args, "--json", str(rows)])
    return capsys.readouterr().out, json.loads(rows.read_text())


def table_lines(out: str, first_header: str) -> list[str]:
    """The table that starts with the header row whose first column is `first_header`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header + " "))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def test_train_runs_both_frameworks(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)   # restored after the test
    out, rows = run_bench(["train", *TINY, "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "0",
                           "--modes", "jit,eager", "--malloc", "default"], tmp_path, capsys)
    peaks = [line.split()[0] for line in out.splitlines() if " matmul peak " in line]
    assert peaks == ["jax", "torch"]
    assert re.search(r"; huge pages (always|madvise|never|none)\) · python", out)
    table = table_lines(out, "framework")
    assert table[0].split() == ["framework", "mode", "ms/step", "tokens/s", "MFU", "peak", "mem", "compile", "s"]
    assert [line.split()[:2] for line in table[1:3]] == [["jax", "jit"], ["torch", "eager"]]
    assert "JAX/PyTorch throughput:" in out and "cores busy during this run" in out
    assert [(r["framework"], r["mode"]) for r in rows] == [("jax", "jit"), ("torch", "eager")]
    assert all(r["ms_per_step"] > 0 and r["peak_mem_bytes"] > 0 and "error" not in r for r in rows)
    assert "malloc default; peak mem:" in out and {r["malloc"] for r in rows} == {"default"}


def test_train_layouts_run_jax_per_attention_backend(tmp_path, capsys, canned_hardware, monkeypatch):
    # The JAX step itself is measured by the test above; here only which runs are made, the table,
    # and the hugepages malloc (the default) set for the workers and recorded.
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)   # restored after the test
    monkeypatch.setattr(common, "in_worker", lambda fn, *args: fn(*args))
    monkeypatch.setattr(train_step, "measure_jax", lambda *args: {"seconds": 0.1, "compile_s": 1.0,
                                                                  "peak_mem_bytes": 2**20})
    out, rows = run_bench(["train", *TINY, "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "0",
                           "--layouts"], tmp_path, capsys)
    table = table_lines(out, "config")
    assert table[0].split() == ["config", "attn_impl", "tokens", "ms/step", "tokens/s", "MFU"]
    assert [line.split()[:2] for line in table[1:]] == [["quickstart", "xla"], ["quickstart", "einsum"]]
    assert {r["framework"] for r in rows} == {"jax"} and "error" not in rows[0]
    assert "\nenvironment: GLIBC_TUNABLES=glibc.malloc.hugetlb=1\n" in out and "\nmalloc hugepages; peak mem:" in out
    assert {r["malloc"] for r in rows} == {"hugepages"}


def test_each_malloc_setting_reaches_the_spawned_workers(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)   # restored after the test
    for name, tunables in common.MALLOCS.items():
        assert common.use_malloc(name) == name
        assert common.in_worker(os.getenv, "GLIBC_TUNABLES") == tunables
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert common.malloc_label() == "GLIBC_TUNABLES=glibc.malloc.arena_max=2"
    with pytest.raises(SystemExit, match=r"^error: argument --malloc: invalid choice: 'jemalloc' \(choose from "
                       r"'hugepages', 'default', 'tuned'\)$"):
        bench.parse_args(["profile", "--malloc", "jemalloc"])


def test_time_steps_resets_the_peak_after_the_first_call():
    calls = []
    first, median = common.time_steps(lambda: calls.append("run"), 2, 1, reset_peak=lambda: calls.append("reset"))
    assert calls == ["run", "reset", "run", "run", "run"] and first >= 0 and median >= 0


def test_reset_peak_rss_lowers_the_high_water_mark():
    block = bytearray(64 * 2**20)   # touched: 64 MiB resident, then freed
    del block
    common.reset_peak_rss()
    assert common.peak_rss() < common.rss_bytes() + 32 * 2**20


@pytest.mark.parametrize("name,batch,seq", sorted(set(train_step.SUITE["cpu"] + train_step.SUITE["gpu"])))
def test_suite_presets_load_and_fit(name, batch, seq):
    assert seq <= load_config(preset_path(name)).model.max_len


def test_small_6x384_is_a_nanogpt_shape():
    m = load_config("configs/small_6x384.py").model
    assert (m.n_layers, m.d_model, m.n_heads, m.seq_len, m.padded_vocab, m.d_ff) == (6, 384, 6, 256, 320, 1536)
    assert (m.pos, m.norm, m.activation, m.gated) == ("learned", "layernorm", "gelu", False)


def test_loader_compares_with_raw_slicing(tmp_path, capsys):
    out, rows = run_bench(["loader", "--steps", "3", "--cold-steps", "2", "--repeats", "1", "--batch", "4",
                           "--seq", "32", "--shard-tokens", "20000"], tmp_path, capsys)
    table = table_lines(out, "page")
    assert table[0].startswith("page cache") and "loader / raw" in table[0]
    assert [line.split()[0] for line in table[1:]] == ["cold", "warm"]
    assert all(r["raw_tokens_per_s"] > 0 and r["loader_tokens_per_s"] > 0 for r in rows)


def test_decode_rows_per_batch(tmp_path, capsys, canned_hardware):
    out, rows = run_bench(["decode", *TINY, "--batches", "1,2", "--prompt", "8", "--new", "3", "--repeats", "1"],
                          tmp_path, capsys)
    table = table_lines(out, "preset")
    assert "decode tok/s" in table[0] and "bound tok/s" in table[0]
    assert [line.split()[:2] for line in table[1:]] == [["quickstart", "float32"]] * 2
    assert [r["batch"] for r in rows] == [1, 2] and all(r["decode_tokens_per_s"] > 0 for r in rows)


def test_mesh_compares_strategies(tmp_path, capsys, canned_hardware):
    out, rows = run_bench(["mesh", *TINY, "--batch", "4", "--seq", "16", "--steps", "1", "--warmup", "0",
                           "--malloc", "default"], tmp_path, capsys)
    table = table_lines(out, "strategy")
    assert [line.split()[0] for line in table[1:]] == ["dp", "fsdp"]
    assert [r["strategy"] for r in rows] == ["dp", "fsdp"]
    assert rows[1]["params_bytes_per_device"] < rows[0]["params_bytes_per_device"]


def test_profile_splits_the_step_into_op_categories(tmp_path, capsys, canned_hardware, monkeypatch):
    monkeypatch.setattr(common, "in_worker", lambda fn, *args: fn(*args))
    out, rows = run_bench(["profile", *TINY, "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "0"],
                          tmp_path, capsys)
    table = table_lines(out, "category")[1:len(profile.CATEGORIES) + 2]
    assert [line.split("  ")[0] for line in table] == [*profile.CATEGORIES, "all ops"]
    seconds = rows[0]["categories"]
    # The model's projections, its attention, its norms and its activations are all found.
    assert all(seconds[name] > 0 for name in ("weight matmuls", "attention matmuls", "reductions", "elementwise"))
    assert set(seconds) <= set(profile.CATEGORIES) and rows[0]["temp_bytes"] > 0


def test_profile_puts_the_twins_step_beside_jaxs(tmp_path, capsys, canned_hardware, monkeypatch):
    monkeypatch.setattr(common, "in_worker", lambda fn, *args: fn(*args))
    out, rows = run_bench(["profile", *TINY, "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "0",
                           "--twin"], tmp_path, capsys)
    table = table_lines(out, "category")
    assert re.split(r"\s{2,}", table[0]) == ["category", "JAX ms/step", "share", "PyTorch eager ms/step", "share",
                                             "what it holds"]
    assert table[len(profile.CATEGORIES) + 2].startswith("outside the weight matmuls ")
    assert [row["framework"] for row in rows] == ["jax", "torch"]
    jax_s, torch_s = rows[0]["categories"], rows[1]["categories"]
    assert set(torch_s) <= set(profile.CATEGORIES)
    # The twin's linears, its attention, its norms and its activations land where JAX's do.
    assert all(torch_s[name] > 0 for name in ("weight matmuls", "attention matmuls", "reductions", "elementwise"))
    assert sum(torch_s.values()) <= 1.05 * rows[1]["wall_s"] and sum(jax_s.values()) > 0
    assert "PyTorch eager: slowest ops" in out and "aten::" in out


def test_profile_refuses_the_twin_on_a_gpu_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common, "hardware", lambda frameworks=(): {**CANNED, "gpu": True})
    with pytest.raises(SystemExit) as err:
        run_bench(["profile", *TINY, "--twin"], tmp_path, capsys)
    assert str(err.value) == "error: --twin profiles the PyTorch twin on a CPU only; leave it out on a GPU"


@pytest.mark.parametrize("name, category", [
    ("aten::addmm", "weight matmuls"), ("aten::mm", "weight matmuls"), ("aten::bmm", "attention matmuls"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention matmuls"),
    ("aten::native_layer_norm_backward", "reductions"), ("aten::_log_softmax", "reductions"),
    ("aten::sum", "reductions"), ("aten::gelu_backward", "elementwise"), ("aten::_fused_adamw_", "elementwise"),
    ("aten::add_", "elementwise"), ("aten::copy_", "copies and transposes"), ("aten::fill_", "buffer fills"),
    ("aten::_foreach_mul_", "elementwise"), ("aten::maximum", "elementwise"), ("aten::amax", "reductions"),
    ("aten::embedding_dense_backward", "other"), ("aten::view", "other"), ("aten::expand", "other"),
    ("aten::as_strided", "other"), ("aten::_unsafe_view", "other"),
    ("autograd::engine::evaluate_function: AddmmBackward0", "other"), ("Optimizer.step#AdamW.step", "other")])
def test_torch_ops_fall_into_jaxs_categories(name, category):
    assert profile.torch_category(name) == category


def test_ab_pairs_config_and_compile_option_variants(tmp_path, capsys, canned_hardware, monkeypatch):
    monkeypatch.setattr(common, "in_worker", lambda fn, *args: fn(*args))
    out, rows = run_bench(["ab", *TINY, "--batch", "2", "--seq", "16", "--rounds", "3", "--warmup", "0",
                           "--variant", "base", "--variant", "full:model.remat=full",
                           "--variant", "exact:xla_cpu_enable_fast_math=false"], tmp_path, capsys)
    table = table_lines(out, "variant")
    assert [line.split()[0] for line in table[1:]] == ["base", "full", "exact"]
    assert [row["name"] for row in rows] == ["base", "full", "exact"]
    assert all(len(row["times"]) == 3 and row["seconds"] > 0 and row["compile_s"] > 0 for row in rows)
    assert rows[0]["ratio"] == rows[0]["ratio_q1"] == rows[0]["ratio_q3"] == 1.0
    assert all(row["ratio_q1"] <= row["ratio"] <= row["ratio_q3"] for row in rows)
    # The same model and data under each: the same loss, up to the fusions' rounding.
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5) == rows[2]["loss"]


def test_ab_refuses_a_bad_compile_option_in_one_line(tmp_path, capsys, canned_hardware, monkeypatch):
    monkeypatch.setattr(common, "in_worker", lambda fn, *args: fn(*args))
    with pytest.raises(SystemExit) as err:
        run_bench(["ab", *TINY, "--variant", "base", "--variant", "odd:xla_cpu_enable_fast_math=maybe"],
                  tmp_path, capsys)
    assert str(err.value).startswith("error: --variant odd: ") and "\n" not in str(err.value)


GPU_HLO = """%fused_add (a: f32[8,8]) -> f32[8,8] {
  %a = f32[8,8]{1,0} parameter(0)
  ROOT %add.0 = f32[8,8]{1,0} add(%a, %a)
}

ENTRY %main (p: f32[8,8]) -> f32[8,8] {
  %p = f32[8,8]{1,0} parameter(0)
  %custom-call.2 = f32[8,8]{1,0} custom-call(%p, %p), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}, metadata={op_name="jit(f)/jvp()/dot_general"}
  %custom-call.3 = f32[8,8]{1,0} custom-call(%p, %p), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(f)/transpose(jvp())/attention"}
  ROOT %fusion.1 = f32[8,8]{1,0} fusion(%custom-call.2), kind=kLoop, calls=%fused_add, metadata={op_name="jit(f)/add"}
}
"""


def test_profile_counts_a_gpu_trace_by_its_stream_kernels(tmp_path):
    names = profile.categories(GPU_HLO)
    assert names["custom-call.2"] == ("weight matmuls", "forward")
    assert names["custom-call.3"] == ("attention matmuls", "backward")
    meta = lambda pid, tid, kind, name: {"ph": "M", "pid": pid, **({"tid": tid} if tid else {}), "name": kind,
                                         "args": {"name": name}}
    kernel = lambda pid, tid, name, dur, op=None: {"ph": "X", "pid": pid, "tid": tid, "name": name, "dur": dur,
                                                   **({"args": {"hlo_op": op}} if op else {})}
    events = [meta(1, None, "process_name", "/host:CPU"), meta(2, None, "process_name", "/device:GPU:0 (H200)"),
              meta(2, 7, "thread_name", "Stream #7(Compute)"), meta(2, 9, "thread_name", "XLA Ops"),
              kernel(1, 1, "fusion.1", 400),                          # the host's launch: not the kernel
              kernel(2, 9, "fusion.1", 300),                          # a span derived from the kernel
              kernel(2, 7, "loop_add_fusion", 300, "fusion.1"), kernel(2, 7, "sm90_xmma_gemm", 500, "custom-call.2"),
              kernel(2, 7, "cudnn_fmha_bwd", 200, "custom-call.3"), kernel(2, 7, "memset32", 50)]
    (tmp_path / "run").mkdir()
    with gzip.open(tmp_path / "run" / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    per_category, per_phase, per_op = profile.op_times(str(tmp_path), names)
    assert dict(per_category) == pytest.approx({"elementwise": 300e-6, "weight matmuls": 500e-6,
                                                "attention matmuls": 200e-6, "other": 50e-6})
    assert dict(per_phase) == pytest.approx({"update": 300e-6, "forward": 500e-6, "backward": 200e-6})
    assert per_op["memset32"] == pytest.approx(50e-6)


def test_gpu_suite_refuses_an_unknown_only_name_in_one_line(tmp_path):
    script = REPO / "scripts" / "gpu_suite.sh"
    listed = re.search(r'^names="([^"]*)"', script.read_text(), re.M).group(1).split()
    assert listed == re.findall(r"^bench (\S+) ", script.read_text(), re.M)   # every row, in order
    proc = subprocess.run(["bash", str(script), str(tmp_path / "out")], env={**os.environ, "ONLY": "train_gpt2"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "" and not (tmp_path / "out").exists()
    assert proc.stderr == f"error: ONLY names train_gpt2; choose from: {' '.join(listed)}\n"


def test_avx2_cap_reaches_both_frameworks_and_the_header(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    for name in common.AVX2_ENV:   # recorded as they were, so the teardown restores them
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    common.cap_at_avx2()
    assert common.os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_cpu_max_isa=AVX2"
    assert "ATEN_CPU_CAPABILITY=avx2" in common.header("train", CANNED)


@pytest.mark.parametrize("args,message", [
    ([], "the following arguments are required"),
    (["train"], "give --config configs/NAME.py, --suite or --layouts"),
    (["train", "--suite", "--batch", "2"], "--batch and --seq go with --config"),
    (["train", "--config", "configs/quickstart.py", "--modes", "jit,fast"], "comma-separated subset"),
    (["train", "--config", "configs/quickstart.py", "model.n_layer=2"], "unknown key 'model.n_layer'"),
    (["train", "--config", "configs/quickstart.py", "optim.name=muon"], "the PyTorch twin has AdamW only"),
    (["profile", "--twin", "optim.name=muon"], "the PyTorch twin has AdamW only"),
    (["decode", "--new", "1"], "--new must be at least 2"),
    (["loader", "--steps", "0"], "must be a positive integer"),
    (["ab", "--variant", "a=b"], "--variant 'a=b': give NAME or NAME:ITEM,ITEM"),
    (["ab", "--variant", "x", "--variant", "x"], "--variant names must differ: x, x"),
    (["ab", "--variant", "x:model.remat"], "item 'model.remat' needs KEY=VALUE"),
    (["ab", "--variant", "x:model.remat=sometimes"], "model.remat='sometimes' is not valid"),
])
def test_errors_are_one_line(args, message):
    proc = subprocess.run([sys.executable, "bench.py", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and message in proc.stderr
