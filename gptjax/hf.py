"""Hugging Face interop: gptjax's parameters as `transformers`' GPT2LMHeadModel's, and back.

`export_model` writes a folder that `GPT2LMHeadModel.from_pretrained` (and, for the gpt2
tokenizer, `AutoTokenizer.from_pretrained`) loads; `initial_params` reads such a folder, or a
gptjax model, as the first parameters of a run (`--init_from`).

The two layouts are the same function: GPT-2's Conv1D weights are (in, out) like flax's kernels,
and c_attn's 3d columns are q, k, v, each head's columns together, as QKVDense splits them; every
tensor maps whole. QKVDense may leave k's and v's biases out of its matmuls on a GPU, but the
parameter holds all three and the function is the one with them. What differs:
- the vocabulary: gptjax pads it (model.padded_vocab_size); the export drops the padding rows, the
  import adds them back as the mean of the real rows. The tied head gives such a row the mean of a
  position's real logits, which by Jensen's inequality adds at most log(1 + pad / n_vocab) to the
  loss (9.4e-4 for gpt2's 47 rows), and far less for a trained model, whose logits spread; a zero
  row would score 0, above every logit of GPT-2's own checkpoints, which are far below 0.
- nothing else: LayerNorm's epsilon is the model's (--layer_norm_epsilon; GPT-2's checkpoints
  use 1e-5, gptjax's default is flax's 1e-6), written into the exported config and checked on
  import like every other architecture field.
`transformers` is not needed here: safetensors reads and writes the weights (torch only for a
`pytorch_model.bin`); both are the optional `hf` extra.
"""
import json
import os
import shutil

import jax
import numpy as np
from flax import traverse_util

from gptjax import checkpoint, config as config_lib
from gptjax.config import ConfigError
from gptjax.model import ModelConfig, padded_vocab_size

DEFAULT_EPSILON = ModelConfig.layer_norm_epsilon  # a model recorded before the field: flax's
# The tanh approximation of GELU (kernels.gelu_tanh) under transformers' names.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# tiktoken's end-of-text ids.
END_OF_TEXT = {"gpt2": 50256, "gpt4": 100257, "gpt4o": 199999}
GPT2_ASSETS = os.path.join(config_lib.PACKAGE_DIR, "assets", "gpt2")
# (gptjax's parameter path under block_i, GPT-2's tensor name under h.i)
_BLOCK = (("ln1/scale", "ln_1.weight"), ("ln1/bias", "ln_1.bias"),
          ("attn/qkv/kernel", "attn.c_attn.weight"), ("attn/qkv/bias", "attn.c_attn.bias"),
          ("attn/proj/kernel", "attn.c_proj.weight"), ("attn/proj/bias", "attn.c_proj.bias"),
          ("ln2/scale", "ln_2.weight"), ("ln2/bias", "ln_2.bias"),
          ("mlp/fc/kernel", "mlp.c_fc.weight"), ("mlp/fc/bias", "mlp.c_fc.bias"),
          ("mlp/proj/kernel", "mlp.c_proj.weight"), ("mlp/proj/bias", "mlp.c_proj.bias"))
_ARCH = ("d_model", "num_heads", "num_layers", "d_ff")


def tensor_names(num_layers: int) -> dict:
  """{gptjax parameter path: GPT-2's tensor name (without 'transformer.')}."""
  names = {"wte/embedding": "wte.weight", "wpe/embedding": "wpe.weight",
           "ln_f/scale": "ln_f.weight", "ln_f/bias": "ln_f.bias"}
  for i in range(num_layers):
    names.update({f"block_{i}/{ours}": f"h.{i}.{theirs}" for ours, theirs in _BLOCK})
  return names


def _needs(package: str):
  raise ConfigError(f"{package} is not installed; it comes with the hf extra: "
                    "pip install -e '.[hf]'") from None


# --- export ---------------------------------------------------------------------------------

