"""`python -m gptjax.train`: parse the command line, validate, train. See --help, --info, --explain."""
import os
import sys


def out_of_memory(error: BaseException) -> bool:
  """XLA's RESOURCE_EXHAUSTED (a jax runtime error, raised when a program is compiled or run,
  maybe wrapped by another error, e.g. an Orbax save) or the host's MemoryError."""
  while error is not None:
    text = str(error).lower()
    if isinstance(error, MemoryError) or any(
        m in text for m in ("resource_exhausted", "out of memory", "out_of_memory")):
      return True
    error = error.__cause__ or error.__context__
  return False


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    from gptjax.cli import help_text
    print(help_text())
    return 0
  if any(a in ("--info", "--explain", "--check_only") for a in argv[1:]):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # these never touch an accelerator
  from gptjax import cli
  from gptjax.config import ConfigError
  try:
    config, explicit, actions, log_file = cli.parse(argv)
    if "info" in actions or "explain" in actions:
      from gptjax import docs
      print(docs.info() if "info" in actions else docs.explain())
      return 0
    from gptjax import sharding, trainer, xla_flags
    if "check_only" in actions:
      trainer.check(config, explicit)
      return 0
    xla_flags.set_defaults()  # before the first device call, as both must be
    sharding.initialize_distributed(config)
    result = trainer.train_and_evaluate(config, explicit=explicit, log_file=log_file)
  except ConfigError as e:
    cli.fail(str(e))
  except KeyboardInterrupt:
    print("Interrupted.", file=sys.stderr)
    return 130
  except Exception as e:
    from gptjax.trainer import NonFiniteError
    if isinstance(e, NonFiniteError):
      print(f"error: {e}", file=sys.stderr)
      return 1
    if out_of_memory(e):
      print(f"error: out of memory (batch_size {config.batch_size}, max_seq_len "
            f"{config.max_seq_len}, model {config.model_preset or 'manual'}, d_model "
            f"{config.d_model} x {config.num_layers} layers); lower --batch_size (try 16, then 8) "
            "or --max_seq_len, use a smaller --model_preset, or add --remat",
            file=sys.stderr)
      return 1
    raise
  if result.get("status") == "interrupted":
    return 128 + result["signal"]
  return 0


if __name__ == "__main__":
  sys.exit(main())
