"""Preset `small`: ~45-50M parameters, the guide's "Option A" for WikiText-103."""
from gptjax.config import base_config


def get_config():
  config = base_config()
  config.model_preset = "small"
  config.dataset = "wikitext-103"
  config.d_model = 512
  config.num_heads = 8
  config.num_layers = 6
  config.d_ff = 2048
  config.max_seq_len = 512
  return config
