"""Copies of one film on two sides of the split, or under both labels, are refused before any training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.training_support import (
    INPUT_SIZE,
    make_dataset,
    normal_names,
    pneumonia_names,
    refused_with_one_line,
    train_args,
    write_split,
)
from training.config import TrainConfig
from training.data import ImageSet, discover, load_images, prepare_data
from training.distributed import DistInfo
from training.leakage import SHOWN, Copy, shared_content
from training.user_errors import DataError


def _images(*files: tuple[str, int, str]) -> ImageSet:
    """An ImageSet of (path, label, sha256) with blank pixels: the check reads only names, labels and digests."""
    return ImageSet(
        torch.zeros(len(files), 1, 2, 2, dtype=torch.uint8),
        torch.tensor([label for _, label, _ in files], dtype=torch.int64),
        [path for path, _, _ in files],
        [digest for _, _, digest in files],
    )


def test_only_copies_across_sides_or_labels_are_reported() -> None:
    train = _images(("t/NORMAL/a.jpeg", 0, "A"), ("t/NORMAL/a2.jpeg", 0, "A"), ("t/PNEUMONIA/b.jpeg", 1, "B"))
    val = _images(("v/PNEUMONIA/b-copy.jpeg", 1, "B"), ("v/NORMAL/c.jpeg", 0, "C"))
    test = _images(("x/PNEUMONIA/c-relabelled.jpeg", 1, "C"), ("x/NORMAL/d.jpeg", 0, "D"), ("x/NORMAL/d2.jpeg", 0, "D"))
    found = shared_content({"train": train, "val": val, "test": test})
    # A twice in train under one label, D twice in test under one label: one side, one label, left alone
    assert sorted([str(copy) for copy in group] for group in found) == [
        ["train:PNEUMONIA/b.jpeg", "val:PNEUMONIA/b-copy.jpeg"],
        ["val:NORMAL/c.jpeg", "test:PNEUMONIA/c-relabelled.jpeg"],
    ]
    assert shared_content({"train": train}) == []
    both_labels = _images(("t/NORMAL/e.jpeg", 0, "E"), ("t/PNEUMONIA/e.jpeg", 1, "E"))
    assert shared_content({"train": both_labels}) == [
        [Copy("train", "t/NORMAL/e.jpeg", 0), Copy("train", "t/PNEUMONIA/e.jpeg", 1)]
    ]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Train (8 + 8 patients, 2 films each) and a test split of other films."""
    root = make_dataset(tmp_path / "d")
    write_split(root / "test", normal_names(range(70, 74), 1), pneumonia_names(range(70, 74), 1), seed=5)
    return root


def test_a_training_film_renamed_into_test_is_refused(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(data / "train" / "PNEUMONIA" / "person3_virus_30.jpeg", data / "test" / "PNEUMONIA" / "scan-77.jpeg")
    out = tmp_path / "o"
    err = refused_with_one_line(capsys, train_args(data, out))
    assert err.startswith("error: 1 image(s) have identical content on two sides of the split or under both labels")
    assert ":PNEUMONIA/person3_virus_30.jpeg = test:PNEUMONIA/scan-77.jpeg)" in err  # train or val: the split decides
    assert not list(out.glob("*.safetensors")) and not (out / "checkpoint").exists()  # refused before training


def test_a_val_folder_that_is_the_test_folder_is_refused(data: Path, tmp_path: Path) -> None:
    shutil.copytree(data / "test", data / "val")
    config = TrainConfig(data=data, out=tmp_path / "o", input_size=INPUT_SIZE, min_val_images=4, workers=1)
    with pytest.raises(DataError, match=r"^8 image\(s\) have identical content") as caught:
        prepare_data(config, discover(data), DistInfo())
    assert f"and {8 - SHOWN} more" in str(caught.value)
    assert "val:NORMAL/IM-0070-0001.jpeg = test:NORMAL/IM-0070-0001.jpeg" in str(caught.value)


def test_a_film_under_both_labels_is_refused(data: Path, tmp_path: Path) -> None:
    shutil.copy(data / "train" / "NORMAL" / "IM-0002-0001.jpeg", data / "train" / "PNEUMONIA" / "person99_virus_1.jpeg")
    config = TrainConfig(data=data, out=tmp_path / "o", input_size=INPUT_SIZE, workers=1, cache=False)
    with pytest.raises(DataError, match=r"^1 image\(s\)") as caught:  # on whichever sides the split put them
        prepare_data(config, discover(data), DistInfo())
    assert ":NORMAL/IM-0002-0001.jpeg" in str(caught.value) and ":PNEUMONIA/person99_virus_1.jpeg" in str(caught.value)


def test_a_patients_repeated_film_is_kept_on_their_side(data: Path, tmp_path: Path) -> None:
    """As in the Kermany training split (26 such groups): the copies share a patient, so they move together."""
    normal = data / "train" / "NORMAL"
    shutil.copy(normal / "IM-0004-0001.jpeg", normal / "IM-0004-0003.jpeg")
    config = TrainConfig(data=data, out=tmp_path / "o", input_size=INPUT_SIZE, val_fraction=0.3, workers=1)
    prepared = prepare_data(config, discover(data), DistInfo())
    placed = {
        Path(p).name: side for side, images in (("train", prepared.train), ("val", prepared.val)) for p in images.paths
    }
    assert placed["IM-0004-0001.jpeg"] == placed["IM-0004-0003.jpeg"]
    assert len(placed) == 33


def test_a_cache_entry_without_digests_is_decoded_again(data: Path, tmp_path: Path) -> None:
    """Entries written before the cache held each file's sha256 are read as a miss and rewritten."""
    samples = discover(data)["train"]
    first = load_images(samples, INPUT_SIZE, workers=1, cache_dir=tmp_path / "cache")
    [meta_path] = (tmp_path / "cache").glob("*.json")
    meta = json.loads(meta_path.read_text())
    assert meta["sha256"] == first.images.sha256 and len(set(meta["sha256"])) == len(samples)
    del meta["sha256"]
    meta_path.write_text(json.dumps(meta))
    again = load_images(samples, INPUT_SIZE, workers=1, cache_dir=tmp_path / "cache")
    assert again.images.sha256 == first.images.sha256 and again.content_hash == first.content_hash
    assert json.loads(meta_path.read_text())["sha256"] == first.images.sha256
