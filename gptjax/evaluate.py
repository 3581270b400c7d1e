"""Measuring a model on a whole split: `python -m gptjax.evaluate`, and the trainer's eval loop.

    python -m gptjax.evaluate --model PATH [--dataset D] [--split test|valid|train]
        [--batch_size N] [--data_cache_dir DIR] [--json]

PATH is a final model (`models/model_<TIMESTAMP>/`) or a snapshot (`snapshots/snapshot_<step>/`);
its record (architecture, tokenizer, vocabulary size, dataset) is all that is needed
(`checkpoint.load_model`). The split runs through the trainer's own jitted eval step and
`mean_loss`, the loop the trainer runs too, so the loss is the one the trainer reported for the
same weights and split: the token-weighted mean over every token after
the first. Perplexity is exp(loss). Bits per byte is the summed loss in bits over the UTF-8 bytes
of the split's text, counted from its tokens (byte-level BPE decodes losslessly, so this is the
text's byte count; end-of-text counts 0 bytes, as it is no text).
"""
import json
import math
import os
import sys

import jax
import numpy as np
from tqdm import tqdm

from gptjax import checkpoint, cli, data, plan, sharding
from gptjax.config import ConfigError, check_dataset, dataset_name

SPLITS = ("test", "valid", "train")


class NonFiniteLoss(RuntimeError):
  """The model's loss on the split is NaN or infinite (a failed measurement, exit 1)."""
_FALLBACK_BATCH = 16




def mean_loss(eval_step, params, tokens, seq_len: int, batch_size: int, mesh=None,
              stop=None, desc: str = "") -> float | None:
  """Token-weighted mean loss over the whole split; over `mesh`, each process feeds its rows.
  None if `stop` (the trainer's signal flag) was signalled: it stops at the next batch. With
  `desc`, a progress bar (on a terminal only)."""
  rows, put = sharding.batch_feeder(mesh, batch_size) if mesh else (slice(None), jax.device_put)
  batches = (tuple(x[rows] for x in b) for b in data.eval_batches(tokens, seq_len, batch_size))
  n_batches = math.ceil(math.ceil((len(tokens) - 1) / seq_len) / batch_size)
  loss_sum, count = 0.0, 0.0
  with tqdm(total=n_batches, desc=desc, unit="batch", leave=False,
            disable=None if desc and jax.process_index() == 0 else True) as bar:
    for batch in data.prefetch(batches, put):
      if stop is not None and stop.signum:
        return None
      s, n = eval_step(params, *batch)
      loss_sum, count = loss_sum + s, count + n
      bar.update()
  return float(loss_sum) / max(float(count), 1.0)


def token_bytes(encoding) -> np.ndarray:
  """UTF-8 length of every token id; special tokens (end-of-text) and unused ids count 0."""
  special = {encoding.encode_single_token(s) for s in encoding.special_tokens_set}
  out = np.zeros(encoding.n_vocab, np.int64)
  for i in range(encoding.n_vocab):
    if i not in special:
      try:
        out[i] = len(encoding.decode_single_token_bytes(i))
      except KeyError:  # a hole in the vocabulary (cl100k_base has some)
        pass
  return out


def evaluate_model(model_path: str, dataset: str = "", split: str = "test", batch_size: int = 0,
                   data_cache_dir: str = "") -> dict:
  """Loss, perplexity and bits per byte of the model at `model_path` on a whole split."""
  from gptjax.model import GPT
  from gptjax.step import make_eval_step

  if split not in SPLITS:
    raise ConfigError(f"split: {split!r} is not allowed; allowed: {', '.join(SPLITS)}")
  if batch_size < 0:
    raise ConfigError(f"batch_size: {batch_size} is not allowed; must be a positive integer "
                      "(0 = the training run's evaluation batch size)")
  model_config, params, info = checkpoint.load_model(model_path)
  run = info.get("config", {})  # the run's config, of a final model or a snapshot
  dataset = dataset or info["dataset"]
  check_dataset(dataset)
  batch_size = batch_size or run.get("eval_batch_size") or run.get("batch_size") or _FALLBACK_BATCH
  # The train split as the run saw it (data applies max_samples to the train split only).
  tokens = data.load_tokens(dataset, split, info["tokenizer"], run.get("max_samples", 0),
                            data_cache_dir, **data.source_options(run))
  if len(tokens) < 2:
    raise ConfigError(f"split: the {split} split of {dataset!r} has fewer than 2 tokens")
  eval_step = make_eval_step(GPT(model_config), compiler_options=plan.model_compiler_options(
      model_config, jax.default_backend()))
  loss = mean_loss(eval_step, params, tokens, model_config.max_seq_len, batch_size,
                   desc=f"eval {split}")
  if not math.isfinite(loss):
    raise NonFiniteLoss(f"the loss of {model_path} on the {split} split is {loss}: the weights "
                       "are finite, so the model overflows on this data")
  n_predicted = len(tokens) - 1
  n_bytes = int(token_bytes(data.get_tokenizer(info["tokenizer"]))[np.asarray(tokens)].sum())
  return {"model": os.path.abspath(model_path), "dataset": dataset, "split": split,
          "loss": loss, "perplexity": math.exp(loss),
          "bits_per_byte": loss * n_predicted / math.log(2) / max(n_bytes, 1),
          "tokens": n_predicted, "bytes": n_bytes, "batch_size": batch_size}


def _define_flags(fv):
  from absl import flags
  flags.DEFINE_string("model", None, "final model directory (models/model_<TIMESTAMP>/) or "
                      "snapshot directory (snapshots/snapshot_<step>/)", flag_values=fv)
  flags.DEFINE_string("dataset", "", "wikitext, wikitext-103, hf:NAME[:CONFIG] or a folder of "
                      ".txt/.jsonl/.parquet files per split (read with the training run's "
                      "text_column, hf_splits, held_out_fraction); '' = the dataset the model was "
                      "trained on", flag_values=fv)
  flags.DEFINE_enum("split", "test", list(SPLITS), "split to measure", flag_values=fv)
  flags.DEFINE_integer("batch_size", 0, "sequences per evaluation step; 0 = the training run's",
                       flag_values=fv)
  flags.DEFINE_string("data_cache_dir", "", "token cache; '' = $GPTJAX_CACHE or ~/.cache/gptjax",
                      flag_values=fv)
  flags.DEFINE_boolean("json", False, "print one JSON line instead of text", flag_values=fv)


def run(argv) -> dict:
  """Parses `argv`, evaluates, prints the result (text or one JSON line) and returns it."""
  fv = cli.parse_flags(argv, _define_flags, "python -m gptjax.evaluate --model PATH [options]")
  try:
    result = evaluate_model(fv.model or "", fv.dataset, fv.split, fv.batch_size,
                            fv.data_cache_dir)
  except NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if fv.json:
    print(json.dumps(result))
  else:
    print(f"{dataset_name(result['dataset'])}/{result['split']}: loss {result['loss']:.4f} | "
          f"ppl {result['perplexity']:.2f} | bits/byte {result['bits_per_byte']:.4f} | "
          f"{result['tokens']:,} tokens, {result['bytes']:,} bytes | {result['model']}")
  return result


def main(argv=None) -> int:
  return cli.entry_point(run, argv)


if __name__ == "__main__":
  sys.exit(main())