def hf_config(arch: dict, tokenizer: str, n_vocab: int) -> dict:
  """GPT2Config's fields for a gptjax model's recorded architecture (model.json's "model")."""
  eot = END_OF_TEXT[tokenizer]
  return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": n_vocab,
          "n_positions": arch["max_seq_len"], "n_embd": arch["d_model"],
          "n_layer": arch["num_layers"], "n_head": arch["num_heads"], "n_inner": arch["d_ff"],
          "activation_function": "gelu_new",
          "layer_norm_epsilon": arch.get("layer_norm_epsilon", DEFAULT_EPSILON),
          # gptjax drops out embeddings and both residual branches, never attention weights.
          "embd_pdrop": arch["dropout"], "resid_pdrop": arch["dropout"], "attn_pdrop": 0.0,
          "initializer_range": 0.02, "tie_word_embeddings": True, "bos_token_id": eot,
          "eos_token_id": eot, "torch_dtype": "float32"}


def to_hf_tensors(params, num_layers: int, n_vocab: int) -> dict:
  """GPT2LMHeadModel's state dict (as save_pretrained names it; the tied lm_head left out) in
  float32 numpy, the vocabulary's padding rows dropped."""
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  tensors = {f"transformer.{theirs}": np.asarray(flat[ours], np.float32)
             for ours, theirs in tensor_names(num_layers).items()}
  tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:n_vocab]
  return tensors


def _write_gpt2_tokenizer(out_dir: str, max_seq_len: int) -> None:
  """GPT2Tokenizer's files: OpenAI's encoder.json and vocab.bpe are its vocab.json and
  merges.txt."""
  shutil.copyfile(os.path.join(GPT2_ASSETS, "encoder.json"), os.path.join(out_dir, "vocab.json"))
  shutil.copyfile(os.path.join(GPT2_ASSETS, "vocab.bpe"), os.path.join(out_dir, "merges.txt"))
  special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
             "unk_token": "<|endoftext|>"}
  _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
  _write_json(os.path.join(out_dir, "tokenizer_config.json"), dict(
      special, tokenizer_class="GPT2Tokenizer", model_max_length=max_seq_len,
      add_prefix_space=False, errors="replace"))


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


def export_model(model_path: str, out_dir: str) -> dict:
  """Writes the gptjax model at `model_path` as a Hugging Face GPT-2 folder `out_dir`:
  config.json, model.safetensors and, for the gpt2 tokenizer, the tokenizer's files. Returns
  what was written: {"out_dir", "files", "tokenizer", "tokenizer_exported"}. `out_dir` must be
  new or empty: files of an earlier export (another tokenizer's) would be loaded with these."""
  try:
    from safetensors.numpy import save_file
  except ImportError:
    _needs("safetensors")
  _, params, info = checkpoint.load_model(model_path)
  arch, tokenizer, n_vocab = info["model"], info["tokenizer"], info["n_vocab"]
  if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
    raise ConfigError(f"OUT: {out_dir!r} exists and is not an empty folder; give a new one")
  os.makedirs(out_dir, exist_ok=True)
  _write_json(os.path.join(out_dir, "config.json"), hf_config(arch, tokenizer, n_vocab))
  save_file(to_hf_tensors(params, arch["num_layers"], n_vocab),
            os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  if tokenizer == "gpt2":
    _write_gpt2_tokenizer(out_dir, arch["max_seq_len"])
  return {"out_dir": os.path.abspath(out_dir), "files": sorted(os.listdir(out_dir)),
          "tokenizer": tokenizer, "tokenizer_exported": tokenizer == "gpt2"}


# --- import (--init_from) -------------------------------------------------------------------

def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"init_from: cannot read {path} ({type(e).__name__})") from None


