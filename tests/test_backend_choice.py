"""CXR_BACKEND / CXR_PRECISION resolution: refused combinations, and what ``auto`` picks from the gate record.

The CPU is one of the choice's inputs: every test here runs on a simulated one (a Cascade Lake, with
int8 dot products and no bf16 units, unless a test says otherwise), so the table is checked the same
on every CI machine. What the real CPU runs is tests/test_openvino_backend.py's business.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.core.backend_choice import BackendChoiceError, choose
from app.core.fastpath_record import (
    FastPathRecord,
    GateRecord,
    GateResult,
    Int8Ranges,
    RecordError,
    read_record,
    record_path,
    write_record,
)
from tests.conftest import AVX2_EPYC, CASCADE_LAKE, SAPPHIRE_RAPIDS

SHA = "ab" * 32
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def cpu(simulate_cpu) -> None:  # type: ignore[no-untyped-def]
    simulate_cpu(CASCADE_LAKE)


def result(images: int = 1000, auc_drop: float = 0.0, flips: int = 0, guard_flips: int | None = 0) -> GateResult:
    return GateResult(
        dataset="validation",
        description="validation: test fixture",
        images=images,
        roc_auc_fp32=0.999,
        roc_auc=0.999 - auc_drop,
        max_probability_difference=0.02,
        label_flips=flips,
        guard_refusal_flips=guard_flips,
    )


def record(tmp_path: Path, *gates: GateRecord, ranges: bool = True) -> Path:
    int8 = Int8Ranges(images=300, source="fixture", exporter=torch.__version__, ranges={"x": (-1.0, 1.0)})
    write_record(
        FastPathRecord(weights_sha256=SHA, input_size=32, int8=int8 if ranges else None, gate=list(gates)), tmp_path
    )
    return tmp_path


def pick(
    tmp_path: Path, backend: str = "auto", precision: str = "auto", guard_on: bool = True, device: torch.device = CPU
):  # type: ignore[no-untyped-def]
    return choose(backend, device, precision, weights=tmp_path, sha256=SHA, guard_on=guard_on)


def test_gate_limits_are_the_issue_goals() -> None:
    assert result(auc_drop=0.0019).passes(with_guard=True)
    assert not result(auc_drop=0.0021).passes(with_guard=False)
    assert result(flips=5).passes(with_guard=False) and not result(flips=6).passes(with_guard=False)  # 0.5 % of 1000
    assert result(guard_flips=None).passes(with_guard=False) and not result(guard_flips=None).passes(with_guard=True)
    assert not result(guard_flips=6).passes(with_guard=True) and result(guard_flips=6).passes(with_guard=False)


def test_without_a_record_auto_serves_openvino_fp32_on_the_cpu(tmp_path: Path) -> None:
    choice = pick(tmp_path)
    assert (choice.backend, choice.precision) == ("openvino", "fp32") and "no model.cpu.json" in choice.reason


def test_auto_is_torch_on_a_gpu(tmp_path: Path) -> None:
    choice = pick(tmp_path, device=torch.device("cuda", 0), precision="bf16")
    assert (choice.backend, choice.precision) == ("torch", "bf16")


def test_auto_takes_int8_only_where_the_gate_approves_it_for_the_guard_mode(tmp_path: Path) -> None:
    breaks_guard = GateRecord(precision="int8", results=[result(guard_flips=777)])
    bf16_ok = GateRecord(precision="bf16", results=[result(guard_flips=1)])
    record(tmp_path, breaks_guard, bf16_ok)
    with_guard, without_guard = pick(tmp_path, guard_on=True), pick(tmp_path, guard_on=False)
    assert (without_guard.backend, without_guard.precision) == ("openvino", "int8")
    assert with_guard.precision == "fp32"  # no bf16 units on this CPU


def test_a_test_set_result_never_chooses(tmp_path: Path) -> None:
    only_test = result().model_copy(update={"dataset": "test"})
    record(tmp_path, GateRecord(precision="int8", results=[only_test]))
    assert pick(tmp_path, guard_on=False).precision == "fp32"


@pytest.mark.parametrize(
    ("backend", "precision", "device", "message"),
    [
        ("torch", "int8", CPU, "precision int8 needs CXR_BACKEND=openvino"),
        ("auto", "int8", torch.device("cuda", 0), "precision int8 needs CXR_BACKEND=openvino"),
        ("openvino", "fp32", torch.device("cuda", 0), "CXR_BACKEND=openvino runs on the CPU"),
        ("openvino", "fp16", CPU, "precision fp16 needs a CUDA device"),
        ("onnx", "fp32", CPU, "invalid backend 'onnx'"),
        ("openvino", "int8", CPU, "int8 needs measured activation ranges"),
    ],
)
def test_refused_combinations_say_why_in_one_line(
    tmp_path: Path, backend: str, precision: str, device: torch.device, message: str
) -> None:
    with pytest.raises(BackendChoiceError, match=message) as failure:
        pick(tmp_path, backend=backend, precision=precision, device=device)
    assert "\n" not in str(failure.value)


def test_int8_with_the_guard_is_refused_with_the_measured_reason(tmp_path: Path) -> None:
    record(tmp_path, GateRecord(precision="int8", results=[result(guard_flips=777)]))
    with pytest.raises(BackendChoiceError, match=r"guard's verdict on 777 of 1000 validation images"):
        pick(tmp_path, backend="openvino", precision="int8", guard_on=True)
    assert pick(tmp_path, backend="openvino", precision="int8", guard_on=False).precision == "int8"


def test_int8_that_failed_the_gate_is_refused_even_without_the_guard(tmp_path: Path) -> None:
    record(tmp_path, GateRecord(precision="int8", results=[result(flips=40)]))
    with pytest.raises(BackendChoiceError, match="failed the accuracy gate on validation"):
        pick(tmp_path, backend="openvino", precision="int8", guard_on=False)


def test_ungated_int8_needs_the_guard_off(tmp_path: Path) -> None:
    record(tmp_path)
    with pytest.raises(BackendChoiceError, match="not been through the accuracy gate"):
        pick(tmp_path, backend="openvino", precision="int8", guard_on=True)
    assert pick(tmp_path, backend="openvino", precision="int8", guard_on=False).precision == "int8"


def test_bf16_follows_the_cpu(tmp_path: Path, simulate_cpu) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BackendChoiceError, match=r"not supported by this CPU \(OpenVINO finds no bf16 units\)"):
        pick(tmp_path, backend="openvino", precision="bf16")
    simulate_cpu(SAPPHIRE_RAPIDS)
    assert pick(tmp_path, backend="openvino", precision="bf16").precision == "bf16"


def test_int8_needs_int8_dot_products_though_openvino_reports_int8(tmp_path: Path, simulate_cpu) -> None:  # type: ignore[no-untyped-def]
    """An AVX2-only x86 CPU: OpenVINO lists INT8, but its int8 kernels there saturate (benchmarks/NOTES.md 11)."""
    approved = GateRecord(precision="int8", results=[result()])
    record(tmp_path, approved)
    assert pick(tmp_path).precision == "int8"
    simulate_cpu(AVX2_EPYC)
    with pytest.raises(BackendChoiceError, match="precision int8 is not supported by this CPU") as refusal:
        pick(tmp_path, backend="openvino", precision="int8")
    assert "no int8 dot-product instructions" in str(refusal.value) and "\n" not in str(refusal.value)
    choice = pick(tmp_path)  # auto serves what is correct here, and says why
    assert (choice.backend, choice.precision) == ("openvino", "fp32") and "runs on this CPU" in choice.reason
    simulate_cpu((AVX2_EPYC[0], None))  # flags unreadable (not Linux x86): OpenVINO's word stands
    assert pick(tmp_path).precision == "int8"


def test_auto_passes_over_precisions_that_failed_to_load_and_says_so(tmp_path: Path, simulate_cpu) -> None:  # type: ignore[no-untyped-def]
    simulate_cpu(SAPPHIRE_RAPIDS)
    record(tmp_path, GateRecord(precision="int8", results=[result()]), GateRecord(precision="bf16", results=[result()]))
    first = pick(tmp_path)
    assert (first.precision, first.automatic) == ("int8", True)
    failed = {"int8": "golden check failed: input-guard scores differ by 0.6"}
    second = choose("auto", CPU, "auto", weights=tmp_path, sha256=SHA, guard_on=True, failed=failed)
    assert second.precision == "bf16" and "int8 did not load on this CPU: golden check failed" in second.reason
    failed["bf16"] = "golden check failed: logits differ by 0.5"
    last = choose("auto", CPU, "auto", weights=tmp_path, sha256=SHA, guard_on=True, failed=failed)
    assert last.precision == "fp32" and "bf16 did not load on this CPU" in last.reason
    assert not pick(tmp_path, backend="openvino", precision="int8").automatic  # a named precision never falls back


def test_a_record_for_other_weights_is_refused(tmp_path: Path) -> None:
    record(tmp_path)
    with pytest.raises(RecordError, match="was measured for weights abababababab, not these"):
        read_record(tmp_path, "cd" * 32)
    record_path(tmp_path).write_text('{"weights_sha256": "nope"}')
    with pytest.raises(RecordError, match=r"invalid .*model\.cpu\.json: weights_sha256"):
        read_record(tmp_path, SHA)
    # auto falls back to fp32 rather than trusting a broken record; an explicit int8 is refused.
    assert pick(tmp_path).precision == "fp32"
    with pytest.raises(BackendChoiceError, match="invalid"):
        pick(tmp_path, backend="openvino", precision="int8", guard_on=False)
