"""Slurm: `hydra/launcher=slurm` (hydra-submitit-launcher) and slurm/longtrain.sbatch, end to
end on a real single-node Slurm started by slurm/start_local_slurm.sh; and the pieces that
need no Slurm (composition, fitting ranks to an allocation, signals of Ray's processes)."""

from __future__ import annotations

import dataclasses
import glob
import io
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from hydra import compose, initialize_config_module

from longtrain.config.schema import LauncherConfig, RunConfig
from longtrain.observability.progress import Progress
from longtrain_launch.slurm import Allocation, fit_launcher, job_signals_ignored_by_children
from longtrain_launch.slurm_submit import job_resources, register_slurm_launcher
from longtrain_launch.store import register_configs

register_configs()
register_slurm_launcher()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
# start_local_slurm.sh's "Slurm cannot be installed here" (not root, no apt-get)
CANNOT_INSTALL = 77


def test_slurm_launcher_composes_with_the_overrides_users_pass():
    overrides = ["hydra/launcher=slurm", "hydra.launcher.nodes=2",
                 "hydra.launcher.gpus_per_node=8", "hydra.launcher.partition=gpu",
                 "hydra.launcher.account=proj", "hydra.launcher.timeout_min=600"]
    with initialize_config_module(config_module="longtrain_conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    # hydra-submitit-launcher's, checking every job before it submits
    assert launcher._target_ == "hydra_plugins.longtrain.LongtrainSlurmLauncher"
    assert (launcher.nodes, launcher.gpus_per_node, launcher.partition, launcher.account,
            launcher.timeout_min) == (2, 8, "gpu", "proj", 600)
    # our defaults on top of the plugin's; resources left unset follow the run's layout
    assert (launcher.signal_delay_s, launcher.max_num_timeout, launcher.check_only) == \
        (120, 3, False)
    assert launcher.submitit_folder.endswith("/.submitit/%j")
    with initialize_config_module(config_module="longtrain_conf", version_base="1.3"):
        plain = compose(config_name="config", overrides=["hydra/launcher=slurm"],
                        return_hydra_config=True).hydra.launcher
    assert (plain.nodes, plain.tasks_per_node, plain.cpus_per_task, plain.gpus_per_node) == \
        (None, None, None, None)


def _run_cfg(**fields) -> RunConfig:
    cfg = RunConfig()
    for dotted, value in fields.items():
        section, name = dotted.split("__")
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section),
                                                                       **{name: value})})
    return cfg


def test_unset_job_resources_follow_the_runs_layout():
    unset = {"nodes": None, "tasks_per_node": None, "cpus_per_task": None, "gpus_per_node": None}
    # the defaults on this 2-CPU machine: 2 ranks, one CPU each, one task
    res, found = job_resources(unset, _run_cfg(parallel__world_size=2))
    assert (res.nodes, res.tasks_per_node, res.cpus_per_task, res.gpus_per_node) == (1, 1, 2, 0)
    assert not found
    res, _ = job_resources(unset, _run_cfg(parallel__world_size=4, launcher__cpus_per_worker=3))
    assert res.cpus_per_task == 12
    # 16 GPU ranks on 8-GPU nodes: two nodes of one task, 8 ranks (and CPUs) each
    res, found = job_resources({**unset, "gpus_per_node": 8}, _run_cfg(parallel__world_size=16))
    assert (res.nodes, res.tasks_per_node, res.cpus_per_task, res.gpus_per_node) == (2, 1, 8, 8)
    assert not found and res.as_params()["gpus_per_node"] == 8
    # what the user set is kept (and checked)
    res, found = job_resources({**unset, "nodes": 2, "tasks_per_node": 1, "cpus_per_task": 5},
                               _run_cfg(parallel__world_size=4))
    assert (res.nodes, res.cpus_per_task) == (2, 5) and not found


