"""``make gpu-check``: does the GPU path work, and how fast is it?

On one CUDA card, in a few minutes (GridCLIP RN50, random weights, K = 1203, 800x1333):

* training steps (forward, backward, SGD update; both alignments) in fp32, bf16 and fp16 autocast, as
  ``engine/train.py`` runs them (``torch.autocast``; a ``GradScaler`` for fp16 only): every loss finite,
  how many timed steps updated the weights (fp16's scaler skips a step whose gradients overflow, leaving
  the loss unchanged: finite losses alone do not show that fp16 trains), whether the loss fell, and the
  median step time of each AMP mode against fp32's. fp16's warm-up runs until the scaler has taken a
  step (its scale starts at 2**16 and halves at each overflow), at most ``MAX_FP16_WARMUP`` steps;
* inference throughput (``optimize_for_inference``, fp16 autocast) at batch 1 and 8, in images/s;
* one DDP training step over NCCL on every visible GPU of the node (``torch.multiprocessing.spawn``,
  one process per GPU; 1 GPU is a valid, if trivial, group): losses finite and gradients equal across
  ranks after the all-reduce.

:func:`render` turns the result into the ``gpu-check`` section of docs/benchmarks.md, with the card's
name; :func:`run_gpu_check` refuses to run without CUDA (:func:`require_cuda`); the parts take a device, so
the tests run their logic on the CPU (gloo for the DDP step).
"""
from __future__ import annotations

import json
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from gridclip_lab.bench.cases import ModelSpec, build_gridclip, random_boxes, random_image, set_input_size
from gridclip_lab.bench.measure import autocast, median

__all__ = ["NoCudaError", "require_cuda", "run_gpu_check", "render", "FPS_GOAL"]

MAX_FP16_WARMUP = 24  # 2**16 halved 22 times is below 1: a model that still overflows does not train in fp16
FPS_GOAL = 40.0  # >= 40 FPS fp16 at batch 1 on an H100 / H200 (paper: 19.5 on an A100)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NoCudaError(RuntimeError):
    """No CUDA device: the GPU check has nothing to check."""


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise NoCudaError(f"no CUDA GPU on this machine (torch {torch.__version__}, torch.cuda.is_available() is "
                          "False): the GPU check needs one; nothing was run")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(call: Callable[[], Any], warmup: int, repeats: int, device: str) -> tuple[list[float], Any]:
    out = None
    for _ in range(warmup):
        out = call()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return samples, out


def _train_inputs(spec: ModelSpec, batch: int, height: int, width: int, num_classes: int, device: str, seed: int):
    g = torch.Generator().manual_seed(seed + 3)
    images = [random_image(height, width, seed + i).to(device) for i in range(batch)]
    targets = [{"boxes": random_boxes(3, height, width, seed + 10 + i).to(device),
                "labels": torch.randint(0, num_classes, (3,), generator=g).to(device),
                "teacher_embedding": F.normalize(torch.randn(spec.teacher_dim, generator=g), dim=0).to(device)}
               for i in range(batch)]
    return images, targets


def _train_step(model, images, targets, amp: str, device: str):
    """One step as the trainer takes it: autocast forward, a GradScaler (enabled for fp16) around backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=amp == "fp16")

    def step() -> tuple[float, bool]:
        """The step's loss, and whether it updated the weights (False: the scaler skipped it)."""
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = sum(model(images, targets).values())
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return float(loss.detach()), scale is None or scaler.get_scale() >= scale

    return step


