"""A fine-tuned model that keeps every other name exactly: names routed between two detectors.

``train.finetune.mode=routed`` (docs/training.md; results/finetune_routed/PLAN.md) saves the unchanged start
model beside plain fine-tuning's model and the custom names the fine-tuning data had. A vocabulary is split
by name (:func:`gridclip.clip.vocabulary.name_key`): the fine-tuned model scores the custom names, the start
model every other name, each over its own part of the vocabulary; each image keeps the start model's
``detections_per_img`` highest scores of the two lists. A part with no name is not run, so a vocabulary of
only custom names (the file's default) or only other names costs one model; a mixed one costs two.

The study measured this design as two models run one after the other on the same images
(``gridclip_lab.study.finetune.routed_detections``); :class:`RoutedDetector` computes the same thing in one
call.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from gridclip.clip.vocabulary import Vocabulary, name_key, parse_vocabulary
from gridclip.model.gridclip import GridCLIP
from gridclip.model.predict import predict_as_given

__all__ = ["RoutedDetector", "join_detections"]


def join_detections(parts: Sequence[dict[str, Tensor]], per_image: int) -> dict[str, Tensor]:
    """One image's detections of several detectors (labels already in one vocabulary) joined: the
    ``per_image`` highest scores, ties in the order of ``parts``."""
    boxes = torch.cat([p["boxes"] for p in parts])
    scores = torch.cat([p["scores"] for p in parts])
    labels = torch.cat([p["labels"] for p in parts])
    order = torch.sort(scores, descending=True, stable=True).indices[:per_image]
    return {"boxes": boxes[order], "scores": scores[order], "labels": labels[order]}


def _shared_setting(name: str) -> property:
    """A setting both parts hold: read from the start model, written to both."""

    def write(self, value) -> None:
        for model in (self.start, self.tuned):
            setattr(model, name, value)

    return property(lambda self: getattr(self.start, name), write)


class RoutedDetector(nn.Module):
    """``start`` scores every name outside ``custom_names``, ``tuned`` the custom names (see the module
    docstring). Inference only, with the detector interface the commands use: ``model(images)``,
    :meth:`set_vocabulary`, :meth:`predict`, the thresholds, the inference form, the ensemble settings."""

    def __init__(self, start: GridCLIP, tuned: GridCLIP, custom_names: Sequence[str]):
        super().__init__()
        if not custom_names:
            raise ValueError("routed model: expected the fine-tuning data's class names, got none")
        self.start, self.tuned = start, tuned
        self.custom_names = tuple(custom_names)
        self._custom_keys = {name_key(n) for n in self.custom_names}
        # per part: (detector, index of its labels in the whole vocabulary); a part without names is absent
        self._routes: list[tuple[GridCLIP, Tensor]] = []
        self.class_names: tuple[str, ...] = ()
        self.start_extra: dict | None = None  # the start model file's training record (kept in the routed file)
        self.eval()

    # ----------------------------------------------------------------------------------------- vocabulary
    def is_custom(self, name: str) -> bool:
        return name_key(name) in self._custom_keys

    def set_vocabulary(self, vocabulary: Sequence[str] | Vocabulary | str, *, cache_dir=None) -> "RoutedDetector":
        """Names (any vocabulary spec) or a :class:`Vocabulary`; each part gets its names in their order.
        Embeddings alone (a tensor) cannot be routed: the route is decided by name."""
        if isinstance(vocabulary, Tensor):
            raise ValueError("routed model: a vocabulary of embeddings cannot be routed; give class names")
        names = list(vocabulary.names) if isinstance(vocabulary, Vocabulary) else parse_vocabulary(vocabulary)
        routes = []
        for model, custom in ((self.start, False), (self.tuned, True)):
            index = [i for i, n in enumerate(names) if self.is_custom(n) == custom]
            if not index:
                continue
            part: Any = [names[i] for i in index]
            if isinstance(vocabulary, Vocabulary):
                part = Vocabulary(tuple(part), vocabulary.embeddings[index], vocabulary.clip_identity)
            model.set_vocabulary(part, cache_dir=cache_dir)
            routes.append((model, torch.tensor(index, dtype=torch.int64)))
        self._routes = routes
        self.class_names = tuple(names)
        return self

    @property
    def vocabulary(self) -> Vocabulary | None:
        """The parts' vocabularies as one, rows in :attr:`class_names`' order (what a checkpoint records);
        None before a vocabulary is set."""
        if not self._routes or any(model.vocabulary is None for model, _ in self._routes):
            return None
        first = self._routes[0][0].vocabulary
        rows = torch.empty(len(self.class_names), first.dim, dtype=first.embeddings.dtype)
        for model, index in self._routes:
            rows[index] = model.vocabulary.embeddings.to(rows)
        return Vocabulary(self.class_names, rows, first.clip_identity)

    def single_part(self) -> GridCLIP | None:
        """The one detector the current vocabulary runs (only custom or only other names), else None: with
        such a vocabulary the routed model's detections are that detector's, exactly."""
        return self._routes[0][0] if len(self._routes) == 1 else None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def cfg(self):
        """The start model's config (both parts have the same architecture and input sizes)."""
        return self.start.cfg

    def set_text_encoder(self, clip_model, clip_pretrained: str | None = None) -> "RoutedDetector":
        for model in (self.start, self.tuned):
            model.set_text_encoder(clip_model, clip_pretrained)
        return self

    def set_clip_ensemble(self, **settings: Any) -> None:
        for model in (self.start, self.tuned):
            model.set_clip_ensemble(**settings)

    # -------------------------------------------------------------------------------------- thresholds
    # torchvision FCOS's attribute names (gridclip.model.predict.override_thresholds sets them): both parts
    # and the join share them
    score_thresh = _shared_setting("score_thresh")
    nms_thresh = _shared_setting("nms_thresh")
    detections_per_img = _shared_setting("detections_per_img")

    # ------------------------------------------------------------------------------------------ running
    def forward(self, images: list[Tensor], targets: Any = None) -> list[dict[str, Tensor]]:
        if self.training or targets is not None:
            raise ValueError("routed model: inference only; to fine-tune it further, give its file as "
                             "train.init_from (docs/training.md)")
        if not self._routes:
            raise ValueError("no vocabulary set: call model.set_vocabulary(names) first")
        outputs = []
        for model, index in self._routes:
            detections = model(images)
            outputs.append([{**d, "labels": index.to(d["labels"].device)[d["labels"]]} for d in detections])
        return [join_detections(parts, self.detections_per_img) for parts in zip(*outputs)]

    def predict(self, inputs: Any, **kwargs) -> Any:
        """As :meth:`gridclip.model.gridclip.GridCLIP.predict`."""
        return predict_as_given(self, inputs, **kwargs)

    def train(self, mode: bool = True) -> "RoutedDetector":
        if mode:
            for model in (self.start, self.tuned):
                model.restore_training_form()
        return super().train(mode)

    def optimize_for_inference(self, *, channels_last: bool = True) -> "RoutedDetector":
        for model in (self.start, self.tuned):
            model.optimize_for_inference(channels_last=channels_last)
        return self.eval()

    def restore_training_form(self) -> "RoutedDetector":
        for model in (self.start, self.tuned):
            model.restore_training_form()
        return self

    @property
    def inference_optimized(self) -> bool:
        return self.start.inference_optimized and self.tuned.inference_optimized

    def inference_parameter_count(self) -> int:
        """Both parts' (the two detectors run for a vocabulary that mixes custom and other names)."""
        return self.start.inference_parameter_count() + self.tuned.inference_parameter_count()
