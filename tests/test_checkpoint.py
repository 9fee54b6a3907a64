"""Native checkpoints: resuming continues the same loss curve, in the same layout and in
another one (resharding), a checkpoint reads in one process, and damaged or missing
checkpoints are refused without touching the good ones."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import rel_err
from longtrain.checkpoint.native import (CheckpointError, find_checkpoint, list_checkpoints,
                                         open_native_weights, read_manifest, resolve_resume)
from longtrain.parallel.spawn import run_distributed

STEPS, SAVE_AT = 6, 3
# different layouts sum in different orders: the CP loss-curve tolerance
LAYOUT_RTOL = 1e-4


def _cfg(world: int, tp: int, cp: int, out: str, *, resume: str = "never", every: int = SAVE_AT):
    from longtrain.config.schema import RunConfig

    cfg = RunConfig()
    cfg.parallel.world_size, cfg.parallel.tp, cfg.parallel.cp = world, tp, cp
    cfg.attention.backend = "ring" if cp > 1 else "dense"
    cfg.model.vocab_size = 301  # odd: the vocabulary is padded under TP
    cfg.data.seq_len, cfg.data.batch_size = 256, 4
    cfg.train.steps = STEPS
    cfg.optim.warmup_steps = 2
    cfg.checkpoint.every, cfg.checkpoint.keep, cfg.checkpoint.resume = every, 2, resume
    cfg.output_dir = out
    return cfg


def _run(rt, out: str, resume: str, stop_after: int, tag: str) -> None:
    """Train (resuming per `resume`), stop after `stop_after` steps of this process; rank 0
    writes the losses and the canonical weights at the end."""
    from longtrain.model.sharding import canonical_state_dict
    from longtrain.train.loop import TrainState, train

    d = rt.dims
    cfg = _cfg(d.world_size, d.tp, d.cp, out, resume=resume)
    state = TrainState.create(cfg, rt)
    start = state.step
    losses = []
    for m in train(cfg, rt, state=state):
        losses.append(m["loss"])
        if len(losses) == stop_after:
            break
    weights = canonical_state_dict(state.model, group=state.runtime.tp_group)
    if rt.rank == 0:
        torch.save({"start": start, "losses": losses, "weights": weights},
                   os.path.join(out, f"{tag}.pt"))


def _load(out: str, tag: str) -> dict:
    return torch.load(os.path.join(out, f"{tag}.pt"), weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("full"))
    run_distributed(_run, world_size=1, args=(out, "never", STEPS, "full"))
    return _load(out, "full")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> str:
    """A TP=2 x CP=2 run stopped after step SAVE_AT (its checkpoint), as a crash would."""
    out = str(tmp_path_factory.mktemp("tp2cp2"))
    run_distributed(_run, world_size=4, tp=2, cp=2, args=(out, "never", SAVE_AT, "first"))
    return out


def test_checkpoint_holds_the_canonical_weights_and_reads_in_one_process(interrupted):
    first = _load(interrupted, "first")
    path = find_checkpoint(os.path.join(interrupted, "checkpoints"))
    manifest = read_manifest(path)
    assert manifest["step"] == SAVE_AT and manifest["layout"] == {"world_size": 4, "tp": 2,
                                                                    "cp": 2, "dp": 1, "zero": 0}
    assert manifest["data"]["step"] == SAVE_AT and manifest["data"]["seq_len"] == 256
    with open_native_weights(path) as get:
        for name, tensor in first["weights"].items():
            # saved after step 3, the weights the run held when it stopped
            assert torch.equal(get(name), tensor), name
        with pytest.raises(CheckpointError, match="no tensor 'model.nope'"):
            get("model.nope")


# (resuming in the same layout: tests/test_launch.py's rerun; across layouts and sharding
# levels: tests/test_sharding.py)
@pytest.mark.parametrize("world,tp,cp", [(4, 1, 4), (1, 1, 1)], ids=["tp1xcp4", "one-process"])
def test_resume_in_any_layout_continues_the_uninterrupted_curve(
        uninterrupted, interrupted, tmp_path, world, tp, cp):
    import shutil

    out = str(tmp_path)
    shutil.copytree(os.path.join(interrupted, "checkpoints"), os.path.join(out, "checkpoints"))
    run_distributed(_run, world_size=world, tp=tp, cp=cp, args=(out, "auto", STEPS, "resumed"))
    first, resumed = _load(interrupted, "first"), _load(out, "resumed")
    assert resumed["start"] == SAVE_AT
    curve = first["losses"] + resumed["losses"]
    assert len(curve) == STEPS
    worst = max(rel_err(torch.tensor(a), torch.tensor(b))
                for a, b in zip(curve, uninterrupted["losses"]))
    assert worst < LAYOUT_RTOL, (curve, uninterrupted["losses"])
    for name, tensor in uninterrupted["weights"].items():
        assert rel_err(resumed["weights"][name], tensor) < 1e-3, name
    # the resumed run saved its final step; keep=2 leaves steps 3 and 6
    assert [s for s, _ in list_checkpoints(os.path.join(out, "checkpoints"))] == [SAVE_AT, STEPS]


def _truncate(path: str) -> str:
    name = max((n for n in os.listdir(path) if n.endswith(".distcp")),
               key=lambda n: os.path.getsize(os.path.join(path, n)))
    with open(os.path.join(path, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, name)) // 2)
    return name


def test_damaged_missing_and_foreign_checkpoints_are_refused(interrupted, tmp_path):
    import shutil

    root = os.path.join(tmp_path, "checkpoints")
    shutil.copytree(os.path.join(interrupted, "checkpoints"), root)
    good = find_checkpoint(root)
    # a second, newer checkpoint whose largest file is cut short
    newer = os.path.join(root, "step_00000004")
    shutil.copytree(good, newer)
    manifest = json.load(open(os.path.join(newer, "manifest.json")))
    manifest["step"] = 4
    json.dump(manifest, open(os.path.join(newer, "manifest.json"), "w"))
    name = _truncate(newer)
    with pytest.raises(CheckpointError, match=rf"truncated or damaged: {name} is \d+ bytes, "
                                              rf"the manifest says \d+"):
        find_checkpoint(newer)
    with pytest.raises(CheckpointError, match="truncated"):
        find_checkpoint(root)
    # auto-resume skips the damaged newest one and takes the last good one
    assert resolve_resume("auto", checkpoint_dir=root) == good
    assert resolve_resume("never", checkpoint_dir=root) is None
    assert resolve_resume("auto", checkpoint_dir=os.path.join(tmp_path, "none")) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(os.path.join(tmp_path, "nowhere"), checkpoint_dir=root)
    os.makedirs(os.path.join(tmp_path, "empty"))
    with pytest.raises(CheckpointError, match="not a longtrain checkpoint"):
        find_checkpoint(os.path.join(tmp_path, "empty"))
    os.remove(os.path.join(newer, "manifest.json"))
    with pytest.raises(CheckpointError, match="no manifest.json: it is incomplete"):
        read_manifest(newer)
    # without a manifest it is not listed at all: an unfinished save is invisible
    assert [s for s, _ in list_checkpoints(root)] == [SAVE_AT]


def _our_logits(rt, source: str, tokens_bt: torch.Tensor, out_path: str) -> None:
    """Logits of a model whose weights come from `source` (init.from), in this layout."""
    from longtrain.planning.resolve import apply_init_from
    from longtrain.config.schema import RunConfig
    from longtrain.model.sharding import gather_vocab_logits
    from longtrain.train.loop import build_model

    cfg = RunConfig()
    cfg.parallel.world_size, cfg.parallel.tp = rt.dims.world_size, rt.dims.tp
    cfg.init = {"from": source, "required": True}
    cfg = apply_init_from(cfg)
    model = build_model(cfg, rt)
    with torch.no_grad():
        logits = gather_vocab_logits(model(tokens_bt), vocab_size=cfg.model.vocab_size,
                                     tp=rt.dims.tp, group=rt.tp_group)
    if rt.rank == 0:
        torch.save(logits, out_path)


def test_export_from_a_sharded_checkpoint_reproduces_its_logits_in_transformers(
        interrupted, tmp_path, capsys):
    import transformers
    from safetensors.torch import load_file

    from longtrain_launch.export import main

    root = os.path.join(interrupted, "checkpoints")
    hf_dir, native_dir, hf_again = (os.path.join(tmp_path, n) for n in ("hf", "native", "hf2"))
    assert main([f"checkpoint={root}", f"out={hf_dir}"]) == 0
    tokens_bt = torch.randint(0, 301, (2, 64), generator=torch.Generator().manual_seed(7))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(tokens_bt).logits
    # saved at TP=2 x CP=2, read at TP=2 (another mesh) and in transformers (one process)
    out = os.path.join(tmp_path, "ours.pt")
    run_distributed(_our_logits, world_size=2, tp=2, args=(root, tokens_bt, out))
    assert rel_err(torch.load(out, weights_only=True), ref) < 1e-5
    # HF -> native (weights only) -> HF gives back the same tensors bit for bit
    assert main([f"checkpoint={hf_dir}", f"out={native_dir}", "format=native"]) == 0
    assert read_manifest(native_dir)["weights_only"] is True
    assert main([f"checkpoint={native_dir}", f"out={hf_again}"]) == 0
    first, again = load_file(f"{hf_dir}/model.safetensors"), load_file(f"{hf_again}/model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    # a bf16 export casts every tensor
    assert main([f"checkpoint={root}", f"out={tmp_path}/bf16", "dtype=bf16"]) == 0
    assert {t.dtype for t in load_file(f"{tmp_path}/bf16/model.safetensors").values()} == {torch.bfloat16}
    # a weights-only checkpoint is refused for resuming (no optimizer state) before any worker
    from longtrain.config.schema import RunConfig
    from longtrain.planning.validate import problems

    cfg = RunConfig()
    cfg.checkpoint.resume = native_dir
    assert any(p.startswith(f"checkpoint.resume={native_dir!r} holds weights only")
               for p in problems(cfg)), problems(cfg)


def test_export_command_refuses_bad_arguments_naming_them(interrupted, tmp_path, capsys):
    from longtrain_launch.export import main

    assert main([f"checkpoint={tmp_path}/missing", f"out={tmp_path}/x"]) == 2
    assert "checkpoint=" in capsys.readouterr().err
    assert main(["chekpoint=a", "out=b"]) == 2
    assert "unknown argument 'chekpoint=a'" in capsys.readouterr().err
    assert main([f"checkpoint={interrupted}/checkpoints"]) == 2
    assert "missing out" in capsys.readouterr().err
    assert main([f"checkpoint={interrupted}/checkpoints", f"out={tmp_path}/y", "format=gguf"]) == 2
    assert "format='gguf' is not one of ['hf', 'native']" in capsys.readouterr().err
    assert not os.path.exists(f"{tmp_path}/y")


def _failing_save(rt, out: str) -> None:
    import torch.distributed.checkpoint as dcp

    from longtrain.train.state import save_train_state
    from longtrain.train.loop import TrainState, checkpoint_meta

    cfg = _cfg(1, 1, 1, out)
    state = TrainState.create(cfg, rt)
    root = os.path.join(out, "checkpoints")
    save = lambda step: save_train_state(root, step=step, model=state.model,  # noqa: E731
                                         optimizer=state.optimizer, runtime=rt, keep=2,
                                         meta=checkpoint_meta(cfg, step=step))
    good = save(1)
    real_save = dcp.save

    def dies_half_way(sd, *, checkpoint_id, **kw):
        os.makedirs(checkpoint_id, exist_ok=True)
        open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb").write(b"partial")
        raise OSError("disk full")

    dcp.save = dies_half_way
    try:
        # a failed save of a new step, and a failed re-save of the good step itself
        for step in (2, 1):
            with pytest.raises(OSError, match="disk full"):
                save(step)
            assert find_checkpoint(root) == good
            assert [s for s, _ in list_checkpoints(root)] == [1]
    finally:
        dcp.save = real_save
    # the next save succeeds and clears the leftovers of the failed one
    assert save(2).endswith("step_00000002")
    assert sorted(os.listdir(root)) == ["step_00000001", "step_00000002"]


def test_a_failed_save_leaves_the_last_good_checkpoint(tmp_path):
    run_distributed(_failing_save, world_size=1, args=(str(tmp_path),))
