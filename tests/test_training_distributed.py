"""Two-process data parallel training on the CPU (torchrun, gloo)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from app.core.artifacts import load_model
from tests.training_support import make_dataset, train_args
from training.distributed import DistInfo, ReplicaDriftError, check_replicas_in_sync

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
    # Both ranks ended with bitwise-identical parameters (checked by the run itself before export).
    assert loaded.metadata.provenance["world_size"] == 2
    assert loaded.metadata.provenance["replicas_checked_in_sync"] is True


def _drift_worker(rank: int, port: int, results: dict[int, str]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        layer = torch.nn.Linear(3, 2)
        with torch.no_grad():
            layer.weight.fill_(1.0)
            layer.bias.fill_(float(rank))  # rank 1 drifted
        info = DistInfo(rank=rank, world_size=2)
        try:
            check_replicas_in_sync(layer, info)
            results[rank] = "in sync"
        except ReplicaDriftError as exc:
            results[rank] = str(exc)
        layer.bias.data.fill_(0.0)
        check_replicas_in_sync(layer, info)  # equal again: no error
    finally:
        dist.destroy_process_group()


def test_replica_drift_is_detected() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_drift_worker, args=(port, results), nprocs=2, join=True)
    drift = "the 2 processes ended with different parameters"
    assert dict(results) == {0: drift, 1: drift}
