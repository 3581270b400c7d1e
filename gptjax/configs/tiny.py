"""Preset `tiny`: ~16M parameters, for WikiText-2 and quick experiments."""
from gptjax.config import base_config


def get_config():
  config = base_config()
  config.model_preset = "tiny"
  config.dataset = "wikitext"
  config.d_model = 256
  config.num_heads = 4
  config.num_layers = 4
  config.d_ff = 1024
  config.max_seq_len = 256
  return config
