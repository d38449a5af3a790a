"""Bit-identity check of detections before/after the model-core redesign (issue 14 points 3-5, 16.3).

    PYTHONPATH=<old>/src python bitcheck.py save  /tmp/ref.pt   # with the code at 6f6fb83 (e.g. /work/ref)
    PYTHONPATH=<new>/src python bitcheck.py check /tmp/ref.pt   # with this branch: torch.equal everywhere
    PYTHONPATH=<new>/src python bitcheck.py init  /tmp/ref.pt   # same random initialisation as before

Tiny random detectors (the tests' tiny CLIP), several variants, weights saved with the reference and
loaded into the new build, so only the code is compared. Paths: the plain model (eval), the optimised one
(optimize_for_inference), and predict() on uint8 arrays; single images and padded batches; one training
step (losses and gradients).
"""
import copy
import dataclasses
import json
import sys
import tempfile

import numpy as np
import torch

TINY_CLIP = {
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def build(variant):
    import open_clip
    from torchvision.ops.misc import FrozenBatchNorm2d

    from gridclip import GridCLIP
    from gridclip.config import GridCLIPConfig

    d = tempfile.mkdtemp()
    with open(f"{d}/bitcheck-tiny-rn.json", "w") as f:
        json.dump(TINY_CLIP, f)
    open_clip.add_model_config(d)
    cfg = GridCLIPConfig(clip_model="bitcheck-tiny-rn", clip_pretrained=None, teacher_model="bitcheck-tiny-rn",
                         teacher_pretrained=None, adapter_channels=32, fpn_channels=32, head_convs=2,
                         projector_hidden=64, min_size=128, max_size=192, detections_per_img=100, score_thresh=0.02)
    cfg = dataclasses.replace(cfg, **variant)
    torch.manual_seed(0)
    model = GridCLIP(cfg, load_clip_weights=False).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.regression_head.bbox_reg.weight, std=0.05, generator=g)
        torch.nn.init.constant_(model.head.regression_head.bbox_reg.bias, 1.0)
        for m in model.backbone.trunk.modules():
            if isinstance(m, FrozenBatchNorm2d):
                n = m.weight.numel()
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    if cfg.grid_align:
        model.set_vocabulary(torch.randn(50, model.clip_dim, generator=g))
    return model


VARIANTS = {"k1": {}, "k3": {"embed_kernel_size": 3}, "closed": {"grid_align": False, "num_classes": 3},
            "nomhsa": {"use_mhsa": False}}
SIZES = [(128, 160), (112, 128), (90, 130), (64, 64), (200, 120)]


def images():
    rs = np.random.RandomState(0)
    return [rs.randint(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def run(model):
    from gridclip.engine.predict import predict

    arrays = images()
    tensors = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]
    out = {}
    with torch.no_grad():
        out["alone"] = [model([t])[0] for t in tensors]
        out["batch"] = model(tensors)
    out["predict"] = predict(model, arrays, batch_size=2)
    return {k: [{n: d[n] for n in ("boxes", "scores", "labels")} for d in v] for k, v in out.items()}


def train_step(model):
    """Losses and gradients of one training step on a padded batch of two images (the training path)."""
    g = torch.Generator().manual_seed(2)
    model.train()
    images = [torch.rand(3, 128, 160, generator=g), torch.rand(3, 112, 128, generator=g)]
    k = model.num_classes
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 90.0]]),
                "labels": torch.tensor([0, k - 1])},
               {"boxes": torch.tensor([[30.0, 30.0, 100.0, 100.0]]), "labels": torch.tensor([1])}]
    if model.projector is not None:
        for t in targets:
            t["teacher_embedding"] = torch.randn(model.projector[-1].out_features, generator=g)
    losses = model(images, targets)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.eval()
    return {"losses": {k: v.detach() for k, v in losses.items()}, "grads": grads}


def main(mode, path):
    if mode == "save":
        ref = {}
        for name, variant in VARIANTS.items():
            model = build(variant)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            ref[name] = {"state": state, "plain": run(model), "fast": run(copy.deepcopy(model).optimize_for_inference()),
                         "train": train_step(copy.deepcopy(model))}
        torch.save(ref, path)
        print("saved", path)
        return 0
    ref = torch.load(path, weights_only=False)
    bad = 0
    for name, variant in VARIANTS.items():
        model = build(variant)
        model.load_state_dict(ref[name]["state"])
        got = {"plain": run(model), "fast": run(copy.deepcopy(model).optimize_for_inference())}
        if "train" in ref[name]:
            step = train_step(copy.deepcopy(model))
            r = ref[name]["train"]
            same = (step["losses"].keys() == r["losses"].keys() and step["grads"].keys() == r["grads"].keys()
                    and all(torch.equal(step["losses"][k], v) for k, v in r["losses"].items())
                    and all(torch.equal(step["grads"][k], v) for k, v in r["grads"].items()))
            bad += not same
            print(f"{name:7s} train step: losses and {len(r['grads'])} gradients {'equal' if same else 'DIFFERENT'}")
        for path_name in ("plain", "fast"):
            for kind, dets in got[path_name].items():
                for i, (a, b) in enumerate(zip(dets, ref[name][path_name][kind])):
                    same = all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
                    bad += not same
                    print(f"{name:7s} {path_name:5s} {kind:7s} image {i}: {'equal' if same else 'DIFFERENT'} ({len(b['scores'])} dets)")
    print("ALL BIT-IDENTICAL" if bad == 0 else f"{bad} DIFFERENCES")
    return 1 if bad else 0



def same_init(path):
    """The random initialisation (seed 0) is unchanged too: same RNG draws in the same order."""
    ref = torch.load(path, weights_only=False)
    for name, variant in VARIANTS.items():
        state = build(variant).state_dict()
        same = all(torch.equal(state[k], v) for k, v in ref[name]["state"].items()) and set(state) == set(ref[name]["state"])
        print(f"{name}: initialisation {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    if sys.argv[1] == "init":
        same_init(sys.argv[2])
    else:
        sys.exit(main(sys.argv[1], sys.argv[2]))