def _is_hf_folder(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json"))


def architecture(path: str) -> dict:
  """The architecture of the model at `path` (a Hugging Face GPT-2 folder or a gptjax model),
  read without its weights: gptjax's field names, plus n_vocab and, for gptjax, tokenizer."""
  if not os.path.isdir(path):
    raise ConfigError(f"init_from: {path!r} does not exist or is not a directory; give a Hugging "
                      "Face GPT-2 folder (config.json, model.safetensors) or a gptjax model")
  if _is_hf_folder(path):
    cfg = _read_json(os.path.join(path, "config.json"))
    if cfg.get("model_type") != "gpt2":
      raise ConfigError(f"init_from: {path} holds a {cfg.get('model_type')!r} model; only GPT-2 "
                        "(model_type gpt2) and gptjax models can be loaded")
    unlike = [f"{k}={cfg.get(k)!r}" for k, want in (
        ("activation_function", TANH_GELUS), ("tie_word_embeddings", (True, None)),
        ("scale_attn_by_inverse_layer_idx", (False, None)), ("add_cross_attention", (False, None)),
        ("scale_attn_weights", (True, None))) if cfg.get(k) not in want]
    if unlike:
      raise ConfigError(f"init_from: {path} has {', '.join(unlike)}, which gptjax's GPT has not "
                        "(tanh GELU, tied embeddings, attention scaled by 1/sqrt(head size))")
    return {"d_model": cfg["n_embd"], "num_heads": cfg["n_head"], "num_layers": cfg["n_layer"],
            "d_ff": cfg.get("n_inner") or 4 * cfg["n_embd"], "max_seq_len": cfg["n_positions"],
            "n_vocab": cfg["vocab_size"],
            "layer_norm_epsilon": cfg.get("layer_norm_epsilon", 1e-5)}
  if not checkpoint.is_model_dir(path):
    raise ConfigError(f"init_from: {path} is neither a Hugging Face GPT-2 folder (config.json) "
                      "nor a gptjax model (model.json, or a snapshot_<step> directory)")
  info = (_read_json(os.path.join(path, "model.json"))
          if os.path.isfile(os.path.join(path, "model.json"))
          else checkpoint.read_meta(path)["model"])
  return dict({k: info["model"][k] for k in _ARCH + ("max_seq_len",)}, n_vocab=info["n_vocab"],
              tokenizer=info["tokenizer"],
              layer_norm_epsilon=info["model"].get("layer_norm_epsilon", DEFAULT_EPSILON))


def check_init_from(config) -> dict:
  """The architecture of config.init_from (see `architecture`), or a one-line ConfigError
  naming the first field in which it differs from the run's config. A model with a longer
  context than max_seq_len is fine: its first max_seq_len positions are taken."""
  arch = architecture(config.init_from)
  for field in _ARCH:
    if arch[field] != config[field]:
      raise ConfigError(f"init_from: the model has {field}={arch[field]} but the config has "
                        f"{field}={config[field]}; give the matching preset/options")
  if arch["max_seq_len"] < config.max_seq_len:
    raise ConfigError(f"init_from: the model has max_seq_len={arch['max_seq_len']} (positions) "
                      f"but the config has max_seq_len={config.max_seq_len}; give --max_seq_len "
                      f"{arch['max_seq_len']} or less")
  eps = arch["layer_norm_epsilon"]
  if eps != config.layer_norm_epsilon:
    raise ConfigError(f"init_from: the model has layer_norm_epsilon={eps:g} but the config has "
                      f"layer_norm_epsilon={config.layer_norm_epsilon:g}; give "
                      f"--layer_norm_epsilon {eps:g}")
  if "tokenizer" in arch and arch["tokenizer"] != config.tokenizer:
    raise ConfigError(f"init_from: the model has tokenizer={arch['tokenizer']} but the config has "
                      f"tokenizer={config.tokenizer}; give --tokenizer {arch['tokenizer']}")
  n_vocab = config_lib.TOKENIZER_VOCAB[config.tokenizer]
  if arch["n_vocab"] != n_vocab:
    raise ConfigError(f"init_from: the model has vocab_size={arch['n_vocab']} but the tokenizer "
                      f"{config.tokenizer} has {n_vocab} tokens; give the model's tokenizer "
                      "(GPT-2's is --tokenizer gpt2)")
  return arch


def _hf_tensors(path: str) -> dict:
  """{GPT-2 tensor name: float32 numpy} of a Hugging Face folder, 'transformer.' stripped; the
  attention-mask buffers and a tied lm_head left out."""
  safetensors_path = os.path.join(path, "model.safetensors")
  bin_path = os.path.join(path, "pytorch_model.bin")
  if os.path.isfile(safetensors_path):
    try:
      from safetensors.flax import load_file  # (numpy has no bfloat16)
    except ImportError:
      _needs("safetensors")
    raw = {k: np.asarray(v, np.float32) for k, v in load_file(safetensors_path).items()}
  elif os.path.isfile(bin_path):
    try:
      import torch
    except ImportError:
      _needs("torch")
    state = torch.load(bin_path, map_location="cpu", weights_only=True)
    raw = {k: v.float().numpy() for k, v in state.items()}
  else:
    raise ConfigError(f"init_from: {path} has config.json but no model.safetensors or "
                      "pytorch_model.bin (a sharded checkpoint is not read)")
  tensors = {k.removeprefix("transformer."): v for k, v in raw.items()
             if not k.endswith((".attn.bias", ".attn.masked_bias"))}
  head = tensors.pop("lm_head.weight", None)
  if head is not None and not np.array_equal(head, tensors["wte.weight"]):
    raise ConfigError(f"init_from: {path} has an lm_head unlike its token embedding; gptjax ties "
                      "the two")
  return tensors


def _pad_vocabulary(wte_VD, vocab_size: int):
  """The token embedding with rows added up to `vocab_size`, each the mean of the real rows (see
  the module's docstring)."""
  pad = vocab_size - wte_VD.shape[0]
  return np.concatenate([wte_VD, np.repeat(wte_VD.mean(0, keepdims=True), pad, 0)])


def initial_params(config, target):
  """(params, what was done) of config.init_from, checked against the run's config and laid out
  as `target` (the run's initial params: their structure, shapes and sharding)."""
  path = config.init_from
  arch = check_init_from(config)
  names = tensor_names(config.num_layers)
  notes = []
  if _is_hf_folder(path):
    tensors = _hf_tensors(path)
    missing = sorted(set(names.values()) - set(tensors))
    if missing:
      raise ConfigError(f"init_from: {path} lacks {', '.join(missing[:3])}; it is not a complete "
                        "GPT-2 checkpoint")
    flat = {ours: tensors[theirs] for ours, theirs in names.items()}
    notes.append("Hugging Face GPT-2")
  else:
    flat = traverse_util.flatten_dict(jax.device_get(checkpoint.load_model(path)[1]), sep="/")
    notes.append("gptjax model")
  if arch["max_seq_len"] > config.max_seq_len:
    flat["wpe/embedding"] = flat["wpe/embedding"][:config.max_seq_len]
    notes.append(f"its first {config.max_seq_len} of {arch['max_seq_len']} positions")
  vocab_size = padded_vocab_size(arch["n_vocab"])
  if flat["wte/embedding"].shape[0] < vocab_size:
    notes.append(f"vocabulary padded from {flat['wte/embedding'].shape[0]} to {vocab_size} rows "
                 "with their mean")
    flat["wte/embedding"] = _pad_vocabulary(flat["wte/embedding"], vocab_size)
  want = traverse_util.flatten_dict(target, sep="/")
  for name, leaf in want.items():
    if name not in flat or flat[name].shape != leaf.shape:
      raise ConfigError(f"init_from: {path} has no parameter {name} of shape {leaf.shape}")
  params = traverse_util.unflatten_dict(
      {name: np.asarray(flat[name], leaf.dtype) for name, leaf in want.items()}, sep="/")
  return jax.device_put(params, jax.tree.map(lambda a: a.sharding, target)), "; ".join(notes)
