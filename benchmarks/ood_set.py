"""Build the out-of-distribution (OOD) image set the input guard is measured on.

``python -m benchmarks.ood_set --out runs/ood --cxr ../shared/data/chest_xray/test``

Nothing is downloaded and nothing is committed: every image is either shipped inside an
installed package (scikit-image, scikit-learn, matplotlib and pydicom sample data, Debian's
pixmaps), generated here from a seed, or a transformation of a chest X-ray from ``--cxr``
(the provided half of the official test split: used for reporting only, never for fitting).
Each image lands in ``OUT/<category>/`` as a lossless PNG; ``OUT/MANIFEST.json`` records for
every file where it came from and what it is, so a refusal rate can be traced to its inputs.

Categories whose name starts with ``control_`` are chest X-rays the guard should *pass*
(mirrored, mildly rotated or exposure-shifted frontal views); every other category should be
refused. ``phantom_*`` categories are procedural drawings of radiographs (hand, knee, lateral
chest), not real radiographs: crude proxies for the hard cases, reported separately.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import itertools

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import cbook
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

Maker = Callable[[], Iterator[tuple[str, Image.Image, str]]]
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation"))
_WORDS = [
    "patient",
    "report",
    "imaging",
    "department",
    "findings",
    "impression",
    "clinical",
    "history",
    "comparison",
    "technique",
    "the",
    "of",
    "and",
    "with",
    "no",
    "acute",
    "normal",
    "left",
    "right",
    "upper",
    "lower",
    "lobe",
    "opacity",
    "effusion",
    "heart",
    "size",
    "within",
    "limits",
    "signed",
    "reviewed",
    "invoice",
    "total",
    "amount",
    "date",
    "reference",
    "account",
    "payment",
    "service",
    "description",
    "quantity",
    "price",
    "tax",
    "order",
]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _gray(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def _rgb(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _font(size: int, index: int = 0) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    fonts = sorted(p for d in FONT_DIRS if d.is_dir() for p in d.glob("*.ttf"))
    if not fonts:
        return ImageFont.load_default(size)
    return ImageFont.truetype(str(fonts[index % len(fonts)]), size)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, scale: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: random values on a coarse grid, bicubically enlarged."""
    coarse = rng.random((max(2, height // scale), max(2, width // scale)))
    img = Image.fromarray((coarse * 255).astype(np.uint8), "L").resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float64) / 255.0


# ---------------------------------------------------------------- generated


def blank() -> Iterator[tuple[str, Image.Image, str]]:
    for value, size in ((255, 300), (0, 300), (128, 224), (64, 512), (192, 1024), (250, 800)):
        yield f"gray{value}_{size}", Image.new("L", (size, size), value), f"uniform gray {value}, {size}x{size}"
    for rgb in ((255, 0, 0), (0, 0, 255), (30, 160, 60), (250, 240, 200)):
        yield "rgb{}_{}_{}".format(*rgb), Image.new("RGB", (400, 300), rgb), f"uniform colour {rgb}"
    rng = _rng(1)
    for value in (20, 128, 235):  # nearly constant: faint sensor-like noise on a flat field
        arr = value + rng.normal(0, 2, (480, 640))
        yield f"flat{value}_faintnoise", _gray(arr), f"gray {value} with N(0, 2) noise"


def noise_gray() -> Iterator[tuple[str, Image.Image, str]]:
    for seed in range(6):
        rng = _rng(100 + seed)
        size = (256, 256) if seed % 2 else (480, 640)
        yield f"uniform_{seed}", _gray(rng.uniform(0, 256, size)), "uniform gray noise"
        mean, std = (64, 128, 192)[seed % 3], (20, 50, 80)[seed % 3]
        yield f"gaussian_{seed}", _gray(rng.normal(mean, std, size)), f"gaussian gray noise mean {mean} std {std}"
        sp = np.full(size, 128.0)
        mask = rng.random(size)
        sp[mask < 0.1], sp[mask > 0.9] = 0, 255
        yield f"saltpepper_{seed}", _gray(sp), "salt-and-pepper noise on gray"
        clouds = _smooth_noise(rng, size[0], size[1], (8, 16, 32)[seed % 3]) * 255
        yield f"clouds_{seed}", _gray(clouds), "smooth low-frequency gray noise"


def noise_colour() -> Iterator[tuple[str, Image.Image, str]]:
    for seed in range(6):
        rng = _rng(200 + seed)
        yield f"uniform_{seed}", _rgb(rng.uniform(0, 256, (300, 300, 3))), "uniform RGB noise"
        yield f"gaussian_{seed}", _rgb(rng.normal(128, 60, (300, 400, 3))), "gaussian RGB noise"
        clouds = np.stack([_smooth_noise(rng, 300, 300, 16) for _ in range(3)], axis=-1) * 255
        yield f"clouds_{seed}", _rgb(clouds), "smooth colour noise"


def gradients() -> Iterator[tuple[str, Image.Image, str]]:
    h, w = 400, 400
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    radial = np.hypot(yy - 0.5, xx - 0.5) / np.sqrt(0.5)
    for name, field in (("horizontal", xx), ("vertical", yy), ("diagonal", (xx + yy) / 2), ("radial", radial)):
        yield f"{name}", _gray(field * 255), f"gray {name} gradient"
        yield f"{name}_inverse", _gray((1 - field) * 255), f"gray {name} gradient, reversed"
        rgb = np.stack([field, 1 - field, np.full_like(field, 0.5)], axis=-1) * 255
        yield f"{name}_colour", _rgb(rgb), f"colour {name} gradient"
    for seed in range(4):
        rng = _rng(300 + seed)
        lo, hi = sorted(rng.uniform(0, 255, 2))
        yield f"narrow_{seed}", _gray(lo + (hi - lo) * xx), f"gray gradient from {lo:.0f} to {hi:.0f}"


def patterns() -> Iterator[tuple[str, Image.Image, str]]:
    for cells in (4, 8, 16, 32):
        tile = (np.indices((256, 256)) // (256 // cells)).sum(axis=0) % 2
        yield f"checker_{cells}", _gray(tile * 255), f"{cells}x{cells} checkerboard"
    for period in (8, 32):
        stripes = (np.arange(256) // period % 2)[None, :].repeat(256, 0) * 255
        yield f"stripes_v{period}", _gray(stripes), f"vertical stripes, period {period}"
        yield f"stripes_h{period}", _gray(stripes.T), f"horizontal stripes, period {period}"
    yy, xx = np.mgrid[-1:1:300j, -1:1:300j]
    yield "rings", _gray((np.sin(np.hypot(xx, yy) * 30) + 1) * 127), "concentric rings"
    for seed in range(5):
        rng = _rng(400 + seed)
        colour = seed % 2 == 0
        img = Image.new("RGB" if colour else "L", (400, 400), (255, 255, 255) if colour else 255)
        draw = ImageDraw.Draw(img)
        for _ in range(25):
            x0, y0 = rng.integers(0, 350, 2)
            x1, y1 = x0 + rng.integers(10, 120), y0 + rng.integers(10, 120)
            fill = tuple(int(v) for v in rng.integers(0, 256, 3)) if colour else int(rng.integers(0, 256))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
        yield f"shapes_{seed}", img, f"random {'colour' if colour else 'gray'} shapes on white"


def documents() -> Iterator[tuple[str, Image.Image, str]]:
    for seed in range(14):
        rng = _rng(500 + seed)
        width, height = (850, 1100) if seed % 3 else (1100, 850)
        dark = seed % 7 == 6
        img = Image.new("L", (width, height), 20 if dark else 250)
        draw = ImageDraw.Draw(img)
        ink = 235 if dark else 15
        y = 60
        draw.text((60, y), " ".join(rng.choice(_WORDS, 4)).upper(), font=_font(34, seed), fill=ink)
        y += 70
        size = int(rng.integers(14, 24))
        while y < height - 80:
            if seed % 4 == 1 and rng.random() < 0.15:  # a table row
                for col in range(4):
                    draw.rectangle((60 + col * 180, y, 60 + (col + 1) * 180, y + size + 10), outline=ink)
                    draw.text((66 + col * 180, y + 4), str(rng.choice(_WORDS)), font=_font(size, seed), fill=ink)
                y += size + 10
                continue
            words = " ".join(rng.choice(_WORDS, int(rng.integers(6, 12))))
            draw.text((60, y), words.capitalize() + ".", font=_font(size, seed), fill=ink)
            y += int(size * 1.6)
        yield f"page_{seed}", img, f"rendered text page, {'light on dark' if dark else 'dark on light'}"


def charts() -> Iterator[tuple[str, Image.Image, str]]:
    kinds = ("line", "bar", "scatter", "pie", "hist", "heatmap", "box")
    for seed in range(21):
        rng = _rng(600 + seed)
        kind = kinds[seed % len(kinds)]
        fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=80)
        if kind == "line":
            ax.plot(np.cumsum(rng.normal(size=(100, 3)), axis=0))
        elif kind == "bar":
            ax.bar(range(8), rng.uniform(1, 10, 8), color=plt.cm.tab10(np.arange(8)))
        elif kind == "scatter":
            ax.scatter(*rng.normal(size=(2, 200)), c=rng.random(200), cmap="viridis")
        elif kind == "pie":
            ax.pie(rng.uniform(1, 5, 5))
        elif kind == "hist":
            ax.hist(rng.normal(size=1000), bins=30, color="gray" if seed % 2 else "tab:blue")
        elif kind == "heatmap":
            ax.imshow(rng.random((12, 12)), cmap="gray" if seed % 2 else "magma")
        else:
            ax.boxplot([rng.normal(size=50) for _ in range(4)])
        ax.set_title(f"{kind} chart {seed}")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        yield f"{kind}_{seed}", Image.open(buffer).convert("RGB"), f"matplotlib {kind} chart"


def screenshots() -> Iterator[tuple[str, Image.Image, str]]:
    for seed in range(12):
        rng = _rng(700 + seed)
        dark = seed % 3 == 0
        bg, fg = ((30, 30, 34), (220, 220, 220)) if dark else ((245, 245, 247), (30, 30, 30))
        img = Image.new("RGB", (1280, 800), bg)
        draw = ImageDraw.Draw(img)
        accent = tuple(int(v) for v in rng.integers(40, 220, 3))
        draw.rectangle((0, 0, 1280, 36), fill=(60, 60, 66) if dark else (222, 222, 226))
        for i, colour in enumerate(((237, 106, 94), (245, 191, 79), (98, 197, 84))):
            draw.ellipse((12 + i * 22, 11, 26 + i * 22, 25), fill=colour)
        draw.rectangle((0, 36, 240, 800), fill=(40, 40, 46) if dark else (232, 232, 236))
        for row in range(14):
            draw.text((20, 56 + row * 40), " ".join(rng.choice(_WORDS, 2)), font=_font(16, seed), fill=fg)
        for row in range(8):
            y = 70 + row * 84
            draw.rounded_rectangle((280, y, 1240, y + 70), radius=8, outline=accent, width=2)
            draw.text((300, y + 12), " ".join(rng.choice(_WORDS, 7)), font=_font(18, seed), fill=fg)
            draw.rounded_rectangle((1100, y + 18, 1220, y + 52), radius=6, fill=accent)
        yield f"app_{seed}", img, f"drawn desktop application window, {'dark' if dark else 'light'} theme"


# ---------------------------------------------------------------- shipped with packages


def _package_image(name: str) -> Image.Image:
    """An image file shipped with an installed package, by ``package:relative/path``."""
    package, relative = name.split(":", 1)
    if package == "debian":
        return Image.open(Path("/usr/share/pixmaps") / relative)
    module = __import__(package)
    return Image.open(Path(module.__file__).parent / relative)


_COLOUR_PHOTOS = (
    "skimage:data/astronaut.png",
    "skimage:data/chelsea.png",
    "skimage:data/coffee.png",
    "skimage:data/rocket.jpg",
    "skimage:data/motorcycle_left.png",
    "skimage:data/motorcycle_right.png",
    "skimage:data/hubble_deep_field.jpg",
    "sklearn:datasets/images/china.jpg",
    "sklearn:datasets/images/flower.jpg",
    "matplotlib:mpl-data/sample_data/grace_hopper.jpg",
    "matplotlib:mpl-data/sample_data/Minduka_Present_Blue_Pack.png",
)
_GRAY_PHOTOS = (
    "skimage:data/camera.png",
    "skimage:data/moon.png",
    "skimage:data/coins.png",
    "skimage:data/brick.png",
    "skimage:data/grass.png",
    "skimage:data/gravel.png",
    "skimage:data/clock_motion.png",
    "skimage:data/horse.png",
    "skimage:data/text.png",
    "skimage:data/page.png",
)
_OTHER_MEDICAL = (
    ("skimage:data/retina.jpg", "colour fundus photograph"),
    ("skimage:data/ihc.png", "immunohistochemistry microscopy"),
    ("skimage:data/cell.png", "cell microscopy (gray)"),
    ("skimage:data/microaneurysms.png", "retinal angiography crop (gray)"),
)
_LOGOS = (
    "matplotlib:mpl-data/sample_data/logo2.png",
    "skimage:data/logo.png",
    "skimage:data/color.png",
    "debian:debian-logo.png",
    "debian:chromium.png",
)


def _crops(img: Image.Image) -> Iterator[tuple[str, Image.Image]]:
    """The whole image plus its four overlapping 70% corner crops: more views of the same scene."""
    w, h = img.size
    yield "full", img
    cw, ch = int(w * 0.7), int(h * 0.7)
    for name, (x, y) in (("tl", (0, 0)), ("tr", (w - cw, 0)), ("bl", (0, h - ch)), ("br", (w - cw, h - ch))):
        yield name, img.crop((x, y, x + cw, y + ch))


def photos_colour() -> Iterator[tuple[str, Image.Image, str]]:
    for name in _COLOUR_PHOTOS:
        img = _package_image(name).convert("RGB")
        for crop, view in _crops(img):
            yield f"{Path(name).stem}_{crop}", view, f"{name} ({crop})"


def photos_gray() -> Iterator[tuple[str, Image.Image, str]]:
    for name in _GRAY_PHOTOS:
        img = _package_image(name).convert("L")
        for crop, view in _crops(img):
            yield f"{Path(name).stem}_{crop}", view, f"{name} ({crop})"
    for name in _COLOUR_PHOTOS[:6]:  # colour photos stored as grayscale: the colour check cannot see these
        yield f"{Path(name).stem}_asgray", _package_image(name).convert("L"), f"{name} converted to grayscale"
    import skimage.data

    faces = skimage.data.lfw_subset()  # 100 faces then 100 non-faces, 25x25 floats in [0, 1]
    for index in range(0, 200, 5):
        kind = "face" if index < 100 else "nonface"
        img = _gray(faces[index] * 255).resize((200, 200), Image.Resampling.BICUBIC)
        yield f"lfw_{kind}_{index}", img, f"scikit-image lfw_subset[{index}] ({kind}), enlarged"


def logos() -> Iterator[tuple[str, Image.Image, str]]:
    for name in _LOGOS:
        img = _package_image(name)
        if img.mode in ("RGBA", "LA", "P"):
            img = img.convert("RGBA")
        yield Path(name).stem, img, name


def other_medical() -> Iterator[tuple[str, Image.Image, str]]:
    for name, what in _OTHER_MEDICAL:
        img = _package_image(name)
        for crop, view in _crops(img):
            yield f"{Path(name).stem}_{crop}", view, f"{what}: {name} ({crop})"


def _dicom(name: str) -> tuple[object, np.ndarray]:
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"pydicom test file {name} is not installed")
    ds = pydicom.dcmread(path)
    return ds, ds.pixel_array


def _window(values: np.ndarray, centre: float, width: float) -> Image.Image:
    lo = centre - width / 2
    return _gray((values.astype(np.float64) - lo) / width * 255)


def _minmax(values: np.ndarray) -> Image.Image:
    v = values.astype(np.float64)
    return _gray((v - v.min()) / max(v.max() - v.min(), 1e-9) * 255)


_CT_WINDOWS = (("lung", -600, 1500), ("soft", 40, 400), ("bone", 400, 1800), ("brain", 40, 80))


def ct() -> Iterator[tuple[str, Image.Image, str]]:
    for name in ("CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"):
        ds, arr = _dicom(name)
        hu = arr * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
        for window, centre, width in _CT_WINDOWS:
            yield f"{Path(name).stem}_{window}", _window(hu, centre, width), f"pydicom {name}, {window} window"
        yield f"{Path(name).stem}_minmax", _minmax(hu), f"pydicom {name}, full range"
    import skimage.data

    phantom = skimage.data.shepp_logan_phantom()
    yield "shepp_logan", _gray(phantom * 255), "Shepp-Logan CT phantom (scikit-image)"


def mri() -> Iterator[tuple[str, Image.Image, str]]:
    for name in ("MR_small.dcm", "examples_overlay.dcm"):
        _, arr = _dicom(name)
        yield f"{Path(name).stem}_minmax", _minmax(arr), f"pydicom {name}, full range"
        hi = np.percentile(arr, 99)
        yield f"{Path(name).stem}_p99", _gray(arr / max(hi, 1) * 255), f"pydicom {name}, clipped at 99th percentile"
    with cbook.get_sample_data("s1045.ima.gz") as handle:
        raw = handle.read()
    brain = np.frombuffer(raw, np.uint16).reshape(256, 256)
    yield "s1045_minmax", _minmax(brain), "matplotlib s1045.ima (MR brain slice), full range"
    yield "s1045_p99", _gray(brain / max(np.percentile(brain, 99), 1) * 255), "s1045.ima, 99th percentile"


def ultrasound() -> Iterator[tuple[str, Image.Image, str]]:
    from pydicom.pixels import apply_color_lut

    # pydicom 3's pixel_array already converts YBR colour spaces to RGB.
    for name in ("examples_rgb_color.dcm", "examples_ybr_color.dcm", "examples_jpeg2k.dcm", "ExplVR_BigEnd.dcm"):
        ds, arr = _dicom(name)
        frames = arr[::6] if arr.ndim == 4 else arr[None]
        for index, frame in enumerate(frames):
            yield f"{Path(name).stem}_{index}", _rgb(frame), f"pydicom {name} frame {index * 6 if arr.ndim == 4 else 0}"
            yield f"{Path(name).stem}_{index}_gray", _rgb(frame).convert("L"), "the same, as grayscale"
    ds, arr = _dicom("examples_palette.dcm")
    yield "examples_palette", _rgb(apply_color_lut(arr, ds) / 256), "pydicom examples_palette.dcm, palette applied"
    yield "examples_palette_index", _minmax(arr), "pydicom examples_palette.dcm, palette indices as gray"


def nuclear() -> Iterator[tuple[str, Image.Image, str]]:
    _, arr = _dicom("JPEG2000.dcm")
    yield "JPEG2000_minmax", _minmax(arr), "pydicom JPEG2000.dcm (NM whole body), full range"
    yield "JPEG2000_inverted", ImageOps.invert(_minmax(arr)), "the same, inverted (dark uptake on white)"
    yield "JPEG2000_anterior", _minmax(arr[:, :128]), "left half (one whole-body view)"
    yield "JPEG2000_posterior", _minmax(arr[:, 128:]), "right half (the other view)"


# ---------------------------------------------------------------- procedural radiograph phantoms


def _radiograph(density: np.ndarray, rng: np.random.Generator, blur: float = 1.5) -> Image.Image:
    """Attenuation map -> X-ray-like image: bright where dense, blurred, with quantum noise."""
    img = _gray(density / max(density.max(), 1e-9) * 235 + 10).filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(img, dtype=np.float64) + rng.normal(0, 4, (img.height, img.width))
    return _gray(arr)


def _capsule(yy: np.ndarray, xx: np.ndarray, p0: np.ndarray, p1: np.ndarray, radius: float) -> np.ndarray:
    """Signed-ish thickness of a rounded bone segment from p0 to p1 (0 outside)."""
    d = p1 - p0
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
    dist = np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))
    return np.sqrt(np.clip(radius**2 - dist**2, 0, None))


