"""Loading an exported model: every refusal word for word, and the golden comparison computed by hand.

The expected messages are written out here (paths, digests and the libraries' own errors filled in
from hashlib, safetensors and torch), never taken from the loader, so a message that loses its
cause, names the wrong file or the wrong side of a mismatch fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from app.core import artifacts
from app.core.artifacts import GOLDEN_KEY, Golden, LoadedModel, ModelLoadError, compare_golden, file_sha256, load_model
from app.core.input_guard import GUARD_MEAN_KEY, GUARD_WHITENER_KEY
from tests.conftest import export_tiny_model, rewrite_model

STATE_DICT_ERROR = "Error(s) in loading state_dict for PneumoniaNet:"


def _no_files(weights: Path) -> str:
    for child in weights.iterdir():
        child.unlink()
    return f"model metadata not found: {weights / 'model.json'}"


def _bad_metadata(weights: Path) -> str:
    rewrite_model(weights, edit_meta=lambda meta: meta.__setitem__("sha256", "not-a-digest"))
    return f"invalid model metadata {weights / 'model.json'}: sha256: String should match pattern '^[0-9a-f]{{64}}$'"


def _two_contrast_steps(weights: Path) -> str:
    """A validator's own words, without pydantic's "Value error, " prefix."""
    both = {"equalize": True, "clahe_clip": 2.0}
    rewrite_model(weights, edit_meta=lambda meta: meta["spec"]["normalization"].update(both))
    reason = "equalize and clahe_clip are alternatives: choose one contrast step"
    return f"invalid model metadata {weights / 'model.json'}: spec.normalization: {reason}"


def _no_weights(weights: Path) -> str:
    (weights / "model.safetensors").unlink()
    return f"model weights not found: {weights / 'model.safetensors'}"


def _sha256_mismatch(weights: Path) -> str:
    rewrite_model(weights, edit_meta=lambda meta: meta.__setitem__("sha256", "0" * 64))
    actual = hashlib.sha256((weights / "model.safetensors").read_bytes()).hexdigest()
    return f"sha256 mismatch for {weights / 'model.safetensors'}: file is {actual}, model.json expects {'0' * 64}"


def _not_a_tensor_file(weights: Path) -> str:
    tensors = weights / "model.safetensors"
    tensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    rewrite_model(weights)
    with pytest.raises(SafetensorError) as caught:
        load_file(str(tensors))
    return f"cannot read {tensors}: {caught.value}"


def _extra_tensor(weights: Path) -> str:
    """strict loading: a tensor the network does not have is an error, not ignored."""
    rewrite_model(weights, lambda tensors: tensors.__setitem__("extra.weight", torch.zeros(1)))
    reason = f'{STATE_DICT_ERROR} Unexpected key(s) in state_dict: "extra.weight".'
    return f"weights in {weights / 'model.safetensors'} do not fit vgg16/compact: {reason}"


def _no_golden_inputs(weights: Path) -> str:
    """A tensor file without its golden inputs cannot be verified (it still loads with verify_golden=False)."""
    rewrite_model(weights, lambda tensors: tensors.pop(GOLDEN_KEY))
    assert load_model(weights, verify_golden=False).golden_inputs is None
    return "model has no golden reference outputs; re-export it with the training package"


def _guard_only_in_weights(weights: Path) -> str:
    rewrite_model(weights, edit_meta=lambda meta: meta.__setitem__("guard", None))
    return f"{weights / 'model.safetensors'}: only the weights file has an input guard; re-export the model"


def _guard_only_in_metadata(weights: Path) -> str:
    rewrite_model(weights, lambda tensors: [tensors.pop(key) for key in (GUARD_MEAN_KEY, GUARD_WHITENER_KEY)])
    return f"{weights / 'model.safetensors'}: only model.json has an input guard; re-export the model"


def _half_a_guard(weights: Path) -> str:
    rewrite_model(weights, lambda tensors: tensors.pop(GUARD_WHITENER_KEY))
    return f"{weights / 'model.safetensors'}: the tensor file holds only one of the guard's two tensors"


def _guard_of_another_size(weights: Path) -> str:
    dim = int(load_file(str(weights / "model.safetensors"))[GUARD_MEAN_KEY].numel())
    rewrite_model(weights, edit_meta=lambda meta: meta["guard"].__setitem__("dim", dim - 1))
    return (
        f"{weights / 'model.safetensors'}: input-guard tensors ({dim},)/({dim}, {dim}) "
        f"do not fit the declared dimension {dim - 1}"
    )


def _swapped_class_names(weights: Path) -> str:
    """Label 1 is PNEUMONIA everywhere: swapped names answered "NORMAL" with P(pneumonia) = 1.0."""
    rewrite_model(weights, edit_meta=lambda meta: meta["spec"].__setitem__("class_names", ["PNEUMONIA", "NORMAL"]))
    return f"invalid model metadata {weights / 'model.json'}: spec.class_names.0: Input should be 'NORMAL'"


def _input_size_edited(weights: Path) -> str:
    """The golden inputs (inside the sha256) say which size the model was made for; 32 px here."""
    rewrite_model(weights, edit_meta=lambda meta: meta["spec"].__setitem__("input_size", 64))
    return (
        f"{weights / 'model.safetensors'}: the golden inputs are [2, 1, 32, 32], but model.json's spec says "
        "[N, 1, 64, 64]: the spec does not belong to these weights"
    )


def _infinite(*keys: str) -> Callable[[Path], str]:
    """An edited number that is not finite: a temperature of Infinity, a guard threshold that refuses nothing."""

    def edit(weights: Path) -> str:
        def set_infinite(meta: dict[str, Any]) -> None:
            *parents, last = keys
            for key in parents:
                meta = meta[key]
            meta[last] = float("inf")

        rewrite_model(weights, edit_meta=set_infinite)
        return f"invalid model metadata {weights / 'model.json'}: {'.'.join(keys)}: Input should be a finite number"

    return edit


REFUSALS: dict[str, Callable[[Path], str]] = {
    "swapped_class_names": _swapped_class_names,
    "input_size_edited": _input_size_edited,
    "infinite_temperature": _infinite("temperature"),
    "infinite_guard_threshold": _infinite("guard", "threshold"),
    "infinite_golden_tolerance": _infinite("golden", "atol"),
    "no_files": _no_files,
    "bad_metadata": _bad_metadata,
    "two_contrast_steps": _two_contrast_steps,
    "no_weights": _no_weights,
    "sha256_mismatch": _sha256_mismatch,
    "not_a_tensor_file": _not_a_tensor_file,
    "extra_tensor": _extra_tensor,
    "no_golden_inputs": _no_golden_inputs,
    "guard_only_in_weights": _guard_only_in_weights,
    "guard_only_in_metadata": _guard_only_in_metadata,
    "half_a_guard": _half_a_guard,
    "guard_of_another_size": _guard_of_another_size,
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_each_refusal_names_the_file_and_the_cause(tiny_weights: Path, tmp_path: Path, case: str) -> None:
    weights = Path(shutil.copytree(tiny_weights, tmp_path / "weights"))
    expected = REFUSALS[case](weights)
    with pytest.raises(ModelLoadError) as caught:
        load_model(weights)
    assert str(caught.value) == expected


def test_a_long_mismatch_is_one_line_cut_at_300_characters(tiny_weights: Path, tmp_path: Path) -> None:
    """torch lists every unexpected tensor, over several lines; the refusal is one line, its reason cut at 300."""
    weights = Path(shutil.copytree(tiny_weights, tmp_path / "weights"))
    names = [f"extra.{index:02d}" for index in range(40)]
    rewrite_model(weights, lambda tensors: tensors.update({name: torch.zeros(1) for name in names}))
    with pytest.raises(ModelLoadError) as caught:
        load_model(weights)
    listed = ", ".join(f'"{name}"' for name in names)
    reason = f"{STATE_DICT_ERROR} Unexpected key(s) in state_dict: {listed}."
    assert len(reason) > 300
    assert str(caught.value) == f"weights in {weights / 'model.safetensors'} do not fit vgg16/compact: {reason[:300]}"


def test_the_model_is_named_by_its_directory_or_either_of_its_files(tiny_weights: Path, tmp_path: Path) -> None:
    by_directory = load_model(tiny_weights)
    for name in ("model.json", "model.safetensors"):
        assert load_model(tiny_weights / name).metadata == by_directory.metadata
    # A file path names its sibling by suffix: "x.json" is read with "x.safetensors".
    shutil.copy(tiny_weights / "model.json", tmp_path / "x.json")
    with pytest.raises(ModelLoadError) as caught:
        load_model(tmp_path / "x.json")
    assert str(caught.value) == f"model weights not found: {tmp_path / 'x.safetensors'}"
    with pytest.raises(ModelLoadError) as caught:
        load_model(tmp_path / "y.safetensors")
    assert str(caught.value) == f"model metadata not found: {tmp_path / 'y.json'}"


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (3 << 20) + 17])
def test_file_sha256_is_hashlibs_digest_of_the_whole_file(tmp_path: Path, size: int) -> None:
    """Read in 1 MiB blocks; sizes around the block boundary and several blocks."""
    data = torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(size), dtype=torch.uint8)
    path = tmp_path / "blob"
    path.write_bytes(data.numpy().tobytes())
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def guarded(tiny_weights: Path) -> LoadedModel:
    return load_model(tiny_weights)


def _with_golden(
    loaded: LoadedModel, logits: list[list[float]], atol: float, scores: list[float] | None
) -> LoadedModel:
    """The loaded model with hand-written golden logits and, if given, golden guard scores (None: no guard)."""
    guard = loaded.metadata.guard
    assert guard is not None
    update = {
        "golden": Golden(logits=logits, atol=atol),
        "guard": None if scores is None else guard.model_copy(update={"golden_scores": scores}),
    }
    return dataclasses.replace(loaded, metadata=loaded.metadata.model_copy(update=update))


# (golden logits, atol, computed logits, the difference returned or the refusal). Values are exact in
# float32. The tolerance is atol times the largest golden magnitude, but never less than atol itself.
LOGIT_CASES = [
    ([[0.25]], 0.5, [[0.75]], 0.5),  # exactly at the tolerance: accepted
    ([[0.25]], 0.5, [[0.875]], "golden check failed: logits differ from the exported ones by 0.625 (tolerance 0.5)"),
    ([[1.5]], 0.25, [[1.875]], 0.375),  # scale 1.5: 0.25 x 1.5
    ([[1.5]], 0.25, [[2.0]], "golden check failed: logits differ from the exported ones by 0.5 (tolerance 0.375)"),
    ([[-4.0, 1.0]], 0.125, [[-3.5, 1.0]], 0.5),  # the scale is the largest magnitude, of either sign
    ([[0.0, 2.0]], 0.5, [[0.0, -2.0]], "golden check failed: logits differ from the exported ones by 4 (tolerance 1)"),
    ([[0.25]], 0.5, [[0.25, 0.25]], "golden check: output shape (1, 2) != (1, 1)"),
]


@pytest.mark.parametrize(("golden", "atol", "computed", "outcome"), LOGIT_CASES)
def test_logits_are_compared_with_a_tolerance_scaled_by_their_size(
    guarded: LoadedModel, golden: list[list[float]], atol: float, computed: list[list[float]], outcome: float | str
) -> None:
    loaded = _with_golden(guarded, golden, atol, scores=None)
    logits = torch.tensor(computed, dtype=torch.float64)  # any runtime's dtype: compared in float32
    if isinstance(outcome, str):
        with pytest.raises(ModelLoadError) as caught:
            compare_golden(loaded, logits, None)
        assert str(caught.value) == outcome
    else:
        assert compare_golden(loaded, logits, None) == outcome


def test_an_explicit_tolerance_replaces_the_stored_one(guarded: LoadedModel) -> None:
    loaded = _with_golden(guarded, [[0.25]], 1e-3, scores=None)
    assert compare_golden(loaded, torch.tensor([[0.75]]), None, atol=0.5) == 0.5
    with pytest.raises(ModelLoadError) as caught:
        compare_golden(loaded, torch.tensor([[0.75]]), None, atol=0.25)
    assert str(caught.value) == "golden check failed: logits differ from the exported ones by 0.5 (tolerance 0.25)"


# (golden guard scores, computed scores, relative tolerance or None for the default, None or the refusal)
GUARD_CASES = [
    ([2.0, 4.0], [2.5, 4.0], 0.25, None),  # exactly at the tolerance: accepted
    ([2.0, 4.0], [2.0, 5.5], 0.25, "by 0.375 (relative tolerance 0.25)"),
    ([2.0], [2.0078125], None, "by 0.00391 (relative tolerance 0.001)"),  # the default is 1e-3
    ([2.0], [2.001953125], None, None),  # 0.00098 relative: within the default
    # A golden score of 0 divides by 1e-6, not by 0: 1e-5 away is 10 times the distance.
    ([0.0], [1e-5], 1.0, "by 10 (relative tolerance 1)"),
    ([0.0], [1e-7], 1.0, None),
]


@pytest.mark.parametrize(("golden", "computed", "rtol", "refusal"), GUARD_CASES)
def test_guard_scores_are_compared_relative_to_the_stored_ones(
    guarded: LoadedModel, golden: list[float], computed: list[float], rtol: float | None, refusal: str | None
) -> None:
    loaded = _with_golden(guarded, [[0.25]], 0.5, scores=golden)
    logits, scores = torch.tensor([[0.5]]), torch.tensor(computed, dtype=torch.float64)
    kwargs = {} if rtol is None else {"guard_rtol": rtol}
    if refusal is None:
        assert compare_golden(loaded, logits, scores, **kwargs) == 0.25
    else:
        with pytest.raises(ModelLoadError) as caught:
            compare_golden(loaded, logits, scores, **kwargs)
        assert str(caught.value) == f"golden check failed: input-guard scores differ from the exported ones {refusal}"


def test_guard_scores_are_checked_only_when_both_sides_have_them(guarded: LoadedModel) -> None:
    with_guard = _with_golden(guarded, [[0.25]], 0.5, scores=[2.0, 4.0])
    without_guard = _with_golden(guarded, [[0.25]], 0.5, scores=None)
    logits = torch.tensor([[0.5]])
    assert compare_golden(with_guard, logits, None) == 0.25  # a runtime serving without the guard
    assert compare_golden(without_guard, logits, torch.tensor([99.0])) == 0.25  # nothing to compare with
    with pytest.raises(ModelLoadError) as caught:
        compare_golden(with_guard, logits, torch.tensor([2.0, 4.0, 6.0]))
    assert str(caught.value) == "golden check: 2 guard scores stored, 3 computed"


def test_a_runtime_cannot_be_checked_against_a_model_without_golden_outputs(guarded: LoadedModel) -> None:
    """compare_golden is also called alone (the OpenVINO backend checks its own outputs), so it refuses by itself."""
    bare = dataclasses.replace(guarded, metadata=guarded.metadata.model_copy(update={"golden": None}))
    with pytest.raises(ModelLoadError) as caught:
        compare_golden(bare, torch.tensor([[0.5]]), None)
    assert str(caught.value) == "model has no golden reference outputs; re-export it with the training package"


EXPORT_LOOP = """
import sys
from pathlib import Path
import torch
from app.core.artifacts import export_model
from app.core.network import ModelSpec, build_model

