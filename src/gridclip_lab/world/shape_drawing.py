"""Drawing the shape world's scenes: textured backgrounds, clutter, coloured textured shapes, and the
visible box of every object (see :mod:`gridclip_lab.world.shapes` for what is drawn where).

Pure functions of their arguments: every scene has its own seeded generator (``render_image(..., key)``),
so worker processes (:func:`render_chunk`) draw the same pixels whatever their number.
"""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 35),
    "purple": (140, 50, 190),
    "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
# Shapes only the "new-words" world design draws, as its novel categories (never in clutter or base names)
NEW_SHAPES: tuple[str, ...] = ("heart", "crescent", "arrow", "pentagon", "semicircle")
TEXTURES: tuple[str, ...] = ("solid", "striped", "shaded")


def _unit_polygon(shape: str) -> list[tuple[float, float]] | None:
    """Vertices in [-0.5, 0.5]^2 (y down), or None for round shapes."""
    if shape == "square":
        h = 0.42
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":
        return [(0.0, -0.5), (0.5, 0.4), (-0.5, 0.4)]
    if shape == "diamond":
        return [(0.0, -0.5), (0.34, 0.0), (0.0, 0.5), (-0.34, 0.0)]
    if shape == "hexagon":
        return [(0.5 * math.cos(a), 0.5 * math.sin(a)) for a in np.arange(6) * math.pi / 3]
    if shape == "star":
        return [((0.5 if i % 2 == 0 else 0.21) * math.sin(i * math.pi / 5),
                 -(0.5 if i % 2 == 0 else 0.21) * math.cos(i * math.pi / 5)) for i in range(10)]
    if shape == "cross":
        a, b = 0.17, 0.5
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    if shape == "pentagon":
        return [(0.5 * math.sin(i * 2 * math.pi / 5), -0.5 * math.cos(i * 2 * math.pi / 5)) for i in range(5)]
    if shape == "arrow":  # pointing right: a shaft and a triangular head
        return [(-0.5, -0.12), (0.05, -0.12), (0.05, -0.34), (0.5, 0.0), (0.05, 0.34), (0.05, 0.12), (-0.5, 0.12)]
    if shape == "semicircle":  # the flat side down
        return [(0.5 * math.cos(a), 0.25 - 0.5 * math.sin(a)) for a in np.linspace(0, math.pi, 25)]
    if shape == "heart":  # the classic parametric heart, scaled into the unit square
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x, y = 16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        scale = 1.0 / max(x.max() - x.min(), y.max() - y.min())
        cy = (y.max() + y.min()) / 2
        return [(float(a * scale), float((b - cy) * scale)) for a, b in zip(x, y)]
    return None


def _shape_mask(shape: str, side: int, angle: float) -> np.ndarray:
    """Boolean mask [side, side] of one shape filling a side x side square, rotated by ``angle`` rad."""
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    c = (side - 1) / 2
    if shape in ("circle", "ring", "crescent"):
        draw.ellipse([0, 0, side - 1, side - 1], fill=255)
        if shape == "ring":
            inner = 0.28 * side
            draw.ellipse([c - inner, c - inner, c + inner, c + inner], fill=0)
        if shape == "crescent":  # a disc minus a disc shifted towards the upper right (turned by angle)
            r, d = 0.42 * side, 0.3 * side
            ox, oy = c + d * math.cos(angle - math.pi / 4), c + d * math.sin(angle - math.pi / 4)
            draw.ellipse([ox - r, oy - r, ox + r, oy + r], fill=0)
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        pts = [(c + side * (x * cos - y * sin), c + side * (x * sin + y * cos)) for x, y in _unit_polygon(shape)]
        draw.polygon(pts, fill=255)
    return np.asarray(img) > 127


