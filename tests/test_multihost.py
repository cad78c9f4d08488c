"""Multi-host: jax.distributed settings from the environment, a 2-process run through launch/local_multiprocess.sh
against one process on the same 8-device mesh, and the TPU pod / SLURM launchers (against stub gcloud / srun)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r1jax.parallel import distributed_config
from r1jax.parallel.mesh import first_slurm_host

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def test_distributed_config_from_environment():
    assert distributed_config({}) is None  # one process: nothing to start
    explicit = {"R1JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "R1JAX_NUM_PROCESSES": "4", "R1JAX_PROCESS_ID": "2"}
    assert distributed_config(explicit) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                            "process_id": 2}
    assert distributed_config({**explicit, "R1JAX_NUM_PROCESSES": "1", "R1JAX_PROCESS_ID": "0"}) is None
    assert distributed_config({**explicit, "R1JAX_LOCAL_DEVICE_IDS": "0,1"})["local_device_ids"] == [0, 1]
    with pytest.raises(ValueError, match=r"missing \['R1JAX_PROCESS_ID'\]"):
        distributed_config({"R1JAX_COORDINATOR_ADDRESS": "h:1", "R1JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match=r"R1JAX_PROCESS_ID=4 must be in \[0, R1JAX_NUM_PROCESSES=4\)"):
        distributed_config({**explicit, "R1JAX_PROCESS_ID": "4"})
    with pytest.raises(ValueError, match=r"R1JAX_COORDINATOR_ADDRESS='h' needs a port, e.g. h:12355"):
        distributed_config({**explicit, "R1JAX_COORDINATOR_ADDRESS": "h"})
    slurm = {"SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_JOB_NODELIST": "gpu[007-008,012],cpu1"}
    assert distributed_config(slurm) == {"coordinator_address": "gpu007:12355", "num_processes": 16,
                                         "process_id": 5}
    assert distributed_config({**slurm, "R1JAX_COORDINATOR": "head", "R1JAX_COORDINATOR_PORT": "999"}) == {
        "coordinator_address": "head:999", "num_processes": 16, "process_id": 5}
    assert distributed_config({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "a"}) is None
    assert first_slurm_host("node1") == "node1"
    assert first_slurm_host("n[3,5-9]") == "n3"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",) and not k.startswith("R1JAX_")}
    # LLVM level 0: the two processes compile the same tiny model; results stay f32-exact enough to compare.
    env.update({"XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
                **extra})
    return env


def _two_processes(out, *extra):
    """The selftest on 2 processes x 4 CPU devices (data parallel across them); process 0's result."""
    cmd = [str(LAUNCH / "local_multiprocess.sh"), "-d", "4", "2", sys.executable, "-m", "r1jax.parallel.selftest",
           "--data", "1", "--dcn-data", "2", "--expert", "4", "--out", str(out), *extra]
    multi = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    lines = [json.loads(line.split("] ", 1)[1]) for line in multi.stdout.splitlines() if '] {"loss"' in line]
    assert sorted(r["process_index"] for r in lines) == [0, 1]
    assert all(r["process_count"] == 2 and r["device_count"] == 8 and r["local_device_count"] == 4 for r in lines)
    assert lines[0]["mesh"] == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert lines[0]["loss"] == lines[1]["loss"]
    return json.loads(out.read_text())


