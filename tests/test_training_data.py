"""Data discovery, decoding, the patient-grouped split and the CLI's one-line errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.core import preprocessing as imaging
from app.core.network import ModelSpec, Normalization
from tests.conftest import encode, synthetic_xray
from tests.dicom_files import Spec, chest_stored, dicom_bytes
from tests.hostile_inputs import gradient16
from tests.training_support import (
    INPUT_SIZE,
    make_dataset,
    normal_names,
    pneumonia_names,
    refused_with_one_line,
    train_args,
    write_split,
)
from training import data as data_module
from training.cli import build_parser, main
from training.config import TrainConfig, flag
from training.data import Decoded, data_hash, discover, load_images, passed_over, prepare_data
from training.distributed import DistInfo
from training.split import grouped_stratified_split, patient_id
from training.user_errors import DataError


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("IM-0115-0001.jpeg", "im-0115"),
        ("NORMAL2-IM-0115-0001.jpeg", "normal2-im-0115"),
        ("scan.png", "file:scan.png"),
    ],
)
def test_patient_id(name: str, patient: str) -> None:
    assert patient_id(Path("x") / name) == patient


def _kermany_like(seed: int) -> tuple[list[str], np.ndarray]:
    """Many patients with 1-6 images each, ~3:1 pneumonia:normal like the real data."""
    rng = np.random.default_rng(seed)
    paths: list[str] = []
    labels: list[int] = []
    for p in range(300):
        count = int(rng.integers(1, 7))
        names = normal_names(range(p, p + 1), count) if p % 4 == 0 else pneumonia_names(range(p, p + 1), count)
        paths += names
        labels += [0 if p % 4 == 0 else 1] * count
    return paths, np.array(labels)


@pytest.mark.parametrize("seed", [0, 1])
def test_grouped_split_keeps_patients_together_and_is_stratified(seed: int) -> None:
    paths, labels = _kermany_like(seed)
    train, val = grouped_stratified_split(paths, labels, 0.2, seed)
    assert sorted(np.r_[train, val].tolist()) == list(range(len(paths)))
    assert not {patient_id(paths[i]) for i in train} & {patient_id(paths[i]) for i in val}
    for label in (0, 1):
        share = np.sum(labels[val] == label) / np.sum(labels == label)
        assert share == pytest.approx(0.2, abs=0.03), label


def test_grouped_split_is_deterministic_per_seed() -> None:
    paths, labels = _kermany_like(0)
    first = grouped_stratified_split(paths, labels, 0.2, 5)[1]
    np.testing.assert_array_equal(first, grouped_stratified_split(paths, labels, 0.2, 5)[1])
    assert not np.array_equal(first, grouped_stratified_split(paths, labels, 0.2, 6)[1])


def test_split_needs_two_patients_per_class() -> None:
    paths = normal_names(range(1, 2), 3) + pneumonia_names(range(1, 5), 1)
    with pytest.raises(DataError, match="patient"):
        grouped_stratified_split(paths, np.array([0, 0, 0, 1, 1, 1, 1]), 0.3, 0)


def _one_image_patients(counts: dict[int, int]) -> tuple[list[str], np.ndarray]:
    """``counts[label]`` patients of each label with one image each (file names no patient pattern knows)."""
    paths = [f"class{label}-{p}.png" for label, n in counts.items() for p in range(n)]
    return paths, np.array([label for label, n in counts.items() for _ in range(n)])


@pytest.mark.parametrize(
    ("counts", "fraction", "expected"),
    [
        # round(0.3 * 10) = 3 and round(0.3 * 20) = 6 patients: exactly the target, never one more
        ({0: 10, 1: 20}, 0.3, {0: 3, 1: 6}),
        # round(0.1 * 4) = 0: still one patient per class, and only one
        ({0: 4, 1: 4}, 0.1, {0: 1, 1: 1}),
        # two patients is enough; 0.9 asks for both, but one always stays in training
        ({0: 2, 1: 2}, 0.9, {0: 1, 1: 1}),
        # any number of classes, each split on its own
        ({0: 5, 1: 5, 2: 5}, 0.4, {0: 2, 1: 2, 2: 2}),
    ],
)
def test_validation_takes_the_rounded_target_of_each_class(
    counts: dict[int, int], fraction: float, expected: dict[int, int]
) -> None:
    paths, labels = _one_image_patients(counts)
    for seed in range(3):
        train, val = grouped_stratified_split(paths, labels, fraction, seed)
        assert Counter(labels[val].tolist()) == expected
        assert Counter(labels[train].tolist()) == {label: counts[label] - n for label, n in expected.items()}
        assert val.dtype == np.int64 and len(set(val.tolist())) == len(val)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.2])
def test_val_fraction_outside_the_open_unit_interval_is_refused(fraction: float) -> None:
    paths, labels = _one_image_patients({0: 4, 1: 4})
    with pytest.raises(DataError, match=r"--val-fraction must be in \(0, 1\)"):
        grouped_stratified_split(paths, labels, fraction, 0)


def test_discover_layouts(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "nested", normal_patients=2, pneumonia_patients=2, per_patient=1)
    assert list(discover(root)) == ["train"]
    flat = discover(root / "train")
    assert list(flat) == ["all"]
    assert Counter(s.label for s in flat["all"]) == {0: 2, 1: 2}


def test_unreadable_image_is_skipped_and_reported(tmp_path: Path) -> None:
    root = write_split(tmp_path / "d", normal_names(range(1, 3), 1), pneumonia_names(range(1, 3), 1))
    bad = root / "NORMAL" / "IM-0009-0001.jpeg"
    bad.write_bytes(b"not an image at all")
    decoded = load_images(discover(root)["all"], INPUT_SIZE, workers=2, cache_dir=None)
    assert len(decoded.images) == 4 and decoded.images.pixels.shape == (4, 1, INPUT_SIZE, INPUT_SIZE)
    assert [item.path for item in decoded.skipped] == [str(bad)]
    assert "unsupported_media_type" in decoded.skipped[0].reason


@pytest.mark.parametrize("limit", [None, 3])
@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_data_hash_from_the_bytes_is_the_one_prepare_data_records(
    tmp_path: Path, layout: str, limit: int | None
) -> None:
    """``training mix`` refuses other data by this hash before decoding; it must be the recorded one exactly."""
    root = make_dataset(tmp_path / "d", normal_patients=4, pneumonia_patients=4, per_patient=1)
    write_split(root / "test", normal_names(range(50, 53), 1), pneumonia_names(range(50, 53), 1), seed=3)
    (root / "train" / "NORMAL" / "IM-0009-0001.jpeg").write_bytes(b"not an image at all")  # skipped, still hashed
    data = root if layout == "nested" else root / "train"
    config = TrainConfig(data=data, out=tmp_path / "o", input_size=INPUT_SIZE, workers=1, limit_per_class=limit)
    prepared = prepare_data(config, discover(data), DistInfo())
    assert data_hash(config, discover(data)) == prepared.data_hash
    (root / "train" / "PNEUMONIA" / "person1_virus_10.jpeg").write_bytes(b"changed")
    assert data_hash(config, discover(data)) != prepared.data_hash


def test_file_names_that_are_not_utf8_or_hold_a_newline_train_and_report(tmp_path: Path) -> None:
    """A Latin-1 name on a UTF-8 system crashed the decode cache's key (UnicodeEncodeError), then the report."""
    root = make_dataset(tmp_path / "d", normal_patients=4, pneumonia_patients=4, per_patient=1)
    normal = root / "train" / "NORMAL"
    latin1 = os.fsdecode(b"IM-0901-M\xfcller.jpeg")  # what Python makes of the bytes: lone surrogates
    (normal / "NORMAL2-IM-0001-0001.jpeg").rename(normal / latin1)
    (normal / "IM-0002-0001.jpeg").rename(normal / "IM-0902-line\nbreak.jpeg")
    (normal / os.fsdecode(b"IM-0903-\xe9.jpeg")).write_bytes(b"not an image")  # skipped, and logged
    out = tmp_path / "run"
    assert main(train_args(root, out, "--epochs", "1")) == 0
    assert "unreadable image skipped: " in (log := (out / "train.log").read_text(encoding="utf-8"))
    assert "IM-0903-\\udce9.jpeg (unsupported_media_type" in log  # (the console is sys.stderr: backslashreplace)
    paths = [row["path"] for side in json.loads((out / "split.json").read_text()).values() for row in side]
    assert str(normal / latin1) in paths and str(normal / "IM-0902-line\nbreak.jpeg") in paths
    report = tmp_path / "report"
    evaluate = ["evaluate", "--weights", str(out), "--data", str(root / "train"), "--report", str(report)]
    assert main([*evaluate, "--bootstrap", "0"]) == 0
    written = (report / "predictions.csv").read_bytes().decode("utf-8")  # still valid UTF-8
    assert "IM-0901-M\\udcfcller.jpeg,NORMAL," in written and '/IM-0902-line\nbreak.jpeg",NORMAL,' in written


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # gone meanwhile
            fields = stat.read_text().rsplit(")", 1)[1].split()
            table[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return table


def _decoding_pid(timeout_s: float = 20.0) -> int:
    """A decoder worker (a grandchild: this process, the pool's forkserver, its workers) that stays on the CPU
    for 50 ms, i.e. is decoding a slow film, not starting up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        table = _process_table()
        children = {pid for pid, (parent, _) in table.items() if parent == os.getpid()}
        running = [pid for pid, (parent, state) in table.items() if parent in children and state == "R"]
        time.sleep(0.05)
        table = _process_table()
        for pid in running:
            if table.get(pid, (0, ""))[1] == "R":
                return pid
    raise AssertionError("no decoder worker started decoding")


def test_a_decoder_that_crashes_costs_its_file_not_the_run(tmp_path: Path) -> None:
    """Decoding runs in the service's decoder processes: SIGSEGV one mid-decode and that film is skipped as
    corrupt_image while every other film is decoded (in-process threads would have taken the run down)."""
    root = write_split(tmp_path / "d", normal_names(range(1, 4), 1), pneumonia_names(range(1, 4), 1))
    slow = encode(Image.fromarray(gradient16(2600, 2600)), "PNG", compress_level=1)  # ~0.3 s to decode
    for k in range(6):
        (root / "NORMAL" / f"IM-{10 + k:04d}-0001.png").write_bytes(slow)
    samples = discover(root)["all"]
    result: dict[str, Decoded] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("decoded", load_images(samples, INPUT_SIZE, workers=2, cache_dir=None))
    )
    thread.start()
    os.kill(_decoding_pid(), signal.SIGSEGV)
    thread.join(120)
    decoded = result["decoded"]
    [crashed] = decoded.skipped
    assert crashed.reason.startswith("corrupt_image: ") and "SIGSEGV" in crashed.reason
    assert len(decoded.images) == len(samples) - 1 and crashed.path not in decoded.images.paths


def test_cache_round_trip_and_invalidation(tmp_path: Path) -> None:
    root = write_split(tmp_path / "d", normal_names(range(1, 3), 1), pneumonia_names(range(1, 3), 1))
    samples = discover(root)["all"]
    first = load_images(samples, INPUT_SIZE, workers=1, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    again = load_images(samples, INPUT_SIZE, workers=1, cache_dir=tmp_path / "cache")
    assert again.content_hash == first.content_hash and again.images.paths == first.images.paths
    assert bool((again.images.pixels == first.images.pixels).all())
    load_images(samples, 40, workers=1, cache_dir=tmp_path / "cache")  # other size: other entry
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_a_change_of_the_decoding_code_is_decoded_again_not_read_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache was keyed by the files alone: after a preprocessing change (EXIF orientation applied to PNGs,
    another 16-bit scaling) training read the old pixels, which the service no longer produces."""
    root = write_split(tmp_path / "d", normal_names(range(1, 3), 1), pneumonia_names(range(1, 3), 1))
    samples = discover(root)["all"]
    load_images(samples, INPUT_SIZE, workers=1, cache_dir=tmp_path / "cache")
    fingerprint = data_module.decoder_fingerprint()
    assert fingerprint == data_module.decoder_fingerprint() and len(fingerprint) == 64
    monkeypatch.setattr(data_module, "decoder_fingerprint", lambda: "another decoder")
    load_images(samples, INPUT_SIZE, workers=1, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_the_decoder_fingerprint_covers_the_decoding_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every module the decode pool runs, and nothing else decides pixels: an edit of any of them changes it."""
    from app.core import decode_pool

    assert set(data_module._DECODER_MODULES) >= {*decode_pool._PRELOAD, "app.core.dicom", "app.core.jpeg_header"}
    before = data_module.decoder_fingerprint()
    edited = tmp_path / "preprocessing.py"
    edited.write_bytes(Path(imaging.__file__).read_bytes() + b"# edited\n")
    monkeypatch.setattr(imaging, "__file__", str(edited))
    data_module.decoder_fingerprint.cache_clear()
    try:
        assert data_module.decoder_fingerprint() != before
    finally:
        monkeypatch.undo()
        data_module.decoder_fingerprint.cache_clear()
    assert data_module.decoder_fingerprint() == before


def test_wrong_layout_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data" / "images").mkdir(parents=True)
    err = refused_with_one_line(capsys, ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")])
    assert "NORMAL" in err and "train/" in err
    err = refused_with_one_line(capsys, ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert "not found" in err


def test_missing_or_empty_class_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_split(tmp_path / "d" / "train", normal_names(range(1, 3), 1), [])
    train = ["train", "--input-size", str(INPUT_SIZE)]  # the 48 px films are too small for the default 224
    err = refused_with_one_line(capsys, [*train, "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")])
    assert "PNEUMONIA" in err
    (tmp_path / "d" / "train" / "PNEUMONIA").mkdir()
    (tmp_path / "d" / "train" / "PNEUMONIA" / "notes.txt").write_text("no images here")
    err = refused_with_one_line(capsys, [*train, "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")])
    assert err.endswith(
        "class PNEUMONIA of the train split has no readable image "
        "(1 file(s) of the split skipped, each logged with its reason)"
    )
    (tmp_path / "d" / "train" / "PNEUMONIA" / "notes.txt").unlink()
    err = refused_with_one_line(capsys, [*train, "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")])
    assert err.endswith("PNEUMONIA: class PNEUMONIA has no files")


def test_too_few_training_images_for_the_guard_fail_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two training images cannot fit the guard; the run says so at once and writes no checkpoint."""
    write_split(tmp_path / "d" / "train", normal_names(range(1, 2), 1), pneumonia_names(range(1, 2), 1))
    write_split(tmp_path / "d" / "val", normal_names(range(5, 7), 1), pneumonia_names(range(5, 7), 1), seed=1)
    out = tmp_path / "o"
    err = refused_with_one_line(capsys, [*train_args(tmp_path / "d", out), "--min-val-images", "4"])
    assert err == "error: 2 training image(s) after the validation split; the input guard needs at least 3"
    assert not list(out.glob("*.safetensors")) and not (out / "checkpoint").exists()  # only the decode cache


def test_evaluate_wrong_layout_and_missing_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_weights: Path
) -> None:
    make_dataset(tmp_path / "d", normal_patients=1, pneumonia_patients=1, per_patient=1)
    err = refused_with_one_line(
        capsys,
        ["evaluate", "--weights", str(tiny_weights), "--data", str(tmp_path / "d"), "--report", str(tmp_path / "r")],
    )
    assert "'test' split" in err
    err = refused_with_one_line(
        capsys,
        [
            "evaluate",
            "--weights",
            str(tmp_path / "nope"),
            "--data",
            str(tmp_path / "d" / "train"),
            "--report",
            str(tmp_path / "r"),
        ],
    )
    assert err == f"error: --weights {tmp_path / 'nope'} not found"  # not the nope.json the loader looked for


def test_evaluate_scores_a_folder_of_one_class_for_what_it_can_tell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_weights: Path
) -> None:
    """A hospital's normal films alone: specificity and calibration, no sensitivity or AUC (training still
    needs both classes); an empty folder is still refused."""
    root = write_split(tmp_path / "normals", normal_names(range(1, 7), 1), [])
    report = tmp_path / "report"
    argv = ["evaluate", "--weights", str(tiny_weights), "--data", str(root), "--report", str(report)]
    assert main([*argv, "--device", "cpu", "--bootstrap", "20", "--workers", "1"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["n"] == 6 and printed["sensitivity"] is None and printed["roc_auc"] is None
    assert 0.0 <= printed["specificity"] <= 1.0
    assert json.loads((report / "metrics.json").read_text())["specificity"] == printed["specificity"]
    err = refused_with_one_line(capsys, train_args(root, tmp_path / "run"))
    assert "missing class folder PNEUMONIA/" in err
    (root / "PNEUMONIA").mkdir()
    for film in (root / "NORMAL").iterdir():
        film.unlink()
    err = refused_with_one_line(capsys, [*argv[:-1], str(tmp_path / "report2")])
    assert err == f"error: {root}: no files in NORMAL/ or PNEUMONIA/"


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--val-fraction", "1.5"),
        ("--ema-epochs", "-1"),
        ("--mixup", "-0.2"),
        ("--acquisition", "-1"),
        ("--clahe-clip", "0.5"),
        ("--clahe-tiles", "0"),
        ("--clahe-tiles", "65"),
        ("--aspect-jitter", "-0.1"),
        ("--seed", "-1"),  # these four were tracebacks (numpy's and torch's seed range, an infinite schedule)
        ("--split-seed", "-5"),
        ("--seed", "100000000000000000000000"),
        ("--warmup-epochs", "inf"),
    ],
)
def test_invalid_flag_value_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    make_dataset(tmp_path / "d", normal_patients=2, pneumonia_patients=2, per_patient=1)
    err = refused_with_one_line(
        capsys, ["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), flag, value]
    )
    assert flag in err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--equalize", "--clahe-clip", "2"],
            "equalize and clahe_clip are alternatives: choose one contrast step",
        ),
        (["--init", "model"], "--init model and --init-model FILE go together"),
        (["--init-model", "weights"], "--init model and --init-model FILE go together"),
        (["--imagenet-weights", "vgg16.pth"], "--imagenet-weights FILE needs --init imagenet"),  # was ignored
        (
            ["--clahe-clip", "2", "--clahe-tiles", "5"],
            "input_size 224 does not split into 5 CLAHE tiles per side",
        ),
    ],
)
def test_options_that_conflict_are_one_plain_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    """A check across options has no single flag to name: the line is the message alone, before any work."""
    make_dataset(tmp_path / "d", normal_patients=2, pneumonia_patients=2, per_patient=1)
    argv = ["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), *options]
    assert refused_with_one_line(capsys, argv) == f"error: {message}"
    assert not (tmp_path / "o").exists()


def test_unusable_device_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tiny_weights: Path
) -> None:
    """Training and evaluation resolve devices with the service's policy, and say what is wrong in one line."""
    make_dataset(tmp_path / "d", normal_patients=2, pneumonia_patients=2, per_patient=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    train = ["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")]
    assert "no CUDA GPU is available" in refused_with_one_line(capsys, [*train, "--device", "cuda"])
    assert "invalid device 'gpu'" in refused_with_one_line(capsys, [*train, "--device", "gpu"])
    assert not (tmp_path / "o").exists()
    evaluate = [
        "evaluate",
        "--weights",
        str(tiny_weights),
        "--data",
        str(tmp_path / "d" / "train"),
        "--report",
        str(tmp_path / "r"),
    ]
    assert "no CUDA GPU is available" in refused_with_one_line(capsys, [*evaluate, "--device", "cuda"])


