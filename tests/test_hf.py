"""Hugging Face interop (gptjax.hf, python -m gptjax.export, --init_from), against `transformers`
itself: a tiny randomly initialised GPT2LMHeadModel saved by transformers starts a run whose first
validation loss is transformers' on the same windows; that run's model, exported, is a
GPT2LMHeadModel with gptjax's logits and an AutoTokenizer with tiktoken's ids. Offline: nothing
is downloaded."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the hf extra (pip install -e '.[hf]') is not installed")
transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
pytest.importorskip("safetensors", reason="the hf extra is not installed")

from gptjax import checkpoint, data, export, hf, plan, train, trainer
from gptjax import model as model_lib
from gptjax.config import ConfigError, base_config
from gptjax.checkpoint import load_model
from gptjax.model import GPT
from conftest import read_run_log

# As the gpt2 checkpoints (n_inner 4 * n_embd, LayerNorm epsilon 1e-5), shrunk.
TINY_GPT2 = dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=50257,
                 layer_norm_epsilon=1e-5)


def _save_gpt2(folder, seed=0, **overrides):
  torch.manual_seed(seed)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**dict(TINY_GPT2, **overrides)))
  model.save_pretrained(folder)
  return str(folder)


def _as_pytorch_model_bin(folder, out):
  """The gpt2 checkpoints' older form: pytorch_model.bin, its names without 'transformer.', the
  attention masks as buffers, lm_head (tied) as a tensor of its own."""
  model = transformers.GPT2LMHeadModel.from_pretrained(folder)
  state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
  n = model.config.n_positions
  state.update({f"h.{i}.attn.bias": torch.tril(torch.ones(n, n))[None, None]
                for i in range(model.config.n_layer)})
  os.makedirs(out)
  torch.save(state, os.path.join(out, "pytorch_model.bin"))
  model.config.save_pretrained(out)
  return str(out)


def _hf_config(make_tiny_config, out, init_from):
  """The tests' tiny run with the tiny GPT-2's architecture, a few steps long."""
  config = make_tiny_config(out)
  config.update(d_ff=128, max_samples=60, epochs=1, init_from=init_from, weight_monitor=False,
                delete_snapshots_after_training=False, layer_norm_epsilon=1e-5)
  return config


def _hf_logits(model, inputs_BT):
  with torch.no_grad():
    return model(torch.from_numpy(inputs_BT).long()).logits.numpy()


def _hf_losses(model, tokens, seq_len, batch_size, extra_rows_VD):
  """transformers' token-weighted mean loss over gptjax's evaluation windows, and the same over
  the logits of the tied head's `extra_rows_VD` too."""
  sums = np.zeros(2)
  for inputs, targets, weights in data.eval_batches(tokens, seq_len, batch_size):
    with torch.no_grad():
      out = model(torch.from_numpy(inputs).long(), output_hidden_states=True)
      logits = out.logits.double()
      extra = out.hidden_states[-1].double() @ torch.from_numpy(extra_rows_VD).double().T
      target = logits.gather(-1, torch.from_numpy(targets).long()[..., None])[..., 0]
      for i, all_logits in enumerate((logits, torch.cat([logits, extra], -1))):
        sums[i] += float(((all_logits.logsumexp(-1) - target) * torch.from_numpy(weights)).sum())
  return sums / float(sum(w.sum() for *_, w in data.eval_batches(tokens, seq_len, batch_size)))


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
  return _save_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def run(make_tiny_config, tmp_path_factory, gpt2_folder):
  """One run started from a tiny GPT-2 folder: (config, result, the GPT2LMHeadModel)."""
  folder = gpt2_folder
  config = _hf_config(make_tiny_config, tmp_path_factory.mktemp("run") / "run", folder)
  result = trainer.train_and_evaluate(config)
  return config, result, transformers.GPT2LMHeadModel.from_pretrained(folder).eval()


