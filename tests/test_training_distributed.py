"""Two-process data parallel training on the CPU (torchrun, gloo)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from app.core.artifacts import load_model
from tests.training_support import make_dataset, train_args
from training.distributed import DistInfo, ReplicaDriftError, check_replicas_in_sync
from training.loops import stop_if_diverged
from training.user_errors import DivergedError

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


def _run_two(worker: Callable[[int, int, dict[int, str]], None]) -> dict[int, str]:
    """Run ``worker(rank, port, results)`` in two gloo processes on a free loopback port; returns the results."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(port, results), nprocs=2, join=True)
    return dict(results)


def test_replica_drift_is_detected() -> None:
    drift = "the 2 processes ended with different parameters"
    assert _run_two(_drift_worker) == {0: drift, 1: drift}


def _divergence_worker(rank: int, port: int, results: dict[int, str]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        info = DistInfo(rank=rank, world_size=2)
        stop_if_diverged(0.7, info, "step 1", 0.5)  # finite on both: goes on
        try:
            stop_if_diverged(float("nan") if rank == 0 else 0.7, info, "step 2", 0.5)
            results[rank] = "went on"
        except DivergedError as exc:
            results[rank] = str(exc)
    finally:
        dist.destroy_process_group()


def test_a_loss_gone_nan_on_one_process_stops_every_process_at_the_same_step() -> None:
    """Were only rank 0 to stop, rank 1 would wait in its next gradient all-reduce for a peer that is gone."""
    tail = "(learning rate 5.00e-01): the run diverged; start a new run (another --out) with a lower --lr"
    assert _run_two(_divergence_worker) == {
        0: f"step 2: the training loss is nan {tail}",
        1: f"step 2: the training loss is not finite on another process {tail}",
    }