def test_evaluate_reads_dicom_files_through_the_service_preprocessing(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "dicom"
    for label, seeds in (("NORMAL", (1, 2, 3)), ("PNEUMONIA", (4, 5, 6))):
        (root / label).mkdir(parents=True)
        for seed in seeds:
            stored = chest_stored(Spec(), seed=seed)
            (root / label / f"IM-{seed:04d}-0001.dcm").write_bytes(dicom_bytes(Spec(photometric="MONOCHROME2"), stored))
    lateral = root / "NORMAL" / "IM-0009-0001.dcm"
    lateral.write_bytes(dicom_bytes(Spec(view="LL")))
    report = tmp_path / "report"
    argv = ["evaluate", "--weights", str(tiny_weights), "--data", str(root), "--report", str(report)]
    assert main([*argv, "--device", "cpu", "--bootstrap", "10", "--workers", "1"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n"] == 6
    assert [(item["path"], item["reason"].split(":")[0]) for item in metrics["unreadable"]] == [
        (str(lateral), "not_frontal_view")
    ]


def test_class_folders_are_read_by_content_with_subfolders_and_nothing_is_dropped_unsaid(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PACS export names DICOM files by UID (no .dcm): read, like a subfolder's films; a note is skipped with
    its code and listed. A linked folder is read (it was left out without a word), a link back to a folder
    already read is not; hidden files (macOS's ._ copies) and folders are not taken, and are listed."""
    root = write_split(tmp_path / "d", normal_names(range(1, 3), 1), pneumonia_names(range(1, 3), 1))
    normal = root / "NORMAL"
    uid = normal / "1.2.840.113619.2.55.3.604688119.969.1234567890.123"
    uid.write_bytes(dicom_bytes(Spec(photometric="MONOCHROME2"), chest_stored(Spec(), seed=3)))
    (normal / "hospital-b").mkdir()
    (normal / "NORMAL2-IM-0001-0001.jpeg").rename(normal / "hospital-b" / "NORMAL2-IM-0001-0001.jpeg")
    (normal / "notes.txt").write_text("exported 2026-11-02")
    with (normal / "backup.zip").open("wb") as handle:
        handle.truncate(2**30)  # sparse: refused by its size, never read
    (normal / "._IM-0002-0001.jpeg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (normal / ".thumbnails").mkdir()
    (normal / ".thumbnails" / "IM-0002-0001.jpeg").write_bytes((normal / "IM-0002-0001.jpeg").read_bytes())
    study = tmp_path / "pacs" / "study-2024"  # a study folder linked in from elsewhere
    study.mkdir(parents=True)
    (study / "IM-0007-0001.jpeg").write_bytes(encode(synthetic_xray(48, 48, 4242), "JPEG", quality=90))
    (normal / "linked").symlink_to(study, target_is_directory=True)
    (study / "back").symlink_to(normal, target_is_directory=True)  # a loop
    (normal / "moved.jpeg").symlink_to(tmp_path / "gone.jpeg")  # a broken link
    os.mkfifo(normal / "pipe")
    splits = discover(root)
    samples = splits["all"]
    assert [s.path.relative_to(root).as_posix() for s in samples if s.label == 0] == [
        f"NORMAL/{uid.name}",
        "NORMAL/IM-0002-0001.jpeg",
        "NORMAL/backup.zip",
        "NORMAL/hospital-b/NORMAL2-IM-0001-0001.jpeg",
        "NORMAL/linked/IM-0007-0001.jpeg",
        "NORMAL/moved.jpeg",
        "NORMAL/notes.txt",
        "NORMAL/pipe",
    ]
    assert [(Path(item.path).relative_to(root).as_posix(), item.reason) for item in passed_over(splits)] == [
        ("NORMAL/._IM-0002-0001.jpeg", "hidden file"),
        ("NORMAL/.thumbnails", "hidden folder, not read"),
        ("NORMAL/linked/back", "linked folder already read (a link loop, or a second link)"),
    ]
    cached = load_images(samples, INPUT_SIZE, workers=1, cache_dir=tmp_path / "cache")  # the cache key stats each
    assert len(cached.images) == 6 and len(cached.skipped) == 4
    report = tmp_path / "report"
    argv = ["evaluate", "--weights", str(tiny_weights), "--data", str(root), "--report", str(report)]
    assert main([*argv, "--device", "cpu", "--bootstrap", "0", "--workers", "1"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n"] == 6  # the UID-named DICOM, three films of NORMAL, two of PNEUMONIA
    assert [(item["path"], item["reason"].split(":")[0]) for item in metrics["unreadable"]] == [
        (str(normal / "._IM-0002-0001.jpeg"), "hidden file"),
        (str(normal / ".thumbnails"), "hidden folder, not read"),
        (str(normal / "linked" / "back"), "linked folder already read (a link loop, or a second link)"),
        (str(normal / "backup.zip"), "image_too_large"),
        (str(normal / "moved.jpeg"), "read_error"),
        (str(normal / "notes.txt"), "unsupported_media_type"),
        (str(normal / "pipe"), "read_error"),
    ]


def test_a_link_loop_in_a_class_folder_is_skipped_and_listed_with_the_cache_on(tmp_path: Path) -> None:
    """The cache key resolved every path: a link to itself raised RuntimeError (a traceback) with the cache on."""
    root = write_split(tmp_path / "d", normal_names(range(1, 3), 1), pneumonia_names(range(1, 3), 1))
    (root / "NORMAL" / "loop").symlink_to("loop")
    decoded = load_images(discover(root)["all"], INPUT_SIZE, workers=1, cache_dir=tmp_path / "cache")
    assert len(decoded.images) == 4
    assert [(item.path, item.reason.split(":")[0]) for item in decoded.skipped] == [
        (str(root / "NORMAL" / "loop"), "read_error")
    ]


@pytest.mark.parametrize("damage", ["empty json", "empty tensors", "json list", "short tensors"])
def test_a_damaged_decode_cache_is_decoded_again(tmp_path: Path, damage: str) -> None:
    """A cache file cut short (a crash, a full disk) was a traceback at every later start or --resume."""
    root = write_split(tmp_path / "d", normal_names(range(1, 3), 1), pneumonia_names(range(1, 3), 1))
    samples = discover(root)["all"]
    first = load_images(samples, INPUT_SIZE, workers=1, cache_dir=tmp_path / "cache")
    [meta] = (tmp_path / "cache").glob("*.json")
    tensors = meta.with_suffix(".safetensors")
    if damage == "empty json":
        meta.write_text("")
    elif damage == "empty tensors":
        tensors.write_bytes(b"")
    elif damage == "json list":
        meta.write_text("[]")
    else:
        listed = json.loads(meta.read_text())
        meta.write_text(json.dumps({**listed, "paths": listed["paths"][:-1], "sha256": listed["sha256"][:-1]}))
    again = load_images(samples, INPUT_SIZE, workers=1, cache_dir=tmp_path / "cache")
    assert again.content_hash == first.content_hash and again.images.paths == first.images.paths
    assert bool((again.images.pixels == first.images.pixels).all())
    assert load_images(samples, INPUT_SIZE, workers=1, cache_dir=tmp_path / "cache").images.paths == first.images.paths


def test_entries_the_layout_does_not_know_are_refused_or_listed_never_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A train/COVID/ folder, an image loose in train/ and a split spelt Test/ were passed over without a word."""
    data = make_dataset(tmp_path / "data")
    (data / "train" / "COVID").mkdir()
    (data / "train" / "COVID" / "x.jpeg").write_bytes(encode(synthetic_xray(48, 48, 99), "JPEG"))
    err = refused_with_one_line(capsys, train_args(data, tmp_path / "run"))
    assert err == (
        f"error: {data / 'train' / 'COVID'}: not a class folder (the classes are NORMAL/ and PNEUMONIA/), yet it "
        f"holds 1 file(s) that would not be used: move it out of {data / 'train'}, or its files into a class folder"
    )
    (data / "train" / "COVID" / "x.jpeg").unlink()  # an empty folder leaves nothing out
    write_split(data / "Test", normal_names(range(40, 42), 1), pneumonia_names(range(40, 42), 1), seed=4)
    err = refused_with_one_line(capsys, train_args(data, tmp_path / "run"))
    renamed = f"rename it to {data / 'test'}"
    assert err == f"error: {data / 'Test'}: split folders are named train/, val/ and test/; {renamed}"
    (data / "Test").rename(data / "test")
    (data / "train" / "stray.jpeg").write_bytes(b"a film outside the class folders")
    (data / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\x00")
    (data / "README.txt").write_text("where the data came from")
    run = tmp_path / "run"
    assert main(train_args(data, run, "--epochs", "1", "--bootstrap", "0")) == 0
    expected = [
        (str(data / "README.txt"), "not in a split folder (train/, val/, test/)"),
        (str(data / "train" / "stray.jpeg"), "not in a class folder (NORMAL/ or PNEUMONIA/)"),
        (str(data / "train" / "NORMAL" / ".DS_Store"), "hidden file"),
    ]
    summary = json.loads((run / "summary.json").read_text())
    assert [(item["path"], item["reason"]) for item in summary["unreadable"]] == expected
    log = (run / "train.log").read_text()
    assert all(f"not used: {path} ({reason})" in log for path, reason in expected)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
        ("--batch-size", "-1", "--batch-size must be at least 1, got -1"),
        ("--bootstrap", "-1", "--bootstrap must be at least 0, got -1"),
    ],
)
def test_evaluate_refuses_numbers_out_of_range_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_weights: Path, option: str, value: str, message: str
) -> None:
    """--batch-size 0 or -1 ended in a traceback; --bootstrap -1 was taken as "no intervals"."""
    root = write_split(tmp_path / "d", normal_names(range(1, 3), 1), pneumonia_names(range(1, 3), 1))
    argv = ["evaluate", "--weights", str(tiny_weights), "--data", str(root), "--report", str(tmp_path / "r")]
    assert refused_with_one_line(capsys, [*argv, option, value]) == f"error: {message}"


def test_train_flags_are_the_config_fields(capsys: pytest.CaptureFixture[str]) -> None:
    """The train subcommand is generated from TrainConfig: each field is a flag that parses to the field's type."""
    argv = ["train", "--data", "d", "--out", "o", "--input-size", "64", "--lr", "0.01", "--no-cache", "--hflip"]
    argv += ["--init", "imagenet", "--imagenet-weights", "w.pth", "--threshold-method", "youden"]
    argv += ["--clahe-clip", "2.5", "--clahe-tiles", "4"]
    values = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if k != "command"}
    assert values == {
        "data": Path("d"),
        "out": Path("o"),
        "input_size": 64,
        "lr": 0.01,
        "cache": False,
        "hflip": True,
        "init": "imagenet",
        "imagenet_weights": Path("w.pth"),
        "threshold_method": "youden",
        "clahe_clip": 2.5,  # a constrained type inside an optional parses to its base type
        "clahe_tiles": 4,
    }
    assert type(values["clahe_tiles"]) is int
    clahe = Normalization(clahe_clip=2.5, clahe_tiles=4)
    assert TrainConfig(**values).model_spec() == ModelSpec(input_size=64, normalization=clahe)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    shown = capsys.readouterr().out
    assert all(flag(name) in shown for name in TrainConfig.model_fields)
