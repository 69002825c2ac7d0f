"""Two-process data parallel training on the CPU (torchrun, gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from app.core.artifacts import load_model
from tests.training_support import make_dataset, train_args

ROOT = Path(__file__).resolve().parent.parent


def test_torchrun_two_processes(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", normal_patients=6, pneumonia_patients=6, per_patient=2)
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training",
        *train_args(data, out, "--epochs", "1", "--threads", "1", "--batch-size", "4"),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(2 process(es))" in (out / "train.log").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1]
    split = json.loads((out / "split.json").read_text())
    assert rows[0]["train_loss"] > 0 and 0.0 <= rows[0]["val_auc"] <= 1.0
    assert len(split["val"]) > 0
    loaded = load_model(out)
    assert loaded.metadata.provenance["world_size"] == 2
