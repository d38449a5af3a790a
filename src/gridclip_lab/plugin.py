"""The lab's entry into gridclip (entry point ``gridclip.plugins: lab``): the peers' detectors and the
lab's named configs (ViLD, CLIP on crops, the world's peers setting)."""
from __future__ import annotations

from pathlib import Path

from gridclip.config import register_config_dir

CONFIG_DIR = Path(__file__).parent / "configs"


def register() -> None:
    from gridclip_lab.peers import register_peers  # the peers import torchvision's Faster R-CNN: only now

    register_config_dir(CONFIG_DIR)
    register_peers()