def training(spec: ModelSpec, batch: int, height: int, width: int, num_classes: int, steps: int,
             device: str = "cuda", seed: int = 0) -> dict[str, Any]:
    out = {}
    for amp in ("none", *AMP_DTYPES):
        model = build_gridclip(spec, num_classes, seed, optimize=False)
        set_input_size(model, height, width)
        model.train().to(device)
        images, targets = _train_inputs(spec, batch, height, width, num_classes, device, seed)
        step = _train_step(model, images, targets, amp, device)
        warmup, taken = 0, False
        while warmup < 2 or (amp == "fp16" and not taken and warmup < MAX_FP16_WARMUP):
            _, taken = step()
            warmup += 1
            _sync(device)
        records = []
        samples, _ = _timed(lambda run=step: records.append(run()), warmup=0, repeats=steps, device=device)
        losses = [loss for loss, _ in records]
        out["fp32" if amp == "none" else amp] = {
            "step_s": samples, "median_step_s": median(samples), "losses": losses,
            "finite": all(map(_finite, losses)), "warmup_steps": warmup,
            "steps_taken": sum(t for _, t in records), "loss_fell": len(losses) > 1 and losses[-1] < losses[0]}
        del model, step
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def inference_fps(spec: ModelSpec, height: int, width: int, num_classes: int, batches: tuple[int, ...],
                  calls: int, device: str = "cuda", seed: int = 0) -> dict[str, Any]:
    model = build_gridclip(spec, num_classes, seed).to(device).eval()  # the inference form, as detect runs it
    set_input_size(model, height, width)
    out = {}
    for batch in batches:
        images = [random_image(height, width, seed + i).to(device) for i in range(batch)]

        def call():
            with torch.no_grad(), autocast(device, "fp16"):
                return model(images)

        samples, dets = _timed(call, warmup=3, repeats=calls, device=device)
        out[str(batch)] = {"call_s": samples, "fps": batch / median(samples),
                           "boxes": [int(d["boxes"].shape[0]) for d in dets],
                           "finite": all(bool(torch.isfinite(d["scores"]).all()) for d in dets)}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, spec: ModelSpec, size: tuple[int, int], num_classes: int,
                out_dir: str, backend: str) -> None:
    """One rank of the DDP step (``backend`` nccl: one GPU per rank; gloo: CPU, for the tests)."""
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = build_gridclip(spec, num_classes, seed=0, optimize=False)
        set_input_size(model, *size)
        model.train().to(device)
        # as engine/train.py wraps it (broadcast_buffers off: frozen BN statistics and the vocabulary never change)
        ddp = DistributedDataParallel(model, device_ids=[rank] if backend == "nccl" else None, broadcast_buffers=False)
        images, targets = _train_inputs(spec, 2, *size, num_classes, device, seed=100 + rank)  # a shard per rank
        optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        times, losses = [], []
        for _ in range(3):  # first step: warm-up (communicators, cuDNN)
            _sync(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = sum(ddp(images, targets).values())
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in ddp.parameters() if p.grad is not None])
            optimizer.step()
            _sync(device)
            times.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))
        # after the all-reduce every rank holds the same gradient: compare a checksum across ranks
        checksum = torch.stack([grads.double().sum(), grads.double().abs().sum()])
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        same = all(torch.allclose(g, gathered[0], rtol=1e-6, atol=0) for g in gathered)
        if rank == 0:
            Path(out_dir, "ddp.json").write_text(json.dumps({
                "world_size": world, "step_s": times[1:], "losses": losses, "finite": all(map(_finite, losses)),
                "same_gradients": bool(same), "backend": dist.get_backend()}))
    finally:
        dist.destroy_process_group()


def ddp_step(spec: ModelSpec, size: tuple[int, int], num_classes: int, gpus: int | None = None,
             backend: str = "nccl") -> dict[str, Any]:
    """One DDP training step (after a warm-up step) in ``gpus`` processes (default: every visible GPU)."""
    world = gpus or torch.cuda.device_count()
    with tempfile.TemporaryDirectory(prefix="gridclip-gpu-check.") as tmp:
        mp.spawn(_ddp_worker, args=(world, _free_port(), spec, size, num_classes, tmp, backend), nprocs=world,
                 join=True)
        return json.loads(Path(tmp, "ddp.json").read_text())