def _bone(yy: np.ndarray, xx: np.ndarray, p0: np.ndarray, p1: np.ndarray, radius: float) -> np.ndarray:
    """Cortical bone: a dense shell with a less dense marrow cavity."""
    return _capsule(yy, xx, p0, p1, radius) * 1.0 - 0.55 * _capsule(yy, xx, p0, p1, radius * 0.6)


def phantom_hand() -> Iterator[tuple[str, Image.Image, str]]:
    for seed in range(10):
        rng = _rng(800 + seed)
        h, w = 512, 420
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        density = np.zeros((h, w))
        wrist = np.array([470.0, 210.0 + rng.normal(0, 10)])
        spread = rng.uniform(0.8, 1.2)
        soft = np.zeros((h, w))
        for finger in range(5):
            angle = np.deg2rad(-40 + finger * 20 * spread + rng.normal(0, 3)) if finger else np.deg2rad(-60)
            direction = np.array([-np.cos(angle), np.sin(angle)])
            base = wrist + direction * 120
            lengths = (70, 45, 32, 24) if finger else (55, 38, 28)
            start = wrist + direction * 30
            segments = [start, base]
            for length in lengths[1:]:
                segments.append(segments[-1] + direction * length * rng.uniform(0.9, 1.1))
            for p0, p1 in itertools.pairwise(segments):
                density += _bone(yy, xx, p0 + direction * 3, p1 - direction * 3, 9 - finger * 0.4)
            soft += _capsule(yy, xx, start, segments[-1] + direction * 12, 20)
        soft += _capsule(yy, xx, wrist, wrist + np.array([-110.0, 0]), 95)
        for index in range(8):  # carpal bones
            centre = wrist + np.array([-15.0 - 18 * (index // 4), -45 + 30 * (index % 4)])
            density += _capsule(yy, xx, centre, centre + 1, 13)
        density += _bone(yy, xx, wrist, wrist + np.array([60.0, -30]), 18)
        density += _bone(yy, xx, wrist, wrist + np.array([60.0, 30]), 14)
        image = _radiograph(density * 3 + np.clip(soft, 0, 40) * 0.8, rng)
        yield f"hand_{seed}", image if seed % 3 else image.rotate(rng.uniform(-20, 20)), "procedural hand radiograph"


def phantom_knee() -> Iterator[tuple[str, Image.Image, str]]:
    for seed in range(10):
        rng = _rng(900 + seed)
        h, w = 512, 400
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        cx = 200 + rng.normal(0, 8)
        gap = rng.uniform(8, 18)
        femur = _bone(yy, xx, np.array([-50.0, cx]), np.array([230.0, cx]), 42)
        condyles = _capsule(yy, xx, np.array([230.0, cx - 35]), np.array([235.0, cx - 35]), 40)
        condyles += _capsule(yy, xx, np.array([230.0, cx + 35]), np.array([235.0, cx + 35]), 40)
        tibia = _bone(yy, xx, np.array([275.0 + gap, cx]), np.array([560.0, cx]), 38)
        plateau = _capsule(yy, xx, np.array([280.0 + gap, cx - 50]), np.array([280.0 + gap, cx + 50]), 22)
        fibula = _bone(yy, xx, np.array([300.0 + gap, cx + 75]), np.array([560.0, cx + 80]), 13)
        patella = _capsule(yy, xx, np.array([190.0, cx - 5]), np.array([215.0, cx]), 30) * (seed % 2)
        soft = _capsule(yy, xx, np.array([-50.0, cx]), np.array([560.0, cx]), 130)
        density = (femur + condyles * 0.8 + tibia + plateau * 0.8 + fibula + patella * 0.6) * 2 + soft * 0.25
        yield f"knee_{seed}", _radiograph(density, rng), "procedural knee radiograph (AP)"


def phantom_lateral_chest() -> Iterator[tuple[str, Image.Image, str]]:
    for seed in range(10):
        rng = _rng(1000 + seed)
        h, w = 512, 512
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        body = np.clip(1 - ((xx - 250) / 200) ** 2 - ((yy - 300) / 330) ** 2, 0, None) ** 0.5 * 60
        lung = np.clip(1 - ((xx - 250) / 150) ** 2 - ((yy - 250) / 190) ** 2, 0, None) ** 0.5 * 45
        heart = _capsule(yy, xx, np.array([300.0, 190]), np.array([360.0, 200]), 85) * 0.5
        diaphragm = (yy > 400 - 40 * np.cos((xx - 250) / 180)) * 25.0
        spine = np.zeros((h, w))
        for level in range(12):  # vertebral bodies, posterior (right side of the image)
            y0 = 40 + level * 38 + rng.normal(0, 2)
            spine += _capsule(yy, xx, np.array([y0, 385.0]), np.array([y0 + 22, 385.0]), 22)
        sternum = _bone(yy, xx, np.array([110.0, 95]), np.array([330.0, 80]), 9)
        arms = _capsule(yy, xx, np.array([-40.0, 230]), np.array([120.0, 260]), 55) * 0.5
        density = body - lung + heart + diaphragm + spine * 1.6 + sternum * 2 + arms
        image = _radiograph(np.clip(density, 0, None), rng, blur=2.5)
        yield f"lateral_{seed}", image if seed % 2 else ImageOps.mirror(image), "procedural lateral chest radiograph"


# ---------------------------------------------------------------- transformations of chest X-rays


def _cxr_files(root: Path, count: int, offset: int) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    return files[offset :: max(1, len(files) // count)][:count]


def cxr_transforms(root: Path) -> dict[str, Maker]:
    def rotated() -> Iterator[tuple[str, Image.Image, str]]:
        for index, path in enumerate(_cxr_files(root, 30, 0)):
            angle = (90, 180, 270)[index % 3]
            yield (
                f"{path.stem}_rot{angle}",
                Image.open(path).convert("L").rotate(angle, expand=True),
                f"{path.name} rotated {angle}°",
            )

    def inverted() -> Iterator[tuple[str, Image.Image, str]]:
        for path in _cxr_files(root, 20, 1):
            yield f"{path.stem}_inv", ImageOps.invert(Image.open(path).convert("L")), f"{path.name} inverted (negative)"

    def corner_crop() -> Iterator[tuple[str, Image.Image, str]]:
        for index, path in enumerate(_cxr_files(root, 20, 2)):
            img = Image.open(path).convert("L")
            w, h = img.size
            x, y = ((0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2))[index % 4]
            yield f"{path.stem}_q{index % 4}", img.crop((x, y, x + w // 2, y + h // 2)), f"{path.name}: one quarter"

    def blurred() -> Iterator[tuple[str, Image.Image, str]]:
        for index, path in enumerate(_cxr_files(root, 20, 5)):
            img = Image.open(path).convert("L")
            radius = (0.01, 0.02, 0.03)[index % 3] * max(img.size)  # 2-7 px on a 224-px film
            yield (
                f"{path.stem}_blur{index % 3}",
                img.filter(ImageFilter.GaussianBlur(radius)),
                f"{path.name} Gaussian blur, radius {radius:.1f} px",
            )

    def enlarged() -> Iterator[tuple[str, Image.Image, str]]:
        for index, path in enumerate(_cxr_files(root, 20, 6)):
            img = Image.open(path).convert("L")
            side = (24, 32, 48)[index % 3]
            small = img.resize((side, side), Image.Resampling.BILINEAR)
            yield (
                f"{path.stem}_from{side}",
                small.resize(img.size, Image.Resampling.BICUBIC),
                f"{path.name} shrunk to {side} px and enlarged back (a thumbnail upscaled)",
            )

    def lower_crop() -> Iterator[tuple[str, Image.Image, str]]:
        # The lung bases and upper abdomen, enlarged by 1.5 so the short side clears the 128-px shape check,
        # as a crop of a full-resolution film would.
        for path in _cxr_files(root, 20, 7):
            img = Image.open(path).convert("L")
            crop = img.crop((0, img.height * 3 // 5, img.width, img.height))
            yield (
                f"{path.stem}_lower40",
                crop.resize((crop.width * 3 // 2, crop.height * 3 // 2), Image.Resampling.BICUBIC),
                f"{path.name}: lower 40 % (lung bases, upper abdomen), enlarged 1.5 x",
            )

    def control_flipped() -> Iterator[tuple[str, Image.Image, str]]:
        for path in _cxr_files(root, 20, 3):
            yield f"{path.stem}_mirror", ImageOps.mirror(Image.open(path).convert("L")), f"{path.name} mirrored"

    def control_mild() -> Iterator[tuple[str, Image.Image, str]]:
        for index, path in enumerate(_cxr_files(root, 20, 4)):
            img = Image.open(path).convert("L")
            rng = _rng(1100 + index)
            img = img.rotate(rng.uniform(-7, 7), resample=Image.Resampling.BILINEAR, fillcolor=0)
            arr = np.asarray(img, dtype=np.float64) * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15)
            yield f"{path.stem}_mild", _gray(arr), f"{path.name} rotated <=7°, exposure +-15%"

    return {
        "cxr_rotated": rotated,
        "cxr_inverted": inverted,
        "cxr_corner_crop": corner_crop,
        "cxr_blurred": blurred,
        "cxr_enlarged": enlarged,
        "cxr_lower_crop": lower_crop,
        "control_cxr_mirrored": control_flipped,
        "control_cxr_mild": control_mild,
    }


GENERATORS: dict[str, Maker] = {
    "blank": blank,
    "noise_gray": noise_gray,
    "noise_colour": noise_colour,
    "gradients": gradients,
    "patterns": patterns,
    "documents": documents,
    "charts": charts,
    "screenshots": screenshots,
    "logos": logos,
    "photos_colour": photos_colour,
    "photos_gray": photos_gray,
    "other_medical": other_medical,
    "ct": ct,
    "mri": mri,
    "ultrasound": ultrasound,
    "nuclear": nuclear,
    "phantom_hand": phantom_hand,
    "phantom_knee": phantom_knee,
    "phantom_lateral_chest": phantom_lateral_chest,
}


def build(out: Path, cxr_root: Path | None) -> dict[str, dict[str, str]]:
    """Write every category under ``out``; returns the manifest {category/file: description}."""
    makers = dict(GENERATORS)
    if cxr_root is not None:
        makers.update(cxr_transforms(cxr_root))
    manifest: dict[str, dict[str, str]] = {}
    for category, maker in makers.items():
        folder = out / category
        folder.mkdir(parents=True, exist_ok=True)
        entries: dict[str, str] = {}
        for name, image, description in maker():
            filename = f"{name}.png"
            image.save(folder / filename)
            entries[filename] = description
        manifest[category] = entries
        print(f"{category}: {len(entries)} images", file=sys.stderr)
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ood_set", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ood"), help="output folder (default: runs/ood)")
    parser.add_argument(
        "--cxr", type=Path, default=None, help="chest X-ray folder for the rotated/inverted/cropped categories"
    )
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # pydicom's notes on its own malformed test files
    manifest = build(args.out, args.cxr)
    print(f"{sum(len(v) for v in manifest.values())} images in {len(manifest)} categories under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
