"""GridCLIP: one-stage open-vocabulary object detection on the CLIP ResNet image encoder.

Heavy optional imports (lvis, gradio, onnx) stay out of this module: ``import gridclip`` is light.
"""

__version__ = "0.1.0"

from gridclip.clip import Vocabulary, load_clip  # noqa: E402
from gridclip.config import Config, GridCLIPConfig, load_config  # noqa: E402
from gridclip.model import GridCLIP, build_model  # noqa: E402



def load(path, device="cpu") -> "GridCLIP":
    """Load a GridCLIP checkpoint (config + weights + vocabulary) in eval mode."""
    from gridclip.checkpoint import load_checkpoint

    return load_checkpoint(path, device)


__all__ = ["load", "Config", "GridCLIP", "GridCLIPConfig", "Vocabulary", "build_model", "load_clip", "load_config"]
