"""The GridCLIP paper's own numbers (LVIS v1 val, ResNet-50; box AP in %), by table, for the paper rows
of docs/results.md. Transcribed from the paper's Tables 1-5 (``../shared/paper``); the embedded-world
rows beside them are measured, these are not."""
from __future__ import annotations

# Table 1: open-vocabulary LVIS (base = frequent + common, novel = rare).
TABLE1 = {
    "GridCLIP-R50 (ViT-B/32 teacher)": {"APr": 15.0, "APc": 22.7, "APf": 32.5, "AP": 25.2},
    "GridCLIP-R50-RN (RN50x64 teacher)": {"APr": 13.7, "APc": 23.3, "APf": 32.6, "AP": 25.3},
    "ViLD": {"APr": 16.3, "APc": 21.2, "APf": 31.6, "AP": 24.4},
    "CLIP on cropped regions": {"APr": 19.5, "APc": 19.7, "APf": 17.0, "AP": 18.6},
}

# Table 2: inference parameters (M), total training cost (GPU-hours), FPS (A100).
TABLE2 = {
    "GridCLIP-R50": {"params_m": 56.4, "gpu_hours": 70, "epochs": 24, "fps": 19.5},
    "ViLD": {"params_m": 60.5, "gpu_hours": 3064, "epochs": 384, "fps": 3.3},
}

# Table 3: transfer of the LVIS-trained GridCLIP-R50 without fine-tuning.
TABLE3 = {"PASCAL VOC 2007 test": {"AP50": 70.9, "AP75": 55.4},
          "COCO val2017": {"AP": 34.7, "AP50": 52.2, "AP75": 37.1}}

# Table 4: close-set LVIS (c + f categories only), pretrained trunks (top section: ImageNet-supervised and
# SwAV R50-FPN w/o align), alignment and MHSA ablations: AP_c / AP_f / AP.
TABLE4 = {
    "FCOS w/o align, supervised trunk": {"APc": 14.6, "APf": 26.2, "AP": 16.6},
    "FCOS w/o align, SwAV trunk": {"APc": 19.5, "APf": 29.2, "AP": 20.0},
    "FCOS w/o align": {"APc": 19.4, "APf": 29.7, "AP": 20.1},
    "w/o MHSA w/o align": {"APc": 20.2, "APf": 30.3, "AP": 20.7},
    "grid only": {"APc": 21.7, "APf": 30.0, "AP": 21.2},
    "image only": {"APc": 19.4, "APf": 30.1, "AP": 20.2},
    "GridCLIP": {"APc": 21.2, "APf": 30.0, "AP": 21.0},
}

# Table 5: open-set effect of image-level alignment.
TABLE5 = {
    "grid only": {"APr": 10.1, "APc": 21.0, "APf": 29.6, "AP": 22.5},
    "GridCLIP": {"APr": 12.7, "APc": 20.6, "APf": 29.7, "AP": 22.8},
}


def paper_difference(table: dict[str, dict[str, float]], a: str, b: str, metric: str) -> float:
    """``table[a][metric] - table[b][metric]``, rounded to the paper's one decimal."""
    return round(table[a][metric] - table[b][metric], 1)
