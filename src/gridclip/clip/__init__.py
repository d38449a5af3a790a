"""Everything CLIP: model loading, tokenizer, prompt templates, vocabularies (text embeddings)."""
from gridclip.clip.loader import clip_identity, get_tokenizer, load_clip, model_config, register_model_configs
from gridclip.clip.prompts import VILD_TEMPLATES, clean_name
from gridclip.clip.vocabulary import Vocabulary, encode_names, validate_names

__all__ = [
    "VILD_TEMPLATES", "Vocabulary", "clean_name", "clip_identity", "encode_names", "get_tokenizer",
    "load_clip", "model_config", "register_model_configs", "validate_names",
]