def test_two_processes_compute_the_same_loss_as_one(tmp_path):
    """2 processes x 4 CPU devices (gloo collectives between them); the (data=2, expert=4) mesh is laid out as a
    hybrid mesh with data parallelism across the processes (dcn_data=2), as on a multi-slice pod. Same loss and
    gradient norm as one 8-device process, also with context parallelism (each row's positions over the 4 expert
    devices of its process, the experts' all-to-all over the same devices)."""
    multi_result = _two_processes(tmp_path / "result.json")
    context_result = _two_processes(tmp_path / "context.json", "--context", "expert")
    single = subprocess.run([sys.executable, "-m", "r1jax.parallel.selftest", "--data", "2", "--expert", "4"],
                            env=_env(XLA_FLAGS="--xla_backend_optimization_level=0 "
                                               "--xla_force_host_platform_device_count=8"),
                            cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads(single.stdout.strip().splitlines()[-1])
    assert one["process_count"] == 1 and one["device_count"] == 8
    for result in (multi_result, context_result):
        assert abs(result["loss"] - one["loss"]) < 1e-5
        assert abs(result["grad_norm"] - one["grad_norm"]) < 1e-5 * one["grad_norm"]


def test_grpo_rollout_across_two_processes():
    """tests/multihost_rollout.py on 2 processes x 2 devices: each process's rollout rows are its own prompts'
    samples and scores, advantages and metrics are the whole batch's (the script's docstring lists its checks)."""
    cmd = [str(LAUNCH / "local_multiprocess.sh"), "-d", "2", "2", sys.executable, str(ROOT / "tests" /
                                                                                         "multihost_rollout.py")]
    run = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [json.loads(line.split("] ", 1)[1]) for line in run.stdout.splitlines() if '"rollout": "ok"' in line]
    assert sorted(r["process_index"] for r in lines) == [0, 1]
    assert lines[0]["reward"] == lines[1]["reward"]


@pytest.mark.slow
def test_train_command_across_two_processes(tmp_path):
    """The tiny R1-Zero config (SFT pretraining, then GRPO with evaluations) through `r1jax train` on 2 processes x
    2 devices: both finish, process 0 alone writes the metrics, each GRPO step logs the whole batch's numbers. The
    GRPO stage keeps its best evaluation's weights (collective saves, process 0's files)."""
    cmd = [str(LAUNCH / "local_multiprocess.sh"), "-d", "2", "2", sys.executable, "-m", "r1jax.cli", "train",
           "--config", str(ROOT / "tests" / "configs" / "tiny_r1zero.py"), "--workdir", str(tmp_path),
           "--config.grpo.steps=2", "--config.grpo.best_metric=eval/pass@1"]
    run = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "pretrain" / "DONE").exists() and (tmp_path / "grpo" / "DONE").exists()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["stage"] == "grpo" and "reward" in r]
    assert steps == [1, 2]  # once each: process 1 does not write
    grpo = [r for r in records if r["stage"] == "grpo" and "reward" in r]
    # 2 prompts x G=4 per step over both processes, 12 new tokens at most
    assert all(r["generated_tokens"] <= 8 * 12 and r["completion_len"] * 8 == r["generated_tokens"] for r in grpo)
    # Both processes report the same stage summaries (global counts and evaluations), wall times aside.
    for stage in ("pretrain", "grpo"):
        found = [json.loads(line.split(f"] {stage}: ", 1)[1]) for line in run.stdout.splitlines()
                 if f"] {stage}: {{" in line]
        assert len(found) == 2 and [{k: v for k, v in f.items() if k != "wall_s"} for f in found] == [
            {k: v for k, v in found[0].items() if k != "wall_s"}] * 2, found
    best = json.loads((tmp_path / "grpo" / "best" / "best.json").read_text())
    assert best["step"] in (0, 2) and found[0]["best"] == best and (tmp_path / "grpo" / "best" / best["dir"]).is_dir()


@pytest.mark.slow
def test_rollout_ahead_across_two_processes(tmp_path):
    """rollout_ahead=1 on 2 processes x 2 devices: the training loop and the thread sampling ahead take turns issuing
    collectives (r1jax.rl.rollout_ahead), through checkpoints (which keep the batch sampled ahead) and evaluations;
    with a learning rate of 0 the run trains on the plain run's batches: same rewards, losses and completions."""
    def train(workdir, *extra):
        cmd = [str(LAUNCH / "local_multiprocess.sh"), "-d", "2", "2", sys.executable, "-m", "r1jax.cli", "train",
               "--config", str(ROOT / "tests" / "configs" / "tiny_r1zero.py"), "--workdir", str(workdir),
               "--config.stages=grpo", "--config.grpo.init=scratch", "--config.grpo.lr=0", "--config.grpo.steps=4",
               "--config.grpo.eval_every=2", *extra]
        done = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if r["stage"] == "grpo"], (workdir / "grpo" / "completions.jsonl").read_text()

    plain, plain_rows = train(tmp_path / "plain")
    ahead, ahead_rows = train(tmp_path / "ahead", "--config.grpo.rollout_ahead=1")
    assert (tmp_path / "ahead" / "grpo" / "rollout_ahead" / "step_2.npz").exists()
    for key in ("reward", "loss", "completion_len", "eval/pass@1"):
        want = {r["step"]: r[key] for r in plain if key in r}
        assert want and {r["step"]: r[key] for r in ahead if key in r} == want, key
    assert ahead_rows == plain_rows and all("rollout_wait_s" in r for r in ahead if "reward" in r and r["step"] > 1)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["r1_pipeline_arith", "reward_model_toy"])
def test_experiment_across_two_processes(experiment, tmp_path):
    """Every stage kind on 2 processes x 2 devices, from scratch: the R1 recipe (sft, grpo, rejection, distill,
    evaluate; ~4 minutes on 2 cores) and a reward model trained, then scoring GRPO rollouts (~1 minute). Process 0
    writes the data files, the others wait for them."""
    cmd = [str(LAUNCH / "local_multiprocess.sh"), "-d", "2", "2", sys.executable, "-m", "r1jax.cli", "train",
           "--config", str(ROOT / "experiments" / f"{experiment}.py") + ":runlocal", "--workdir", str(tmp_path)]
    run = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    config = json.loads((tmp_path / "config.json").read_text())
    for stage in config["stages"].split(","):
        assert (tmp_path / stage / "DONE").exists(), stage
    if experiment == "r1_pipeline_arith":
        assert json.loads((tmp_path / "results.json").read_text())


