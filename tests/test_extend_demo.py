"""The context-extension demonstration, end to end through the CLIs a user runs.

The tiny model trained on passkey retrieval at 256 tokens (`tests/fixtures/passkey_base_256`,
made by `tests/fixtures/make_passkey_base.py`) retrieves at 256 tokens and fails at 2048.
`longtrain-train experiment=extend` with YaRN (factor 8) and 150 steps at 2048 tokens makes it
retrieve at 2048; `longtrain-export` writes the result as a Hugging Face directory whose
config.json carries the YaRN scaling, and `longtrain-eval eval.backend=transformers` on that
export gives the same answers as our model on the native checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

BASE = Path(__file__).parent / "fixtures" / "passkey_base_256"
DEPTHS = "[0.0,0.25,0.5,0.75,1.0]"
SAMPLES = 8
# the extension recipe (README, "Extending a checkpoint"): YaRN x8, 150 steps of 4 x 2048
# tokens, the answers' loss weighed x10, the learning rate decayed to 0
EXTEND = ["experiment=extend", f"init.from={BASE}", "rope.factor=8", "data.seq_len=2048",
          "data.batch_size=4", "data.micro_batch_size=2", "data.answer_loss_weight=10",
          "optim.lr=2e-3", "optim.min_lr_ratio=0", "train.steps=150", "checkpoint.every=0"]


def _cli(name: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    script = os.path.join(os.path.dirname(sys.executable), name)
    res = subprocess.run([script, *args], capture_output=True, text=True, timeout=timeout,
                         env=env)
    assert res.returncode == 0, f"{name} {' '.join(args)}\n{res.stdout}\n{res.stderr}"
    return res


def _evaluate(checkpoint: Path, out: Path, lengths: str, *extra: str) -> dict:
    _cli("longtrain-eval", f"checkpoint={checkpoint}", f"eval.lengths={lengths}",
         f"eval.depths={DEPTHS}", f"eval.samples={SAMPLES}", f"output_dir={out}", *extra,
         timeout=900)
    return json.loads((out / "eval.json").read_text())


def _answers(summary: dict) -> list[tuple]:
    return [(p["length"], p["depth"], p["index"], p["prediction"]) for p in summary["prompts"]]


def test_yarn_extension_makes_the_256_token_model_retrieve_at_2048(tmp_path):
    before = _evaluate(BASE, tmp_path / "eval_base", "[256,2048]")
    assert before["accuracy_by_length"]["256"] >= 0.9, before["accuracy_by_length"]
    assert before["accuracy_by_length"]["2048"] <= 0.1, before["accuracy_by_length"]

    run = tmp_path / "extend"
    _cli("longtrain-train", *EXTEND, f"hydra.run.dir={run}", timeout=1200)
    final = run / "checkpoints" / "step_00000150"
    assert final.is_dir(), sorted(os.listdir(run / "checkpoints"))

    after = _evaluate(final, tmp_path / "eval_extended", "[2048]")
    assert after["accuracy_by_length"]["2048"] >= 0.9, after["accuracy"]

    hf = tmp_path / "hf"
    _cli("longtrain-export", f"checkpoint={final}", f"out={hf}", "format=hf", timeout=300)
    config = json.loads((hf / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "yarn"
    assert config["rope_scaling"]["factor"] == 8.0
    assert config["rope_scaling"]["original_max_position_embeddings"] == 256
    assert config["max_position_embeddings"] >= 2048

    in_transformers = _evaluate(hf, tmp_path / "eval_hf", "[2048]", "eval.backend=transformers")
    assert in_transformers["layout"]["attention"] == "transformers"
    assert _answers(in_transformers) == _answers(after)
    assert in_transformers["accuracy_by_length"] == after["accuracy_by_length"]
