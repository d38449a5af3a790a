"""CLIP loading from every source, ViLD prompts, and the on-disk vocabulary cache."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from gridclip.clip import VILD_TEMPLATES, Vocabulary, clean_name, clip_identity, get_tokenizer, load_clip
from gridclip.clip import vocabulary as vocab_mod


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_init_is_seeded_and_leaves_global_rng(tiny_clip_names):
    state = torch.random.get_rng_state()
    a = load_clip(tiny_clip_names[0], None, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    assert _same_weights(a, load_clip(tiny_clip_names[0], None, seed=3))
    assert not _same_weights(a, load_clip(tiny_clip_names[0], None, seed=4))


def test_checkpoint_file_and_local_dir_sources(tiny_clip_names, tmp_path):
    name = tiny_clip_names[0]
    ref = load_clip(name, None, seed=5)
    # open_clip-format checkpoint file
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "ckpt.pt")
    assert _same_weights(ref, load_clip(name, str(tmp_path / "ckpt.pt")))
    # OpenAI-style plain state dict (no wrapper)
    torch.save(ref.state_dict(), tmp_path / "plain.pt")
    assert _same_weights(ref, load_clip(name, str(tmp_path / "plain.pt")))
    # open_clip local model directory
    d = tmp_path / "local"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(name), "preprocess_cfg": {}}))
    torch.save(ref.state_dict(), d / "open_clip_pytorch_model.bin")
    assert _same_weights(ref, load_clip(str(d)))
    assert _same_weights(ref, load_clip(f"local-dir:{d}"))


def test_loader_errors_are_clear(tiny_clip_names, tmp_path):
    with pytest.raises(ValueError, match="unknown CLIP model 'RN51'"):
        load_clip("RN51", None)
    with pytest.raises(ValueError, match="unknown pretrained tag 'nope'.*openai"):
        load_clip("RN50-quickgelu", "nope")
    with pytest.raises(FileNotFoundError, match="CLIP checkpoint not found"):
        load_clip(tiny_clip_names[0], str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_clip(f"local-dir:{tmp_path}")


def test_identity_changes_with_weights(tiny_clip_names, tmp_path):
    p = tmp_path / "w.pt"
    torch.save(load_clip(tiny_clip_names[0], None, seed=1).state_dict(), p)
    first = clip_identity(tiny_clip_names[0], str(p))
    torch.save(load_clip(tiny_clip_names[0], None, seed=2).state_dict(), p)
    assert clip_identity(tiny_clip_names[0], str(p)) != first
    assert clip_identity("RN50-quickgelu", "openai") == "RN50-quickgelu:openai"


def test_clean_names():
    assert clean_name("bow_(weapon)") == "bow (weapon)"
    assert clean_name("tv_set") == "tv set"
    assert clean_name("  red   star ") == "red star"
    assert len(VILD_TEMPLATES) == 14 and all(t.count("{}") == 1 for t in VILD_TEMPLATES)


def test_class_embedding_is_normalised_mean_of_normalised_templates(tiny_clip_names):
    """Reference: embed each filled template with open_clip directly, normalise, average, normalise."""
    name = tiny_clip_names[0]
    vocab = Vocabulary.from_names(["red star", "bow_(weapon)"], name, None)
    clip, tok = load_clip(name, None), get_tokenizer(name)
    with torch.no_grad():
        for i, cls in enumerate(["red star", "bow (weapon)"]):
            e = F.normalize(clip.encode_text(tok([t.format(cls) for t in VILD_TEMPLATES])), dim=-1)
            torch.testing.assert_close(vocab.embeddings[i], F.normalize(e.mean(0), dim=-1), rtol=1e-5, atol=1e-6)
    assert vocab.names == ("red star", "bow_(weapon)")


def test_vocabulary_cache_skips_the_text_encoder(tiny_clip_names, tmp_path, monkeypatch):
    name = tiny_clip_names[0]
    first = Vocabulary.from_names(["cat", "dog"], name, None, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    def boom(*a, **k):
        raise AssertionError("text encoder ran on a cache hit")

    monkeypatch.setattr(vocab_mod, "encode_names", boom)
    second = Vocabulary.from_names(["cat", "dog"], name, None, cache_dir=tmp_path)
    assert torch.equal(first.embeddings, second.embeddings)
    # another name list, other templates or another CLIP is another key -> encoder needed
    with pytest.raises(AssertionError, match="cache hit"):
        Vocabulary.from_names(["cat", "bird"], name, None, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="cache hit"):
        Vocabulary.from_names(["cat", "dog"], name, None, cache_dir=tmp_path, templates=("a {}.",))
    with pytest.raises(AssertionError, match="cache hit"):
        Vocabulary.from_names(["cat", "dog"], name, None, cache_dir=tmp_path, seed=9)


def test_corrupt_cache_entry_is_recomputed(tiny_clip_names, tmp_path):
    name = tiny_clip_names[0]
    first = Vocabulary.from_names(["cat"], name, None, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.pt")
    entry.write_bytes(b"garbage")
    again = Vocabulary.from_names(["cat"], name, None, cache_dir=tmp_path)
    assert torch.equal(first.embeddings, again.embeddings)


@pytest.mark.parametrize("names,match", [([], "empty"), (["a", "b", "A"], "duplicate"), (["a", ""], "entry 1"),
                                         ("cat", "single string")])
def test_vocabulary_errors(names, match, tiny_clip_names):
    with pytest.raises(ValueError, match=match):
        Vocabulary.from_names(names, tiny_clip_names[0], None)


def test_vocabulary_from_tensor_checks_shape():
    with pytest.raises(ValueError, match="empty"):
        Vocabulary.from_tensor(torch.zeros(0, 8))
    with pytest.raises(ValueError, match="NaN"):
        Vocabulary.from_tensor(torch.full((2, 8), float("nan")))
    v = Vocabulary.from_tensor(torch.randn(3, 8) * 5)
    torch.testing.assert_close(v.embeddings.norm(dim=1), torch.ones(3))
