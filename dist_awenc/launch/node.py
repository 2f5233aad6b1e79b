"""One node's ``accelerate launch`` of a stage: the command the sbatch template and ``awenc submit`` run.

    python -m dist_awenc.launch.node --num-machines N --machine-rank R --processes-per-node P \\
        --main-host HOST --main-port PORT [--gpus G] [--cpus C] [--accelerate-config FILE] \\
        [--mixed-precision no|bf16|fp16] -- <stage> [--config FILE] [key=value ...]

The launcher config decides the engine. With ``--accelerate-config`` the command
passes no ``--multi_gpu``, ``--use_deepspeed`` or ``--cpu`` (any of them replaces
the config's ``distributed_type``: ``--multi_gpu`` turns a ZeRO config into
plain DDP), no ``--mixed_precision`` unless asked, no ``--dynamo_backend``. It
passes what the allocation decides (machines, machine rank, processes, the
rendezvous host and port, CPU threads on a CPU node) and, read from the config,
what accelerate's command line would otherwise shadow: accelerate copies a
config value only where the argument is None, and ``--rdzv_backend`` defaults to
``static`` (so ``rdzv_backend: c10d`` alone does nothing), ``--same_network`` and
``--enable_cpu_affinity`` to False. A multi-node DeepSpeed config gets
``--deepspeed_multinode_launcher standard`` (one torchrun per node, as srun runs
it; accelerate's default, pdsh, would start every node from each node).
Without a config: DDP (``--multi_gpu``) for several processes, one process otherwise.

Loader workers (GPU nodes): ``data.num_workers`` is set to this node's CPUs
per process less one (the training process's own), unless the stage's config
file or an override sets it. On a CPU node the CPUs are the training's threads
(``--num_cpu_threads_per_process``) and the workers stay as configured.

Several machines: every machine rank >= 1 waits until machine rank 0's
rendezvous port accepts connections (up to ``--main-wait-s``, then starts
anyway: torchrun waits for the rendezvous itself). Where the nodes share a host
(two SLURM tasks on one machine), the main host's address is every node's own,
so any node's torchrun may host the c10d store; the one that binds the port
first and is not rank 0 then waits out the rendezvous while rank 0's launcher
refuses the taken port.

Preemption: the command runs as a child whose launcher ignores SIGUSR1/SIGUSR2;
this process forwards SIGUSR1 or SIGUSR2 as SIGUSR1 to every process below it
(again every few seconds, for a rank still starting), the training saves at its
next step boundary on every rank (:mod:`dist_awenc.engine.preempt`) and its main
process writes ``$AWENC_REQUEUE_MARK``; this process then exits with 75, the
requeue status. SIGTERM does not end this process before its child: inside SLURM
every process receives it (the training saves on it too), elsewhere it is passed
to the launcher.

No torch here: this runs on every node before the training starts.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from dist_awenc.errors import ConfigError

REQUEUE_EXIT = 75  # = dist_awenc.engine.preempt.REQUEUE_EXIT (that module is not imported here: no torch)
MARK_ENV = "AWENC_REQUEUE_MARK"
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
RESEND_S = 5.0  # a rank still importing ignores the signal: send it again until the training has stopped
# the flags that choose an engine: none goes on a command line that has a launcher config
ENGINE_FLAGS = ("--multi_gpu", "--use_deepspeed", "--use_fsdp", "--cpu", "--tpu", "--use_megatron_lm")
_DISTRIBUTED = ("NO", "MULTI_CPU", "MULTI_GPU", "DEEPSPEED", "FSDP")
MAIN_WAIT_S = 600.0  # machine ranks >= 1: the longest wait for rank 0's rendezvous port


def read_accelerate_config(path: str | Path) -> dict[str, Any]:
    """An accelerate config file as a mapping, checked for what a launch needs (one-line errors naming the file)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"accelerate config '{p}' does not exist (see configs/accelerate/)")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: expected a mapping of accelerate settings, got {type(doc).__name__}")
    kind = doc.get("distributed_type", "NO")
    kind = "NO" if kind is False else str(kind)  # YAML 1.1 reads an unquoted NO as false
    if kind not in _DISTRIBUTED:
        raise ConfigError(f"{p}: distributed_type '{kind}' is not one of {', '.join(_DISTRIBUTED)}")
    if kind == "DEEPSPEED":
        ds = doc.get("deepspeed_config") or {}
        file = ds.get("deepspeed_config_file")
        if file and not Path(file).is_file():  # accelerate reads it relative to the working directory
            raise ConfigError(f"{p}: deepspeed_config_file '{file}' does not exist (from {os.getcwd()}; run from the "
                              f"repository root or make the path absolute)")
        launcher = ds.get("deepspeed_multinode_launcher")
        if launcher not in (None, "standard"):
            raise ConfigError(f"{p}: deepspeed_multinode_launcher '{launcher}' starts every node from one node; under "
                              "srun (one accelerate launch per node) it must be 'standard' (or absent)")
    return doc


