"""Training configuration: every field with its default and one-line help, presets, validation.

This is the one place that knows the allowed values. The presets, `gptjax/configs/*.py` (also
`configs/` at the repository root), start from `base_config()` and change only what their preset
changes. They and the embedded data (`gptjax/assets/`) ship inside the package, so an installed
gptjax finds them from any folder.
"""
import os

import ml_collections

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIGS_DIR = os.path.join(PACKAGE_DIR, "configs")
# A WikiText-2 excerpt shipped with the package (assets/sample/README.md): the offline default.
SAMPLE_DIR = os.path.join(PACKAGE_DIR, "assets", "sample")
PRESETS = ("tiny", "small", "medium")
HUB_DATASETS = {"wikitext": "wikitext-2-raw-v1", "wikitext-103": "wikitext-103-raw-v1"}
HF_PREFIX = "hf:"   # --dataset hf:NAME[:CONFIG], any hub dataset with a text column
# Besides --dataset, what chooses a split's text (gptjax.data.source_options).
SOURCE_FIELDS = ("text_column", "hf_splits", "held_out_fraction")
TOKENIZERS = {"gpt2": "gpt2", "gpt4": "cl100k_base", "gpt4o": "o200k_base"}
# The architecture: a resumed run takes these from its snapshot.
ARCH_FIELDS = ("d_model", "num_heads", "num_layers", "d_ff", "max_seq_len", "layer_norm_epsilon",
               "tokenizer")
# The execution plan's switches (gptjax/plan.py resolves them), each auto | on | off.
PLAN_SWITCHES = ("fused_block", "block_kernels", "loss_kernel", "xla_gpu_epilogues",
                 "xla_overlap_collectives")
TOKENIZER_VOCAB = {"gpt2": 50257, "gpt4": 100277, "gpt4o": 200019}  # n_vocab, for offline counts

