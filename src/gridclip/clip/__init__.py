"""Everything CLIP: model loading, tokenizer, prompt templates, vocabularies (text embeddings)."""
from gridclip.clip.loader import (BUILTIN_PREFIX, builtin_clips, clip_identity, get_tokenizer, load_clip, model_config,
                                  parse_clip_spec, register_model_configs)
from gridclip.clip.text import TextEncoder, TextEncoderUnavailable
from gridclip.clip.prompts import VILD_TEMPLATES, clean_name
from gridclip.clip.vocabulary import Vocabulary, encode_names, validate_names

__all__ = [
    "BUILTIN_PREFIX", "TextEncoder", "TextEncoderUnavailable", "VILD_TEMPLATES", "Vocabulary", "builtin_clips",
    "clean_name", "clip_identity", "encode_names", "get_tokenizer", "load_clip", "model_config", "parse_clip_spec",
    "register_model_configs", "validate_names",
]
