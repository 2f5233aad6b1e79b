"""The launcher users call does what its config says, and a preemption signal loses no step (#31).

- The command one node runs (:mod:`dist_awenc.launch.node`: the sbatch template's and ``awenc submit``'s) keeps the
  accelerate config's engine: no flag overrides ``distributed_type``, ``rdzv_backend`` comes from the config, and
  accelerate's own argument resolution, run on that command, picks DeepSpeed for the ZeRO configs.
- One tiny pre-training launched with each shipped accelerate config (on CPU: 2 gloo processes, or 2 "machines"
  for the multi-node config) records, from inside the run, the engine it got: DDP, ZeRO-1, ZeRO-2.
- SIGUSR1 to one rank of a running 2-process training: every rank saves at the same step, the launcher exits 75
  (requeue), and the same command resumes to the weights of an uninterrupted run, bit for bit.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import extra_or_skip, spawn_launch, tiny_overrides, weights
from dist_awenc.config import PretrainConfig, load_config
from dist_awenc.engine.loop import _free_port, checkpoints
from dist_awenc.engine.preempt import REQUEUE_EXIT, Preempted
from dist_awenc.errors import ConfigError
from dist_awenc.launch.node import ENGINE_FLAGS, descendants, launch_command, loader_workers

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "accelerate"
HANG_GUARD_S = 600  # a hang guard only: a launch takes 20-40 s on 2 busy cores
# what each shipped accelerate config runs on CPU processes: (distributed_type, ZeRO stage, processes, machines)
ENGINES = {
    "1gpu.yaml": ("NO", None, 1, 1),
    "8gpu.yaml": ("MULTI_CPU", None, 2, 1),  # DDP (MULTI_GPU on GPUs)
    "8gpu_zero1.yaml": ("DEEPSPEED", 1, 2, 1),
    "8gpu_zero2.yaml": ("DEEPSPEED", 2, 2, 1),
    "cpu_2proc.yaml": ("MULTI_CPU", None, 2, 1),
    "multinode_8gpu.yaml": ("MULTI_CPU", None, 2, 2),  # 2 "machines" of one process each, c10d rendezvous
}


def _resolved(cmd: list[str]):
    """Accelerate's own reading of an ``accelerate launch`` command line (what it would launch), without launching."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(cmd[cmd.index("accelerate.commands.launch") + 1:])
    return _validate_launch_command(args)[0]


def test_every_shipped_accelerate_config_has_an_expected_engine():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(ENGINES)


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_the_node_command_keeps_the_configs_engine_and_rendezvous(name, monkeypatch):
    monkeypatch.chdir(REPO)  # the ZeRO configs name their DeepSpeed JSON relative to the repository
    doc = yaml.safe_load((CONFIGS / name).read_text())
    cmd, env = launch_command(["pretrain"], num_machines=2, machine_rank=1, processes_per_node=8, main_host="node07",
                              main_port=29511, gpus=8, cpus=64, accelerate_config=str(CONFIGS / name))
    assert not set(ENGINE_FLAGS) & set(cmd) and "--mixed_precision" not in cmd and "--dynamo_backend" not in cmd
    assert cmd[cmd.index("--rdzv_backend") + 1] == doc.get("rdzv_backend", "static")
    args = _resolved(cmd)
    assert args.use_deepspeed == (doc["distributed_type"] == "DEEPSPEED")
    assert args.multi_gpu == (doc["distributed_type"] == "MULTI_GPU")
    assert args.rdzv_backend == doc.get("rdzv_backend", "static")  # c10d for multinode_8gpu.yaml
    assert (args.num_processes, args.num_machines, args.machine_rank) == (16, 2, 1)
    if args.use_deepspeed:  # one torchrun per node under srun (accelerate's default, pdsh, starts every node from each)
        assert args.deepspeed_multinode_launcher == "standard"
        assert args.deepspeed_config_file == doc["deepspeed_config"]["deepspeed_config_file"]
        # what the template used to pass: --multi_gpu replaces the config's DeepSpeed with plain DDP
        assert not _resolved(cmd[:3] + ["--multi_gpu"] + cmd[3:]).use_deepspeed
    assert cmd[cmd.index("-m", 3) + 1:] == ["dist_awenc", "pretrain", "data.num_workers=7"]  # 64 CPUs / 8 - 1
    assert env == {}


