"""`longtrain-train --check`: the layout, attention per layer, memory estimate and every
violated constraint, printed without starting a worker."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.spawn import run_distributed


def _check(*overrides: str, cwd: str) -> subprocess.CompletedProcess:
    script = os.path.join(os.path.dirname(sys.executable), "longtrain-train")
    return subprocess.run([script, "--check", *overrides, f"hydra.run.dir={cwd}/run"],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def _megatron_groups(rt: Any, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    mine = {name: sorted(dist.get_process_group_ranks(group)) for name, group in
            (("tp", rt.tp_group), ("cp", rt.cp_group), ("dp", rt.dp_group))}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if rt.rank == 0:
        torch.save(gathered, out_path)


@pytest.mark.parametrize("tp,cp", [(2, 1), (1, 2)])
def test_printed_groups_are_megatrons(tmp_path, tp, cp) -> None:
    """4 processes (dp 2 either way): every axis has more than one group."""
    import torch

    world = 4
    path = str(tmp_path / "groups.pt")
    run_distributed(_megatron_groups, world_size=world, tp=tp, cp=cp, args=(path,))
    per_rank = torch.load(path, weights_only=False)
    ours = ParallelDims(world, tp, cp).groups()
    for name in ("tp", "cp", "dp"):
        theirs = sorted({tuple(r[name]) for r in per_rank})
        assert [list(g) for g in theirs] == ours[name], (name, theirs, ours[name])


def test_check_prints_the_plan_and_starts_nothing(tmp_path) -> None:
    res = _check("parallel.world_size=8", "parallel.tp=2", "parallel.cp=2", "attention=ring",
                 "data.seq_len=8192", cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "layout: world=8 = tp 2 x cp 2 x dp 2" in out
    assert "tp groups: [0, 1], [2, 3], [4, 5], [6, 7]" in out
    assert "cp groups: [0, 2], [1, 3], [4, 6], [5, 7]" in out
    assert "dp groups: [0, 4], [1, 5], [2, 6], [3, 7]" in out
    assert "attention per layer (4 layers): 0-3: ring" in out
    assert "memory per device (estimate, memory none)" in out and ": fits" in out
    assert "constraints: all satisfied" in out
    # nothing ran: no progress bar, no checkpoints, no W&B run
    assert "train:" not in res.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    assert not os.path.exists(tmp_path / "run" / "wandb")


def test_check_with_the_slurm_launcher_checks_every_run_here(tmp_path) -> None:
    """A Slurm sweep under --check submits nothing (no Slurm needed) and checks each run."""
    res = _check("-m", "hydra/launcher=slurm", "hydra.launcher.nodes=2",
                 "hydra.launcher.partition=gpu", "parallel.world_size=2",
                 "data.seq_len=1024,2048", f"hydra.sweep.dir={tmp_path}/sweep", cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "checking here instead of submitting" in res.stderr
    assert "hydra/launcher=slurm hydra.launcher.nodes=2" in res.stderr
    assert res.stdout.count("constraints: all satisfied") == 2, res.stdout
    assert not os.path.exists(tmp_path / "sweep" / ".submitit")


def test_check_lists_every_violated_constraint(tmp_path) -> None:
    res = _check("parallel.world_size=6", "parallel.tp=4", "attention=s2", "data.seq_len=1000",
                 "model.layer_pattern=", cwd=str(tmp_path))
    assert res.returncode == 2
    out = res.stdout
    assert "constraints violated (3)" in out, out
    assert "parallel.world_size=6" in out and "parallel.tp=4" in out
    assert "data.seq_len=1000" in out
    # the sections whose settings are valid are still printed
    assert "attention per layer (4 layers): 0-1: dense; 2: s2; 3: dense" in out


def test_check_says_when_the_memory_does_not_fit(tmp_path) -> None:
    res = _check("model.layer_pattern=3:1", "attention=lasp2", "parallel.cp=2",
                 "memory.budget_gib=0.01", cwd=str(tmp_path))
    # valid but too big: a distinct, documented non-zero code, so a submission script stops
    assert res.returncode == 3, res.stdout + res.stderr
    assert "constraints: all satisfied" in res.stdout
    assert "memory: the estimate does NOT fit the budget (exit 3)" in res.stdout
    assert "0-2: linear (lasp2); 3: softmax (allgather)" in res.stdout
    assert "does NOT fit" in res.stdout and "raise parallel.cp" in res.stdout
