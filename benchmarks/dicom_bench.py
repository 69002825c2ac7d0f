"""DICOM preprocessing cost against the JPEG of the same radiograph, measured in the same run.

    python -m benchmarks.dicom_bench [--width 2048 --height 2500 --repeats 5]

Prints the median time of ``preprocess`` (decode, grayscale pipeline, resize) per encoding and
its ratio to an 8-bit JPEG of the same pixels, plus what DICOM detection adds to a JPEG upload.
The image is synthetic (``benchmarks.uploads.xray_like``) at a typical CR/DX detector size.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

import imagecodecs
import numpy as np
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

from app.core.dicom import is_dicom
from app.core.preprocessing import preprocess
from benchmarks.uploads import xray_like


def dicom_file(stored: np.ndarray, syntax: uid.UID, frame: bytes | None) -> bytes:
    """A minimal single-frame 12-bit MONOCHROME2 DX file; ``frame`` is the compressed frame, if any."""
    ds = Dataset()
    ds.SOPClassUID = uid.DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = uid.generate_uid()
    ds.Modality, ds.ViewPosition = "DX", "PA"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian if syntax == uid.RLELossless else syntax
    ds.PixelData = stored.tobytes() if frame is None else encapsulate([frame])
    ds["PixelData"].VR = "OW" if frame is None else "OB"
    if frame is not None:
        ds["PixelData"].is_undefined_length = True
    if syntax == uid.RLELossless:
        ds.compress(uid.RLELossless, encoding_plugin="pydicom")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-use allocations and codec initialisation
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=2500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--input-size", type=int, default=224)
    args = parser.parse_args()

    pixels8 = xray_like(args.width, args.height, seed=1)
    stored = (pixels8.astype(np.uint16) * 16 + (pixels8 >> 4)).astype(np.uint16)  # 12-bit, full range
    jpeg = io.BytesIO()
    Image.fromarray(pixels8, "L").save(jpeg, "JPEG", quality=90)
    uploads = {
        "JPEG 8-bit q90 (baseline)": jpeg.getvalue(),
        "PNG 16-bit": imagecodecs.png_encode(stored << 4),
        "DICOM uncompressed": dicom_file(stored, uid.ExplicitVRLittleEndian, None),
        "DICOM RLE": dicom_file(stored, uid.RLELossless, None),
        "DICOM JPEG Lossless SV1": dicom_file(
            stored, uid.JPEGLosslessSV1, imagecodecs.jpeg8_encode(stored, lossless=True, bitspersample=12)
        ),
        "DICOM JPEG-LS lossless": dicom_file(stored, uid.JPEGLSLossless, imagecodecs.jpegls_encode(stored)),
        "DICOM JPEG 2000 lossless": dicom_file(
            stored, uid.JPEG2000Lossless, imagecodecs.jpeg2k_encode(stored, codecformat="J2K", reversible=True)
        ),
    }
    print(f"{args.width}x{args.height}, 12-bit source, preprocess to {args.input_size} px, median of {args.repeats}")
    baseline = None
    for name, data in uploads.items():
        ms = median_ms(lambda data=data: preprocess(data, args.input_size, max_pixels=10**8), args.repeats)
        baseline = baseline or ms
        print(f"  {name:28s} {len(data) / 1e6:6.2f} MB  {ms:8.1f} ms  x{ms / baseline:5.2f}")
    jpeg_bytes = uploads["JPEG 8-bit q90 (baseline)"]
    detect_us = median_ms(lambda: [is_dicom(jpeg_bytes) for _ in range(10_000)], args.repeats) / 10
    print(
        f"  DICOM detection on a JPEG upload: {detect_us:.3f} us = {detect_us / 1000 / baseline:.2e} of its preprocess"
    )


if __name__ == "__main__":
    main()
