"""Refuse a run whose images are shared between splits or labels: the same file content twice.

The patient-grouped split (``training.split``) keeps a patient's films on one side by their file
names. A copy under another name escapes it: a film exported twice, a renamed file, a ``val`` or
``test`` folder that holds training images. Validation would then score the network on films it
trained on (the threshold and temperature are fitted there), and the test split would report a
flattering number. A copy filed under both labels teaches the network both answers for one film.

Content means the sha256 of the file's bytes, which every image is read with anyway
(``preprocess_file``), so the check costs one dictionary pass. Identical bytes are the certain case;
a re-encoded copy (other quality, other format) is not found and is not claimed to be.

Copies on one side under one label are left alone: the Kermany training split has 26 such groups,
all within one patient's films, and they move together. Everything else is refused rather than
dropped, because which copy to keep is the user's call, and a dropped file would change the data
the run is recorded as trained on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.core.network import CLASS_NAMES
from training.user_errors import DataError

if TYPE_CHECKING:
    from training.data import ImageSet

SHOWN = 3  # copies named in the refusal; the rest are counted


@dataclass(frozen=True)
class Copy:
    """One file of a group with identical content: the side it is on and its label."""

    side: str
    path: str
    label: int

    def __str__(self) -> str:
        return f"{self.side}:{CLASS_NAMES[self.label]}/{Path(self.path).name}"


def shared_content(sides: Mapping[str, ImageSet]) -> list[list[Copy]]:
    """Groups of files with identical bytes that sit on more than one side or under more than one label."""
    groups: dict[str, list[Copy]] = defaultdict(list)
    for side, images in sides.items():
        for path, label, digest in zip(images.paths, images.labels.tolist(), images.sha256, strict=True):
            groups[digest].append(Copy(side, path, label))
    return [
        copies
        for copies in groups.values()
        if len({copy.side for copy in copies}) > 1 or len({copy.label for copy in copies}) > 1
    ]


def check_no_leakage(sides: Mapping[str, ImageSet]) -> None:
    """Raise a :class:`DataError` naming the shared files, if there are any."""
    found = shared_content(sides)
    if not found:
        return
    shown = "; ".join(" = ".join(str(copy) for copy in copies) for copies in found[:SHOWN])
    more = f" and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
    raise DataError(
        f"{len(found)} image(s) have identical content on two sides of the split or under both labels "
        f"({shown}{more}): a copy on two sides scores the network on films it trained on, a copy under both "
        "labels teaches it both answers; remove the copies, or give them one label"
    )