def loader_workers(cpus: int, processes_per_node: int) -> int:
    """Loader workers per training process on a node of ``cpus`` CPUs: its share less one (its own main thread)."""
    return max(0, cpus // max(1, processes_per_node) - 1)


def configured_workers(stage_args: list[str]) -> Optional[str]:
    """``data.num_workers`` as the stage's arguments set it (the last override, else the ``--config`` file's data
    section), or None where they leave it."""
    overrides = [a.split("=", 1)[1] for a in stage_args if a.startswith("data.num_workers=")]
    if overrides:
        return overrides[-1]
    config = next((stage_args[i + 1] for i, a in enumerate(stage_args[:-1]) if a == "--config"), None)
    config = config or next((a.split("=", 1)[1] for a in stage_args if a.startswith("--config=")), None)
    if not config:
        return None
    try:
        doc = yaml.safe_load(Path(config).read_text())
    except (OSError, yaml.YAMLError):
        return None  # the stage itself reports an unreadable config, naming it
    data = doc.get("data") if isinstance(doc, dict) else None
    return str(data["num_workers"]) if isinstance(data, dict) and "num_workers" in data else None


def launch_command(stage_args: list[str], *, num_machines: int = 1, machine_rank: int = 0, processes_per_node: int = 1,
                   main_host: str = "127.0.0.1", main_port: int = 29500, gpus: int = 0, cpus: Optional[int] = None,
                   accelerate_config: Optional[str] = None, mixed_precision: Optional[str] = None,
                   python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch -m dist_awenc <stage_args>`` command of one node, and the environment it adds."""
    if num_machines < 1 or processes_per_node < 1 or not 0 <= machine_rank < num_machines:
        raise ConfigError(f"bad launch shape: {num_machines} machine(s), rank {machine_rank}, "
                          f"{processes_per_node} process(es) per node")
    total = num_machines * processes_per_node
    cmd = [python, "-m", "accelerate.commands.launch"]
    env: dict[str, str] = {}
    if not gpus:
        env["ACCELERATE_USE_CPU"] = "1"  # gloo processes; `--cpu --num_processes N` would start ONE (TOOLCHAIN.md)
    if accelerate_config:
        doc = read_accelerate_config(accelerate_config)
        cmd += ["--config_file", str(accelerate_config), "--rdzv_backend", str(doc.get("rdzv_backend") or "static")]
        if doc.get("same_network") and (doc.get("rdzv_backend") or "static") == "static":
            cmd.append("--same_network")  # (with c10d it would drop the rendezvous endpoint torchrun needs)
        if doc.get("enable_cpu_affinity"):
            cmd.append("--enable_cpu_affinity")
        ds = doc.get("deepspeed_config") or {}
        if doc.get("distributed_type") == "DEEPSPEED" and num_machines > 1 and "deepspeed_multinode_launcher" not in ds:
            cmd += ["--deepspeed_multinode_launcher", "standard"]
        if mixed_precision:
            cmd += ["--mixed_precision", mixed_precision]
    else:
        if total > 1:
            cmd.append("--multi_gpu")  # DDP: the default engine without a launcher config
        elif not gpus:
            cmd.append("--cpu")
        cmd += ["--mixed_precision", mixed_precision or ("bf16" if gpus else "no"), "--dynamo_backend", "no"]
    cmd += ["--num_processes", str(total), "--num_machines", str(num_machines)]
    if total > 1:
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", main_host, "--main_process_port", str(main_port)]
    cpus = cpus or os.cpu_count() or 1
    if not gpus:  # Accelerate's default (2 threads, or every core) oversubscribes small CPU allocations badly
        cmd += ["--num_cpu_threads_per_process", str(max(1, cpus // processes_per_node))]
    args, workers = list(stage_args), configured_workers(stage_args)
    if gpus and workers is None:
        args.append(f"data.num_workers={loader_workers(cpus, processes_per_node)}")
    elif gpus and workers.isdigit() and (int(workers) + 1) * processes_per_node > cpus:
        print(f"awenc launch: warning: data.num_workers={workers} x {processes_per_node} process(es) needs "
              f"{(int(workers) + 1) * processes_per_node} CPUs; this node has {cpus} (loader workers would share them)",
              file=sys.stderr, flush=True)
    return cmd + ["-m", "dist_awenc", *args], env


def wait_for_main(host: str, port: int, timeout: float = MAIN_WAIT_S, poll: float = 0.5) -> bool:
    """Whether ``host:port`` accepted a connection within ``timeout`` seconds (polled every ``poll``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=min(1.0, max(poll, 0.1))).close()
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc), children before their children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid`` and every process below it (a process that ended meanwhile is skipped)."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def launcher_signals() -> None:
    """In the launcher child: ignore the stop signals (accelerate's launcher would die of SIGUSR1; torchrun's agent
    would kill its workers on SIGUSR2); the training processes install their own handlers."""
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def run(cmd: list[str], env: dict[str, str], mark: Optional[str] = None, done: Optional[str] = None) -> int:
    """Run ``cmd``, forwarding the stop signals below it; 75 when the training stopped for a requeue (its main process
    wrote ``mark``), else the command's status (on success ``done`` is created, where given)."""
    mark = mark or os.environ.get(MARK_ENV) or str(Path.cwd() / f".awenc-requeue-{os.getpid()}")
    if Path(mark).exists():
        Path(mark).unlink()  # a mark from an earlier attempt
    asked: list[int] = []  # the handler only records; the loop below forwards (no /proc walk inside a handler)
    previous = {sig: signal.signal(sig, lambda signum, frame: asked.append(signum)) for sig in FORWARDED}
    try:
        proc = subprocess.Popen(cmd, env={**os.environ, **env, MARK_ENV: mark}, preexec_fn=launcher_signals)
        sent, last = 0, 0.0
        while proc.poll() is None:
            stop = [s for s in asked if s != signal.SIGTERM]
            if signal.SIGTERM in asked[sent:] and not os.environ.get("SLURM_JOB_ID"):
                proc.terminate()  # (SLURM sends SIGTERM to every process itself: the training saves on it there)
            if stop and (len(asked) > sent or time.monotonic() - last > RESEND_S):
                signal_tree(proc.pid, signal.SIGUSR1)  # SIGUSR2 (submitit's) as SIGUSR1; again for a rank still starting
                last = time.monotonic()
            sent = len(asked)
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if Path(mark).exists():
        step = Path(mark).read_text().strip()
        print(f"awenc: the training saved a checkpoint at step {step} and stopped for a requeue (exit {REQUEUE_EXIT})",
              file=sys.stderr, flush=True)
        if not os.environ.get(MARK_ENV):
            Path(mark).unlink()
        return REQUEUE_EXIT
    if proc.returncode == 0 and done:
        Path(done).touch()
    return proc.returncode


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m dist_awenc.launch.node [options] -- <stage> [--config FILE] [key=value ...]", file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m dist_awenc.launch.node", description=__doc__.split("\n")[0])
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--processes-per-node", type=int, default=1)
    p.add_argument("--main-host", default="127.0.0.1")
    p.add_argument("--main-port", type=int, default=29500)
    p.add_argument("--gpus", type=int, default=0, help="GPUs on this node (0: CPU processes)")
    p.add_argument("--cpus", type=int, help="CPUs of this node's task (default: SLURM_CPUS_PER_TASK, else all)")
    p.add_argument("--accelerate-config", help="an accelerate config file (configs/accelerate/): it decides the engine")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                   help="override the launcher config's (default without one: bf16 with GPUs, else no)")
    p.add_argument("--done-file", help="created when the stage finished (machine rank 0)")
    p.add_argument("--main-wait-s", type=float, default=MAIN_WAIT_S,
                   help="machine ranks >= 1: wait this long for rank 0's rendezvous port before starting (0: do not)")
    a = p.parse_args(argv[:cut])
    stage_args = argv[cut + 1:]
    if not stage_args:
        p.error("no stage after --")
    cpus = a.cpus or int(os.environ.get("SLURM_CPUS_PER_TASK") or 0) or None
    try:
        cmd, env = launch_command(stage_args, num_machines=a.num_machines, machine_rank=a.machine_rank,
                                  processes_per_node=a.processes_per_node, main_host=a.main_host, main_port=a.main_port,
                                  gpus=a.gpus, cpus=cpus, accelerate_config=a.accelerate_config,
                                  mixed_precision=a.mixed_precision)
    except ConfigError as e:
        print(f"awenc launch: error: {e}", file=sys.stderr)
        return 2
    if a.machine_rank > 0 and a.main_wait_s > 0:
        print(f"awenc launch: machine rank {a.machine_rank} waits for rank 0 at {a.main_host}:{a.main_port}",
              file=sys.stderr, flush=True)
        if not wait_for_main(a.main_host, a.main_port, a.main_wait_s):
            print(f"awenc launch: warning: {a.main_host}:{a.main_port} not listening after {a.main_wait_s:g} s; "
                  "starting anyway (torchrun waits for the rendezvous)", file=sys.stderr, flush=True)
    print("+ " + " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(cmd), file=sys.stderr, flush=True)
    return run(cmd, env, done=a.done_file if a.machine_rank == 0 else None)


if __name__ == "__main__":
    raise SystemExit(main())
