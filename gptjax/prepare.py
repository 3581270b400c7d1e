"""`python -m gptjax.prepare`: tokenize a dataset's three splits into the token cache ahead of
training (on a CPU node, say), so that the training run starts from the cache.

    python -m gptjax.prepare --dataset DATASET [--tokenizer gpt2] [--data_cache_dir DIR]
        [--text_column text] [--hf_splits train,validation,test] [--held_out_fraction F]
        [--max_samples N] [--tokenizer_threads N]

It takes the training command's own flags (any other field is accepted and has no effect here),
so the cache it writes is the one that training with the same flags reads. Each split prints its
length, fingerprint and cache folder; tokenizing prints its speed. Interrupted, the same command
resumes after the last complete shard.
"""
import sys
import textwrap

from gptjax.config import SOURCE_FIELDS

DATA_FIELDS = ("dataset",) + SOURCE_FIELDS + ("tokenizer", "max_samples", "data_cache_dir",
                                              "tokenizer_threads")
USAGE = "python -m gptjax.prepare --dataset DATASET [options]"


def run(argv) -> dict:
  """Parses `argv` as the trainer does, prepares every split; returns {split: cache folder}."""
  from gptjax import cli, config as config_lib, data

  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    print(f"usage: {USAGE}\n\nThe training run's data options (python -m gptjax.train --help "
          "lists every field):")
    for name in DATA_FIELDS:
      default, help_text = config_lib.FIELDS[name]
      print(textwrap.fill(f"--{name} (default {default!r}): {help_text}", 100,
                          initial_indent="  ", subsequent_indent="      "))
    return {}
  config, _, _, _ = cli.parse(argv)
  config_lib.validate(config)
  options = data.source_options(config)
  folders = {}
  for split in data.SPLITS:
    folder = data.cache_folder(config.dataset, split, config.tokenizer, config.max_samples,
                               config.data_cache_dir, **options)
    cached = data.is_cached(folder)
    tokens = data.load_tokens(config.dataset, split, config.tokenizer, config.max_samples,
                              config.data_cache_dir, threads=config.tokenizer_threads, **options)
    print(f"{split}: {len(tokens):,} tokens ({data.fingerprint(tokens)[:19]}), "
          f"{'already cached' if cached else 'cached'} in {folder}")
    folders[split] = folder
  return folders


def main(argv=None) -> int:
  from gptjax import cli
  return cli.entry_point(run, argv)


if __name__ == "__main__":
  sys.exit(main())
