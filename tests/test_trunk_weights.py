"""Trunks from other pretrainings (paper Table 4's top section): ``gridclip-lab pretrain-trunk`` on the mini
world, and ``model.trunk_weights`` (loaded bit-exactly, recorded in the checkpoint, surviving save/load)."""
from __future__ import annotations

import json

import pytest
import torch

from gridclip.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from gridclip.config import GridCLIPConfig, load_config
from gridclip.model import GridCLIP
from gridclip.model.backbone import CLIPResNetTrunk
from gridclip.model.summary import summarize
from gridclip.model.trunk_weights import file_sha256, read_trunk_weights, resolve_trunk_file, save_trunk_weights, trunk_state
from gridclip_lab.cli import main as lab_main
from gridclip_lab.variants import VARIANTS
from gridclip_lab.world.trunk_pretrain import build_trunk
from helpers import TINY_CLIP


def _other_trunk_file(path, dtype=torch.float32):
    """A trunk of the tiny test CLIP's architecture with other weights than any CLIP the tests build."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        trunk = CLIPResNetTrunk.from_config(TINY_CLIP["embed_dim"], TINY_CLIP["vision_cfg"])
    for name, buf in trunk.named_buffers():  # BN statistics as a pretraining leaves them, not 0 / 1
        if buf.is_floating_point():
            buf.uniform_(0.5, 1.5)
    trunk.take_attnpool()
    save_trunk_weights(path, trunk_state(trunk), "test-tiny-rn", meta={"method": "test"}, dtype=dtype)
    return path


def _cfg(tiny_clip_names, **overrides) -> GridCLIPConfig:
    rn, vit = tiny_clip_names
    return GridCLIPConfig(clip_model=rn, clip_pretrained=None, teacher_model=vit, teacher_pretrained=None,
                          adapter_channels=32, fpn_channels=32, head_convs=2, projector_hidden=64, min_size=128,
                          max_size=192, use_mhsa=False, grid_align=False, image_align=False, num_classes=5, **overrides)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_trunk_weights_load_bit_exactly_and_only_the_trunk(tiny_clip_names, tmp_path, dtype):
    path = _other_trunk_file(tmp_path / "other.pt", dtype)
    data, source = read_trunk_weights(path)
    torch.manual_seed(0)
    own = GridCLIP(_cfg(tiny_clip_names))
    torch.manual_seed(0)
    model = GridCLIP(_cfg(tiny_clip_names, trunk_weights=str(path)))
    trunk = model.backbone.trunk.state_dict()
    tensors = {k: v for k, v in data["state_dict"].items() if not k.endswith("num_batches_tracked")}  # frozen BN
    assert set(trunk) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(trunk[k], v.to(trunk[k].dtype)), k  # the file's values exactly
    differs = [k for k, v in own.backbone.trunk.state_dict().items() if v.is_floating_point() and not torch.equal(v, trunk[k])]
    assert len(differs) > len(trunk) // 2  # not the CLIP's trunk
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.trunk.")}
    own_rest = own.state_dict()
    assert all(torch.equal(v, own_rest[k]) for k, v in rest.items())  # everything else as without the option
    assert model.trunk_source == source and own.trunk_source is None
    assert source.sha256 == file_sha256(path) and source.name == "other.pt" and source.meta == {"method": "test"}


def test_trunk_source_survives_save_and_load(tiny_clip_names, tmp_path):
    path = _other_trunk_file(tmp_path / "machine" / "dir" / "other.pt")
    torch.manual_seed(0)
    model = GridCLIP(_cfg(tiny_clip_names, trunk_weights=str(path)))
    save_checkpoint(tmp_path / "model.pt", model)
    raw = read_checkpoint(tmp_path / "model.pt")
    assert raw["config"]["trunk_weights"] == "local:other.pt"  # no machine path
    assert str(tmp_path) not in json.dumps({k: raw[k] for k in ("config", "trunk_source", "extra")}, default=str)
    assert raw["trunk_source"]["sha256"] == file_sha256(path)
    file_sha256_before = file_sha256(path)
    path.unlink()  # loading never needs the file: the tensors are in the checkpoint
    loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.trunk_source == model.trunk_source
    assert f"trunk weights: other.pt (test; sha256 {file_sha256_before[:16]})" in "\n".join(summarize(loaded))
    state = loaded.backbone.trunk.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.backbone.trunk.state_dict().items())
    save_checkpoint(tmp_path / "again.pt", loaded)  # and a second save keeps the record
    assert read_checkpoint(tmp_path / "again.pt")["trunk_source"] == raw["trunk_source"]
    torch.manual_seed(0)
    plain = GridCLIP(_cfg(tiny_clip_names))
    save_checkpoint(tmp_path / "plain.pt", plain)
    assert read_checkpoint(tmp_path / "plain.pt")["trunk_source"] is None
    assert load_checkpoint(tmp_path / "plain.pt").trunk_source is None
    assert "trunk weights" not in "\n".join(summarize(plain))


def test_trunk_weights_bad_files_are_one_line_errors(tiny_clip_names, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        GridCLIP(_cfg(tiny_clip_names, trunk_weights=str(tmp_path / "junk.pt")))
    torch.save({"format": "something-else"}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="gridclip-trunk"):
        GridCLIP(_cfg(tiny_clip_names, trunk_weights=str(tmp_path / "foreign.pt")))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        GridCLIP(_cfg(tiny_clip_names, trunk_weights=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="unknown built-in trunk"):
        GridCLIP(_cfg(tiny_clip_names, trunk_weights="gridclip:no-such-trunk"))
    trunk, _, _ = build_trunk()  # the world's trunk (width 16, other embed dim): C5 fits, not everything
    save_trunk_weights(tmp_path / "world.pt", {k: v for k, v in trunk_state(trunk).items() if not k.startswith("layer4")},
                       "shapes-RN-tiny")
    with pytest.raises(ValueError, match="do not fit this trunk"):
        GridCLIP(_cfg(tiny_clip_names, trunk_weights=str(tmp_path / "world.pt")))


def test_trunk_weights_is_a_model_option():
    assert GridCLIPConfig().trunk_weights is None  # the CLIP's own trunk
    assert load_config("shapes_demo", ["model.trunk_weights=gridclip:shapes-RN-tiny-swav"]).model.trunk_weights == \
        "gridclip:shapes-RN-tiny-swav"


@pytest.mark.parametrize("method", ["supervised", "swav"])
def test_pretrain_trunk_runs_end_to_end_on_the_mini_world(shapes_world, tmp_path, method, one_thread):
    files = []
    for run in ("a", "b"):
        out = tmp_path / run / f"{method}.pt"
        assert lab_main(["pretrain-trunk", "--method", method, "--world", str(shapes_world.root), "--out", str(out),
                         "--steps", "3", "--batch-size", "16", "--seed", "0"]) == 0
        files.append(out)
    record = json.loads(files[0].with_suffix(".json").read_text())
    assert record["method"] == method and record["steps_run"] == 3
    assert record["trunk_image_passes"] == 3 * 16 * (2 if method == "swav" else 1)
    assert record["sha256"] == file_sha256(files[0]) == file_sha256(files[1])  # bit-reproducible, file and all
    data, source = read_trunk_weights(files[0])
    assert source.meta["method"] == method and data["clip_model"] == "shapes-RN-tiny"
    torch.manual_seed(0)
    init, _, _ = build_trunk()  # the same initial draws: training moved the weights
    moved = [k for k, v in trunk_state(init).items() if v.is_floating_point()
             and not torch.equal(v.half(), data["state_dict"][k])]
    assert len(moved) > len(data["state_dict"]) // 2
    trunk, _, _ = build_trunk()  # and the file fits the world CLIP's trunk
    trunk.load_state_dict(data["state_dict"])


def test_pretrain_trunk_refuses_bad_arguments(shapes_world, tmp_path):
    assert lab_main(["pretrain-trunk", "--method", "supervised", "--world", str(shapes_world.root), "--out",
                     str(tmp_path / "x.bin"), "--steps", "1"]) == 2
    assert lab_main(["pretrain-trunk", "--method", "supervised", "--world", str(tmp_path / "nowhere"), "--out",
                     str(tmp_path / "x.pt"), "--steps", "1"]) == 2


def test_table4_trunk_variants_name_shipped_trunks():
    for name in ("FCOS w/o align, supervised trunk", "FCOS w/o align, SwAV trunk"):
        settings = VARIANTS[name]
        assert settings["trunk_weights"].startswith("gridclip:")
        assert not settings["grid_align"] and not settings["image_align"] and not settings["use_mhsa"]


def test_shipped_trunks_match_their_records_and_the_assets_readme():
    """Each trunk variant's file is shipped; its sha256 is its record's and the assets README's."""
    for name in ("FCOS w/o align, supervised trunk", "FCOS w/o align, SwAV trunk"):
        path = resolve_trunk_file(VARIANTS[name]["trunk_weights"])
        record = json.loads(path.with_suffix(".json").read_text())
        digest = file_sha256(path)
        assert record["sha256"] == digest, path.name
        assert record["trunk_image_passes"] == 2400 * 128  # the tiny CLIP's budget
        data, source = read_trunk_weights(path)
        assert source.meta["method"] == record["method"] and data["clip_model"] == "shapes-RN-tiny"
        readme = (path.parent.parent / "README.md").read_text()
        assert f"`trunks/{path.name}`" in readme and f"`{digest}`" in readme, path.name
