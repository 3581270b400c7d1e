"""The text of `--info` (the comprehensive documentation) and `--explain` (short, with examples).

The presets table is computed, not written: each `configs/<preset>.py` is loaded and its model
counted from shapes alone (`model.count_params`, `jax.eval_shape`), with the tokenizer's known
vocabulary size, so neither the network nor an accelerator is touched.
"""
import importlib.util
import os
import textwrap

from gptjax import config as config_lib
from gptjax import monitor
from gptjax.model import ModelConfig, count_params, padded_vocab_size

PRESET_NOTES = {  # the PyTorch guide's words for each preset
    "tiny": "WikiText-2, quick experiments",
    "small": 'WikiText-103, the guide\'s "Option A"',
    "medium": "WikiText-103, GPT-2 small (\"Option C\")",
    "default": "the manual configuration (no preset)",
}


def load_preset(name: str):
  """The ConfigDict of `configs/<name>.py` (`default` included)."""
  path = os.path.join(config_lib.CONFIGS_DIR, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"gptjax_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def preset_rows() -> list[dict]:
  """One row per preset (and the manual default): architecture and computed parameter counts."""
  rows = []
  for name in config_lib.PRESETS + ("default",):
    c = load_preset(name)
    vocab = padded_vocab_size(config_lib.TOKENIZER_VOCAB[c.tokenizer])
    params = count_params(ModelConfig(vocab_size=vocab, d_model=c.d_model, num_heads=c.num_heads,
                                      num_layers=c.num_layers, d_ff=c.d_ff,
                                      max_seq_len=c.max_seq_len))
    # nanoGPT's convention: the embeddings (token and position) are not "non-embedding".
    non_embedding = params - (vocab + c.max_seq_len) * c.d_model
    rows.append({"preset": name, "params": params, "non_embedding": non_embedding,
                 "d_model": c.d_model, "num_heads": c.num_heads, "num_layers": c.num_layers,
                 "d_ff": c.d_ff, "max_seq_len": c.max_seq_len, "dataset": c.dataset,
                 "tokenizer": c.tokenizer})
  return rows


def presets_table() -> str:
  head = ("| preset  | parameters  | non-embedding | d_model | heads | layers | d_ff | context | "
          "dataset      |")
  lines = [head, "|" + "|".join("-" * (len(cell)) for cell in head.split("|")[1:-1]) + "|"]
  for r in preset_rows():
    lines.append(f"| {r['preset']:<7} | {r['params']:>11,} | {r['non_embedding']:>13,} | "
                 f"{r['d_model']:>7} | {r['num_heads']:>5} | {r['num_layers']:>6} | "
                 f"{r['d_ff']:>4} | {r['max_seq_len']:>7} | {r['dataset']:<12} |")
  notes = [f"  {name}: {text}" for name, text in PRESET_NOTES.items()]
  return "\n".join(lines + [""] + notes)


def _vocab_line() -> str:
  return ", ".join(f"{name} {n:,} ({padded_vocab_size(n):,} padded)"
                   for name, n in config_lib.TOKENIZER_VOCAB.items())


INFO_MODEL = """\
MODEL
  A GPT-2-style decoder-only transformer (gptjax/model.py, Flax linen):
    token embedding + learned position embedding -> dropout
    -> num_layers pre-LN blocks:  x + Attn(LN(x)),  then  x + MLP(LN(x))
         Attn: one fused q/k/v projection, causal softmax attention over num_heads heads
               (cuDNN flash attention on NVIDIA GPUs, XLA elsewhere), output projection, dropout
         MLP:  d_model -> d_ff -> GELU (tanh) -> d_model, dropout
    -> final LayerNorm -> output head tied to the token embedding (no separate matrix).
  Dropout is applied in three places: after the embedding sum, after the attention output
  projection and after the MLP output projection (not on the attention probabilities); it is
  off during evaluation and sampling.
  Initialisation as GPT-2: normal(0, 0.02), residual output projections scaled by
  1/sqrt(2 * num_layers), LayerNorm scale 1 and bias 0.
  Precision: parameters and optimizer state are float32; activations are computed in bfloat16 on
  GPU/TPU (float32 on CPU; --compute_dtype); the logits are computed in that dtype and the loss
  from them in float32 (logsumexp and target logit upcast inside the reduction).
  Vocabulary size by --tokenizer:
    {vocab}.
  The embedding is padded to a multiple of 128 rows for fast matrix multiplies; the padding
  rows are never targets.
  Memory: --remat recomputes each block's activations in the backward pass.
  Starting weights: --init_from PATH takes a Hugging Face GPT-2 folder (config.json and
  model.safetensors or pytorch_model.bin) or a gptjax model; its architecture must match the
  config (an error names the field). python -m gptjax.export --model PATH --to hf OUT writes a
  folder transformers.GPT2LMHeadModel and AutoTokenizer load (the tokenizer for gpt2 only)."""

INFO_DATA = """\
DATA AND THE TOKEN CACHE
  --dataset wikitext      WikiText-2 raw (~2M tokens), from the Hugging Face Hub
  --dataset wikitext-103  WikiText-103 raw (~100M tokens), from the Hugging Face Hub
  --dataset hf:NAME[:CONFIG]   any hub dataset with a text column, streamed by HF `datasets`:
                          --text_column (text), --hf_splits (train,validation,test)
  --dataset FOLDER        your own files, .txt, .jsonl or .parquet: FOLDER/train.txt,
                          train-*.jsonl, train/*.parquet, ... (likewise valid or validation,
                          and test), read in name order
  --dataset gptjax/assets/sample   such a folder shipped in the package: a WikiText-2 sample
                          (350K/25K/27K tokens), for a first run with no network
  --held_out_fraction F   valid and test each take F of the training text's pieces (a
                          document, or 2048 lines of .txt), chosen by a hash of their position:
                          for a corpus with no splits of its own (a folder of any file names)
  A .txt file is one document: its lines in pieces of 2048, encoded with tiktoken
  (encode_ordinary, so text that looks like a special token stays text), one end-of-text token
  after the file. A .jsonl line, .parquet row or hub row is one document, an end-of-text after
  each. Tokenizing streams the text (memory stays flat for any size) on every core
  (--tokenizer_threads), with a progress bar and a closing line giving tokens/s and MB/s.
  The ids go to the token cache (--data_cache_dir, else $GPTJAX_CACHE, else ~/.cache/gptjax),
  a folder per split keyed by dataset, split, tokenizer and --max_samples (local files also by
  path, size and modification time): shards of 64M uint16/uint32 ids, each written with its
  sha256 and where in the text it ends, so an interrupted preparation resumes after its last
  shard; memory-mapped afterwards, the second run starts at once. python -m gptjax.prepare
  --dataset ... (the training flags) fills the cache ahead of training, on a CPU node say.
  --max_samples N keeps the first N lines (.txt) or documents of the training split.
  Training: the tokens are cut into non-overlapping windows of max_seq_len + 1 tokens, shuffled
  each epoch by (seed, epoch): one int32 permutation, 4 bytes a window (10B tokens at
  max_seq_len 1024: 39 MB); a window across two shards is read from both. An epoch is
  (windows // B) steps of B windows, where the
  effective batch B = batch_size x grad_accum_steps. With --grad_accum_steps N each optimizer
  step sums the gradients of N micro-batches of batch_size inside the compiled step (memory of
  one micro-batch); schedule, intervals, snapshots and resume count optimizer steps, and the
  log's Mesh line states the effective batch.
  The model predicts tokens 1..T of a window from tokens 0..T-1.
  Evaluation: the whole split in order, each token after the first predicted exactly once; the
  loss is the token-weighted mean, and perplexity = exp(loss)."""

INFO_OPTIM = """\
OPTIMIZER AND LEARNING-RATE SCHEDULE
  AdamW (optax): beta1 0.9, beta2 0.95 (--adam_b1, --adam_b2), eps 1e-8, decoupled weight
  decay --weight_decay applied only to tensors with 2 or more dimensions (the projection
  matrices and the embeddings), never to biases or LayerNorm parameters.
  Gradients are clipped to a global L2 norm of --gradient_clip (0 disables) before AdamW.
  Schedule: linear warmup from 0 to --lr over --warmup_steps steps, then cosine decay to
  lr * --min_lr_ratio at the last step of the run (epochs * steps per epoch). A warmup longer
  than the whole run is allowed with a warning in the log: the peak is then reached at the end.
  A step whose loss or gradient is not finite is never applied: training stops with an error
  naming where the NaN/Inf appeared and the last good snapshot."""

INFO_EARLY_STOP = """\
EARLY STOPPING (checked once per epoch, on the validation loss)
  --early_stopping               stop after --early_stop_patience epochs in a row without an
                                 improvement of at least --early_stop_min_delta on the best
  --early_stop_overfit_patience N  stop when the gap (val loss - train loss) grew by more than
                                 --early_stop_overfit_min_delta for N epochs in a row (0: off)
  The final model holds the best epoch's weights, unless --no_early_stop_restore_best.
  The best loss, its epoch and the counters are saved in every snapshot, so a resumed run
  decides exactly as an uninterrupted one."""

INFO_SNAPSHOTS = """\
SNAPSHOTS AND RESUME
  A snapshot (Orbax) holds the parameters, the optimizer state, the step, the data position
  (epoch and batch index; the order follows from seed and epoch), the early-stopping state, the
  validation history and the resolved config. One is written every --snapshot_interval steps
  (0: none within an epoch) and at the end of every epoch; the newest --keep_last_n_snapshots
  are kept. Saves are asynchronous and atomic: a run killed while saving leaves no half snapshot.
  Each snapshot and final model carries manifest.json (size and SHA-256 of every file), checked
  before it is loaded: a damaged one is an error naming it and the newest intact snapshot.
  After training the snapshots are deleted, unless --no_delete_snapshots_after_training.
  `kill PID` (SIGTERM), SIGHUP or Ctrl-C: the run stops at the next step (or evaluation batch),
  saves a snapshot and exits; a second signal stops at once.
  --resume                resume from the newest snapshot of the run directory
                          (--output_dir, else result/lm_{dataset})
  --checkpoint_file PATH  resume from this snapshot, e.g. result/lm_wikitext/snapshots/snapshot_1200
                          (later snapshots of the run directory are moved aside, not deleted)
  -y, --yes               do not ask before loading it (needed when not at a terminal)
  --allow_data_change     resume although the tokenized data differs from the snapshot's
  Options not given come from the snapshot. Given with another value, an option that defines the
  run (architecture, data, batch size, seed, optimizer and schedule) is an error naming both
  values; run length (--epochs), reporting, monitor and snapshot intervals may change, and the
  log states each change. The data's fingerprint must match unless --allow_data_change. Raise
  --epochs to train a finished run further; a run that stopped after its last epoch without a
  final model gets its test evaluation and final model from --resume. One run at a time writes
  a run directory (an OS lock, .lock): a second one exits 2 naming the first one's PID."""

INFO_OUTPUT = """\
OUTPUT LAYOUT (the run directory: --output_dir, else result/lm_{dataset})
  result/lm_{dataset}/
  |-- logs/train_<TIMESTAMP>.log     every log line (timestamp like 2026FEB15_215234_GMT+00)
  |-- run_config.json                the resolved configuration
  |-- snapshots/                     while training (see above)
  |   |-- run_config.json
  |   `-- snapshot_<step>/{state/, meta/, manifest.json}
  |-- models/model_<TIMESTAMP>/      the final model: params/ (Orbax) and model.json
  |                                  (architecture, tokenizer, history, test loss, config)
  `-- tensorboard/                   event files, for tensorboard --logdir DIR/tensorboard
  {dataset} is wikitext, wikitext-103, or a folder's base name.
  Use the final model with: python -m gptjax.evaluate --model PATH
                            python -m gptjax.generate --model PATH --prompt "Once upon a time"
  Console: a progress bar per epoch (loss, lr, tokens/s) when the output is a terminal; plain
  timestamped lines otherwise, so log files hold no bar."""

INFO_OFFLINE = """\
OFFLINE USE
  --help, --info and --explain need neither the network nor an accelerator.
  GPT-2's vocabulary and a WikiText-2 sample (gptjax/assets) ship in the package. tiktoken
  downloads the gpt4/gpt4o vocabularies once: offline, set TIKTOKEN_CACHE_DIR to a folder holding
  tiktoken's cache files. The Hub datasets are downloaded once by HF `datasets`; with no
  connection they load from HF's cache, or the run stops at once naming the sample's path; give
  --dataset a folder of .txt, .jsonl or .parquet files. Once a split is in the token cache,
  neither the text nor `datasets` is read again."""

INFO_DEVICES = """\
DEVICES AND MACHINES
  Every visible device is used: a ('data', 'fsdp') mesh, batches split over all devices
  (--batch_size is the global batch and must divide evenly). --config.shard_optimizer splits
  AdamW's moments over the devices (ZeRO-1; parameters stay whole). --config.mesh_fsdp=-1 also splits
  parameters and optimizer state over the devices (for models larger than one card). Several
  machines: the same command on each, with --config.coordinator_address=HOST0:PORT
  --config.num_processes=N --config.process_id=i (detected by itself under Slurm or Open MPI).

EXECUTION PLAN
  How the step runs is part of the config, resolved once at start, logged ("Plan: ...") and
  stored in model.json: --compute_dtype, --attention and the switches --fused_block,
  --block_kernels, --loss_kernel, --xla_gpu_epilogues and --xla_overlap_collectives (each auto |
  on | off). auto: on GPUs the fused block with its Pallas LayerNorm and GELU-backward kernels,
  the Pallas loss kernels (all on any mesh: each device runs them on its rows) and XLA's cuBLASLt
  epilogues (bias, residual add and GELU fused into the matmuls); with
  two or more GPUs also XLA's latency-hiding scheduler and combined collectives. Elsewhere the
  plain GPT-2 block and optax's loss. The XLA options go to the compiled programs themselves (not
  XLA_FLAGS), so Python callers and the CLI build the same program. Any switch set off is the
  escape hatch when a kernel or a JAX/Triton version misbehaves.

USING THE MODEL
  python -m gptjax.evaluate --model result/lm_X/models/model_<TS> --split test   (loss, ppl,
  bits/byte; --json). python -m gptjax.generate --model ... --prompt "The game" --top_k 200
  (a KV-cached, compiled decoder; --temperature 0 is greedy). Both take a snapshot as well."""

INFO_CONFIG = """\
CONFIGURATION
  Every option is a field of one config (gptjax/config.py): --lr 6e-4 and --config.lr=6e-4 are
  the same, and --model_preset small is --config configs/small.py. A config file may be your
  own copy of configs/*.py. Giving one field two different values two ways is an error.
  `python -m gptjax.train --help` lists every field with its default.
  --check_only validates the options and exits without writing anything; its last line names
  the run directory (output_dir: PATH), which ./run/run_train_lm.sh puts the log under.
  Exit codes: 0 done, 1 a run-time failure (NaN/Inf, out of memory), 2 bad input (one line
  naming the option, the value and what is allowed; nothing written), 128+N stopped by signal N."""


def info() -> str:
  sections = [
      "gptjax: a GPT language-model trainer in JAX/Flax (python -m gptjax.train)",
      INFO_MODEL.format(vocab=_vocab_line()),
      "PRESETS (parameter counts computed from configs/*.py with the gpt2 tokenizer)\n"
      + presets_table(),
      INFO_DATA, INFO_OPTIM,
      "MONITORS\n" + textwrap.indent(monitor.MONITOR_DOC.strip("\n"), "  "),
      INFO_EARLY_STOP, INFO_SNAPSHOTS, INFO_OUTPUT, INFO_DEVICES, INFO_CONFIG, INFO_OFFLINE,
  ]
  return "\n\n".join(sections)


EXPLAIN = """\
gptjax trains a GPT-2-style language model on WikiText (or your own text) to predict the next
token. Each step shows the model batch_size windows of max_seq_len tokens, measures the
cross-entropy of its next-token guesses and moves the weights with AdamW. Lower loss is better;
perplexity = exp(loss) is "how many tokens it hesitates between": an untrained model is at the
vocabulary size (~50,000), a good WikiText-103 model at a few tens. After each epoch the loss on
the validation split is measured and a snapshot saved; at the end the test split is measured
and the final model written to result/lm_{dataset}/models/.

Examples (python -m gptjax.train replaces the guide's python src/training/train_lm.py):

  # a quick run: tiny model (~16M parameters) on WikiText-2
  python -m gptjax.train --model_preset tiny --dataset wikitext --epochs 5 --batch_size 64

  # smoke test in a minute on the CPU, offline: 300 lines of the shipped sample, a shrunken model
  python -m gptjax.train --model_preset tiny --dataset gptjax/assets/sample --epochs 1 \\
      --max_samples 300 --d_model 64 --num_heads 2 --num_layers 2 --d_ff 128 --max_seq_len 64

  # your own text: a folder with train.txt, valid.txt, test.txt
  python -m gptjax.train --model_preset tiny --dataset path/to/folder --epochs 10

  # the guide's Option A, in the background with a timestamped log
  ./run/run_train_lm.sh --preset small --dataset wikitext-103 --epochs 30 --warmup 4000 \\
      --lr 6e-4 --snapshot 5000

  # GPT-2 small with every monitor and early stopping
  python -m gptjax.train --model_preset medium --dataset wikitext-103 --epochs 40 \\
      --batch_size 16 --warmup_steps 4000 --snapshot_interval 2000 --gradient_monitor \\
      --gradient_monitor_interval 500 --early_stopping --early_stop_patience 7 \\
      --early_stop_overfit_patience 3 --keep_last_n_snapshots 5 --yes

  # resume the newest snapshot of result/lm_wikitext-103 (asks first; --yes does not)
  python -m gptjax.train --resume
  python -m gptjax.train --resume --yes
  # or a given snapshot
  python -m gptjax.train --checkpoint_file result/lm_wikitext-103/snapshots/snapshot_5000 --yes

  # the same options through a config: a preset file plus single fields
  python -m gptjax.train --config configs/small.py --config.lr=6e-4

  # check the options without training; see every option with its default
  python -m gptjax.train --model_preset small --batch_size 16 --check_only
  python -m gptjax.train --help

Watch a run: tail -f result/lm_{dataset}/logs/train_<TIMESTAMP>.log and
tensorboard --logdir result/lm_{dataset}/tensorboard. Out of memory: lower --batch_size (16,
then 8) and keep the effective batch with --grad_accum_steps (2, then 4), or lower
--max_seq_len, or take a smaller preset. Loss NaN: lower --lr, raise --warmup_steps.
python -m gptjax.train --info has the whole story (model, presets, monitors, resume)."""


def explain() -> str:
  return EXPLAIN