def _background(rng: np.random.Generator, hw: int) -> np.ndarray:
    """Low-saturation textured background, float32 [hw, hw, 3] in 0..255."""
    base = rng.uniform(55, 200) + rng.normal(0, 12, size=3)
    yy, xx = np.mgrid[0:hw, 0:hw].astype(np.float32)
    kind = rng.integers(5)
    if kind == 0:    # stripes at a random angle
        a = rng.uniform(0, math.pi)
        tex = rng.uniform(8, 25) * np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / rng.uniform(5, 20))
    elif kind == 1:  # checker
        b = int(rng.integers(4, 17))
        tex = rng.uniform(8, 22) * (((xx // b + yy // b) % 2) * 2 - 1)
    elif kind == 2:  # linear gradient
        a = rng.uniform(0, 2 * math.pi)
        tex = rng.uniform(20, 50) * ((xx * math.cos(a) + yy * math.sin(a)) / hw)
    elif kind == 3:  # soft blobs
        lo = rng.normal(0, 1, size=(4, 4)).astype(np.float32)
        tex = rng.uniform(15, 35) * np.asarray(Image.fromarray(lo).resize((hw, hw), Image.BILINEAR))
    else:
        tex = np.zeros((hw, hw), np.float32)
    tint = rng.normal(0, 0.15, size=3) + 1.0
    img = base[None, None, :] + tex[..., None] * tint[None, None, :]
    return img + rng.normal(0, rng.uniform(2, 9), size=(hw, hw, 3))


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, hw: int) -> None:
    """Distractor marks that are not categories: lines, dots, arcs and grey shapes."""
    for _ in range(int(rng.integers(1, 6))):
        g = int(rng.integers(20, 235))
        grey = (g, g, g) if rng.random() < 0.7 else (int(rng.integers(70, 140)), int(rng.integers(50, 100)), 30)
        x, y = rng.uniform(0, hw, size=2)
        kind = rng.integers(4)
        if kind == 0:
            x2, y2 = x + rng.normal(0, hw / 5), y + rng.normal(0, hw / 5)
            draw.line([x, y, x2, y2], fill=grey, width=int(rng.integers(1, 3)))
        elif kind == 1:
            r = rng.uniform(1, 3)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=grey)
        elif kind == 2:
            r = rng.uniform(4, hw / 6)
            a = rng.uniform(0, 360)
            draw.arc([x - r, y - r, x + r, y + r], a, a + rng.uniform(60, 200), fill=grey, width=1)
        else:  # grey shape: teaches that colour is part of the category
            s = int(rng.integers(8, 24))
            m = Image.fromarray(_shape_mask(SHAPES[int(rng.integers(len(SHAPES)))], s, rng.uniform(-0.3, 0.3)))
            draw.bitmap((int(x) - s // 2, int(y) - s // 2), m.convert("1"), fill=grey)


def _fill(rng: np.random.Generator, rgb: tuple[int, int, int], side: int) -> np.ndarray:
    """Object colour with a texture attribute, float32 [side, side, 3]."""
    colour = np.clip(np.array(rgb, np.float32) + rng.normal(0, 12, size=3), 0, 255)
    colour = colour * rng.uniform(0.85, 1.1)
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    if texture == "striped":
        a = rng.uniform(0, math.pi)
        period = rng.uniform(4, 8)
        on = (np.floor((xx * math.cos(a) + yy * math.sin(a)) / (period / 2)) % 2)[..., None]
        shade = 1.0 - 0.35 * on
    elif texture == "shaded":
        a = rng.uniform(0, 2 * math.pi)
        shade = (1.0 - 0.35 * (0.5 + (xx * math.cos(a) + yy * math.sin(a)) / (side * 1.5)))[..., None]
    else:
        shade = np.ones((side, side, 1), np.float32)
    return colour[None, None, :] * shade + rng.normal(0, 5, size=(side, side, 3))


def _place(rng: np.random.Generator, hw: int, side: int, boxes: list[tuple[int, int, int, int]]) -> tuple[int, int]:
    """Top-left corner for a side x side object overlapping earlier ones by at most 30 % of either box."""
    best, best_overlap = (0, 0), float("inf")
    for _ in range(60):
        x, y = int(rng.integers(0, hw - side + 1)), int(rng.integers(0, hw - side + 1))
        overlap = 0.0
        for bx, by, bs, _ in boxes:
            iw = max(0, min(x + side, bx + bs) - max(x, bx))
            ih = max(0, min(y + side, by + bs) - max(y, by))
            overlap = max(overlap, iw * ih / min(side * side, bs * bs))
        if overlap <= 0.3:
            return x, y
        if overlap < best_overlap:
            best, best_overlap = (x, y), overlap
    return best  # crowded: accept the least-overlapping spot (objects are never dropped)


def render_image(names: list[str], hw: int, min_obj: int, max_obj: int, key: tuple[int, ...]) -> tuple[np.ndarray, list[list[int]]]:
    """Draw one scene. Returns (uint8 [hw, hw, 3], visible xyxy boxes, exclusive end, in ``names`` order).

    Later objects occlude earlier ones; a box covers the object's visible pixels only, as in LVIS.
    """
    rng = np.random.default_rng(key)
    canvas = Image.fromarray(np.clip(_background(rng, hw), 0, 255).astype(np.uint8))
    _clutter(rng, ImageDraw.Draw(canvas), hw)
    img = np.asarray(canvas).astype(np.float32)
    owner = np.full((hw, hw), -1, np.int16)
    # crowded scenes get smaller objects so that 8 of them fit in the image
    hi = min(max_obj, max(min_obj, int(0.95 * hw / math.sqrt(max(1, len(names))))))
    placed: list[tuple[int, int, int, int]] = []
    for i, name in enumerate(names):
        colour, shape = name.split(" ")
        side = int(round(math.exp(rng.uniform(math.log(min_obj), math.log(hi + 1)))))
        side = min(max(side, min_obj), hi)
        mask = _shape_mask(shape, side, rng.uniform(-0.35, 0.35))
        x, y = _place(rng, hw, side, placed)
        placed.append((x, y, side, i))
        region = img[y:y + side, x:x + side]
        region[mask] = _fill(rng, COLOURS[colour], side)[mask]
        owner[y:y + side, x:x + side][mask] = i
    boxes = []
    for i in range(len(names)):
        ys, xs = np.nonzero(owner == i)
        if len(xs) == 0:  # fully hidden (cannot happen with the 30 % overlap limit, kept as a guard)
            raise RuntimeError(f"object {i} of scene {key} is fully occluded")
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
    return np.clip(img, 0, 255).astype(np.uint8), boxes


def render_chunk(args: tuple) -> list[list[list[int]]]:
    """Worker: render and save a chunk of images; returns their boxes."""
    out_dir, items, hw, min_obj, max_obj = args
    results = []
    for key, file_name, names in items:
        pixels, boxes = render_image(names, hw, min_obj, max_obj, key)
        Image.fromarray(pixels).save(os.path.join(out_dir, file_name), format="PNG", compress_level=6)
        results.append(boxes)
    return results
