"""Offline scorer: same numbers as the service path, unreadable files reported, interrupted runs resumed."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import torch
from PIL import Image
from pydicom import uid

from app import score
from app.core.artifacts import LoadedModel, load_model
from app.core.decision import pneumonia_probability
from app.core.dicom import DicomPolicy
from app.core.engine import InferenceEngine, load_engine
from app.core.preprocessing import preprocess
from tests.conftest import add_detail_floor, encode, export_tiny_model, synthetic_xray
from tests.dicom_files import Spec, dicom_bytes

GOOD = ["a0.jpg", "a1.jpg", "a2.png", "nested/deeper/c3.jpg", "nested/b4.jpg", "nested/b5.png"]
CORRUPT = "nested/corrupt.jpg"
NOT_IMAGE = "notes.txt"


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Six real images in nested folders, a truncated JPEG, a text file and a hidden file."""
    root = tmp_path / "images"
    for seed, name in enumerate(GOOD):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(synthetic_xray(90 + seed, 80, seed), "PNG" if name.endswith(".png") else "JPEG"))
    (root / CORRUPT).write_bytes(encode(synthetic_xray(seed=9))[:400])
    (root / NOT_IMAGE).write_text("radiology notes, not an image\n")
    (root / ".DS_Store").write_bytes(b"\0\1")
    return root


