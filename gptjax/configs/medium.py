"""Preset `medium`: ~124M parameters, GPT-2 small ("Option C") on WikiText-103."""
from gptjax.config import base_config


def get_config():
  config = base_config()
  config.model_preset = "medium"
  config.dataset = "wikitext-103"
  config.d_model = 768
  config.num_heads = 12
  config.num_layers = 12
  config.d_ff = 3072
  config.max_seq_len = 1024
  return config