def run_gpu_check(clip_model: str = "RN50-quickgelu", size: tuple[int, int] = (800, 1333), num_classes: int = 1203,
                  train_batch: int = 2, train_steps: int = 5, fps_calls: int = 20, gpus: int | None = None) -> dict[str, Any]:
    """Everything of the module docstring on ``cuda:0`` (DDP: on ``gpus`` GPUs, default all); a dict for :func:`render`."""
    require_cuda()
    torch.backends.cudnn.benchmark = True
    spec = ModelSpec(clip_model=clip_model)
    start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0), "memory_gib": round(props.total_memory / 2 ** 30, 1),
        "gpus": torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": clip_model,
        "size": list(size), "K": num_classes, "train_batch": train_batch,
    }
    result["training"] = training(spec, train_batch, *size, num_classes, train_steps)
    result["inference"] = inference_fps(spec, *size, num_classes, (1, 8), fps_calls)
    result["ddp"] = ddp_step(spec, size, num_classes, gpus)
    result["wall_s"] = time.perf_counter() - start
    return result


def render(result: dict[str, Any]) -> str:
    """The ``gpu-check`` section of docs/benchmarks.md from :func:`run_gpu_check`'s result."""
    h, w = result["size"]
    train = result["training"]
    fp32 = train["fp32"]["median_step_s"]
    lines = ["## GPU check", "",
             f"Generated by `make gpu-check` ({result['date']}) on **{result['device']}** ({result['memory_gib']} GiB; "
             f"{result['gpus']} GPU(s) visible), torch {result['torch']}, CUDA {result['cuda']}; {result['model']} "
             f"GridCLIP, random weights, K = {result['K']}, {h}x{w}; whole check {result['wall_s']:.0f} s.", "",
             f"Training step (batch {result['train_batch']}, both alignments, SGD), medians of the timed steps after "
             "the warm-up steps (fp16: until its GradScaler took a step); `weights updated`: timed steps the "
             "scaler did not skip; `loss fell`: last timed loss below the first:", "",
             "| precision | warm-up steps | median step s | vs fp32 | losses finite | weights updated | loss fell | "
             "faster than fp32 |", "|---|---|---|---|---|---|---|---|"]
    for name, t in train.items():
        ratio = t["median_step_s"] / fp32
        faster = "-" if name == "fp32" else ("yes" if ratio < 1 else "no")
        taken = f"{t['steps_taken']} of {len(t['step_s'])}" if "steps_taken" in t else "not recorded"
        fell = ("yes" if t["loss_fell"] else "no") if "loss_fell" in t else "not recorded"
        lines.append(f"| {name} | {t.get('warmup_steps', 2)} | {t['median_step_s']:.4f} | {ratio:.2f}x | "
                     f"{'yes' if t['finite'] else 'no'} | {taken} | {fell} | {faster} |")
    lines += ["", "Inference (`optimize_for_inference`, fp16 autocast, full pipeline incl. post-processing):", "",
              "| batch | median call s | images/s | scores finite |", "|---|---|---|---|"]
    for batch, t in result["inference"].items():
        lines.append(f"| {batch} | {median(t['call_s']):.4f} | {t['fps']:.1f} | {'yes' if t['finite'] else 'no'} |")
    fps1 = result["inference"]["1"]["fps"]
    ddp = result["ddp"]
    lines += ["", f"DDP ({ddp['backend']}, {ddp['world_size']} process(es), one per GPU, batch 2 each): median step "
              f"{median(ddp['step_s']):.4f} s; losses finite: {'yes' if ddp['finite'] else 'no'}; gradients equal "
              f"across ranks after the all-reduce: {'yes' if ddp['same_gradients'] else 'no'}.", "",
              f"Goal (H100 / H200): >= {FPS_GOAL:.0f} FPS fp16 at batch 1: {fps1:.1f} FPS, "
              f"{'holds' if fps1 >= FPS_GOAL else 'does not hold'}"
              + ("" if any(k in result["device"] for k in ("H100", "H200")) else " (not an H100 / H200: for reference)")
              + "."]
    return "\n".join(lines) + "\n"