def test_init_from_a_gpt2_folder_starts_at_transformers_loss(run):
  config, result, gpt2 = run
  log = read_run_log(config.output_dir)
  assert (f"Initialised from {config.init_from} (Hugging Face GPT-2; its first 32 of 64 "
          "positions; vocabulary padded from 50257 to 50304 rows with their mean)") in log
  eval_batch = config.eval_batch_size or config.batch_size
  valid = data.load_tokens(config.dataset, "valid", "gpt2", 0, config.data_cache_dir)
  wte = gpt2.transformer.wte.weight.detach().numpy()
  padding = np.repeat(wte.mean(0, keepdims=True), 50304 - 50257, 0)
  plain, exact = _hf_losses(gpt2, valid, config.max_seq_len, eval_batch, padding)
  # Exactly transformers' function, over gptjax's padded vocabulary ...
  assert abs(result["initial_val_loss"] - exact) < 1e-5
  # ... whose 47 rows (the mean row) add at most log(1 + 47/50257) to transformers' own loss.
  assert 0 <= result["initial_val_loss"] - plain < np.log1p(47 / 50257) + 1e-5 < 1e-3
  assert f"Before training | val loss {result['initial_val_loss']:.4f}" in log
  # And training went on from there.
  assert result["history"][0]["val_loss"] < result["initial_val_loss"]


@pytest.mark.parametrize("fused", [False, True], ids=["block", "fused_block"])
def test_export_gives_transformers_gptjaxs_logits_and_tokenizer(run, tmp_path, capsys, fused):
  # The fused block leaves k's and v's biases out of its q/k/v matmuls; the export holds them.
  config, result, _ = run
  out = str(tmp_path / "hf")
  assert export.main(["export", "--model", result["model_path"], "--to", "hf", out]) == 0
  assert f"to {out}: config.json, merges.txt, model.safetensors" in capsys.readouterr().out
  model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  assert (model.config.vocab_size, model.config.n_positions, model.config.n_inner) == (50257, 32, 128)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)

  mcfg, params, _ = load_model(result["model_path"])
  mcfg = dataclasses.replace(mcfg, fused_block=fused)
  with open(os.path.join(config.dataset, "test.txt")) as f:
    text = f.read()[:4000]
  ids = data.get_tokenizer("gpt2").encode_ordinary(text)
  assert tokenizer(text)["input_ids"] == ids and tokenizer.decode(ids) == text
  inputs = np.asarray(ids[:4 * 32], np.int32).reshape(4, 32)  # a batch of real text
  ours = np.asarray(GPT(mcfg).apply({"params": params}, jnp.asarray(inputs), deterministic=True))
  theirs = _hf_logits(model, inputs)
  assert ours.dtype == np.float32 and np.abs(ours[..., :50257] - theirs).max() < 1e-4


def test_exported_then_imported_is_the_same_model(run, tmp_path):
  config, result, _ = run
  config = config.copy_and_resolve_references()
  out = str(tmp_path / "hf")
  hf.export_model(result["model_path"], out)
  _, params, _ = load_model(result["model_path"])
  config.init_from = out
  loaded, how = hf.initial_params(config, params)
  assert how == "Hugging Face GPT-2; vocabulary padded from 50257 to 50304 rows with their mean"
  flat = jax.tree_util.tree_leaves_with_path(jax.device_get(params))
  again = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(loaded)))
  for path, leaf in flat:
    rows = slice(0, 50257) if "wte" in jax.tree_util.keystr(path) else slice(None)
    np.testing.assert_array_equal(again[path][rows], leaf[rows])