torch.manual_seed(0)
network = build_model(ModelSpec(architecture="vgg16", head="compact", input_size=32))
golden = torch.zeros((1, 1, 32, 32), dtype=torch.uint8)
for round in range(10_000):  # the weights differ between float32 and float16, so each export changes them
    export_model(network, Path(sys.argv[1]), version=str(round), golden_inputs=golden,
                 dtype=("float32", "float16")[round % 2])
    if round == 0:
        print("ready", flush=True)  # a model is in place: every kill from here lands on an overwrite
"""


def test_an_export_killed_at_any_moment_never_pairs_new_weights_with_old_metadata(tmp_path: Path) -> None:
    """kill -9 an exporter rewriting one folder, at random moments: the folder then loads, or is refused as an
    interrupted export; before, new weights under the old model.json's sha256 said "sha256 mismatch"."""
    script = tmp_path / "loop.py"
    script.write_text(EXPORT_LOOP)
    out = tmp_path / "model"
    rng = random.Random(0)
    outcomes = set()
    for _ in range(6):
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        process = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, env=env)
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.05, 1.5))
        process.kill()
        process.wait()
        if (out / "model.json").is_file():
            load_model(out)  # never "sha256 mismatch"
            outcomes.add("loads")
        else:
            with pytest.raises(ModelLoadError, match="an export was interrupted"):
                load_model(out)
            outcomes.add("interrupted")
    assert outcomes, "no round ran"
    export_tiny_model(out, guard=False)  # the next export clears what the killed ones left half-written
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    assert load_model(out).metadata.version == "test-0"