def test_job_resources_that_do_not_fit_the_run_are_named():
    unset = {"nodes": None, "tasks_per_node": None, "cpus_per_task": None, "gpus_per_node": None}

    def problems(params, **cfg):
        return " | ".join(job_resources({**unset, **params}, _run_cfg(**cfg))[1])

    assert "set hydra.launcher.cpus_per_task>=4" in problems(
        {"cpus_per_task": 2}, parallel__world_size=4)
    assert "needs 16 GPU(s) per node; the job has 8" in problems(
        {"gpus_per_node": 8, "nodes": 1}, parallel__world_size=16)
    idle = problems({"gpus_per_node": 8, "nodes": 2}, parallel__world_size=8)
    assert "nodes=2 x gpus_per_node=8 = 16 GPUs for parallel.world_size=8" in idle
    assert "hydra.launcher.nodes=1" in idle
    assert "set hydra.launcher.tasks_per_node=1" in problems(
        {"gpus_per_node": 8, "tasks_per_node": 2}, parallel__world_size=16)
    assert "4 tasks for parallel.world_size=2: 2 would hold no rank" in problems(
        {"nodes": 4}, parallel__world_size=2)
    assert "launcher.kind=ray with hydra/launcher=slurm" in problems(
        {}, launcher__kind="ray", launcher__address="h:1")


def _train_cli(*args: str, cwd, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "longtrain-train"), *args], capture_output=True,
                          text=True, timeout=timeout, env=_env(), cwd=cwd)


def test_a_bad_sweep_submits_nothing_and_names_every_problem_of_every_job(tmp_path):
    """Checked on the submitting host, before sbatch (no Slurm needed): every job's own
    constraints and its fit to the hydra.launcher.* resources."""
    start = time.monotonic()
    sweep = tmp_path / "sweep"
    res = _train_cli("-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}",
                     "hydra.launcher.cpus_per_task=2", "parallel.world_size=2,4",
                     "train.steps=3,0", cwd=tmp_path)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    err = res.stderr
    # one good job does not let the three bad ones through
    assert "3 of 4 job(s) would fail; nothing submitted to Slurm" in err, err
    assert "job #0 " not in err
    for num, overrides in enumerate(["parallel.world_size=2 train.steps=0",
                                     "parallel.world_size=4 train.steps=3",
                                     "parallel.world_size=4 train.steps=0"], start=1):
        assert f"job #{num} ({overrides}):" in err
    assert err.count("train.steps=0 must be >= 1") == 2
    assert err.count("the job has 2 (set hydra.launcher.cpus_per_task>=4)") == 2
    assert "Traceback" not in err
    assert not (sweep / ".submitit").exists()
    assert time.monotonic() - start < 60