# name -> (default, help). Order is the order of --help.
FIELDS = {
    # data
    "dataset": ("wikitext-103", "wikitext (WikiText-2 raw), wikitext-103 (raw), hf:NAME[:CONFIG] "
                "(a Hugging Face hub dataset with a text column, streamed), or a folder of .txt, "
                ".jsonl or .parquet files per split (train.txt or train-*.EXT or train/, "
                "likewise valid or validation, test), e.g. gptjax/assets/sample (a WikiText-2 "
                "sample shipped with gptjax)"),
    "text_column": ("text", "the column (field) holding the text, for hf: datasets and .jsonl or "
                    ".parquet files"),
    "hf_splits": ("train,validation,test", "an hf: dataset's split names for train, valid, test"),
    "held_out_fraction": (0.0, "hold valid and test out of the training text, each this "
                          "fraction of its pieces (documents, or 2048 lines of .txt), for a "
                          "corpus without its own; 0 = the dataset's own splits"),
    "tokenizer_threads": (0, "threads that tokenize a split not yet cached; 0 = every core"),
    "tokenizer": ("gpt2", "tiktoken encoding: gpt2 | gpt4 (cl100k_base) | gpt4o (o200k_base)"),
    "max_samples": (0, "use only the first N training samples (lines of .txt, else documents); "
                    "0 = all"),
    "data_cache_dir": ("", "where tokenized splits are cached; '' = $GPTJAX_CACHE or ~/.cache/gptjax"),
    # model
    "model_preset": ("", "tiny | small | medium, as --config configs/<preset>.py; '' = manual"),
    "d_model": (256, "model (embedding) dimension"),
    "num_heads": (4, "attention heads; must divide d_model"),
    "num_layers": (4, "decoder blocks"),
    "d_ff": (512, "width of the MLP in each block"),
    "max_seq_len": (256, "context length in tokens"),
    "layer_norm_epsilon": (1e-6, "LayerNorm's epsilon (GPT-2's checkpoints, for --init_from, use "
                           "1e-5)"),
    "dropout": (0.1, "dropout on embeddings, attention output and MLP output, in [0, 1)"),
    "attention": ("auto", "attention kernel: auto (cuDNN flash on GPU, else XLA) | cudnn | xla"),
    "compute_dtype": ("auto", "activation dtype: auto (bfloat16 on GPU/TPU, float32 on CPU) | "
                      "bfloat16 | float32; parameters are always float32"),
    "remat": (False, "recompute each block's activations in the backward pass (less memory)"),
    # execution plan (gptjax/plan.py): how the step runs, resolved once at start; `auto` picks
    # per backend and is logged. Each switch is auto | on | off.
    "fused_block": ("auto", "the block's fused form (rows layout, q/k/v as three matmuls with k's "
                    "bias dropped and v's moved into the output projection, GELU recomputed "
                    "backward): auto (on GPUs) | on | off (the plain GPT-2 block)"),
    "block_kernels": ("auto", "the fused block's Pallas kernels: LayerNorm forward and backward "
                      "(the residual gradient added in the kernel) and the MLP's GELU backward "
                      "with its bias gradient, per shard on any mesh; needs fused_block: auto "
                      "(on GPUs) | on | off"),
    "loss_kernel": ("auto", "Pallas loss kernels (training: the output head's one-pass softmax; "
                    "evaluation: logsumexp), per shard on any mesh: auto (on GPUs) | on | off "
                    "(optax's cross-entropy)"),
    "xla_gpu_epilogues": ("auto", "XLA options: matmuls through cuBLASLt with bias, GELU and "
                          "residual epilogues, Triton GEMM off: auto (on GPUs) | on | off"),
    "xla_overlap_collectives": ("auto", "XLA options: latency-hiding scheduler and 128 MiB "
                                "collective combining: auto (on with 2+ GPUs) | on | off"),
    "init_from": ("", "start from these weights: a Hugging Face GPT-2 folder (config.json and "
                  "model.safetensors or pytorch_model.bin) or a gptjax model; its architecture "
                  "must be the config's; '' = random initialisation"),
    # optimisation
    "epochs": (20, "passes over the training tokens"),
    "batch_size": (32, "sequences per micro-batch (global, over all devices); one optimizer step "
                   "takes grad_accum_steps of them"),
    "grad_accum_steps": (1, "gradient accumulation: micro-batches of batch_size per optimizer "
                         "step, summed inside the compiled step (effective batch = batch_size x "
                         "grad_accum_steps)"),
    "lr": (3e-4, "peak learning rate"),
    "warmup_steps": (1000, "linear warmup from 0 to lr over this many steps"),
    "weight_decay": (0.1, "AdamW decoupled weight decay, on tensors of 2+ dimensions only"),
    "min_lr_ratio": (0.1, "cosine decay ends at lr * min_lr_ratio on the last step"),
    "gradient_clip": (1.0, "clip gradients to this global L2 norm; 0 disables"),
    "adam_b1": (0.9, "AdamW beta1"),
    "adam_b2": (0.95, "AdamW beta2"),
    "seed": (42, "seed of initialisation, data order and dropout"),
    # evaluation and logging
    "eval_batch_size": (0, "sequences per evaluation step; 0 = batch_size"),
    "log_interval": (50, "steps between log lines and TensorBoard points"),
    "output_dir": ("", "run directory; '' = result/lm_{dataset}"),
    "sample_prompts": ("The meaning of life is|In 1885 ,|The game", "prompts ('|'-separated) sampled "
                       "at each validation and written to the log and TensorBoard; '' disables"),
    "sample_max_new_tokens": (40, "tokens generated per sample during training"),
    # snapshots and resume
    "snapshot_interval": (0, "save a snapshot every N steps (0: only at the end of each epoch)"),
    "keep_last_n_snapshots": (3, "snapshots kept on disk (newest first)"),
    "delete_snapshots_after_training": (True, "remove snapshots once the final model is written"),
    "resume": (False, "resume from the newest complete snapshot of the run directory"),
    "checkpoint_file": ("", "resume from this snapshot directory"),
    "yes": (False, "do not ask before loading a snapshot"),
    "allow_data_change": (False, "resume even though the tokenized data differs from the "
                          "snapshot's (another --dataset, or its files changed)"),
    # monitoring
    "gradient_monitor": (False, "per-layer gradient norms, global norm before/after clipping"),
    "gradient_monitor_interval": (100, "steps between gradient-monitor reports"),
    "grad_vanish_threshold": (1e-7, "gradient monitor: flag a layer whose gradient norm falls "
                              "below this (vanishing)"),
    "grad_explode_threshold": (100.0, "gradient monitor: flag a layer whose gradient norm (before "
                               "clipping) rises above this (exploding)"),
    "weight_monitor": (True, "per-layer weight norm, update norm, update/weight ratio, sampled stats"),
    "weight_monitor_interval": (100, "steps between weight-monitor reports"),
    "weight_monitor_sample_size": (1024, "entries per tensor sampled (fixed for the run) for stats"),
    "sanity_check_interval": (100, "steps between reports of non-finite counts; 0 disables the "
                              "reports (a non-finite update is never applied)"),
    # early stopping
    "early_stopping": (False, "stop when validation loss stops improving"),
    "early_stop_patience": (5, "epochs without an improvement of min_delta before stopping"),
    "early_stop_min_delta": (0.001, "smallest validation-loss decrease that counts"),
    "early_stop_restore_best": (True, "the final model holds the best epoch's weights"),
    "early_stop_overfit_patience": (0, "stop when val-train gap grows this many epochs in a row; "
                                    "0 disables"),
    "early_stop_overfit_min_delta": (0.01, "smallest gap growth that counts"),
    # devices
    "mesh_data": (-1, "devices on the data-parallel mesh axis; -1 fills the rest"),
    "mesh_fsdp": (1, "devices on the fully-sharded mesh axis (parameters and optimizer state "
                  "split over them); -1 fills the rest"),
    "shard_optimizer": (False, "ZeRO-1: the optimizer state (AdamW's moments) split over every "
                        "device, the parameters laid out as the mesh says (whole on each device "
                        "with data parallelism): data parallelism's step, the moments (two "
                        "thirds of the train state) split N ways on N devices"),
    "coordinator_address": ("", "multi-process runs: HOST:PORT where process 0 listens; '' = "
                            "single process, or detected under Slurm (srun) / Open MPI (mpirun)"),
    "num_processes": (0, "multi-process runs: processes in the run (one per machine); 0 = 1, or "
                      "detected under Slurm / Open MPI"),
    "process_id": (-1, "multi-process runs: this process's rank, 0 .. num_processes-1 (0 runs the "
                   "coordinator); -1 = detected under Slurm / Open MPI"),
}