@pytest.fixture(autouse=True)
def clean_settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scorer's defaults come from CXR_* variables; the developer's shell must not leak in."""
    for name in [name for name in os.environ if name.startswith("CXR_")]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def engine(tiny_weights: Path) -> InferenceEngine:
    """One engine for the module: loading a model dominates the cost of these tests."""
    return load_engine(tiny_weights, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_weights: Path) -> LoadedModel:
    return load_model(tiny_weights)


def read_rows(out: Path) -> list[dict[str, str]]:
    with out.open(newline="") as handle:
        return list(csv.DictReader(handle))


def direct_probability(loaded: LoadedModel, image: Path) -> float:
    """P(pneumonia) computed without the scorer or the engine: preprocess + network + calibration."""
    pixels = preprocess(image.read_bytes(), loaded.metadata.spec.input_size).unsqueeze(0)
    with torch.inference_mode():
        return float(pneumonia_probability(loaded.network(pixels), loaded.metadata.temperature)[0])


def run(image_dir: Path, out: Path, weights: Path, *extra: str) -> int:
    """The whole CLI in-process, model loading included."""
    argv = [str(image_dir), "--out", str(out), "--weights", str(weights), "--device", "cpu", "--no-progress"]
    return score.main([*argv, *extra])


def run_with(engine: InferenceEngine, image_dir: Path, out: Path, batch_size: int = 32) -> score.Summary:
    """The scoring loop with an already loaded engine."""
    return score.score(image_dir, out, engine, batch_size=batch_size, workers=2, max_pixels=10_000_000, progress=False)


def test_scores_recursively_and_reports_unreadable_files(
    image_dir: Path, tiny_weights: Path, reference: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "predictions.csv"
    assert run(image_dir, out, tiny_weights, "--batch-size", "4") == 0

    rows = read_rows(out)
    assert [row["path"] for row in rows] == sorted([*GOOD, CORRUPT, NOT_IMAGE])
    sha = reference.metadata.sha256
    assert {row["model_sha256"] for row in rows} == {sha} and {row["threshold"] for row in rows} == {"0.5"}
    by_path = {row["path"]: row for row in rows}
    for name in GOOD:
        row = by_path[name]
        probability = float(row["pneumonia_probability"])
        assert probability == pytest.approx(direct_probability(reference, image_dir / name), abs=1e-6)
        assert row["label"] == ("PNEUMONIA" if probability >= 0.5 else "NORMAL")
        assert row["error_code"] == row["error_message"] == ""
    assert (by_path[CORRUPT]["error_code"], by_path[NOT_IMAGE]["error_code"]) == (
        "corrupt_image",
        "unsupported_media_type",
    )
    assert by_path[CORRUPT]["label"] == by_path[CORRUPT]["pneumonia_probability"] == ""
    assert by_path[NOT_IMAGE]["error_message"]

    err = capsys.readouterr().err
    assert "scored 8 files (2 unreadable or refused), skipped 0" in err
    assert f"corrupt_image: {CORRUPT}" in err and f"unsupported_media_type: {NOT_IMAGE}" in err


def test_labels_follow_the_model_card_threshold(
    image_dir: Path, engine: InferenceEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "metadata", engine.metadata.model_copy(update={"threshold": 0.999}))
    out = tmp_path / "p.csv"
    run_with(engine, image_dir, out)
    scored = [row for row in read_rows(out) if not row["error_code"]]
    assert (
        scored and {row["label"] for row in scored} == {"NORMAL"} and {row["threshold"] for row in scored} == {"0.999"}
    )


def test_resume_skips_finished_files_and_repairs_a_torn_row(
    image_dir: Path, engine: InferenceEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "predictions.csv"
    full = tmp_path / "reference.csv"
    run_with(engine, image_dir, full)
    # A real earlier run killed mid-write: header, three flushed rows and half of the fourth.
    lines = full.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:20])

    processed: list[str] = []
    real_prepare = score.prepare
    monkeypatch.setattr(score, "prepare", lambda root, path, *a: processed.append(path) or real_prepare(root, path, *a))
    summary = run_with(engine, image_dir, out, batch_size=2)

    done_before = {line.split(",")[0] for line in lines[1:4]}
    assert sorted(processed) == sorted({row["path"] for row in read_rows(full)} - done_before)
    assert (summary.scored, summary.skipped, sum(summary.errors.values())) == (5, 3, 2)
    # Torn row dropped, nothing duplicated, same order; values equal up to float noise, because the
    # resumed run used another batch size and only CPU fp32 promises batch-independent bits.
    resumed, reference = read_rows(out), read_rows(full)
    noisy = ("pneumonia_probability", "guard_score")  # floats: equal up to batch-size noise
    assert [{k: v for k, v in row.items() if k not in noisy} for row in resumed] == [
        {k: v for k, v in row.items() if k not in noisy} for row in reference
    ]
    for got, expected in zip(resumed, reference, strict=True):
        for column in noisy:
            if expected[column]:
                assert float(got[column]) == pytest.approx(float(expected[column]), rel=1e-5, abs=1e-6)
            else:
                assert got[column] == ""

    processed.clear()
    summary = run_with(engine, image_dir, out)
    assert processed == [] and (summary.scored, summary.skipped) == (0, 8)


def test_interrupt_keeps_flushed_batches(
    image_dir: Path, engine: InferenceEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "predictions.csv"
    real_rows_for = score.rows_for
    calls = 0

    def interrupt_second_batch(
        batch: list[score.Prepared], engine: InferenceEngine, explain: bool = False
    ) -> tuple[list[dict[str, str]], list[score.Overlay]]:
        nonlocal calls
        calls += 1
        if calls == 2:
            on_disk.extend(row["path"] for row in read_rows(out))  # while the CSV is still open for writing
            raise KeyboardInterrupt
        return real_rows_for(batch, engine, explain)

    on_disk: list[str] = []
    monkeypatch.setattr(score, "rows_for", interrupt_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_with(engine, image_dir, out, batch_size=3)
    first_batch = sorted([*GOOD, CORRUPT, NOT_IMAGE])[:3]
    assert on_disk == first_batch and [row["path"] for row in read_rows(out)] == first_batch

    monkeypatch.setattr(score, "rows_for", real_rows_for)
    assert run_with(engine, image_dir, out, batch_size=3).skipped == 3
    assert [row["path"] for row in read_rows(out)] == sorted([*GOOD, CORRUPT, NOT_IMAGE])


def test_refuses_to_mix_models_in_one_csv(
    image_dir: Path, engine: InferenceEngine, tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "predictions.csv"
    run_with(engine, image_dir, out)
    before = out.read_text().replace(engine.metadata.sha256, "0" * 64)  # as if another model wrote it
    out.write_text(before)
    assert run(image_dir, out, tiny_weights) == score.USAGE_ERROR
    assert "write to a new --out file" in capsys.readouterr().err and out.read_text() == before


@pytest.mark.parametrize(
    "content",
    [
        b"id,value\n1,2\n",
        b'{"auc": 0.97, "note": "results of last week"}',  # one line, no newline: not a header cut by a kill
        b"path,label,note",  # begins like our header, but is not a prefix of it
        b"path,label\rfoo,bar\r",  # bare CR line ends (Excel's "CSV (Macintosh)")
        b'"unclosed\n',
    ],
)
def test_refuses_a_foreign_file_and_leaves_it_untouched(
    content: bytes, image_dir: Path, engine: InferenceEngine, tmp_path: Path
) -> None:
    out = tmp_path / "other.csv"
    out.write_bytes(content)
    with pytest.raises(score.UsageError, match="not a predictions file"):
        run_with(engine, image_dir, out)
    assert out.read_bytes() == content


def test_a_header_cut_by_a_kill_is_repaired(image_dir: Path, engine: InferenceEngine, tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    out.write_text(",".join(score.COLUMNS)[:30])
    assert run_with(engine, image_dir, out).scored == 8 and len(read_rows(out)) == 8


def _edit_second_row(lines: list[str]) -> list[str]:
    return [lines[0], lines[1].replace("\r\n", ",checked\r\n"), *lines[2:]]


@pytest.mark.parametrize(
    ("edit", "line"),
    [
        (_edit_second_row, 2),  # a reviewer's note on one row
        (lambda lines: [*lines[:3], lines[0], *lines[3:]], 4),  # a second header from a concurrent run
        (lambda lines: [*lines[:2], '"a note left open\r\n', *lines[2:]], 3),  # an open quote swallows the rest
        (lambda lines: [*lines[:-1], lines[-1].replace("\r\n", ",checked\r\n")], 9),  # a whole last line, edited
    ],
)
def test_a_bad_row_is_refused_not_cut_off_with_everything_after_it(
    edit: Callable[[list[str]], list[str]], line: int, image_dir: Path, engine: InferenceEngine, tmp_path: Path
) -> None:
    out = tmp_path / "p.csv"
    run_with(engine, image_dir, out)
    edited = "".join(edit(out.read_bytes().decode().splitlines(keepends=True))).encode()
    out.write_bytes(edited)
    with pytest.raises(score.UsageError, match=f"line {line} is not a whole predictions row"):
        run_with(engine, image_dir, out)
    assert out.read_bytes() == edited


def test_output_inside_the_scored_folder_is_not_scored(image_dir: Path, engine: InferenceEngine) -> None:
    out = image_dir / "predictions.csv"
    run_with(engine, image_dir, out)
    assert run_with(engine, image_dir, out).skipped == 8
    assert "predictions.csv" not in {row["path"] for row in read_rows(out)} and len(read_rows(out)) == 8


def test_cli_missing_directory_exits_2(tmp_path: Path) -> None:
    """Through the real ``python -m app.score`` entry point: the exit status scripts rely on."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CXR_")}
    result = subprocess.run(
        [sys.executable, "-m", "app.score", str(tmp_path / "missing"), "--out", str(tmp_path / "p.csv")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2 and "is not a directory" in result.stderr
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--out", "{tmp}/no/such/p.csv"],
        ["--out", "{tmp}/p.csv", "--batch-size", "0"],
        ["--out", "{tmp}/p.csv", "--weights", "{tmp}/none"],
        ["--out", "{tmp}/p.csv", "--device", "tpu"],
        ["--out", "{tmp}/p.csv", "--device", "cpu", "--precision", "fp16"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(tmp_path), *(arg.format(tmp=tmp_path) for arg in argv)]
    try:
        status = score.main(args)
    except SystemExit as exc:  # argparse reports bad arguments by exiting
        status = exc.code
    assert status == 2 and "error:" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_cli_defaults_follow_service_settings(monkeypatch: pytest.MonkeyPatch, tiny_weights: Path) -> None:
    monkeypatch.setenv("CXR_WEIGHTS", str(tiny_weights))
    monkeypatch.setenv("CXR_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("CXR_MAX_PIXELS", "1234")
    args = score.build_parser(score.load_settings()).parse_args(["dir", "--out", "p.csv"])
    assert (args.weights, args.batch_size, args.max_pixels, args.device) == (tiny_weights, 7, 1234, "auto")


@pytest.fixture
def dicom_export(tmp_path: Path) -> Path:
    """A PACS-style export: extensionless DICOM files in nested folders, a CT among them, and a JPEG."""
    root = tmp_path / "export"
    files = {
        "DICOM/ST1/SE1/IM1": dicom_bytes(Spec(syntax=uid.JPEGLosslessSV1, photometric="MONOCHROME1", modality="CR")),
        "DICOM/ST1/SE1/IM2": dicom_bytes(Spec(window=(1800, 2500))),
        "DICOM/ST1/SE2/IM1": dicom_bytes(Spec(modality="CT")),
        "DICOM/ST2/SE1/IM1": dicom_bytes(Spec(syntax=uid.RLELossless))[:-400],
        "photo.jpg": encode(synthetic_xray(seed=4)),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_scores_a_dicom_export_folder(
    dicom_export: Path, tiny_weights: Path, reference: LoadedModel, tmp_path: Path
) -> None:
    out = tmp_path / "predictions.csv"
    assert (
        run(dicom_export, out, tiny_weights, "--input-guard", "off") == 0
    )  # DICOM decoding is tested here; the tiny model's guard (fitted on JPEG synthetics) is not
    rows = {row["path"]: row for row in read_rows(out)}
    assert list(read_rows(out)[0]) == list(score.COLUMNS)  # no UID column unless asked for
    for name in ("DICOM/ST1/SE1/IM1", "DICOM/ST1/SE1/IM2", "photo.jpg"):
        probability = float(rows[name]["pneumonia_probability"])
        assert probability == pytest.approx(direct_probability(reference, dicom_export / name), abs=1e-6)
    assert rows["DICOM/ST1/SE2/IM1"]["error_code"] == "unsupported_modality"
    assert rows["DICOM/ST2/SE1/IM1"]["error_code"] == "corrupt_image"


def test_with_uids_adds_the_sop_instance_uid_column(dicom_export: Path, tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "predictions.csv"
    assert run(dicom_export, out, tiny_weights, "--with-uids") == 0
    rows = read_rows(out)
    assert list(rows[0]) == ["path", "sop_instance_uid", *score.COLUMNS[1:]]
    by_path = {row["path"]: row["sop_instance_uid"] for row in rows}
    for name in ("DICOM/ST1/SE1/IM1", "DICOM/ST1/SE1/IM2", "DICOM/ST1/SE2/IM1"):  # refused files keep their UID
        assert by_path[name] == sop_uid(dicom_export / name)
    assert by_path["photo.jpg"] == ""


def test_resume_works_with_either_form_and_refuses_to_mix_them(
    dicom_export: Path, engine: InferenceEngine, tmp_path: Path
) -> None:
    def score_into(out: Path, with_uids: bool) -> score.Summary:
        return score.score(
            dicom_export, out, engine, batch_size=2, workers=2, max_pixels=10**6, progress=False, with_uids=with_uids
        )

    for with_uids in (False, True):
        out = tmp_path / f"uids-{with_uids}.csv"
        full = score_into(out, with_uids)
        lines = out.read_text().splitlines(keepends=True)
        out.write_text("".join(lines[:3]))  # header and two rows: an interrupted run
        resumed = score_into(out, with_uids)
        assert (full.scored, resumed.skipped, resumed.scored) == (5, 2, 3)
        assert out.read_text() == "".join(lines)
        with pytest.raises(score.UsageError, match=f"written {'with' if with_uids else 'without'} --with-uids"):
            score_into(out, not with_uids)
        assert out.read_text() == "".join(lines)


def test_scorer_follows_the_dicom_settings(
    dicom_export: Path, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_DICOM_CHECK_MODALITY", "false")
    monkeypatch.setenv("CXR_INPUT_GUARD", "off")  # a CT slice is what the guard refuses; here the DICOM check is tested
    out = tmp_path / "predictions.csv"
    assert run(dicom_export, out, tiny_weights) == 0
    assert {row["path"]: row["error_code"] for row in read_rows(out)}["DICOM/ST1/SE2/IM1"] == ""


def test_heatmaps_writes_one_overlay_per_scored_image(image_dir: Path, tiny_weights: Path, tmp_path: Path) -> None:
    out, heatmaps = tmp_path / "predictions.csv", tmp_path / "heatmaps"
    assert run(image_dir, out, tiny_weights, "--heatmaps", str(heatmaps)) == 0
    written = sorted(path.relative_to(heatmaps).as_posix() for path in heatmaps.rglob("*") if path.is_file())
    assert written == sorted(f"{name}.png" for name in GOOD)  # none for the unreadable files
    for seed, name in enumerate(GOOD):
        with Image.open(heatmaps / f"{name}.png") as overlay:
            assert overlay.format == "PNG" and overlay.size == (90 + seed, 80)  # the upload's own size and aspect
    # Heatmaps inside the scored folder are not scored on the next run.
    inside = image_dir / "heatmaps"
    assert run(image_dir, tmp_path / "again.csv", tiny_weights, "--heatmaps", str(inside)) == 0
    assert {row["path"] for row in read_rows(tmp_path / "again.csv")} == {*GOOD, CORRUPT, NOT_IMAGE}
    assert run(image_dir, tmp_path / "third.csv", tiny_weights, "--heatmaps", str(inside)) == 0
    assert {row["path"] for row in read_rows(tmp_path / "third.csv")} == {*GOOD, CORRUPT, NOT_IMAGE}


@pytest.mark.parametrize("above", [0, 1])
def test_heatmaps_in_dir_or_above_it_is_refused(
    above: int, image_dir: Path, engine: InferenceEngine, tiny_weights: Path, tmp_path: Path
) -> None:
    """Every file lies inside such a HEATDIR: the old scorer excluded them all and scored nothing, exit 0."""
    heatmaps = image_dir.parents[above - 1] if above else image_dir
    out = tmp_path / "p.csv"
    with pytest.raises(score.UsageError, match="folder above it"):
        score.score(
            image_dir, out, engine, batch_size=4, workers=1, max_pixels=10**6, progress=False, heatmaps=heatmaps
        )
    assert run(image_dir, out, tiny_weights, "--heatmaps", str(heatmaps)) == score.USAGE_ERROR
    assert not out.exists()


def test_a_heatmap_that_cannot_be_written_keeps_its_row(
    engine: InferenceEngine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name too long for HEATDIR and a file/folder collision (``x`` and ``x.png/``) used to end the run."""
    root, heatmaps, out = tmp_path / "images", tmp_path / "heat", tmp_path / "p.csv"
    long_name = "x" * 248 + ".jpg"  # 252 bytes: a valid name, but its 256-byte heatmap name is not
    names = [long_name, "a.jpg", "a.jpg.png/b.jpg", "c.jpg"]
    for seed, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(encode(synthetic_xray(seed=seed)))
    summary = score.score(
        root, out, engine, batch_size=4, workers=1, max_pixels=10**6, progress=False, heatmaps=heatmaps
    )
    rows = {row["path"]: row for row in read_rows(out)}
    assert sorted(rows) == sorted(names) and all(row["label"] for row in rows.values())
    assert "File name too long" in rows[long_name]["heatmap_error"]
    collided = [name for name in ("a.jpg", "a.jpg.png/b.jpg") if rows[name]["heatmap_error"]]
    assert len(collided) == 1 and rows["c.jpg"]["heatmap_error"] == ""  # one of the two wins the name
    assert (heatmaps / "c.jpg.png").is_file()
    assert sorted(path for path, _ in summary.heatmap_failures) == sorted([long_name, *collided])
    assert f"warning: no heatmap for {long_name}" in capsys.readouterr().err
    again = score.score(root, out, engine, batch_size=4, workers=1, max_pixels=10**6, progress=False, heatmaps=heatmaps)
    assert (again.scored, again.skipped) == (0, 4)


def test_a_second_run_on_the_same_csv_is_refused(
    image_dir: Path, tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.csv"
    out.write_text(",".join(score.COLUMNS) + "\r\n")
    with score.out_lock(out):  # a first run still going
        assert run(image_dir, out, tiny_weights) == score.USAGE_ERROR
        assert f"another run is writing {out} (pid {os.getpid()}" in capsys.readouterr().err
    assert read_rows(out) == []
    assert run(image_dir, out, tiny_weights) == 0 and len(read_rows(out)) == 8  # free once the first ends


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", ["directory", "DIR", "", "fifo", "/dev/null"])
def test_out_that_is_not_a_regular_file_exits_2(
    target: str, image_dir: Path, tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory was a traceback; a FIFO or ``/dev/stdout`` into a pipe hung; ``/dev/zero`` read forever."""
    out = {"directory": str(tmp_path), "DIR": str(image_dir), "fifo": str(tmp_path / "fifo")}.get(target, target)
    if target == "fifo":
        os.mkfifo(out)
    assert run(image_dir, Path(out) if out else out, tiny_weights) == score.USAGE_ERROR  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "error: --out" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "option",
    [
        ["--batch-size", "99999999999999999999"],
        ["--batch-size", str(score.MAX_BATCH_SIZE + 1)],
        ["--workers", str(score.MAX_WORKERS + 1)],
        ["--workers", "99999999999999999999"],
        ["--max-pixels", str(2**40 + 1)],
        ["--max-pixels", "1e9"],
    ],
)
def test_options_past_the_service_bounds_exit_2(option: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Huge values passed argparse, then failed in islice or the decode pool, or started 10**20 workers."""
    with pytest.raises(SystemExit) as exc:
        score.build_parser(score.load_settings()).parse_args(["dir", "--out", "p.csv", *option])
    assert exc.value.code == score.USAGE_ERROR and f"argument {option[0]}: must be" in capsys.readouterr().err


def test_rows_record_their_settings_and_resume_refuses_others(
    image_dir: Path, engine: InferenceEngine, tiny_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p.csv"
    run_with(engine, image_dir, out)
    written = out.read_bytes()
    settings = {"input_guard": "reject", "precision": "fp32", "backend": "torch"}
    expected = {**settings, "dicom_checks": "modality;view_position;presentation_intent"}
    assert {tuple(row[name] for name in expected) for row in read_rows(out)} == {tuple(expected.values())}
    flagging = load_engine(tiny_weights, device="cpu", input_guard="flag")
    with pytest.raises(score.UsageError, match=r"input_guard reject \(now flag\)"):
        run_with(flagging, image_dir, out)
    with pytest.raises(score.UsageError, match=r"dicom_checks .* \(now view_position;presentation_intent\)"):
        score.score(
            image_dir, out, engine, batch_size=4, workers=1, max_pixels=10**6, progress=False,
            dicom=DicomPolicy(check_modality=False),
        )  # fmt: skip
    assert out.read_bytes() == written


def test_a_csv_from_before_the_settings_columns_is_refused(
    image_dir: Path, engine: InferenceEngine, tmp_path: Path
) -> None:
    out = tmp_path / "old.csv"
    legacy = (",".join(score.LEGACY_COLUMNS) + "\r\na0.jpg,NORMAL,0.1,0.5,1.0,2.0,,,," + "0" * 64 + "\r\n").encode()
    out.write_bytes(legacy)
    with pytest.raises(score.UsageError, match=r"older app\.score"):
        run_with(engine, image_dir, out)
    assert out.read_bytes() == legacy


def test_guard_detail_and_floor_columns(image_dir: Path, engine: InferenceEngine, tmp_path: Path) -> None:
    weights = export_tiny_model(tmp_path / "weights")
    floor = add_detail_floor(weights)
    with_floor = load_engine(weights, device="cpu", input_guard="flag")
    run_with(with_floor, image_dir, tmp_path / "floor.csv")
    scored = [row for row in read_rows(tmp_path / "floor.csv") if row["guard_score"]]
    assert scored and {row["detail_floor"] for row in scored} == {repr(floor)}
    assert all(float(row["guard_detail"]) > 0 for row in scored)
    run_with(engine, image_dir, tmp_path / "none.csv")  # a guard without a detail floor: both left empty
    assert {(row["guard_detail"], row["detail_floor"]) for row in read_rows(tmp_path / "none.csv")} == {("", "")}


def test_retry_errors_scores_transient_errors_again(
    engine: InferenceEngine, tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file still being copied in is a corrupt_image row; --retry-errors replaces it once the copy is done."""
    root, out = tmp_path / "images", tmp_path / "p.csv"
    root.mkdir()
    whole = encode(synthetic_xray(seed=1))
    for name in ("a.jpg", "c.jpg"):
        (root / name).write_bytes(encode(synthetic_xray(seed=2)))
    (root / "incoming.jpg").write_bytes(whole[:300])
    (root / "gone.jpg").write_bytes(whole[:300])
    (root / "notes.txt").write_text("not an image")  # a verdict on the whole file: not retried
    run_with(engine, root, out)
    (root / "incoming.jpg").write_bytes(whole)  # the copy finished
    (root / "gone.jpg").unlink()  # its row is the only record left: kept
    before = read_rows(out)
    assert run_with(engine, root, out).scored == 0  # a plain resume keeps error rows
    assert run(root, out, tiny_weights, "--retry-errors") == 0
    after = read_rows(out)
    assert [row["path"] for row in after] == ["a.jpg", "c.jpg", "gone.jpg", "notes.txt", "incoming.jpg"]
    assert after[:4] == [row for row in before if row["path"] != "incoming.jpg"]
    assert after[-1]["label"] and after[-1]["error_code"] == ""
    assert "1 of them scored again" in capsys.readouterr().err
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


def test_scorer_uses_the_service_decode_settings(
    image_dir: Path, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CXR_MAX_DECODE_BYTES bounds the file read and CXR_DECODE_TIMEOUT_S the decode, as in the service."""
    monkeypatch.setenv("CXR_MAX_DECODE_BYTES", "1000")
    assert run(image_dir, tmp_path / "small.csv", tiny_weights) == 0
    rows = [row for row in read_rows(tmp_path / "small.csv") if row["path"] in GOOD]
    assert all("over the limit of 1000" in row["error_message"] for row in rows), rows
    monkeypatch.delenv("CXR_MAX_DECODE_BYTES")
    monkeypatch.setenv("CXR_DECODE_TIMEOUT_S", "0.000001")
    big = tmp_path / "big"  # a 4-megapixel PNG: its decode takes milliseconds, far past the timeout
    big.mkdir()
    (big / "big.png").write_bytes(encode(synthetic_xray(2048, 2048, seed=3), "PNG"))
    assert run(big, tmp_path / "slow.csv", tiny_weights) == 0
    assert "did not finish within 1e-06 s" in read_rows(tmp_path / "slow.csv")[0]["error_message"]
