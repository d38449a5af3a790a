"""``gridclip serve``: a Gradio page to try a checkpoint: upload an image, type a vocabulary, see the boxes.

Gradio is an optional dependency (``pip install gridclip[serve]``) imported only here, when the page is
built. One request at a time changes the model's vocabulary (Gradio's queue runs each event with
concurrency 1), and text embeddings are cached on disk, so switching back to a vocabulary is fast.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from torch import nn

from gridclip.clip.vocabulary import is_existing_file, parse_vocabulary
from gridclip.engine.predict import predict
from gridclip.utils.extras import require

__all__ = ["detect_image", "build_demo"]

TABLE_HEADERS = ["class", "score", "x1", "y1", "x2", "y2"]


def detect_image(model: nn.Module, image: np.ndarray | None, vocabulary: str,
                 score_thresh: float | None = None) -> tuple[np.ndarray, list[list[Any]]]:
    """One request: ``image`` HWC uint8 (as Gradio gives it), ``vocabulary`` as for ``--vocab``
    (comma-separated names, 'coco', 'lvis', 'voc'; empty: keep the model's). Returns the drawn image
    (HWC uint8) and table rows ``[class, score, x1, y1, x2, y2]`` (pixels), best first.

    Raises ValueError with a one-line message for a missing image or a bad vocabulary."""
    if image is None:
        raise ValueError("no image: upload one first")
    if vocabulary and vocabulary.strip():
        text = vocabulary.strip()
        if text.lower().endswith(".txt") or is_existing_file(text):
            raise ValueError("vocabulary: files are not read from the web page; type names separated by commas")
        names = parse_vocabulary(text)
        if list(names) != list(getattr(model, "class_names", ())):
            model.set_vocabulary(names)
    elif not getattr(model, "class_names", None):
        raise ValueError("vocabulary: empty; type class names separated by commas")
    (result,) = predict(model, image, score_thresh=score_thresh)
    drawn = result.plot().permute(1, 2, 0).numpy()
    rows = [[name, round(score, 3), *[round(v, 1) for v in box]]
            for name, score, box in zip(result["names"], result["scores"].tolist(), result["boxes"].tolist())]
    return drawn, rows


def build_demo(model: nn.Module, default_vocabulary: str = "", default_score: float = 0.3):
    """The Gradio Blocks page (not launched). Element ids: ``input-image``, ``vocabulary``, ``score``,
    ``detect-button``, ``output-image``, ``detections``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    gr = require("gradio", "serve", "the web demo")

    model.eval()
    if not default_vocabulary and getattr(model, "class_names", None):
        default_vocabulary = ", ".join(model.class_names) if len(model.class_names) <= 50 else ""

    def run(image, vocabulary, score):
        try:
            drawn, rows = detect_image(model, image, vocabulary, float(score))
        except (ValueError, FileNotFoundError) as exc:
            raise gr.Error(str(exc)) from None
        return drawn, rows

    with gr.Blocks(title="GridCLIP open-vocabulary detection") as demo:
        gr.Markdown("## GridCLIP: open-vocabulary detection\nUpload an image, type the classes to look for "
                    "(comma-separated, or `coco` / `lvis` / `voc`) and press **Detect**.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="numpy", label="image", elem_id="input-image", image_mode="RGB")
                vocab = gr.Textbox(value=default_vocabulary, label="vocabulary", elem_id="vocabulary",
                                   placeholder="red star, blue ring, person, dog")
                score = gr.Slider(0.0, 1.0, value=default_score, step=0.01, label="score threshold", elem_id="score")
                button = gr.Button("Detect", variant="primary", elem_id="detect-button")
            with gr.Column():
                output = gr.Image(type="numpy", label="detections", elem_id="output-image", interactive=False,
                                  format="png")  # lossless: the page shows exactly what was drawn
                table = gr.Dataframe(headers=TABLE_HEADERS, label="boxes", elem_id="detections", interactive=False)
        button.click(run, inputs=[image, vocab, score], outputs=[output, table], concurrency_limit=1)
    return demo
