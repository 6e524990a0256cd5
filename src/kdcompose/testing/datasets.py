"""Synthetic, deterministic datasets in ms-swift's ``messages`` JSONL format.

Image-caption samples are small PNGs (56-112 px, one coloured shape on a plain background) with a
caption naming size, colour, shape, position and background. Small images keep each sample at 4-16
vision tokens after Qwen-VL's 2x2 merge, so a CPU training step takes a fraction of a second. The
text-only variant asks about a described shape, for LLM runs and for the text-only tiny model.

Each row::

    {"messages": [{"role": "user", "content": "<image>Describe the image."},
                  {"role": "assistant", "content": "a large red square in the center on a white ..."}],
     "images": ["/abs/path/img_00000.png"]}
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kdcompose.testing._cache import atomic_build, cache_root, content_key
from kdcompose.testing.tokenizer import COLORS, POSITIONS, SHAPES, SIZES

#: Bump when the generated content changes, so caches rebuild.
DATASET_FORMAT_VERSION = 1
DATA_FILE = "data.jsonl"

_RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "gray": (128, 128, 128),
    "pink": (250, 150, 190),
}
_SIZE_FRACTION = {"small": 0.3, "medium": 0.45, "large": 0.6}
_BACKGROUNDS = ("white", "black", "gray")


@dataclass(frozen=True)
class ShapeSample:
    """What one synthetic picture shows (also the source of its caption)."""

    width: int
    height: int
    color: str
    shape: str
    size: str
    position: str
    background: str
    offset: tuple[int, int] = (0, 0)
    """Pixels (x, y) the shape is moved from its slot, towards the picture's inside."""
    scale: float = 1.0
    """Multiplies the size class's side (0.9-1.1 keeps the three classes apart)."""
    tint: tuple[int, int, int] = (0, 0, 0)
    """Added to the shape's RGB colour (small: the colour name stays right)."""

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"in the {self.position}"
        return f"a {self.size} {self.color} {self.shape} {where} on a {self.background} background."


def sample_shapes(n: int, seed: int = 0) -> list[ShapeSample]:
    """``n`` deterministic picture descriptions (independent of global random state)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        background = rng.choice(_BACKGROUNDS)
        color = rng.choice([c for c in COLORS if c != background])
        out.append(
            ShapeSample(
                width=rng.randrange(56, 113),
                height=rng.randrange(56, 113),
                color=color,
                shape=rng.choice(SHAPES),
                size=rng.choice(SIZES),
                position=rng.choice(POSITIONS),
                background=background,
            )
        )
    return out


def render_shape(sample: ShapeSample):  # -> PIL.Image.Image
    """Draw ``sample`` with PIL (no anti-aliasing, so output bytes are stable across runs)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (sample.width, sample.height), _RGB[sample.background])
    draw = ImageDraw.Draw(img)
    side = int(min(sample.width, sample.height) * _SIZE_FRACTION[sample.size] * sample.scale)
    margin = 2
    dx, dy = sample.offset
    xs = {
        "left": margin + dx,
        "center": (sample.width - side) // 2 + dx,
        "right": sample.width - side - margin - dx,
    }
    ys = {
        "top": margin + dy,
        "center": (sample.height - side) // 2 + dy,
        "bottom": sample.height - side - margin - dy,
    }
    if sample.position == "center":
        x0, y0 = xs["center"], ys["center"]
    else:
        vert, horiz = sample.position.split()
        x0, y0 = xs[horiz], ys[vert]
    x1, y1 = x0 + side, y0 + side
    fill = tuple(min(255, max(0, c + t)) for c, t in zip(_RGB[sample.color], sample.tint, strict=True))
    if sample.shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif sample.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif sample.shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif sample.shape == "diamond":
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:  # cross
        t = max(2, side // 4)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle([cx - t // 2, y0, cx + t // 2, y1], fill=fill)
        draw.rectangle([x0, cy - t // 2, x1, cy + t // 2], fill=fill)
    return img


def _text_row(sample: ShapeSample, rng: random.Random) -> dict:
    if rng.random() < 0.5:
        q, a = f"What color is the {sample.shape}?", f"The {sample.shape} is {sample.color}."
    else:
        q, a = "Describe the picture in one sentence.", sample.caption
    context = f"The picture shows {sample.caption[:-1]}."
    return {"messages": [{"role": "user", "content": f"{context} {q}"}, {"role": "assistant", "content": a}]}


def build_caption_dataset(
    out_dir: str | Path | None = None,
    n: int = 32,
    seed: int = 0,
    image: bool = True,
    prompt: str = "Describe the image.",
) -> Path:
    """Write (once) a synthetic caption dataset and return the path of its JSONL file.

    ``out_dir``: the directory to write into; default a content-keyed directory in the cache
    (``$KDCOMPOSE_CACHE``, default ``~/.cache/kdcompose``). Calling again with the same arguments
    returns the existing file without rewriting it. ``image=False`` gives the text-only variant
    (no ``images`` key, the shape described in words). Image paths in the JSONL are absolute.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    desc = {
        "kind": "caption",
        "n": n,
        "seed": seed,
        "image": image,
        "prompt": prompt,
        "format": DATASET_FORMAT_VERSION,
    }
    key = content_key(desc)
    final = (
        Path(out_dir)
        if out_dir is not None
        else cache_root() / "datasets" / (f"caption-{'image' if image else 'text'}-n{n}-s{seed}-{key}")
    )

    def build(tmp: Path, final_dir: Path) -> None:
        samples = sample_shapes(n, seed)
        if image:
            _write_image_rows(tmp, final_dir, samples, prompt)
            return
        rng = random.Random(seed + 1)
        _write_jsonl(tmp / DATA_FILE, [_text_row(sample, rng) for sample in samples])

    return atomic_build(final, key, build, desc) / DATA_FILE


def write_image_dataset(out_dir: str | Path, samples: Sequence[ShapeSample], prompt: str) -> Path:
    """Write (once) the pictures of `samples` and their captions as an ms-swift JSONL dataset in
    `out_dir`; returns the JSONL path. Keyed by the samples themselves, so the same samples
    reuse the folder and different ones replace it."""
    desc = {
        "kind": "caption-samples",
        "samples": [dataclasses.asdict(s) for s in samples],
        "prompt": prompt,
        "format": DATASET_FORMAT_VERSION,
    }
    key = content_key(desc)
    summary = {"kind": desc["kind"], "n": len(samples), "prompt": prompt, "format": DATASET_FORMAT_VERSION}
    build = lambda tmp, final_dir: _write_image_rows(tmp, final_dir, samples, prompt)  # noqa: E731
    return atomic_build(Path(out_dir), key, build, summary) / DATA_FILE


def _write_image_rows(tmp: Path, final_dir: Path, samples: Sequence[ShapeSample], prompt: str) -> None:
    rows = []
    for i, sample in enumerate(samples):
        name = f"img_{i:05d}.png"
        render_shape(sample).save(tmp / name, format="PNG", optimize=False)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"<image>{prompt}"},
                    {"role": "assistant", "content": sample.caption},
                ],
                "images": [str(final_dir / name)],
            }
        )
    _write_jsonl(tmp / DATA_FILE, rows)


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_rows(path: str | Path) -> list[dict]:
    """Read a JSONL dataset file back (convenience for tests and the demo)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