def test_check_checks_the_slurm_launchers_resources_and_submits_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    res = _train_cli("--check", "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}",
                     "hydra.launcher.cpus_per_task=1", "parallel.world_size=2", cwd=tmp_path)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "needs at least 2 CPU(s) per task; the job has 1" in res.stderr
    assert "set hydra.launcher.cpus_per_task>=2" in res.stderr
    # unset, the resources are derived and the run's report follows
    res = _train_cli("--check", "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}",
                     "parallel.world_size=2", cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "would get 1 node(s) x 1 task(s), 2 CPU(s) per task" in res.stdout
    assert "constraints: all satisfied" in res.stdout
    assert not (sweep / ".submitit").exists()


def test_a_failed_jobs_error_is_one_line():
    from longtrain_launch.slurm_submit import _error_line

    reported = ("Job (task=0) failed during processing with trace:\n----------------------\n"
                "Traceback (most recent call last):\n  File \"/x.py\", line 1, in f\n"
                "    raise ConfigError([problem])\n"
                "longtrain.config.errors.ConfigError: invalid configuration (1 problem(s)):\n"
                "  - data.path: cannot read /tmp/bad.jsonl as json\n\n----------------------\n"
                "You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n"
                "  - /s/.submitit/1_1/1_1_0_log.err\n  - /s/.submitit/1_1/1_1_0_log.out\n")
    assert _error_line(reported) == ("ConfigError: invalid configuration (1 problem(s)): "
                                     "- data.path: cannot read /tmp/bad.jsonl as json")


def test_without_a_terminal_progress_is_a_plain_line_every_report():
    """In a batch job stderr is a file: no tqdm frames (`\r`), one line per `logging.every`
    steps (the driver reports every `logging.every` steps)."""
    stream = io.StringIO()
    progress = Progress(total=6, enabled=True, stream=stream)
    for step in (2, 4, 6):
        progress.update({"step": step, "loss": 5.0 / step, "tokens_per_s": 1234.0})
    progress.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 3, lines
    assert lines[1] == "train step 4/6  loss 1.2500  tokens/s 1,234"
    quiet = io.StringIO()
    off = Progress(total=6, enabled=False, stream=quiet)
    off.update({"step": 2, "loss": 1.0, "tokens_per_s": 1.0})
    assert quiet.getvalue() == ""


def test_without_multirun_the_slurm_launcher_refuses_to_train_here(tmp_path):
    # Hydra ignores launchers outside -m: the run would start on this (login) machine
    res = subprocess.run([os.path.join(BIN, "longtrain-train"), "hydra/launcher=slurm",
                          f"output_dir={tmp_path}"], capture_output=True, text=True,
                         timeout=120, env=_env())
    assert res.returncode == 2 and "add -m" in res.stderr, res.stderr
    assert not (tmp_path / "logs").exists()


def _alloc(**kw) -> Allocation:
    base = dict(job_id="7", rank=0, num_tasks=1, num_nodes=1, cpus_per_task=2, gpus_per_task=0,
                folder="/tmp/unused", restart=0)
    return Allocation(**{**base, **kw})


def test_ranks_take_the_cpus_and_gpus_of_the_allocation():
    two_gpu_nodes = _alloc(num_tasks=2, num_nodes=2, cpus_per_task=64, gpus_per_task=8)
    fitted = fit_launcher(LauncherConfig(), world_size=16, alloc=two_gpu_nodes,
                          address="10.0.0.1:6379")
    assert (fitted.kind, fitted.address) == ("ray", "10.0.0.1:6379")
    assert (fitted.cpus_per_worker, fitted.gpus_per_worker) == (8, 1)
    # too few CPUs for a rank each is fine with GPUs: Ray places ranks by GPU
    few_cpus = dataclasses.replace(two_gpu_nodes, cpus_per_task=1)
    assert fit_launcher(LauncherConfig(), world_size=16, alloc=few_cpus).cpus_per_worker == 0

    one_node = fit_launcher(LauncherConfig(), world_size=2, alloc=_alloc(cpus_per_task=4))
    assert (one_node.kind, one_node.cpus_per_worker, one_node.gpus_per_worker) == ("local", 2, 0)

    with pytest.raises(ValueError, match=r"hydra.launcher.cpus_per_task>=3"):
        fit_launcher(LauncherConfig(), world_size=3, alloc=_alloc(cpus_per_task=2))
    with pytest.raises(ValueError, match=r"needs 16 GPU\(s\) per node; the job has 8"):
        fit_launcher(LauncherConfig(), world_size=32, alloc=two_gpu_nodes)
    with pytest.raises(ValueError, match=r"launcher.gpus_per_worker=1 but the job has no GPUs"):
        fit_launcher(LauncherConfig(gpus_per_worker=1), world_size=2, alloc=_alloc())


def test_outside_a_submitit_job_there_is_no_allocation(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    assert Allocation.detect() is None


def test_processes_started_for_ray_survive_slurms_warning_signal():
    before = signal.getsignal(signal.SIGUSR1)
    with job_signals_ignored_by_children():
        shielded = subprocess.Popen(["sleep", "30"])
    plain = subprocess.Popen(["sleep", "30"])
    try:
        assert signal.getsignal(signal.SIGUSR1) == before
        time.sleep(0.2)
        for proc in (shielded, plain):
            proc.send_signal(signal.SIGUSR1)
        assert plain.wait(timeout=10) == -signal.SIGUSR1
        time.sleep(0.3)
        assert shielded.poll() is None
    finally:
        for proc in (shielded, plain):
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def local_slurm():
    """A single-node Slurm on this machine; stopped afterwards if this fixture started it."""
    script = os.path.join(ROOT, "slurm", "start_local_slurm.sh")
    was_up = shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo", "--noheader"], capture_output=True, timeout=30).returncode == 0
    res = subprocess.run(["bash", script], capture_output=True, text=True, timeout=900)
    if res.returncode == CANNOT_INSTALL:
        pytest.skip(f"no local Slurm here: {res.stderr.strip()}")
    assert res.returncode == 0, res.stdout + res.stderr
    cpus = int(subprocess.run(["sinfo", "--noheader", "--format=%c"], capture_output=True,
                              text=True, timeout=30, check=True).stdout.split()[0])
    yield cpus
    if not was_up:
        subprocess.run(["bash", os.path.join(ROOT, "slurm", "stop_local_slurm.sh")],
                       capture_output=True, timeout=120)


def _env() -> dict[str, str]:
    # the environment a user has after activating the venv
    return {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def _submit(sweep_dir, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`longtrain-train -m hydra/launcher=slurm ...`: returns once every job has finished."""
    cmd = [os.path.join(BIN, "longtrain-train"), "-m", "hydra/launcher=slurm",
           f"hydra.sweep.dir={sweep_dir}", "data.seq_len=256", "logging.progress=false",
           "logging.wandb.mode=offline", "train.save_hf=false", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _job_results(sweep_dir) -> dict[str, list]:
    """submitit's result pickle of every task, by job id: ("success", hydra JobReturn) or
    ("error", traceback)."""
    out: dict[str, list] = {}
    for path in sorted(glob.glob(os.path.join(sweep_dir, ".submitit", "*", "*_result.pkl"))):
        job = os.path.basename(os.path.dirname(path))
        with open(path, "rb") as f:
            out.setdefault(job, []).append(pickle.load(f))
    return out


def _job_dirs(sweep_dir) -> list[str]:
    """submitit's folder of each job (named by the job id)."""
    root = os.path.join(sweep_dir, ".submitit")
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def _task_log(sweep_dir, job: str, task: int) -> str:
    with open(os.path.join(sweep_dir, ".submitit", job, f"{job}_{task}_log.out")) as f:
        return f.read()


def _wandb_blob(run_dir, *, attempts: int = 1) -> bytes:
    """The W&B offline run's records: one run, written by `attempts` attempts (a requeued
    job continues the same run id in a new offline directory)."""
    runs = sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb")))
    assert len(runs) == attempts, runs
    assert len({os.path.basename(r) for r in runs}) == 1, runs
    blob = b""
    for run in runs:
        with open(run, "rb") as f:
            blob += f.read()
    return blob


@pytest.mark.slow
def test_a_two_task_job_runs_ray_head_and_worker_and_trains(local_slurm, tmp_path):
    """One job of two tasks (standing in for two nodes): task 0 starts the Ray head and runs
    the driver, task 1 joins as a Ray worker; the two ranks land on the two Ray nodes (each
    offers the one CPU of its task) and train 4 steps."""
    from hydra.core.utils import JobStatus

    world, cpus_per_worker = 2, 1
    assert local_slurm >= world * cpus_per_worker, local_slurm
    sweep = tmp_path / "sweep"
    res = _submit(sweep, "train.steps=4", f"parallel.world_size={world}",
                  "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
                  "hydra.launcher.timeout_min=10")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    (job, tasks), = _job_results(sweep).items()
    assert [outcome for outcome, _ in tasks] == ["success", "success"], tasks
    head, worker = tasks[0][1], tasks[1][1]
    assert head.status == JobStatus.COMPLETED, head._return_value
    assert head.return_value["steps"] == 4
    assert worker.status == JobStatus.COMPLETED and worker.return_value["role"] == "ray worker"
    assert "Ray cluster over Slurm job" in _task_log(sweep, job, 0)
    assert "leaves the Ray cluster: driver done" in _task_log(sweep, job, 1)
    script = (sweep / ".submitit" / job / f"{job}_submission.sh").read_text()
    assert "#SBATCH --signal=USR1@120" in script and "#SBATCH --ntasks-per-node=2" in script

    run = sweep / "0"
    for rank in range(world):
        text = (run / "logs" / f"rank{rank}.log").read_text()
        assert f"[rank {rank}]" in text and "step 4" in text
    blob = _wandb_blob(run)
    assert blob.count(b"train/loss") >= 4 and b"seq_len" in blob
    # the job's Ray token stays private to the user
    token, = glob.glob(str(sweep / ".submitit" / job / "ray-*.token"))
    assert os.stat(token).st_mode & 0o077 == 0


@pytest.mark.slow
def test_the_time_limit_warning_checkpoints_requeues_and_resumes(local_slurm, tmp_path):
    """Slurm's warning (USR1, as `--signal=USR1@120` sends it to every process of the job)
    in a two-task job: Ray survives it, the driver checkpoints and stops, submitit requeues
    the job, and the second attempt (a new Ray cluster) resumes and finishes the run."""
    sweep = tmp_path / "sweep"
    cmd = [os.path.join(BIN, "longtrain-train"), "-m", "hydra/launcher=slurm",
           f"hydra.sweep.dir={sweep}", "data.seq_len=256", "logging.progress=false",
           "train.save_hf=false", "train.steps=60", "checkpoint.every=1000",
           "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.timeout_min=10"]
    submit = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env())
    try:
        rank0 = sweep / "0" / "logs" / "rank0.log"
        deadline = time.monotonic() + 300
        while not (rank0.exists() and "step 10 " in rank0.read_text()):
            assert submit.poll() is None and time.monotonic() < deadline, "no step 10"
            time.sleep(1)
        job, = _job_dirs(sweep)
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=60)
        output, _ = submit.communicate(timeout=600)
    finally:
        if submit.poll() is None:
            submit.kill()
            subprocess.run(["scancel", *_job_dirs(sweep)], timeout=60)
    assert submit.returncode == 0, output[-3000:]

    (_, tasks), = _job_results(sweep).items()
    assert tasks[0][0] == "success" and tasks[0][1].return_value["steps"] == 60
    # a second attempt of the same job, with its own Ray cluster
    assert (sweep / ".submitit" / job / f"ray-{job}-r1.address").exists()
    stopped = sorted(p.name for p in (sweep / "0" / "checkpoints").glob("step_*"))
    assert len(stopped) == 2 and stopped[-1] == "step_00000060", stopped
    at = int(stopped[0].split("_")[1])
    text = rank0.read_text()
    assert f"continuing at step {at} " in text and "step 60 " in text
    assert _wandb_blob(sweep / "0", attempts=2).count(b"train/loss") >= 60


@pytest.mark.slow
def test_a_sweep_is_one_slurm_job_per_combination(local_slurm, tmp_path):
    """`-m train.steps=2,3`: two jobs (a Slurm array), each one node with the embedded Ray."""
    sweep = tmp_path / "sweep"
    res = _submit(sweep, "train.steps=2,3", "hydra.launcher.cpus_per_task=2",
                  "hydra.launcher.timeout_min=10")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = _job_results(sweep)
    assert len(results) == 2, results
    for tasks in results.values():
        assert [outcome for outcome, _ in tasks] == ["success"]
    steps = sorted(tasks[0][1].return_value["steps"] for tasks in results.values())
    assert steps == [2, 3]
    for num, last in ((0, 2), (1, 3)):
        run = sweep / str(num)
        assert f"step {last}" in (run / "logs" / "rank0.log").read_text()
        assert _wandb_blob(run).count(b"train/loss") >= last


@pytest.mark.slow
def test_default_resources_train_and_a_failed_run_fails_its_slurm_job(local_slurm, tmp_path):
    """No hydra.launcher.* resources: they follow the layout (2 ranks: 2 CPUs). A sweep of
    two jobs: #0 trains; #1's corpus cannot be read, which only the driver finds out, in the
    job. Slurm records #1 FAILED with exit code 1 (not COMPLETED, hydra#1928) and #0
    COMPLETED; the submitting command prints each job's id, run dir and logs at submission,
    one line per job at the end, and exits 1."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    sweep = tmp_path / "sweep"
    # Slurm forgets an ended job after MinJobAge (30 s here, no accounting): watch meanwhile
    ended: dict[str, dict[str, str]] = {}
    stop = threading.Event()

    def poll() -> None:
        res = subprocess.run(["scontrol", "show", "job", "--oneliner"], capture_output=True,
                             text=True, timeout=60)
        for line in res.stdout.splitlines():
            state = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if state.get("JobState") in ("COMPLETED", "FAILED") and "ArrayTaskId" in state:
                ended[f"{state['ArrayJobId']}_{state['ArrayTaskId']}"] = state

    def watch() -> None:
        while not stop.wait(1):
            poll()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        res = _submit(sweep, "train.steps=2", "data=synthetic,files", f"data.path={bad}",
                      "hydra.launcher.timeout_min=10")
    finally:
        stop.set()
        watcher.join(timeout=60)
    out = res.stdout
    assert res.returncode == 1, out[-3000:] + res.stderr[-3000:]
    submitted = dict((int(num), job) for job, num in
                     re.findall(r"submitted Slurm job (\S+) for #(\d) ", out))
    assert sorted(submitted) == [0, 1], out
    for num, job in submitted.items():
        logs = sweep / ".submitit" / job / f"{job}_0_log"
        assert f"run dir {sweep / str(num)}\n" in out
        assert f"logs    {logs}.out {logs}.err\n" in out
    good, failed = submitted[0], submitted[1]
    # the result file comes before the job's end: the last one may still be ending
    deadline = time.monotonic() + 20
    while not {good, failed} <= set(ended) and time.monotonic() < deadline:
        time.sleep(0.5)
        poll()
    assert re.search(rf"job {good} #0 \(.*\): 2 steps, loss \d", out), out
    assert re.search(rf"job {failed} #1 \(.*\): FAILED: .*cannot read {bad} .*"
                     rf"\(see .*{failed}_0_log.err\)", out), out
    assert "1 of 2 Slurm job(s) failed" in res.stderr
    assert "Traceback" not in out + res.stderr
    states = {job: (s.get("JobState"), s.get("ExitCode")) for job, s in ended.items()}
    assert states.get(good) == ("COMPLETED", "0:0"), states
    assert states.get(failed) == ("FAILED", "1:0"), states
    # submitit's result file still carries the error back
    results = _job_results(sweep)
    assert results[failed][0][0] == "error" and "cannot read" in results[failed][0][1]
    assert results[good][0][0] == "success"


def _job_state(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


@pytest.mark.slow
def test_the_sbatch_template_trains_and_requeues_itself_on_the_warning(local_slurm, tmp_path):
    """slurm/longtrain.sbatch with two tasks on the one node (head, worker) and the driver;
    the Hydra overrides pass through. The time-limit warning (USR1 to the batch script, as
    `--signal=B:USR1@120` sends it) checkpoints, requeues the job, and the second attempt
    resumes and finishes."""
    out = tmp_path / "run"
    log = tmp_path / "job.out"
    cmd = ["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10",
           f"--output={log}", os.path.join(ROOT, "slurm", "longtrain.sbatch"),
           "train.steps=60", "checkpoint.every=1000", "data.seq_len=256",
           "logging.progress=false", "train.save_hf=false"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={**_env(), "LONGTRAIN_RUN_DIR": str(out)}, check=True)
    job = res.stdout.strip().split(";")[0]
    try:
        rank0 = out / "logs" / "rank0.log"
        deadline = time.monotonic() + 300
        while not (rank0.exists() and "step 10 " in rank0.read_text()):
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
            time.sleep(1)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=60)
        deadline = time.monotonic() + 600
        while (state := _job_state(job))["JobState"] not in ("COMPLETED", "FAILED",
                                                             "CANCELLED", "TIMEOUT"):
            assert time.monotonic() < deadline, state
            time.sleep(2)
    finally:
        if _job_state(job)["JobState"] in ("PENDING", "RUNNING"):
            subprocess.run(["scancel", job], timeout=60)
    text = log.read_text()
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "1"), text[-3000:]
    assert "requeueing job" in text and "longtrain run summary" in text
    stopped = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert len(stopped) == 2 and stopped[-1] == "step_00000060", stopped
    at = int(stopped[0].split("_")[1])
    assert f"continuing at step {at} " in rank0.read_text()
    for rank in (0, 1):
        assert "step 60 " in (out / "logs" / f"rank{rank}.log").read_text()
    assert _wandb_blob(out, attempts=2).count(b"train/loss") >= 60
