"""How a run's step runs: the execution plan, resolved once from the config.

The config's plan fields (PLAN_FIELDS) say `auto` or a concrete choice; `resolve` turns them into
a Plan of concrete values for this backend and device count, once, at start. The run header logs
it (`describe`), model.json stores it, the model and the step read only it (through ModelConfig
and `compiler_options`): the same config on the same machine gives the same program from the
CLI, from Python and in the benchmark, whatever XLA_FLAGS or the device count say.

What `auto` chooses, and why:
- compute_dtype: bfloat16 on accelerators, float32 on the CPU.
- attention: cuDNN's flash attention on a GPU with a 16-bit compute dtype, else XLA's.
- fused_block, block_kernels, loss_kernel: on GPUs, on any mesh (the row-wise Pallas kernels run
  per shard under shard_map). Elsewhere the plain GPT-2 block and optax's loss: the kernels are
  Triton kernels (on the CPU Pallas can only interpret them, slowly). block_kernels is one path,
  the LayerNorm and GELU-backward kernels together: they share the row-wise machinery and were
  measured on and off together (bench/RESULTS.md).
- xla_gpu_epilogues: on GPUs. XLA fuses epilogues only in its cuBLAS(Lt) rewriter; matmuls that go
  through the Triton GEMM autotuner come back without them. The fused block writes its GELU in
  the form the rewriter matches (gptjax.model.gelu).
- xla_overlap_collectives: on two or more GPUs. The latency-hiding scheduler overlaps the gradient
  all-reduce (data) and the weight all-gather / gradient reduce-scatter (fsdp) with neighbouring
  layers' matmuls; combining collectives into 128 MiB transfers turns one small NCCL call per
  tensor into a few near link bandwidth (JAX's GPU performance tips; NVIDIA JAX-Toolbox).
bench/RESULTS.md has what each path is measured to be worth.
"""
import dataclasses

import jax.numpy as jnp

from gptjax.config import PLAN_SWITCHES, ConfigError, base_config
from gptjax.model import ModelConfig, padded_vocab_size

PLAN_FIELDS = ("compute_dtype", "attention") + PLAN_SWITCHES

# The fused block runs q, k and v as three matmuls; XLA's dot merger would merge them back into
# one whose output is sliced (copies) and whose gradients are concatenated.
_FUSED_BLOCK_OPTIONS = {"xla_disable_hlo_passes": "dot-merger"}
_EPILOGUE_OPTIONS = {"xla_gpu_enable_cublaslt": True, "xla_gpu_enable_triton_gemm": False}
_OVERLAP_OPTIONS = {
    "xla_gpu_enable_latency_hiding_scheduler": True,
    "xla_gpu_all_reduce_combine_threshold_bytes": 134217728,
    "xla_gpu_all_gather_combine_threshold_bytes": 134217728,
    "xla_gpu_reduce_scatter_combine_threshold_bytes": 134217728,
}


def _model_options(backend: str, fused_block: bool, epilogues: bool) -> dict:
  options = dict(_FUSED_BLOCK_OPTIONS) if backend == "gpu" and fused_block else {}
  if epilogues:
    options.update(_EPILOGUE_OPTIONS)
  return options


def model_compiler_options(model_config: ModelConfig, backend: str) -> dict:
  """The XLA options that the form of `model_config` (as model_fields made it) needs, for a
  program of the model outside the train and eval steps (evaluation and sampling of a saved
  model): the fused block's and the GELU epilogue's, as Plan.compiler_options gives them."""
  return _model_options(backend, model_config.fused_block, model_config.gelu_epilogue)