class ConfigError(ValueError):
  """A bad configuration value; the CLI prints it as one line and exits with code 2."""


def base_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({k: v for k, (v, _) in FIELDS.items()})


def preset_path(name: str) -> str:
  if name not in PRESETS:
    raise ConfigError(f"model_preset: unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
  return os.path.join(CONFIGS_DIR, f"{name}.py")


def dataset_name(dataset: str) -> str:
  """The name used in `result/lm_{name}`: the hub name (hf:OWNER/NAME:CONFIG gives NAME-CONFIG),
  or a local folder's base name."""
  if dataset in HUB_DATASETS:
    return dataset
  if dataset.startswith(HF_PREFIX):
    return "-".join(filter(None, dataset[len(HF_PREFIX):].rpartition("/")[2].split(":")))
  return os.path.basename(os.path.normpath(dataset))


def output_dir(config) -> str:
  return config.output_dir or os.path.join("result", f"lm_{dataset_name(config.dataset)}")


def sequences_per_step(config) -> int:
  """The effective batch: sequences per optimizer step, over all micro-batches and devices."""
  return config.batch_size * config.grad_accum_steps


def check_dataset(dataset: str) -> None:
  """ConfigError unless `dataset` names a hub dataset or an existing folder (what --dataset
  allows, for training and for evaluating a saved model on other data)."""
  hub_name = dataset[len(HF_PREFIX):].split(":")[0]
  if not (dataset in HUB_DATASETS or dataset.startswith(HF_PREFIX) and bool(hub_name)
          or os.path.isdir(dataset)):
    raise ConfigError(f"dataset: {dataset!r} is not allowed; use wikitext, wikitext-103, "
                      "hf:NAME[:CONFIG], or an existing folder of .txt, .jsonl or .parquet files "
                      f"per split, e.g. the sample shipped with gptjax, {SAMPLE_DIR}")


def validate(config) -> None:
  """Raises ConfigError naming the first bad field, its value and what is allowed."""
  def need(ok, field, allowed):
    if not ok:
      raise ConfigError(f"{field}: {getattr(config, field)!r} is not allowed; {allowed}")

  check_dataset(config.dataset)
  need(bool(config.text_column), "text_column", "name the column that holds the text")
  need(len(config.hf_splits.split(",")) == 3 and all(config.hf_splits.split(",")), "hf_splits",
       "three split names, comma-separated: train,valid,test (the hub's names)")
  need(0.0 <= config.held_out_fraction < 0.5, "held_out_fraction",
       "must be in [0, 0.5): valid and test each take this fraction (0: the dataset's own)")
  need(config.tokenizer_threads >= 0, "tokenizer_threads", "must be 0 (every core) or positive")
  need(config.tokenizer in TOKENIZERS, "tokenizer", f"allowed: {', '.join(TOKENIZERS)}")
  need(config.model_preset in ("",) + PRESETS, "model_preset", f"allowed: {', '.join(PRESETS)}")
  for field in ("epochs", "batch_size", "grad_accum_steps", "d_model", "num_heads", "num_layers",
                "d_ff", "max_seq_len", "keep_last_n_snapshots", "log_interval",
                "gradient_monitor_interval", "weight_monitor_interval",
                "weight_monitor_sample_size", "early_stop_patience"):
    need(getattr(config, field) > 0, field, "must be a positive integer")
  for field in ("max_samples", "snapshot_interval", "sanity_check_interval", "warmup_steps",
                "eval_batch_size", "early_stop_overfit_patience", "sample_max_new_tokens"):
    need(getattr(config, field) >= 0, field, "must be 0 or a positive integer")
  need(config.d_model % config.num_heads == 0, "d_model",
       f"must be divisible by num_heads ({config.num_heads})")
  need(0.0 <= config.dropout < 1.0, "dropout", "must be in [0, 1)")
  need(config.layer_norm_epsilon > 0, "layer_norm_epsilon", "must be > 0")
  need(config.lr >= 0, "lr", "must be >= 0")
  need(config.weight_decay >= 0, "weight_decay", "must be >= 0")
  need(0.0 <= config.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
  need(config.gradient_clip >= 0, "gradient_clip", "must be >= 0 (0 disables clipping)")
  need(config.grad_vanish_threshold >= 0, "grad_vanish_threshold", "must be >= 0 (0: never flag)")
  need(config.grad_explode_threshold > config.grad_vanish_threshold, "grad_explode_threshold",
       f"must be above grad_vanish_threshold ({config.grad_vanish_threshold:g})")
  need(config.attention in ("auto", "cudnn", "xla"), "attention", "allowed: auto, cudnn, xla")
  need(config.compute_dtype in ("auto", "bfloat16", "float32"), "compute_dtype",
       "allowed: auto, bfloat16, float32")
  for field in PLAN_SWITCHES:
    need(config[field] in ("auto", "on", "off"), field, "allowed: auto, on, off")
  need(config.mesh_data == -1 or config.mesh_data > 0, "mesh_data", "must be -1 or positive")
  need(config.mesh_fsdp == -1 or config.mesh_fsdp > 0, "mesh_fsdp", "must be -1 or positive")
  need(config.num_processes >= 0, "num_processes", "must be 0 (detect) or positive")
  need(config.process_id >= -1 and (config.num_processes == 0
                                    or config.process_id < config.num_processes), "process_id",
       f"must be -1 (detect) or in 0..{max(config.num_processes - 1, 0)} (num_processes - 1)")
