"""The XLA flags gptjax adds before JAX starts on GPUs (a flag already in XLA_FLAGS wins).

XLA reads XLA_FLAGS once, when its first backend starts, so `set_defaults()` must run before
any device call: the command-line tools call it first thing. Nothing changes on CPU or TPU.
"""
import os
import re

# One GPU or more: matmuls through cuBLASLt with XLA's epilogue fusion. The vector bias of the
# Dense layers, the residual add after a projection (beta=1) and the MLP's GELU (BIAS_GELU_AUX,
# see gptjax.model.gelu) then run inside the matmul instead of as separate passes over memory.
# XLA fuses epilogues only in its cuBLAS rewriter; matmuls that go through the Triton GEMM
# autotuner come back without them, hence the second flag. bench/HISTORY.md has the A/B.
GPU_XLA_FLAGS = (
    "--xla_gpu_enable_cublaslt=true",
    "--xla_gpu_enable_triton_gemm=false",
)

# One GPU: XLA's dot merger off. It merges matmuls that share an operand into one, and would
# merge the attention's q, k and v projections (gptjax.model.QKVDense: three matmuls, so that
# each leaves its matmul contiguous for cuDNN's attention) back into one whose output is then
# sliced (copies) and whose gradients are concatenated: faster on one GPU at large batches
# (bench/HISTORY.md has the figures). Not with several GPUs, where it is not measured (a process
# that sees one GPU of a multi-process run gets the flag, and the model keeps one matmul there).
ONE_GPU_XLA_FLAGS = ("--xla_disable_hlo_passes=dot-merger",)

# Several GPUs: the latency-hiding scheduler lets XLA overlap the gradient all-reduce (data) and
# the weight all-gather / gradient reduce-scatter (fsdp) with the matmuls of neighbouring layers,
# instead of running each collective between them; combining collectives into 128 MiB transfers
# turns one small NCCL call per tensor into a few large ones near link bandwidth. JAX's GPU
# performance tips recommend the scheduler (NVIDIA's JAX images turn it on); NVIDIA's JAX-Toolbox
# performance guide documents the combine thresholds.
MULTI_GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
)


def visible_gpu_count() -> int:
  """NVIDIA GPUs this process may use, read from /dev and CUDA_VISIBLE_DEVICES (no CUDA call)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and not {"cuda", "gpu"} & set(platforms.split(",")):
    return 0
  try:
    present = [d for d in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", d)]
  except OSError:
    return 0
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is None:
    return len(present)
  return min(len(present), len([d for d in visible.split(",") if d.strip() not in ("", "-1")]))


def _flags(text: str) -> dict:
  """{'--name': value or None} of a space-separated flag string such as XLA_FLAGS."""
  return dict((f.split("=", 1) + [None])[:2] for f in text.split())


def add(flags) -> list:
  """Appends `flags` to XLA_FLAGS, each unless the variable already names it; the ones added."""
  current = os.environ.get("XLA_FLAGS", "")
  given = _flags(current)
  extra = [f for f in flags if f.split("=", 1)[0] not in given]
  os.environ["XLA_FLAGS"] = " ".join([current] + extra).strip()
  return extra


def epilogue_fusion_on() -> bool:
  """Whether XLA_FLAGS holds GPU_XLA_FLAGS as given here (a user's own value may turn them off)."""
  current = _flags(os.environ.get("XLA_FLAGS", ""))
  return _flags(" ".join(GPU_XLA_FLAGS)).items() <= current.items()


def dot_merger_off() -> bool:
  """Whether XLA_FLAGS turns XLA's dot merger off (ONE_GPU_XLA_FLAGS, or a user's own list)."""
  passes = _flags(os.environ.get("XLA_FLAGS", "")).get("--xla_disable_hlo_passes") or ""
  return "dot-merger" in passes.split(",")


def set_defaults(gpus: int = None) -> list:
  """Adds GPU_XLA_FLAGS where a GPU is visible, ONE_GPU_XLA_FLAGS where it is the only one and
  MULTI_GPU_XLA_FLAGS where there are several."""
  gpus = visible_gpu_count() if gpus is None else gpus
  flags = ((GPU_XLA_FLAGS if gpus >= 1 else ()) + (ONE_GPU_XLA_FLAGS if gpus == 1 else ())
           + (MULTI_GPU_XLA_FLAGS if gpus >= 2 else ()))
  return add(flags)