def test_without_a_config_several_processes_run_ddp_and_one_cpu_process_runs_alone():
    gpu, env = launch_command(["embed"], num_machines=2, processes_per_node=8, gpus=8, cpus=80)
    assert "--multi_gpu" in gpu and gpu[gpu.index("--mixed_precision") + 1] == "bf16" and env == {}
    cpu2, env = launch_command(["embed"], processes_per_node=2, cpus=2)
    assert env == {"ACCELERATE_USE_CPU": "1"} and "--multi_gpu" in cpu2 and "--cpu" not in cpu2  # 2 real processes
    assert cpu2[cpu2.index("--num_cpu_threads_per_process") + 1] == "1" and "data.num_workers" not in " ".join(cpu2)
    cpu1, _ = launch_command(["embed"], cpus=2)
    assert "--cpu" in cpu1 and "--multi_gpu" not in cpu1


def test_loader_workers_come_from_the_cpus_unless_the_stage_sets_them(tmp_path, capsys):
    assert [loader_workers(c, 8) for c in (8, 16, 32, 96)] == [0, 1, 3, 11]
    assert loader_workers(4, 1) == 3
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {num_workers: 5}\n")
    for stage_args in (["pretrain", "--config", str(cfg)], ["pretrain", f"--config={cfg}"],
                       ["pretrain", "data.num_workers=2"]):
        cmd, _ = launch_command(stage_args, processes_per_node=8, gpus=8, cpus=32)
        assert cmd[-len(stage_args):] == stage_args, cmd  # nothing appended
    assert "data.num_workers=5 x 8 process(es) needs 48 CPUs; this node has 32" in capsys.readouterr().err
    cmd, _ = launch_command(["pretrain", "train.epochs=2"], processes_per_node=8, gpus=8, cpus=32)
    assert cmd[-1] == "data.num_workers=3"


def test_a_bad_accelerate_config_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    for text, match in (("distributed_type: TPU_POD\n", "distributed_type 'TPU_POD' is not one of"),
                        ("- a list\n", "expected a mapping"),
                        ("distributed_type: DEEPSPEED\ndeepspeed_config: {deepspeed_config_file: configs/deepspeed/zero1.json}\n",
                         "deepspeed_config_file 'configs/deepspeed/zero1.json' does not exist"),
                        ("distributed_type: DEEPSPEED\ndeepspeed_config: {deepspeed_multinode_launcher: pdsh}\n",
                         "must be 'standard'")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match) as e:
            launch_command(["pretrain"], accelerate_config=str(bad))
        assert "\n" not in str(e.value) and str(bad) in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        launch_command(["pretrain"], accelerate_config=str(tmp_path / "missing.yaml"))


def test_the_sbatch_template_forwards_the_signal_and_sets_the_cluster_environment():
    text = (REPO / "slurm" / "accelerate_multinode.sbatch").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "--multi_gpu" not in body and "--mixed_precision" not in body  # the node command decides, from the config
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "trap stop_for_requeue USR1",
                 'scontrol requeue "$SLURM_JOB_ID"', 'export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"',
                 "-m dist_awenc.launch.node"):
        assert line in text, line
    for var in ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_DEBUG", "GLOO_SOCKET_IFNAME"):
        assert f'{var}="${{{var}:-' in body, var  # a documented default the user edits, an exported value wins


FAKE_LAUNCH = """
import os, signal, subprocess, sys, time
from pathlib import Path
if sys.argv[1] == "agent":  # like torchrun's agent: its worker in a session of its own, SIGUSR1 ignored (inherited)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    sys.exit(subprocess.Popen([sys.executable, __file__, "worker", sys.argv[2]], start_new_session=True).wait())
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
Path(sys.argv[2]).touch()
while not got:
    time.sleep(0.02)
Path(os.environ["AWENC_REQUEUE_MARK"]).write_text("7\\n")  # what the training's main process does once all saved
sys.exit(75)
"""


def test_the_node_launcher_forwards_the_signal_below_it_and_exits_for_the_requeue(tmp_path):
    """SIGUSR1 (or submitit's SIGUSR2) to the node launcher reaches a worker in another session below a launcher that
    ignores it; the worker's requeue mark makes the node launcher exit 75."""
    script = tmp_path / "fake.py"
    script.write_text(FAKE_LAUNCH)
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        ready, mark = tmp_path / f"ready{sig}", tmp_path / f"mark{sig}"
        code = ("import sys; from dist_awenc.launch.node import run; "
                f"sys.exit(run([sys.executable, {str(script)!r}, 'agent', {str(ready)!r}], {{}}, mark={str(mark)!r}))")
        node = subprocess.Popen([sys.executable, "-c", code], env=_env(), stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not ready.exists():
            assert node.poll() is None and time.time() < deadline, node.communicate()[1]
            time.sleep(0.02)
        node.send_signal(sig)
        err = node.communicate(timeout=60)[1]
        assert node.returncode == REQUEUE_EXIT and "saved a checkpoint at step 7" in err, err


# ------------------------------------------------------------------ real launches


def _env() -> dict[str, str]:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU",
              "ACCELERATE_USE_DEEPSPEED", "SLURM_JOB_ID", "AWENC_REQUEUE_MARK"):
        env.pop(k, None)
    return env