def test_an_export_interrupted_between_its_files_is_refused_as_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = export_tiny_model(tmp_path / "model", guard=False)
    calls = []
    replace_durably = artifacts.replace_durably

    def killed_after_the_weights(pairs: list[tuple[Path, Path]]) -> None:
        calls.append([target.name for _, target in pairs])
        replace_durably(pairs[:1])
        raise OSError("killed")

    monkeypatch.setattr(artifacts, "replace_durably", killed_after_the_weights)
    with pytest.raises(OSError, match="killed"):
        export_tiny_model(weights, seed=1, guard=False)
    assert calls == [["model.safetensors", "model.json"]]
    with pytest.raises(ModelLoadError, match="an export was interrupted"):
        load_model(weights)
    monkeypatch.undo()
    export_tiny_model(weights, seed=1, guard=False)
    assert load_model(weights).metadata.version == "test-1"
    assert sorted(p.name for p in weights.iterdir()) == ["model.json", "model.safetensors"]  # no staging left
    assert (weights / "model.safetensors").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=2), "format_version: Input should be 1"),
        (lambda m: m.update(temperature=1e300), "temperature: Input should be less than or equal to 100"),
        (lambda m: m["golden"].update(atol=1e30), "golden.atol: Input should be less than or equal to 1"),
        (lambda m: m["guard"].update(threshold=1e9), "guard.threshold: Input should be less than or equal to 100"),
        (lambda m: m.update(dtype="float16"), "model.json says the weights are float16, the file holds float32"),
    ],
)
def test_edits_that_disarm_a_check_are_refused(
    tmp_path: Path, edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    """The sha256 cannot see model.json: a temperature of 1e300 made every answer 0.5, a guard threshold of
    1e9 switched the guard off, a golden tolerance of 1e30 passed any network, and a newer format or a
    wrong dtype claim was read as this one."""
    weights = export_tiny_model(tmp_path / "model")
    rewrite_model(weights, edit_meta=edit)
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        load_model(weights)
