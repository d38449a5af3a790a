"""Everything CLIP: model loading, tokenizer, prompt templates, the vocabulary (names -> text embeddings)."""
from gridclip.clip.loader import (BUILTIN_PREFIX, builtin_clips, clip_identity, get_tokenizer, load_clip, model_config,
                                  parse_clip_spec, register_model_configs)
from gridclip.clip.prompts import VILD_TEMPLATES
from gridclip.clip.text import TextEncoder, TextEncoderUnavailable
from gridclip.clip.vocabulary import (BUILTIN_VOCABULARIES, Vocabulary, builtin_frequencies, builtin_vocabulary,
                                      clean_name, encode_names, name_key, parse_vocabulary, read_vocabulary_file,
                                      validate_names)

__all__ = [
    "BUILTIN_PREFIX", "BUILTIN_VOCABULARIES", "TextEncoder", "TextEncoderUnavailable", "VILD_TEMPLATES", "Vocabulary",
    "builtin_clips", "builtin_frequencies", "builtin_vocabulary", "clean_name", "clip_identity", "encode_names",
    "get_tokenizer", "load_clip", "model_config", "name_key", "parse_clip_spec", "parse_vocabulary",
    "read_vocabulary_file", "register_model_configs", "validate_names",
]