def _node(config: str | None, overrides: list[str], *, procs: int = 2, machines: int = 1, rank: int = 0,
          port: int = 0) -> subprocess.Popen:
    """``python -m dist_awenc.launch.node ... -- pretrain <overrides>``: what the sbatch template runs on a node."""
    cmd = [sys.executable, "-m", "dist_awenc.launch.node", "--num-machines", str(machines), "--machine-rank", str(rank),
           "--processes-per-node", str(procs), "--main-port", str(port or _free_port()), "--cpus", str(procs)]
    cmd += ["--accelerate-config", config] if config else []
    return subprocess.Popen(cmd + ["--", "pretrain", *overrides], env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_other_machine_ranks_wait_for_rank_0s_port():
    """dist_awenc.launch.node's wait: True once the port accepts connections (a listener opened 0.5 s later), False
    after the timeout on a port nothing listens on."""
    import threading

    from dist_awenc.launch.node import wait_for_main

    port = _free_port()
    assert not wait_for_main("127.0.0.1", port, timeout=0.3, poll=0.1)
    server = socket.socket()
    threading.Timer(0.5, lambda: (server.bind(("127.0.0.1", port)), server.listen())).start()
    try:
        start = time.monotonic()
        assert wait_for_main("127.0.0.1", port, timeout=30, poll=0.1)
        assert time.monotonic() - start >= 0.4
    finally:
        server.close()


def _engine(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "engine.json").read_text())["starts"]