@dataclasses.dataclass(frozen=True)
class Plan:
  backend: str
  compute_dtype: str
  attention: str
  fused_block: bool
  block_kernels: bool
  loss_kernel: bool
  xla_gpu_epilogues: bool
  xla_overlap_collectives: bool

  def compiler_options(self) -> dict:
    """XLA options for the jitted steps (jax.jit's compiler_options): per program, not the
    process-wide XLA_FLAGS, so a Python caller gets them as the CLI does."""
    options = _model_options(self.backend, self.fused_block, self.xla_gpu_epilogues)
    if self.xla_overlap_collectives:
      options.update(_OVERLAP_OPTIONS)
    return options

  def to_json(self) -> dict:
    return {f: getattr(self, f) for f in PLAN_FIELDS}

  def describe(self) -> str:
    """One line for the run header: every choice, `on`/`off` for the switches."""
    words = [f"{f} {'on' if getattr(self, f) else 'off'}" for f in PLAN_SWITCHES]
    interpreted = self.backend != "gpu" and (self.block_kernels or self.loss_kernel)
    return (f"Plan: compute {self.compute_dtype}, attention {self.attention}, " + ", ".join(words)
            + (" (Pallas kernels in the interpreter: slow)" if interpreted else ""))


def resolve(config, backend: str, n_devices: int) -> Plan:
  """The concrete Plan of `config`'s plan fields on `backend` ('cpu', 'gpu', 'tpu') with
  `n_devices` devices in the mesh; ConfigError naming a field whose value cannot run there."""
  gpu = backend == "gpu"
  dtype = config.compute_dtype
  if dtype == "auto":
    dtype = "float32" if backend == "cpu" else "bfloat16"
  attention = config.attention
  if attention == "auto":
    attention = "cudnn" if gpu and dtype == "bfloat16" else "xla"
  elif attention == "cudnn" and not (gpu and dtype == "bfloat16"):
    raise ConfigError(f"attention: cudnn needs an NVIDIA GPU and compute_dtype bfloat16 (here "
                      f"backend {backend}, compute {dtype}); allowed: auto, xla")

  def switch(field: str, auto: bool) -> bool:
    value = config[field]
    if value not in ("auto", "on", "off"):
      raise ConfigError(f"{field}: {value!r} is not allowed; allowed: auto, on, off")
    return auto if value == "auto" else value == "on"

  fused = switch("fused_block", gpu)
  plan = Plan(backend=backend, compute_dtype=dtype, attention=attention, fused_block=fused,
              block_kernels=switch("block_kernels", gpu and fused),
              loss_kernel=switch("loss_kernel", gpu),
              xla_gpu_epilogues=switch("xla_gpu_epilogues", gpu),
              xla_overlap_collectives=switch("xla_overlap_collectives", gpu and n_devices > 1))
  if plan.block_kernels and not fused:
    raise ConfigError("block_kernels: on needs fused_block on (the plain block uses flax's layers "
                      "only); allowed with fused_block off: auto, off")
  for field in ("xla_gpu_epilogues", "xla_overlap_collectives"):
    if getattr(plan, field) and not gpu:
      raise ConfigError(f"{field}: on applies to GPUs only (backend {backend}); allowed here: "
                        "auto, off")
  return plan


def model_config(config, n_vocab: int, plan: Plan) -> ModelConfig:
  """The model of `config` (its architecture) computed as `plan` says."""
  return ModelConfig(vocab_size=padded_vocab_size(n_vocab), d_model=config.d_model,
                     num_heads=config.num_heads, num_layers=config.num_layers, d_ff=config.d_ff,
                     max_seq_len=config.max_seq_len, dropout=config.dropout,
                     layer_norm_epsilon=config.layer_norm_epsilon, remat=config.remat,
                     **model_fields(plan))


def model_fields(plan: Plan) -> dict:
  """ModelConfig's fields that the plan decides."""
  return dict(dtype=jnp.dtype(plan.compute_dtype), attention=plan.attention,
              fused_block=plan.fused_block, block_kernels=plan.block_kernels,
              loss_kernel=plan.loss_kernel,
              gelu_epilogue=plan.xla_gpu_epilogues)


def for_inference(compute_dtype: str, backend: str) -> Plan:
  """The default plan on this machine (one device) for a saved model, in the dtype it was trained
  in: a model trained with GPU kernels evaluates on a CPU, and the other way round."""
  config = base_config()
  config.compute_dtype = compute_dtype
  return resolve(config, backend, 1)
