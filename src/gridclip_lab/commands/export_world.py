"""``gridclip-lab export-world WORLD --format coco|yolo|voc --out DIR [--train-images N] [--val-images N]``: the
shape world's images as a small custom dataset in that format (``gridclip_lab.world.formats``)."""
from __future__ import annotations

import argparse
from typing import Sequence

from gridclip_lab.world.formats import FORMATS, YOLO_STYLES, export_world


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab export-world",
                                description="Write some of the shape world's images as a COCO, YOLO or VOC dataset "
                                            "to try `gridclip train` / `gridclip eval` with data.format=... on.")
    p.add_argument("world", help="a shape world folder (gridclip-lab make-world; the demo's is runs/demo/world)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--train-images", type=int, default=12, help="images of the train split (default 12)")
    p.add_argument("--val-images", type=int, default=6, help="images of the val split (default 6)")
    p.add_argument("--yolo-style", choices=YOLO_STYLES, default="ultralytics",
                   help="YOLO folder layout: images/{train,val} (ultralytics) or {train,valid}/images (roboflow)")
    a = p.parse_args(list(argv))
    path = export_world(a.world, a.out, a.format, train_images=a.train_images, val_images=a.val_images,
                        yolo_style=a.yolo_style)
    print(f"wrote a {a.format} dataset of {a.train_images} + {a.val_images} images: {path}")
    return 0