def test_every_process_takes_the_tokenizer_barrier_whatever_it_finds(tmp_path, monkeypatch):
    """Process 0 trains the run's tokenizer with no collective; a slower process 1 may then find the file already
    written. It must still take the barrier: skipping it paired process 0's barrier with process 1's next
    collective (seen as device_put's "not the same on each process" in a 2-process run)."""
    import jax

    from r1jax.configs import base_config
    from r1jax.data import train_sentencepiece
    from r1jax.pipeline import stages

    train_sentencepiece([f"{a} + {b} = {a + b}" for a in range(30) for b in range(30)], 300,
                        tmp_path / "tokenizer.model")
    taken = []
    monkeypatch.setattr(stages.hosts, "barrier", taken.append)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    cfg = base_config()
    cfg.tokenizer.kind = "spm_train"
    tok = stages.build_tokenizer(cfg, tmp_path, tasks=None)
    assert taken == ["tokenizer"]
    assert tok.decode(tok.encode("12 + 7 = 19")) == "12 + 7 = 19"


def test_local_launcher_sets_env_and_fails_if_any_process_fails():
    prog = ("import os; print(os.environ['R1JAX_PROCESS_ID'], os.environ['R1JAX_NUM_PROCESSES'], "
            "os.environ['R1JAX_COORDINATOR_ADDRESS'], os.environ['XLA_FLAGS'].split()[-1])")
    run = subprocess.run([str(LAUNCH / "local_multiprocess.sh"), "-d", "2", "3", sys.executable, "-c", prog],
                         env=_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = sorted(line for line in run.stdout.splitlines() if line.startswith("["))
    assert [line.split()[:3] for line in lines] == [["[0]", "0", "3"], ["[1]", "1", "3"], ["[2]", "2", "3"]]
    assert len({line.split()[3] for line in lines}) == 1 and lines[0].split()[3].startswith("127.0.0.1:")
    assert all(line.endswith("--xla_force_host_platform_device_count=2") for line in lines)
    # Process 1 fails at once; process 0 would sleep for a minute: the launcher stops it and returns 1's status.
    prog = "import os, sys, time; time.sleep(60) if os.environ['R1JAX_PROCESS_ID'] == '0' else sys.exit(3)"
    t0 = time.monotonic()
    bad = subprocess.run([str(LAUNCH / "local_multiprocess.sh"), "2", sys.executable, "-c", prog], env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 3 and time.monotonic() - t0 < 30 and "stopping the others" in bad.stderr
    usage = subprocess.run([str(LAUNCH / "local_multiprocess.sh"), "two", "true"], env=_env(), capture_output=True,
                           text=True, timeout=60)
    assert usage.returncode == 2 and "number of processes" in usage.stderr


def _stub(tmp_path, name):
    """An executable that records its arguments (one per line) in <name>.args."""
    stub = tmp_path / name
    stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {tmp_path / (name + ".args")}\n')
    stub.chmod(0o755)
    return tmp_path / (name + ".args")


def test_tpu_pod_launcher_runs_on_all_workers_with_overrides_intact(tmp_path):
    args_file = _stub(tmp_path, "gcloud")
    env = _env(PATH=f"{tmp_path}:{os.environ['PATH']}", TPU_SSH_FLAGS="--internal-ip")
    run = subprocess.run([str(LAUNCH / "tpu_pod.sh"), "--project", "proj", "--setup", "source venv/bin/activate",
                          "my-pod", "us-east5-a", "--", "python", "-m", "r1jax.cli", "train", "exp.py",
                          "--config.run_name=a b", "--config.note=it's"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    args = args_file.read_text().splitlines()
    assert args[:6] == ["compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone"]
    assert "--worker=all" in args and args[args.index("--project") + 1] == "proj" and args[-1] == "--internal-ip"
    remote = args[args.index("--command") + 1]
    assert remote.startswith("set -e; cd ~/r1jax; source venv/bin/activate; python -m r1jax.cli train exp.py")
    # The remote shell sees each override as one argument, quotes intact.
    words = subprocess.run(["bash", "-c", "printf '%s\\n' " + remote.split("; ", 3)[3].split(" ", 5)[5]],
                           capture_output=True, text=True).stdout.splitlines()
    assert words == ["--config.run_name=a b", "--config.note=it's"]


def test_slurm_script_sets_coordinator_and_runs_one_task_per_gpu(tmp_path):
    args_file = _stub(tmp_path, "srun")
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/usr/bin/env bash\necho gpu-a01\necho gpu-a02\n')
    scontrol.chmod(0o755)
    env = _env(PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_NTASKS="16")
    script = LAUNCH / "slurm_gpu.sbatch"
    assert "#SBATCH --gpus-per-task=1" in script.read_text()
    run = subprocess.run(["bash", str(script), "python", "-m", "r1jax.parallel.selftest", "--expert", "8"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "coordinator gpu-a01:12355" in run.stderr
    assert args_file.read_text().splitlines() == ["--kill-on-bad-exit=1", "python", "-m", "r1jax.parallel.selftest",
                                                  "--expert", "8"]
