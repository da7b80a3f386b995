"""sharding.py and multi-device / multi-process training, in subprocesses with simulated CPU
devices (JAX_NUM_CPU_DEVICES) and real jax.distributed processes on localhost."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import model
import sharding
from configs.base import ConfigError, MeshConfig, ModelConfig
from configs.load import load_config

from conftest import REPO, records, run_train

# The tiny model of conftest.TINY, batch 8 so that it splits over 4 devices.
SIX_STEPS = ["train.batch_size=8", "eval.every=6", "train.steps=6", "train.ckpt_every=100"]
FSDP4 = ["mesh.strategy=fsdp", "mesh.data=1", "mesh.fsdp=4"]
RTOL = 1e-5   # relative: only the order of float reductions differs across layouts


def env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}


def train(corpus, run_dir, *args, devices=1, check=True):
    return run_train(corpus, run_dir, *SIX_STEPS, *args, devices=devices, check=check)


def launch_local(corpus, run_dir, processes, devices, *args):
    from conftest import TINY
    cmd = ["bash", "scripts/launch_local.sh", str(processes), str(devices), "--config", "configs/quickstart.py",
           *TINY, *SIX_STEPS, f"data.path={corpus}", f"train.run_dir={run_dir}", *args]
    proc = subprocess.run(cmd, cwd=REPO, env={**env(devices), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return proc


def losses(run_dir) -> dict:
    return {record["step"]: record["loss"] for record in records(run_dir)}


def assert_same_losses(a: dict, b: dict, steps):
    """Whole-run losses within RTOL of each other, relative to the loss (a scalar per step)."""
    for step in steps:
        assert abs(a[step] - b[step]) <= RTOL * abs(b[step]), f"step {step}: {a[step]} vs {b[step]}"


@pytest.fixture(scope="module")
def four_device_fsdp(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("fsdp4") / "run"
    proc = train(corpus, run, *FSDP4, devices=4)
    return run, proc


def test_one_device_and_four_give_the_same_losses(corpus, four_device_fsdp, tmp_path):
    train(corpus, tmp_path / "one", devices=1)
    train(corpus, tmp_path / "dp4", "mesh.strategy=dp", devices=4)
    one = losses(tmp_path / "one")
    assert_same_losses(one, losses(tmp_path / "dp4"), range(1, 7))
    assert_same_losses(one, losses(four_device_fsdp[0]), range(1, 7))



def test_the_loss_in_sequence_blocks_trains_like_the_whole_loss_under_fsdp(corpus, four_device_fsdp, tmp_path):
    # The fixture's loss runs in cross_entropy.auto_blocks(8, 32, 32) = 8 blocks of the batch-sharded states.
    train(corpus, tmp_path / "whole", *FSDP4, "model.loss_chunks=1", devices=4)
    assert_same_losses(losses(tmp_path / "whole"), losses(four_device_fsdp[0]), range(1, 7))

def test_two_processes_match_one_and_checkpoints_cross_layouts(corpus, four_device_fsdp, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    launch_local(corpus, whole, 2, 2, *FSDP4)
    assert_same_losses(losses(whole), losses(four_device_fsdp[0]), range(1, 7))
    launch_local(corpus, split, 2, 2, *FSDP4, "--stop-after", "3")
    # Resume the 2-process, 4-way FSDP checkpoint in 1 process on a 2-device mesh: resharded on load.
    resumed = train(corpus, split, "mesh.strategy=fsdp", "mesh.data=1", "mesh.fsdp=2", devices=2)
    assert "resuming from step 3" in resumed.stdout
    assert_same_losses(losses(split), losses(whole), range(1, 7))


def test_sharding_table_under_four_way_fsdp(four_device_fsdp):
    _, proc = four_device_fsdp
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.startswith("['")}
    wqkv = rows["['blocks']['attn']['wqkv']"]       # 2 x 32 x 2 x 3 x 16 float32, split over fsdp
    assert wqkv[2] == "(None," and wqkv[3] == "'fsdp',"
    assert int(wqkv[-1].replace(",", "")) == 2 * 32 * 2 * 3 * 16 * 4 // 4
    assert "mesh data=1 x fsdp=4 x tensor=1 x expert=1, strategy fsdp" in proc.stdout
    assert "params per device" in proc.stdout and "opt_state per device" in proc.stdout


def probe(devices: int, code: str) -> dict:
    """Run `code` (which prints one JSON line) in a fresh process with simulated devices."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env(devices),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_partition_specs_and_fallback_to_replication():
    got = probe(4, """
        import json, jax, model, sharding
        from configs.base import MeshConfig, ModelConfig
        cfg = ModelConfig(vocab_size=100, d_model=64, n_heads=6, n_kv_heads=3, head_dim=16, n_layers=2, d_ff=128)
        mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2))
        specs = model.param_specs(cfg)
        out = {}
        for name, spec in [("wqkv", specs["blocks"]["attn"]["wqkv"]), ("wo", specs["blocks"]["attn"]["wo"]),
                           ("w_out", specs["blocks"]["mlp"]["w_out"]), ("embed", specs["embed"])]:
            pspec, note = sharding.partition_spec(name, spec, sharding.rules_for("fsdp+tp"), mesh)
            out[name] = [list(pspec), note]
        print(json.dumps(out))
    """)
    assert got["wqkv"] == [[None, "fsdp", None, None, None], "kv_heads=3 % tensor=2: replicated"]
    assert got["wo"] == [[None, "tensor", None, "fsdp"], ""]
    assert got["w_out"] == [[None, "tensor", "fsdp"], ""]
    assert got["embed"] == [[None, "fsdp"], ""]