def _outputs(nodes: list[subprocess.Popen]) -> list[str]:
    """Every node's output; past the hang guard the waiting nodes are killed, so a node that exited early (and left
    another waiting in the rendezvous) still shows its log in the assertion."""
    deadline = time.time() + HANG_GUARD_S
    logs = []
    for p in nodes:
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
        except subprocess.TimeoutExpired:
            p.kill()
            logs.append(p.communicate()[0] + f"\n[killed after the {HANG_GUARD_S} s hang guard]")
    return logs


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_each_shipped_accelerate_config_runs_the_engine_it_names(name, tmp_path):
    kind, zero, procs, machines = ENGINES[name]
    if kind == "DEEPSPEED":
        extra_or_skip("deepspeed", "DeepSpeed is not installed (pip install -e '.[deepspeed]')")
        extra_or_skip("transformers", "Accelerate's DeepSpeed plugin needs transformers")
    over = tiny_overrides(tmp_path, "run", **{"train.max_steps": 2, "train.checkpoint_every": 2})
    port = _free_port()
    node = lambda r: _node(str(CONFIGS / name), over, procs=procs // machines, machines=machines, rank=r, port=port)  # noqa: E731
    # the other machine ranks first: on one host every node's torchrun may host the c10d store (127.0.0.1 is each
    # one's own address), and a rank >= 1 that bound the port first made rank 0's launcher refuse it and waited out
    # the rendezvous (CI at 2781554 and b6ffee1); dist_awenc.launch.node now holds ranks >= 1 until rank 0 listens
    nodes = [node(r) for r in reversed(range(machines))][::-1]
    logs = _outputs(nodes)
    assert [p.returncode for p in nodes] == [0] * machines, "\n".join(f"machine rank {r}: {log[-3000:]}"
                                                                   for r, log in enumerate(logs))
    (got,) = _engine(tmp_path / "run")
    assert (got["distributed_type"], got["zero_stage"], got["num_processes"], got["num_machines"]) == ENGINES[name]
    assert got["device"] == "cpu" and got["backend"] == (None if procs == 1 else "gloo")
    assert got["launcher_deepspeed_config"] == (f"configs/deepspeed/zero{zero}.json" if zero else None)
    assert "".join(logs).count(f"engine: {kind}") == 1  # the global rank 0 logs it (c10d ranks machines as they join)
    assert (tmp_path / "run" / "encoder.safetensors").exists()


def _two_process_reference(out_dir: str, overrides: list[str]) -> None:
    from dist_awenc.ssl.pretrain import pretrain

    pretrain(load_config(PretrainConfig, None, overrides))


@pytest.mark.numerics
def test_sigusr1_to_one_rank_stops_every_rank_at_one_step_and_the_run_resumes_bit_for_bit(tmp_path):
    """Only rank 1 gets the signal; both ranks save at the same step (no periodic checkpoint would fall there), the
    launcher exits 75, and the same command resumes to the weights of an uninterrupted 2-process run."""
    long = {"train.max_steps": 200, "train.epochs": 100, "train.checkpoint_every": 1000, "train.log_every": 1}
    cut = tmp_path / "cut"
    node = _node(str(CONFIGS / "cpu_2proc.yaml"), tiny_overrides(tmp_path, "cut", **long))
    deadline = time.time() + HANG_GUARD_S
    while not (cut / "metrics.jsonl").exists() or len((cut / "metrics.jsonl").read_text().splitlines()) < 2:
        assert node.poll() is None and time.time() < deadline, node.communicate()[0][-3000:]
        time.sleep(0.05)
    ranks = {}
    for pid in descendants(node.pid):
        try:
            env = dict(x.split("=", 1) for x in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in x)
        except OSError:
            continue
        if "dist_awenc" in Path(f"/proc/{pid}/cmdline").read_text() and "RANK" in env:
            ranks[env["RANK"]] = pid
    assert sorted(ranks) == ["0", "1"]
    os.kill(ranks["1"], signal.SIGUSR1)
    log = node.communicate(timeout=HANG_GUARD_S)[0]
    assert node.returncode == REQUEUE_EXIT, log[-3000:]
    (ckpt,) = checkpoints(cut)
    step = int(ckpt.name.removeprefix("step_"))
    assert 2 <= step < 200 and f"saved a checkpoint at step {step}" in log
    assert json.loads((cut / "status.json").read_text())["state"] != "complete"
    resumed = _node(str(CONFIGS / "cpu_2proc.yaml"), tiny_overrides(tmp_path, "cut", **long))
    log = resumed.communicate(timeout=HANG_GUARD_S)[0]
    assert resumed.returncode == 0, log[-3000:]
    assert [(s["start_step"], s["distributed_type"], s["num_processes"]) for s in _engine(cut)] == \
        [(0, "MULTI_CPU", 2), (step, "MULTI_CPU", 2)]
    logged = [json.loads(x)["step"] for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 201))  # each step once
    spawn_launch(_two_process_reference, (str(tmp_path), tiny_overrides(tmp_path, "full", **long)), tmp_path)
    a, b = weights(tmp_path / "full" / "encoder.safetensors"), weights(cut / "encoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.numerics
def test_a_signal_in_process_saves_at_that_step_and_the_resumed_run_is_bit_for_bit(tmp_path, monkeypatch):
    """One process: SIGUSR1 after step 1 (checkpoints every 3) saves step 1 and raises Preempted; resuming from
    there ends with the weights of an uninterrupted run; engine.json holds both starts."""
    import dist_awenc.ssl.pretrain as pre

    full = pre.pretrain(load_config(PretrainConfig, None, tiny_overrides(tmp_path, "full")))
    real_fit = pre.fit

    def signalling_fit(*args, after_step=None, **kw):
        def hook(model, step):
            after_step(model, step)
            if step == 1:
                os.kill(os.getpid(), signal.SIGUSR1)
        return real_fit(*args, after_step=hook, **kw)

    monkeypatch.setattr(pre, "fit", signalling_fit)
    with pytest.raises(Preempted, match="stopped at step 1"):
        pre.pretrain(load_config(PretrainConfig, None, tiny_overrides(tmp_path, "cut")))
    assert [p.name for p in checkpoints(tmp_path / "cut")] == ["step_00000001"]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the loop's handler is gone with the loop
    monkeypatch.setattr(pre, "fit", real_fit)
    resumed = pre.pretrain(load_config(PretrainConfig, None, tiny_overrides(tmp_path, "cut")))
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [s["start_step"] for s in _engine(tmp_path / "cut")] == [0, 1]


def test_a_training_loop_that_ends_in_an_error_gives_the_stop_signals_back(tmp_path, monkeypatch):
    """An exception out of fit (a step's hook, as the benchmarks stop their timed runs) restores the default
    SIGUSR1/SIGUSR2 handlers: a stale handler would swallow the next run's preemption signal."""
    import dist_awenc.ssl.pretrain as pre

    class Stop(Exception):
        pass

    real_fit = pre.fit

    def failing_fit(*args, after_step=None, **kw):
        def hook(model, step):
            after_step(model, step)
            assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)  # listening during the loop
            raise Stop

        return real_fit(*args, after_step=hook, **kw)

    monkeypatch.setattr(pre, "fit", failing_fit)
    with pytest.raises(Stop):
        pre.pretrain(load_config(PretrainConfig, None, tiny_overrides(tmp_path, "failed")))
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL and signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
