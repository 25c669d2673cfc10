"""Run N local processes of a multi-process JAX program (default: launch/train.py).

  # 2 processes x 4 CPU devices: the multi-host code path on one machine
  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=4 \\
      --config=configs/quickstart.py --workdir=/tmp/mp_quickstart

  # one process per GPU of this machine
  python launch/local_multiprocess.py --platform=gpu --num_processes=8 \\
      --config=configs/x.py --workdir=/tmp/x

Every flag this launcher does not know is forwarded to each process (use `--`
to forward a flag whose name clashes). Each process gets the variables that
`jaxrl_llm.sharding.distributed_init_args` reads:

  JAX_COORDINATOR_ADDRESS  localhost:<port>   (a free port unless --port)
  JAX_NUM_PROCESSES        N
  JAX_PROCESS_ID           0 .. N-1
  cpu: JAX_PLATFORMS=cpu, XLA_FLAGS += --xla_force_host_platform_device_count=K,
       JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo (cross-process CPU collectives)
  gpu: CUDA_VISIBLE_DEVICES = the process's K GPUs (process i: i*K .. i*K+K-1)

Process 0's output streams to this terminal; the others' go to
<log_dir>/process_<i>.log. If a process fails the others are stopped, the
failing process's log tail is printed, and this launcher exits with its code.
SIGTERM / SIGINT are forwarded to every process (the trainer then saves a
checkpoint and exits, as on a preempted cluster); a second one kills them all
(JAX's distributed runtime itself catches SIGTERM in a program that does not
handle it).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SCRIPT = os.path.join(ROOT, "launch", "train.py")


def free_port() -> int:
  """A TCP port that is free now on localhost (for the coordinator)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n")[0], allow_abbrev=False,
      epilog="Unknown flags are forwarded to every process.")
  parser.add_argument("--num_processes", type=int, default=2, help="processes to start")
  parser.add_argument("--devices_per_process", type=int, default=None,
                      help="CPU: fake devices per process (default 4); GPU: GPUs per process "
                           "(default 1)")
  parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--script", default=DEFAULT_SCRIPT,
                      help="Python program each process runs (default launch/train.py)")
  parser.add_argument("--log_dir", default=None,
                      help="where processes 1..N-1 log (default: a new temporary directory)")
  parser.add_argument("--timeout", type=float, default=None,
                      help="stop every process and fail after this many seconds")
  args, forwarded = parser.parse_known_args(argv)
  if "--" in forwarded:  # argparse leaves the separator in place
    forwarded.remove("--")
  if args.num_processes < 1:
    parser.error(f"--num_processes={args.num_processes} must be >= 1")
  if args.devices_per_process is None:
    args.devices_per_process = 4 if args.platform == "cpu" else 1
  if args.devices_per_process < 1:
    parser.error(f"--devices_per_process={args.devices_per_process} must be >= 1")
  if not os.path.exists(args.script):
    parser.error(f"--script={args.script} does not exist")
  return args, forwarded


def process_env(base: dict, i: int, args, port: int) -> dict:
  """The environment of process i."""
  env = dict(base)
  env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
             JAX_NUM_PROCESSES=str(args.num_processes), JAX_PROCESS_ID=str(i))
  k = args.devices_per_process
  if args.platform == "cpu":
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={k}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  else:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i * k + d) for d in range(k))
    env.pop("JAX_PLATFORMS", None)
  # Each process's Python output unbuffered, so logs are complete on failure.
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _tail(path: str, lines: int = 60) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError as e:
    return f"(no log: {e})"


def _stop(procs, grace: float = 10.0) -> None:
  """SIGTERM every live process, then SIGKILL whatever is left after `grace` seconds."""
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.time() + grace
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.time(), 0.1))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def main(argv=None) -> int:
  args, forwarded = parse_args(sys.argv[1:] if argv is None else argv)
  port = args.port or free_port()
  log_dir = args.log_dir or tempfile.mkdtemp(prefix="jaxrl_llm_mp_")
  os.makedirs(log_dir, exist_ok=True)
  cmd = [sys.executable, args.script, *forwarded]
  print(f"local_multiprocess: {args.num_processes} x {args.devices_per_process} "
        f"{args.platform} device(s), coordinator localhost:{port}; logs of processes "
        f"1..{args.num_processes - 1} in {log_dir}", flush=True)

  procs, logs, files = [], [], []
  for i in range(args.num_processes):
    env = process_env(os.environ, i, args, port)
    if i == 0:
      out, log = None, None  # streams to this terminal
    else:
      log = os.path.join(log_dir, f"process_{i}.log")
      out = open(log, "w")  # noqa: SIM115 (closed below)
      files.append(out)
    procs.append(subprocess.Popen(cmd, env=env, stdout=out,
                                  stderr=subprocess.STDOUT if out else None))
    logs.append(log)

  signalled = []

  def forward(signum, frame):
    """First signal: pass it on (the trainer checkpoints and exits). Second: kill everyone."""
    del frame
    signalled.append(signum)
    for p in procs:
      if p.poll() is None:
        if len(signalled) == 1:
          p.send_signal(signum)
        else:
          p.kill()
    if len(signalled) == 1:
      print(f"local_multiprocess: forwarded signal {signum} to every process; send it again "
            "to kill them", file=sys.stderr, flush=True)
  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}

  start = time.time()
  code = 0
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        print(f"local_multiprocess: process {i} failed with exit code {code}; stopping the "
              "others", file=sys.stderr, flush=True)
        _stop(procs)
        if logs[i] is not None:
          print(f"----- last lines of process {i} ({logs[i]}) -----\n{_tail(logs[i])}",
                file=sys.stderr, flush=True)
        break
      if all(c == 0 for c in codes):
        break
      if args.timeout is not None and time.time() - start > args.timeout:
        print(f"local_multiprocess: timeout after {args.timeout:.0f}s; stopping every process",
              file=sys.stderr, flush=True)
        _stop(procs)
        for i, log in enumerate(logs):
          if log is not None:
            print(f"----- last lines of process {i} ({log}) -----\n{_tail(log)}",
                  file=sys.stderr, flush=True)
        code = 124
        break
      time.sleep(0.2)
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    for f in files:
      f.close()
  return code if code >= 0 else 128 - code  # killed by signal k: 128 + k


if __name__ == "__main__":
  sys.exit(main())
