"""Schema-driven fuzzing of the live service with schemathesis: the server and its OpenAPI document agree.

Schemathesis's CLI sends a bounded number of generated requests per operation (valid and invalid,
its coverage and fuzzing phases) over real HTTP to a uvicorn server on loopback, and judges every
answer with all of its checks: no 500, documented status codes, content types and response
schemas, invalid data refused, valid data accepted. ``tests/schemathesis.toml`` says the little
a schema cannot: which bytes are an X-ray. (Its pytest plugin does not support this pytest yet,
hence the CLI.)
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live_server import LiveServer, live_server, serving_settings

CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[LiveServer]:
    with live_server(serving_settings(tiny_weights, max_batch_files=4)) as running:
        yield running


@pytest.mark.parametrize("seed", [1, 2])
def test_schemathesis_finds_no_failures(server: LiveServer, seed: int, tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(CONFIG),
        "--no-color",
        "run",
        f"{server.url}/openapi.json",
        "--max-examples",
        "40",
        "--seed",
        str(seed),
        "--request-timeout",
        "60",
        "--generation-database",
        ":memory:",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    with server.client() as client:
        operations = sum(len(methods) for methods in client.get("/openapi.json").json()["paths"].values())
    assert f"{operations} selected / {operations} total" in result.stdout  # every operation was exercised
