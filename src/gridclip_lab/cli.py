"""``gridclip-lab <command> ...``: the lab's commands (the embedded world, demo, studies, analyses,
benchmarks, the peers), dispatched as ``gridclip <command>`` is."""
from __future__ import annotations

import sys

from gridclip.cli import dispatch

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "demo": ("gridclip_lab.commands.demo", "the embedded open-vocabulary world, end to end"),
    "make-world": ("gridclip_lab.commands.make_world", "generate the embedded shape world (LVIS-format JSON + PNGs)"),
    "export-world": ("gridclip_lab.commands.export_world",
                     "some of the world's images as a COCO, YOLO or VOC dataset (to try data.format=...)"),
    "pretrain-clip": ("gridclip_lab.commands.pretrain_clip", "pretrain the tiny CLIP and ViT teacher on world captions"),
    "pretrain-trunk": ("gridclip_lab.commands.pretrain_trunk",
                       "visual-only pretraining of the tiny CLIP's trunk: supervised or SwAV (paper Table 4)"),
    "study": ("gridclip_lab.commands.study", "ablation study: variants x seeds x schedule lengths, with CIs"),
    "finetune-study": ("gridclip_lab.commands.finetune_study",
                       "fine-tuning without forgetting: custom categories, with / without image alignment"),
    "select-ensemble": ("gridclip_lab.commands.select_ensemble",
                        "choose the frozen-CLIP ensemble's settings on a held-out world's val split"),
    "analyze": ("gridclip_lab.commands.analyze", "AP-vs-frequency and CLIP recall@k analyses"),
    "precompute-regions": ("gridclip_lab.commands.precompute_regions", "ViLD-image: CLIP embeddings of proposal crops"),
    "bench": ("gridclip_lab.commands.bench", "speed and memory benchmarks"),
    "bench-deploy": ("gridclip_lab.commands.bench_deploy", "onnxruntime (fp32, INT8) vs PyTorch: speed and world AP"),
    "bench-stages": ("gridclip_lab.commands.bench_stages",
                     "per-stage CPU times, GridCLIP vs FCOS-R50 under the same rewrites"),
    "bench-train": ("gridclip_lab.commands.bench_train",
                    "training images/s of the study's variants (frozen trunk, GridCLIP, ...) vs FCOS w/o align"),
    "bench-infer": ("gridclip_lab.commands.bench_infer",
                    "inference time of the study's variants (frozen-CLIP ensemble) vs GridCLIP at 800x1333"),
    "bench-load-predict": ("gridclip_lab.commands.bench_load_predict",
                           "gridclip.load().predict vs the model gridclip detect runs"),
    "bench-peers": ("gridclip_lab.commands.bench_peers", "GridCLIP vs ViLD and CLIP-on-crops on the world (paper Tables 1-2)"),
    "gpu-check": ("gridclip_lab.commands.gpu_check", "AMP training, fp16 FPS and a NCCL DDP step on this machine's GPU(s)"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("gridclip-lab", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
