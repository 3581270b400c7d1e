"""The guide's manual defaults (``train_lm.py`` with no preset)."""
from gptjax.config import base_config


def get_config():
  return base_config()
