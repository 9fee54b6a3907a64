"""Faults a long run meets: a hung collective, a dead worker, a preemption signal.

The hang test runs two ranks directly (no Ray); the others run the real CLI through Ray and
compare the final checkpoint with an uninterrupted run's, bit for bit (CPU is deterministic).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from longtrain.parallel.spawn import run_distributed

HANG_TIMEOUT_S = 5


def _hang_in_layer_2(rt, out: str) -> None:
    from longtrain.attention.base import register_attention
    from longtrain.attention.ring import ring_attention
    from longtrain.config.schema import RunConfig
    from longtrain.parallel import watch
    from longtrain.train.loop import train

    @register_attention("ring_that_stalls", supports_cp=True)
    def stalls(q, k, v, meta, ctx):
        # rank 1 stops answering in layer 2's attention: a hung peer, as rank 0 sees it
        if rt.rank == 1 and watch.current().module == "layers.2.attn":
            time.sleep(3 * HANG_TIMEOUT_S)
        return ring_attention(q, k, v, meta, ctx)

    cfg = RunConfig()
    cfg.parallel.world_size, cfg.parallel.cp = 2, 2
    cfg.attention.backend = "ring_that_stalls"
    cfg.data.seq_len, cfg.data.batch_size, cfg.train.steps = 256, 2, 3
    cfg.checkpoint.resume, cfg.checkpoint.every, cfg.checkpoint.save_final = "never", 0, False
    cfg.parallel.timeout_s = HANG_TIMEOUT_S
    start = time.monotonic()
    try:
        list(train(cfg, rt))
    except watch.CollectiveError as exc:
        message = str(exc)
    else:
        message = "no error"
    if rt.rank == 0:
        torch.save({"message": message, "seconds": time.monotonic() - start}, out)


def test_a_hung_collective_fails_the_step_naming_rank_layer_and_collective(tmp_path):
    out = str(tmp_path / "hang.pt")
    run_distributed(_hang_in_layer_2, world_size=2, cp=2, args=(out,), timeout_s=HANG_TIMEOUT_S)
    got = torch.load(out)
    message = got["message"]
    assert message.startswith("rank 0: ring attention K/V send/recv over the context-parallel "
                              "group failed after"), message
    assert "in layers.2.attn (forward) at step 1 (parallel.timeout_s=5)" in message, message
    # failed within the timeout (plus start-up), not after a default of minutes
    assert got["seconds"] < 4 * HANG_TIMEOUT_S + 20, got


def _cli(*args: str, session: bool = False) -> subprocess.Popen:
    """The CLI; `session=True` gives it a process group of its own, as a shell gives a job, so a
    test can signal the whole group as a terminal's Ctrl-C does."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    script = os.path.join(os.path.dirname(sys.executable), "longtrain-train")
    return subprocess.Popen([script, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=session)


ARGS = ("train.steps=12", "checkpoint.every=3", "checkpoint.keep=10", "data.seq_len=256",
        "optim.warmup_steps=2", "logging.progress=false", "train.save_hf=false")


def _final_weights(out) -> dict:
    from longtrain.checkpoint.native import open_native_weights

    names = ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight",
             "model.layers.3.mlp.down_proj.weight", "lm_head.weight")
    with open_native_weights(str(out / "checkpoints")) as get:
        return {n: get(n) for n in names}


def _wait_for(path, pattern: str, *, proc: subprocess.Popen, timeout_s: float = 300) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(path):
            m = re.search(pattern, open(path).read())
            if m:
                return m
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not in {path} within {timeout_s} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    proc = _cli(*ARGS, "logging.wandb.mode=disabled", f"output_dir={out}")
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout
    return _final_weights(out)


@pytest.mark.slow
def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = _cli(*ARGS, f"output_dir={out}")
    log = out / "logs" / "rank1.log"
    pid = int(_wait_for(log, r"worker pid (\d+)", proc=proc).group(1))
    _wait_for(log, r"step 5 loss", proc=proc)
    os.kill(pid, signal.SIGKILL)
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout
    assert re.search(r"worker group failed \(\w+.*\); restart 1/3 from \S+step_0000000[36]",
                     stdout), stdout
    assert "steps          12" in stdout
    # the W&B run holds the restart as an alert, and the whole history in one run
    from longtrain.observability.wandb_files import read_offline_run

    run = read_offline_run(str(out))
    assert [title for title, _ in run.alerts] == ["worker group restarted"], run.alerts
    assert "restart 1/3" in run.alerts[0][1]
    assert run.series("train/loss") and max(row["_step"] for row in run.history) == 12
    final = _final_weights(out)
    for name, tensor in uninterrupted.items():
        assert torch.equal(final[name], tensor), name
    _assert_no_ray_processes_left()


def _assert_no_ray_processes_left(timeout_s: float = 20) -> None:
    """The embedded Ray and every actor of every attempt are gone once the CLI exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = subprocess.run(["pgrep", "-f", "ray::|raylet|gcs_server"], capture_output=True,
                              text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, subprocess.run(["ps", "-o", "pid,cmd", "-p", ",".join(left)],
                                    capture_output=True, text=True).stdout


@pytest.mark.slow
def test_sigterm_checkpoints_and_a_rerun_resumes_the_same_run(uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = _cli(*ARGS, f"output_dir={out}")
    _wait_for(out / "logs" / "rank0.log", r"step 4 loss", proc=proc)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=600)
    # a clean, checkpointed stop: the conventional 128 + SIGTERM, never a crash's 1
    assert proc.returncode == 143, stdout
    stopped = int(re.search(r"stopped at step (\d+) on SIGTERM, checkpoint saved in \S+"
                            r"step_(\d+)", stdout).group(1))
    assert 4 <= stopped < 12
    from longtrain.checkpoint.native import list_checkpoints

    assert list_checkpoints(str(out / "checkpoints"))[-1][0] == stopped
    run_id = (out / "wandb_run_id").read_text().strip()
    proc = _cli(*ARGS, f"output_dir={out}")
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout
    assert f"step_{stopped:08d}" in stdout
    final = _final_weights(out)
    for name, tensor in uninterrupted.items():
        assert torch.equal(final[name], tensor), name
    # both halves logged to the same W&B run
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs), runs


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_checkpoints_and_exits_130(tmp_path):
    """A terminal's Ctrl-C reaches the whole foreground process group (the driver and the Ray
    processes it started): the run saves a checkpoint after the current step, says where and
    how to resume, prints the summary and exits 130, with no traceback."""
    out = tmp_path / "run"
    proc = _cli(*ARGS, f"output_dir={out}", session=True)
    _wait_for(out / "logs" / "rank0.log", r"step 4 loss", proc=proc)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 130, stdout
    assert "Traceback" not in stdout and "KeyboardInterrupt" not in stdout, stdout
    m = re.search(r"stopped at step (\d+) on SIGINT, checkpoint saved in (\S+); run the same "
                  r"command to resume", stdout)
    assert m, stdout
    from longtrain.checkpoint.native import list_checkpoints

    step, path = list_checkpoints(str(out / "checkpoints"))[-1]
    assert step == int(m.group(1)) and os.path.samefile(path, m.group(2))
    assert "longtrain run summary" in stdout
    _assert_no_ray_processes_left()


def test_a_second_ctrl_c_aborts_at_once():
    """The first SIGINT only asks for a checkpointed stop; the second raises KeyboardInterrupt
    at once (the CLI turns it into one line and exit 130)."""
    from longtrain_launch.driver import _StopSignals

    before = signal.getsignal(signal.SIGINT)
    with _StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before