def test_a_mesh_axis_used_twice_is_rejected():
    spec = model.param_specs(ModelConfig(d_model=64, n_heads=4))["blocks"]["mlp"]["w_in"]
    mesh = sharding.make_mesh(MeshConfig())
    with pytest.raises(sharding.ShardingError, match=r"rules map two axes of w_in .* onto mesh axis 'fsdp'"):
        sharding.partition_spec("w_in", spec, {"embed": "fsdp", "mlp": "fsdp"}, mesh)


def test_mesh_must_match_the_devices():
    with pytest.raises(sharding.ShardingError) as err:
        sharding.make_mesh(MeshConfig(data=2, fsdp=1))
    assert str(err.value) == ("mesh data=2 x fsdp=1 x tensor=1 x expert=1 does not match the 1 devices; set "
                              "mesh.data, mesh.fsdp, mesh.tensor, mesh.expert so their product is 1 (one may be -1)")


@pytest.mark.parametrize("rules, message", [
    ({"fsdp": {"embd": "fsdp"}}, "maps 'embd' -> 'fsdp'; logical axes: "),
    ({"fsdp": {"embed": "fsd"}}, "maps 'embed' -> 'fsd'; logical axes: "),
])
def test_a_misspelled_rule_fails_in_one_line(rules, message):
    with pytest.raises(sharding.ShardingError, match=message) as err:
        sharding.check_rules({**sharding.RULES, **rules})
    assert "\n" not in str(err.value)
    with pytest.raises(sharding.ShardingError, match="lists"):
        sharding.check_rules({**sharding.RULES, "zero3": {}})


def test_errors_before_compiling(corpus, tmp_path):
    proc = train(corpus, tmp_path / "r", *FSDP4, "train.batch_size=6", devices=4, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: train.batch_size=6 (micro-batches of 6 with train.grad_accum=1) does not divide over the "
        "data-parallel size 4 (mesh data x fsdp x expert); use a batch size that is a multiple of 4")
    proc = train(corpus, tmp_path / "r", "mesh.data=3", devices=4, check=False)
    assert proc.returncode == 1 and "does not match the 4 devices" in proc.stderr.strip().splitlines()[-1]
    with pytest.raises(ConfigError, match="mesh.strategy='zero3' is not valid"):
        load_config("configs/quickstart.py", ["mesh.strategy=zero3"])
