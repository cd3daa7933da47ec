"""Joining a multi-process JAX cluster from the command line, before anything touches a device.

Every Loom CLI (`python -m train`, `train.eval`, `train.generate`, `train.export`) calls
`initialize` right after parsing. A process learns that it is one of several from:

1. the flags `--coordinator HOST:PORT --num-processes N --process-id I` (all three together),
   or the environment variables LOOM_COORDINATOR, LOOM_NUM_PROCESSES, LOOM_PROCESS_ID (a flag
   wins over its variable); `--num-processes 1` alone forces a single process;
2. otherwise JAX's own cluster detection: a Cloud TPU pod slice (GCE metadata or GKE
   TPU_WORKER_HOSTNAMES), SLURM (srun), Open MPI (mpirun) or Kubernetes (JobSet, with the
   `kubernetes` package). Only the environment's *presence* and its process count are looked
   up here, which reads environment variables (and, on a TPU VM or in a Kubernetes pod, asks
   the local metadata or API server once); nothing waits for a coordinator unless the count
   is above 1.

With neither, the process runs alone and never waits for anyone: a laptop run is unchanged.
CPU processes exchange collectives through gloo.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Mapping

from errors import ConfigError

ENV = {"coordinator": "LOOM_COORDINATOR", "num_processes": "LOOM_NUM_PROCESSES",
       "process_id": "LOOM_PROCESS_ID"}
FLAGS = {"coordinator": "--coordinator", "num_processes": "--num-processes",
         "process_id": "--process-id"}
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where this process stands: None fields are unknown (left to auto-detection)."""
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def explicit(self) -> bool:
        return self.num_processes is not None


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The three cluster flags, on any CLI's parser (or subcommand parser)."""
    group = parser.add_argument_group(
        "multi-process (default: detected on TPU pods, SLURM, Open MPI, Kubernetes; else one "
        "process)")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help=f"address of process 0's coordinator service [{ENV['coordinator']}]")
    group.add_argument("--num-processes", metavar="N",
                       help=f"processes in the run; 1 = alone, skip detection "
                            f"[{ENV['num_processes']}]")
    group.add_argument("--process-id", metavar="I",
                       help=f"this process's index, 0..N-1 [{ENV['process_id']}]")


def _int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected an integer") from None


def from_args(args: argparse.Namespace | None,
              environ: Mapping[str, str] | None = None) -> Cluster:
    """The cluster the flags (else the LOOM_* variables) describe; a ConfigError names the
    flag when they are incomplete or do not fit together."""
    environ = os.environ if environ is None else environ
    given: dict[str, tuple[str, str]] = {}   # field -> (how it was given, text)
    for field, var in ENV.items():
        flag = getattr(args, field, None) if args is not None else None
        if flag not in (None, ""):
            given[field] = (FLAGS[field], str(flag))
        elif environ.get(var, "") != "":
            given[field] = (var, environ[var])
    if not given:
        return Cluster()
    values = {f: (_int(name, text) if f != "coordinator" else text)
              for f, (name, text) in given.items()}
    if values.get("num_processes") == 1 and values.get("process_id", 0) == 0:
        return Cluster(values.get("coordinator"), 1, 0)
    missing = [FLAGS[f] for f in ENV if f not in given]
    if missing:
        shown = ", ".join(f"{name}={text}" for name, text in given.values())
        raise ConfigError(
            f"{shown} needs {' and '.join(missing)} too: --coordinator HOST:PORT, "
            "--num-processes N and --process-id I go together (or LOOM_COORDINATOR, "
            "LOOM_NUM_PROCESSES, LOOM_PROCESS_ID); give none of them on a TPU pod, under SLURM, "
            "Open MPI or Kubernetes to let JAX detect the cluster")
    host, _, port = values["coordinator"].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{given['coordinator'][0]}={values['coordinator']!r}: expected "
                          "HOST:PORT of process 0, e.g. 10.0.0.1:12345")
    n, i = values["num_processes"], values["process_id"]
    if n < 1:
        raise ConfigError(f"{given['num_processes'][0]}={n}: the number of processes is >= 1")
    if not 0 <= i < n:
        raise ConfigError(f"{given['process_id'][0]}={i} with {given['num_processes'][0]}={n}: "
                          f"process ids run from 0 to {n - 1}")
    return Cluster(values["coordinator"], n, i)


def detected_environment() -> tuple[str, int] | None:
    """(name, process count) of the cluster environment JAX's auto-detection would use, or None
    on a plain machine. Asks only whether the environment is present and how many processes it
    has, so it never blocks on a coordinator."""
    try:   # JAX's detectors; private, so a moved module means "nothing detected", with a note
        from jax._src.clusters import ClusterEnv
        envs = [e for e in ClusterEnv._cluster_types if not e.opt_in_only_method]
    except (ImportError, AttributeError) as e:
        log.warning("cannot read JAX's cluster detection (%s); pass --coordinator, "
                    "--num-processes and --process-id for a multi-process run", e)
        return None
    for env in envs:
        if env.is_env_present():
            return env.__name__, int(env.get_process_count())
    return None


def initialize(args: argparse.Namespace | None = None) -> int:
    """Joins the run's cluster (jax.distributed) if this process is one of several; returns the
    number of processes. Call before anything uses a device; calling it again changes
    nothing."""
    import jax   # deferred: the CLIs' --help stays fast
    cluster = from_args(args)
    if jax.distributed.is_initialized():
        return jax.process_count()
    if cluster.explicit:
        if cluster.num_processes == 1:
            return 1
        kwargs = dict(coordinator_address=cluster.coordinator,
                      num_processes=cluster.num_processes, process_id=cluster.process_id)
        how = f"process {cluster.process_id} of {cluster.num_processes}, coordinator " \
              f"{cluster.coordinator}"
    else:
        found = detected_environment()
        if found is None or found[1] <= 1:
            return 1
        kwargs, how = {}, f"{found[0]} environment with {found[1]} processes"
    # CPU processes talk through gloo (the default in recent JAX; stated for older ones). It
    # only concerns the CPU client, so it is harmless next to GPUs and TPUs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"could not join the cluster ({how}): {str(e).splitlines()[0][:300]}"
                          ) from e
    log.info("joined the cluster as process %d of %d (%s); %d local of %d devices",
             jax.process_index(), jax.process_count(), how, jax.local_device_count(),
             jax.device_count())
    return jax.process_count()


def main_process() -> bool:
    """Whether this process prints a CLI's results and writes its files (process 0)."""
    import jax   # deferred: the CLIs' --help stays fast
    return jax.process_index() == 0
