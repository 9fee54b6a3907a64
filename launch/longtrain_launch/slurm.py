"""Inside a Slurm job that `hydra/launcher=slurm` (hydra-submitit-launcher) submitted.

Every task of the job runs the Hydra task function. With one task (one node, the default)
nothing changes: the driver starts its embedded local Ray. With several (one per node):

- the task of global rank 0 starts a Ray head on its node (`ray start --head`), publishes its
  address in the job's submitit folder, waits until every task's node has joined, and runs the
  driver against it (`launcher.kind=ray`, `launcher.address=<head>`);
- every other task joins as a Ray worker node (`ray start --address=<head>`) and stays until
  the driver is done, the head is gone, or its own Ray node dies; then it stops that node.

Either way the worker group's CPUs and GPUs per rank follow the allocation: each Ray node
offers its task's CPUs (`SLURM_CPUS_PER_TASK`) and its node's GPUs (`SLURM_GPUS_ON_NODE`),
shared evenly by the ranks that land there.

Slurm delivers a job's warning signal (`--signal=USR1@T`) to every process of its steps,
Ray's raylet, GCS and actors included; they have no handler and would die of it before the
driver could checkpoint. Ray processes are therefore started with USR1 / USR2 ignored (the
disposition is inherited across exec), and only the driver and the tasks themselves act on it.

The cluster uses Ray's token authentication with a token made for the job: a file (mode
0600) beside the address in the job's folder, passed to Ray by path, never logged. Files
carry the Slurm restart count, so a requeued job never reads its previous attempt's.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

from longtrain.config.schema import LauncherConfig, RunConfig
from longtrain.observability.log import get_logger

# How long the head may take to start (rank 0) and others may wait for its address.
HEAD_START_S = 300
# How long rank 0 waits for every task's node to join before giving up.
JOIN_WAIT_S = 600
# A worker leaves once the head has been unreachable this long.
HEAD_LOST_S = 30
# Grace given to a `ray start --block` process to stop its node.
STOP_WAIT_S = 30
POLL_S = 1.0
# Slurm's warning signals (submitit's preemption signal is one of them): see the module doc.
JOB_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def _ignore_job_signals() -> None:
    for sig in JOB_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextmanager
def job_signals_ignored_by_children() -> Iterator[None]:
    """Processes started inside the block (e.g. by `ray.init()`) ignore JOB_SIGNALS; this
    process's own handlers are back when the block ends. A no-op outside the main thread."""
    try:
        previous = {sig: signal.getsignal(sig) for sig in JOB_SIGNALS}
        _ignore_job_signals()
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@dataclass(frozen=True)
class Allocation:
    """This task's place in the Slurm job and what the job gave it."""

    job_id: str
    rank: int
    num_tasks: int
    num_nodes: int
    cpus_per_task: int
    gpus_per_task: int
    # submitit's folder of this job: shared by every task (it holds the job's pickles)
    folder: str
    # SLURM_RESTART_COUNT: 0, then 1, 2, ... for each requeue of the same job id
    restart: int

    @classmethod
    def detect(cls, environ: Mapping[str, str] = os.environ) -> Optional["Allocation"]:
        """The allocation when this process is a task of a submitit Slurm job, else None.

        `environ`: the process environment, read by the entry point (submitit's and Slurm's
        variables: SUBMITIT_EXECUTOR, SLURM_CPUS_PER_TASK, ...)."""
        if environ.get("SUBMITIT_EXECUTOR") != "slurm":
            return None
        import submitit

        env = submitit.JobEnvironment()
        tasks_on_node = max(1, env.num_tasks // max(1, env.num_nodes))
        cpus = environ.get("SLURM_CPUS_PER_TASK")
        cpus_per_task = int(cpus) if cpus else \
            max(1, int(environ.get("SLURM_CPUS_ON_NODE", "1")) // tasks_on_node)
        gpus_on_node = _count_gpus(environ.get("SLURM_GPUS_ON_NODE", ""))
        problem = one_task_per_gpu_node(tasks_on_node, gpus_on_node)
        if problem:
            raise ValueError(problem)
        return cls(job_id=str(env.job_id), rank=env.global_rank, num_tasks=env.num_tasks,
                   num_nodes=env.num_nodes, cpus_per_task=cpus_per_task,
                   gpus_per_task=gpus_on_node, folder=str(env.paths.folder),
                   restart=int(environ.get("SLURM_RESTART_COUNT", "0") or 0))


def one_task_per_gpu_node(tasks_per_node: int, gpus_per_node: int) -> Optional[str]:
    """Why a job with GPUs must run one task per node (None when it does)."""
    if gpus_per_node and tasks_per_node > 1:
        return (f"hydra.launcher.tasks_per_node={tasks_per_node} with {gpus_per_node} GPU(s) "
                "per node: longtrain runs one task per node (one Ray node each, owning the "
                "node's GPUs); set hydra.launcher.tasks_per_node=1")
    return None


def _count_gpus(value: str) -> int:
    # SLURM_GPUS_ON_NODE is a count; tolerate a "type:count" form
    value = value.strip()
    if not value:
        return 0
    return int(value.rsplit(":", 1)[-1])


def fit_launcher(launcher: LauncherConfig, *, world_size: int, alloc: Allocation,
                 address: Optional[str] = None) -> LauncherConfig:
    """`launcher` with CPUs / GPUs per rank taken from the allocation (and, for a Ray cluster
    over several tasks, `kind=ray` at `address`). Raises ValueError when the ranks do not fit."""
    ranks_per_task = math.ceil(world_size / alloc.num_tasks)
    where = (f"parallel.world_size={world_size} over {alloc.num_tasks} task(s) "
             f"({ranks_per_task} rank(s) each)")
    if alloc.gpus_per_task:
        gpus = launcher.gpus_per_worker or 1
        if ranks_per_task * gpus > alloc.gpus_per_task:
            raise ValueError(
                f"{where} x launcher.gpus_per_worker={gpus} needs {ranks_per_task * gpus} "
                f"GPU(s) per node; the job has {alloc.gpus_per_task} "
                "(hydra.launcher.gpus_per_node)")
    elif launcher.gpus_per_worker:
        raise ValueError(f"launcher.gpus_per_worker={launcher.gpus_per_worker} but the job has "
                         "no GPUs (set hydra.launcher.gpus_per_node)")
    else:
        gpus = 0
    cpus = alloc.cpus_per_task // ranks_per_task
    if cpus < 1 and not gpus:
        raise ValueError(
            f"{where} needs at least {ranks_per_task} CPU(s) per task; the job has "
            f"{alloc.cpus_per_task} (set hydra.launcher.cpus_per_task>={ranks_per_task})")
    fitted = dataclasses.replace(launcher, cpus_per_worker=cpus, gpus_per_worker=gpus)
    if address is not None:
        fitted = dataclasses.replace(fitted, kind="ray", address=address)
    return fitted


def run_in_allocation(alloc: Allocation, train: Callable[[Callable[[RunConfig], RunConfig]], Any],
                      *, launcher_kind: str) -> Any:
    """Play this task's part. `train(adapt)` runs the driver with the config `adapt(cfg)`
    (rank 0 only); returns what it returns, or a small summary on the other ranks."""
    if launcher_kind != "local":
        raise ValueError(
            f"launcher.kind={launcher_kind} with hydra/launcher=slurm: the job starts its own Ray "
            "cluster over the allocation; drop the launcher override (launcher.kind=local)")

    if alloc.num_tasks == 1:
        return train(lambda cfg: dataclasses.replace(cfg, launcher=fit_launcher(
            cfg.launcher, world_size=cfg.parallel.world_size, alloc=alloc)))
    if alloc.rank > 0:
        return run_ray_worker(alloc)
    with ray_head(alloc) as address:
        return train(lambda cfg: dataclasses.replace(cfg, launcher=fit_launcher(
            cfg.launcher, world_size=cfg.parallel.world_size, alloc=alloc, address=address)))


class _Rendezvous:
    """The files through which the tasks of one attempt of a job meet: the head's address
    (written last, atomically), the Ray token, and the driver's "done"."""

    def __init__(self, alloc: Allocation) -> None:
        base = os.path.join(alloc.folder, f"ray-{alloc.job_id}-r{alloc.restart}")
        self.address_file = base + ".address"
        self.token_file = base + ".token"
        self.done_file = base + ".done"

    def make_token(self) -> str:
        os.makedirs(os.path.dirname(self.token_file), exist_ok=True)
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        return self.token_file

    def publish(self, address: str) -> None:
        tmp = self.address_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(address)
        os.replace(tmp, self.address_file)

    def wait_address(self, timeout_s: float) -> Optional[str]:
        """The head's address once published; None when rank 0 finished without one."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if os.path.exists(self.address_file):
                with open(self.address_file) as f:
                    return f.read().strip()
            if self.done():
                return None
            time.sleep(POLL_S)
        raise TimeoutError(f"no Ray head address in {self.address_file} after {timeout_s:.0f}s "
                           "(did the job's rank 0 task start? see its log)")

    def mark_done(self) -> None:
        with open(self.done_file, "w") as f:
            f.write("done\n")

    def done(self) -> bool:
        return os.path.exists(self.done_file)


def node_ip() -> str:
    """This node's address as other nodes reach it: its host name's address, or Ray's guess
    when the name resolves to loopback (Ray refuses to advertise a loopback address)."""
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        addr = ""
    if addr and not ipaddress.ip_address(addr).is_loopback:
        return addr
    import ray

    return ray.util.get_node_ip_address()


def _head_port(host: str) -> int:
    """Ray's usual 6379 when free, else a free port below Linux's ephemeral range (a port the
    kernel hands out could be taken by a client, even by our own probe connecting to it)."""
    for port in (6379, *random.sample(range(20000, 32000), 50)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port for the Ray head on {host}")


def _reachable(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def _ray_cli() -> str:
    # the `ray` of this environment, next to the Python running the job
    here = shutil.which("ray", path=os.path.dirname(sys.executable))
    return here or "ray"


def _use_token(token_file: str) -> None:
    """This process (the driver) authenticates to the job's cluster with its token."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = token_file
    if "ray" in sys.modules:
        # Ray reads both when imported; a Ray imported earlier re-reads them the way its own
        # `ray.init()` does when it turns token authentication on
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def _ray_node(args: list[str], *, alloc: Allocation, ip: str, token_file: str
              ) -> subprocess.Popen:
    """`ray start --block ...` for this task's node (its output goes to the task's log)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_file}
    cmd = [_ray_cli(), "start", "--block", f"--node-ip-address={ip}",
           f"--num-cpus={alloc.cpus_per_task}", f"--num-gpus={alloc.gpus_per_task}",
           "--disable-usage-stats", *args]
    # its own process group: the node's processes can be killed together as a last resort
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_ignore_job_signals)


def _forget(address: str) -> None:
    """`ray start` leaves its cluster's address in Ray's temp dir, where a later plain
    `ray.init()` on this machine would find and join it: remove it once the node is stopped
    (only when it still names our cluster)."""
    try:
        from ray._common.utils import get_ray_address_file

        path = get_ray_address_file(None)
        with open(path) as f:
            if f.read().strip() == address:
                os.remove(path)
    except (ImportError, OSError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    """Stop a node started by `_ray_node`: SIGTERM makes `ray start --block` drain and stop
    its own node's processes (only those); after STOP_WAIT_S its process group is killed."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_WAIT_S)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait(timeout=STOP_WAIT_S)


@contextmanager
def ray_head(alloc: Allocation) -> Iterator[str]:
    """Rank 0: a Ray head on this node, joined by every other task's node; yields its
    address with this process connected to it as the driver. On exit, however it exits,
    the others are told the driver is done and the head stops."""
    rdv = _Rendezvous(alloc)
    proc: Optional[subprocess.Popen] = None
    address = ""
    try:
        token_file = rdv.make_token()
        _use_token(token_file)
        ip = node_ip()
        address = f"{ip}:{_head_port(ip)}"
        proc = _ray_node(["--head", f"--port={address.rsplit(':', 1)[1]}",
                          "--include-dashboard=false"], alloc=alloc, ip=ip,
                         token_file=token_file)
        deadline = time.monotonic() + HEAD_START_S
        while not _reachable(address):
            if proc.poll() is not None:
                raise RuntimeError(f"the Ray head exited with code {proc.returncode} "
                                   "(see this task's log)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Ray head did not listen on {address} "
                                   f"within {HEAD_START_S}s")
            time.sleep(POLL_S)
        rdv.publish(address)
        _connect(address, ip=ip)
        _wait_for_nodes(address, alloc)
        get_logger().info("Ray cluster over Slurm job %s: %d nodes, head %s", alloc.job_id,
                          alloc.num_tasks, address)
        print(f"longtrain: Ray cluster over Slurm job {alloc.job_id}: {alloc.num_tasks} "
              f"tasks, head {address}", flush=True)
        yield address
    finally:
        rdv.mark_done()
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                _let_workers_leave()
                ray.shutdown()
        if proc is not None:
            _stop(proc)
        if address:
            _forget(address)


def _connect(address: str, *, ip: str) -> None:
    """This process joins the cluster as its driver, keeping its SIGTERM handler (ray.init
    installs one that exits): the driver's own signal handling sees the same handlers as in
    a one-task job, where Ray starts later."""
    import ray

    previous = signal.getsignal(signal.SIGTERM)
    ray.init(address=address, _node_ip_address=ip, log_to_driver=False,
             logging_level="WARNING")
    try:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    except ValueError:
        pass


def _alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"])


def _wait_for_nodes(address: str, alloc: Allocation) -> None:
    """Until every task's node has joined (JOIN_WAIT_S at most)."""
    deadline = time.monotonic() + JOIN_WAIT_S
    while (alive := _alive_nodes()) < alloc.num_tasks:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{alive} of {alloc.num_tasks} Slurm tasks joined the Ray "
                               f"cluster at {address} within {JOIN_WAIT_S}s")
        time.sleep(POLL_S)


def _let_workers_leave() -> None:
    """Until only the head is left (STOP_WAIT_S at most): the others drain their nodes
    through the head, which would make each wait out Ray's drain timeout were it gone."""
    deadline = time.monotonic() + STOP_WAIT_S
    try:
        while _alive_nodes() > 1 and time.monotonic() < deadline:
            time.sleep(POLL_S)
    except Exception:
        # the head is already unusable: nothing to wait for
        pass


def run_ray_worker(alloc: Allocation) -> dict[str, Any]:
    """Ranks > 0: join the head as a Ray worker node until the driver is done or the head is
    gone (bounded: HEAD_LOST_S after it stops answering); then stop this node."""
    try:
        # Slurm's warning is for the driver (rank 0); a worker task just stays until the end
        _ignore_job_signals()
    except ValueError:
        pass
    rdv = _Rendezvous(alloc)
    address = rdv.wait_address(HEAD_START_S)
    if address is None:
        print(f"longtrain: task {alloc.rank}: the driver ended before starting Ray (see task 0's "
              "log)", flush=True)
        return {"role": "ray worker", "rank": alloc.rank, "head": None}
    print(f"longtrain: task {alloc.rank} of Slurm job {alloc.job_id} joins Ray at {address}",
          flush=True)
    proc = _ray_node([f"--address={address}"], alloc=alloc, ip=node_ip(),
                     token_file=rdv.token_file)
    last_seen = time.monotonic()
    reason = ""
    try:
        while not reason:
            time.sleep(POLL_S)
            if rdv.done():
                reason = "driver done"
            elif proc.poll() is not None:
                reason = f"Ray node exited with code {proc.returncode}"
            elif _reachable(address):
                last_seen = time.monotonic()
            elif time.monotonic() - last_seen > HEAD_LOST_S:
                reason = f"head {address} unreachable for {HEAD_LOST_S}s"
    finally:
        _stop(proc)
        _forget(address)
    print(f"longtrain: task {alloc.rank} leaves the Ray cluster: {reason}", flush=True)
    if not rdv.done():
        raise RuntimeError(f"task {alloc.rank} of Slurm job {alloc.job_id}: {reason} before "
                           "the driver finished")
    return {"role": "ray worker", "rank": alloc.rank, "head": address}
