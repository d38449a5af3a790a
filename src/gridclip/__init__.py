"""GridCLIP: one-stage open-vocabulary object detection on the CLIP ResNet image encoder.

Heavy optional imports (lvis, gradio, onnx) stay out of this module: ``import gridclip`` is light.
"""

__version__ = "0.1.0"
