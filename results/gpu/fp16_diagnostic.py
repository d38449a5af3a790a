"""fp16 GradScaler diagnostic: where do fp16 gradients overflow in a GridCLIP training step?"""
import json, os, sys, time
import torch
from gridclip_lab.bench.cases import ModelSpec, build_gridclip, set_input_size
from gridclip_lab.bench.gpu_check import _train_inputs, training
from gridclip_lab.bench.measure import autocast
from gridclip.model.head import CLIPClassificationHead

dev = "cuda" if torch.cuda.is_available() else "cpu"
name = sys.argv[1] if len(sys.argv) > 1 else "RN50-quickgelu"
H, W, K = (800, 1333, 1203) if dev == "cuda" else (64, 96, 5)
spec = ModelSpec(clip_model=name, teacher_dim=512 if dev == "cuda" else 64)
out = {}

def probe(amp, scale):
    model = build_gridclip(spec, K, 0, optimize=False); set_input_size(model, H, W); model.train().to(dev)
    images, targets = _train_inputs(spec, 2, H, W, K, dev, 0)
    rec = []
    def hook(n):
        def f(m, i, o):
            outs = o if isinstance(o, (list, tuple)) else [o]
            for j, t in enumerate(outs):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda g, n=n, j=j: rec.append((n, j, str(g.dtype)[6:], float(g.float().abs().max()),
                                                                     bool(torch.isfinite(g).all()))))
        return f
    hs = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    with autocast(dev, amp):
        losses = model(images, targets)
    lv = {k: float(v) for k, v in losses.items()}
    for k, v in losses.items():  # each loss's own gradient on the 0-dim parameters
        pass
    (sum(losses.values()) * scale).backward()
    for h in hs: h.remove()
    first_bad = next((r for r in rec if not r[4]), None)
    top = sorted(rec, key=lambda r: -r[3] if r[4] else -1e30)[:12]
    params = sorted(((float(p.grad.abs().max()), n, bool(torch.isfinite(p.grad).all())) for n, p in model.named_parameters()
                     if p.grad is not None), key=lambda t: -t[0] if t[2] else -1e30)
    nonfinite = [n for _, n, ok in params if not ok]
    return {"losses": lv, "first_nonfinite_output_grad": first_bad, "top_output_grads": top,
            "top_param_grads": params[:10], "nonfinite_params": nonfinite[:20], "n_nonfinite_params": len(nonfinite)}

import torch.nn.functional as F
from gridclip.model.gridclip import GridCLIP
orig_logits, orig_image = CLIPClassificationHead.logits, GridCLIP.image_alignment_loss
def logits32(self, embeddings, text=None):
    text = self.text_embeddings if text is None else text
    return torch.matmul(embeddings, text.t().to(embeddings.dtype)).float() * self.logit_scale.exp() + self.logit_bias
def image32(self, z_global, targets):
    with torch.autocast(z_global.device.type, enabled=False):
        return orig_image(self, z_global, targets)
orig_loss = GridCLIP.compute_loss
def loss32(self, targets, head_outputs, anchors, num_per_level):
    with torch.autocast(anchors[0].device.type, enabled=False):
        return orig_loss(self, targets, {k: v.float() for k, v in head_outputs.items()}, anchors, num_per_level)
def setp(logits=False, image=False, loss=False):
    CLIPClassificationHead.logits = logits32 if logits else orig_logits
    GridCLIP.image_alignment_loss = image32 if image else orig_image
    GridCLIP.compute_loss = loss32 if loss else orig_loss

t = time.time()
out["fp32_scale1"] = probe("none", 1.0)
out["fp16_scale1"] = probe("fp16", 1.0)
out["fp16_scale2"] = probe("fp16", 2.0)
print("probes", time.time() - t, flush=True)
for label, kw in (("baseline", {}), ("image32", {"image": True}), ("logits32", {"logits": True}),
                  ("loss32", {"loss": True}), ("all32", {"image": True, "logits": True, "loss": True})):
    setp(**kw)
    out["probe_" + label] = probe("fp16", 1024.0)
    out["training_" + label] = training(spec, 2, H, W, K, steps=5, device=dev)["fp16"]
    print(label, time.time() - t, flush=True)
setp()
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "diag.json"), "w"), indent=1)
for k, v in out.items():
    if k.startswith("training"):
        print(k, {kk: v[kk] for kk in ("warmup_steps", "steps_taken", "loss_fell", "losses")})
    else:
        print(k, {a: round(b, 3) for a, b in v["losses"].items()}, "first bad:", v["first_nonfinite_output_grad"],
              "n bad params:", v["n_nonfinite_params"], v["nonfinite_params"][:4])
        print("   top out grads:", [(r[0], r[1], r[2], round(r[3], 2)) for r in v["top_output_grads"][:5]])
        print("   top param grads:", [(n, round(a, 2)) for a, n, _ in v["top_param_grads"][:4]])