def test_gpt2s_epsilon_and_pytorch_model_bin(tmp_path, make_tiny_config):
  # GPT-2's LayerNorm epsilon, 1e-5, must be the config's (gptjax's default is 1e-6); the older
  # pytorch_model.bin reads as the same weights as model.safetensors.
  st = _save_gpt2(tmp_path / "st")
  pt = _as_pytorch_model_bin(st, tmp_path / "pt")
  config = _hf_config(make_tiny_config, tmp_path / "run", st)
  config.layer_norm_epsilon = 1e-6
  with pytest.raises(ConfigError, match=r"layer_norm_epsilon=1e-05 but the config has "
                                        r"layer_norm_epsilon=1e-06; give --layer_norm_epsilon"):
    hf.check_init_from(config)
  config.layer_norm_epsilon = 1e-5
  mcfg = plan.model_config(config, 50257, plan.resolve(config, "cpu", 1))
  target = GPT(mcfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  from_st, _ = hf.initial_params(config, target)
  config.init_from = pt
  from_pt, _ = hf.initial_params(config, target)
  jax.tree.map(np.testing.assert_array_equal, from_st, from_pt)


def test_gpt4_export_says_the_tokenizer_is_not_exported(tmp_path, capsys):
  mcfg = model_lib.ModelConfig(vocab_size=model_lib.padded_vocab_size(100277), d_model=16,
                               num_heads=2, num_layers=1, d_ff=32, max_seq_len=16, dropout=0.0)
  params = GPT(mcfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  config = base_config()
  config.tokenizer = "gpt4"
  path = checkpoint.save_model(str(tmp_path / "models"), "model_x", params,
                               trainer.model_info(mcfg, config, 100277,
                                                  plan.resolve(config, "cpu", 1)))
  out = str(tmp_path / "hf")
  export.main(["export", "--model", path, "--to", "hf", out])
  printed = capsys.readouterr().out.splitlines()
  assert printed[-1].startswith("The gpt4 tokenizer is not exported: tiktoken's encoding has no "
                                "GPT2Tokenizer form")
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  for args, message in ((["--model", path, out], "OUT: '" + out + "' exists and is not an empty "
                         "folder; give a new one"),
                        (["--model", path], "OUT: missing; usage: python -m gptjax.export"),
                        (["--model", path, "--to", "onnx", out], "--to")):
    with pytest.raises(SystemExit) as e:
      export.main(["export", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1
  model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  assert (model.config.vocab_size, model.config.eos_token_id) == (100277, 100257)
  inputs = np.array([[1, 100256, 5, 7]], np.int32)
  ours = np.asarray(GPT(mcfg).apply({"params": params}, jnp.asarray(inputs)))
  assert np.abs(ours[..., :100277] - _hf_logits(model, inputs)).max() < 1e-4


@pytest.mark.parametrize("change, message", [
    (dict(d_model=64, num_heads=2), "init_from: the model has d_model=32 but the config has "
     "d_model=64; give the matching preset/options"),
    (dict(num_layers=3), "the model has num_layers=2 but the config has num_layers=3"),
    (dict(d_ff=64), "the model has d_ff=128 but the config has d_ff=64"),
    (dict(max_seq_len=128), "the model has max_seq_len=64 (positions) but the config has "
     "max_seq_len=128; give --max_seq_len 64 or less"),
    (dict(tokenizer="gpt4"), "the model has vocab_size=50257 but the tokenizer gpt4 has 100277"),
    (dict(init_from="/nonexistent"), "init_from: '/nonexistent' does not exist"),
    (dict(init_from="{tmp}"), "is neither a Hugging Face GPT-2 folder (config.json) nor a gptjax "
     "model"),
])
def test_a_mismatch_is_one_line_naming_it(tmp_path, make_tiny_config, gpt2_folder, capsys,
                                          change, message):
  config = _hf_config(make_tiny_config, tmp_path / "run", gpt2_folder)
  config.update({k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v
                 for k, v in change.items()})
  with pytest.raises(ConfigError) as e:
    trainer.check(config)
  assert message in str(e.value) and "\n" not in str(e.value)
  # The command line: --check_only says it in one line, exit code 2.
  args = [f"--{k}={config[k]}" for k in ("dataset", "data_cache_dir", "output_dir", "d_model",
                                         "num_heads", "num_layers", "d_ff", "max_seq_len",
                                         "layer_norm_epsilon", "tokenizer", "init_from")]
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    train.main(["train", *args, "--check_only"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_other_model_kinds_are_refused(tmp_path, make_tiny_config):
  folder = _save_gpt2(tmp_path / "gpt2", activation_function="gelu")
  config = _hf_config(make_tiny_config, tmp_path / "run", folder)
  with pytest.raises(ConfigError, match="has activation_function='gelu', which gptjax's GPT has "
                     "not"):
    hf.check_init_from(config)
  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(dict(cfg, model_type="llama"), f)
  with pytest.raises(ConfigError, match="holds a 'llama' model; only GPT-2"):
    hf.check_init_from(config)


def test_init_from_is_the_runs_identity_on_resume(run, tmp_path):
  config = run[0].copy_and_resolve_references()
  config.update(init_from=str(tmp_path), resume=True, yes=True)
  with pytest.raises(ConfigError, match="init_from: the snapshot was trained with init_from="):
    trainer.check(config, frozenset({"init_from"}))
