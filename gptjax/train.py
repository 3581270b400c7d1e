"""`python -m gptjax.train`: parse the command line, validate, train. See --help, --info, --explain."""
import errno
import os
import sys

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _chain(error: BaseException):
  """`error` and the errors it was raised from or during."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def disk_full(error: BaseException) -> str | None:
  """The path (or '') of a write that found the disk full or over quota, else None. Checked
  before out_of_memory: the storage layer reports a full disk as RESOURCE_EXHAUSTED too."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
      return e.filename or ""
    if any(m in str(e).lower() for m in ("no space left on device", "disk quota exceeded")):
      return ""
  return None


def os_error(error: BaseException) -> OSError | None:
  """The first OSError with a path in `error`'s chain (a file that could not be written or
  read), else None."""
  return next((e for e in _chain(error) if isinstance(e, OSError) and e.filename), None)


def out_of_memory(error: BaseException) -> bool:
  """XLA's RESOURCE_EXHAUSTED (a jax runtime error, raised when a program is compiled or run,
  maybe wrapped by another error, e.g. an Orbax save) or the host's MemoryError."""
  return any(isinstance(e, MemoryError) or any(
      m in str(e).lower() for m in ("resource_exhausted", "out of memory", "out_of_memory"))
      for e in _chain(error))


def ask(question: str) -> bool:
  """The terminal's answer to a yes/no question (no is the default)."""
  return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


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
    from gptjax import sharding, trainer
    at_terminal = sys.stdin.isatty()
    if "check_only" in actions:
      trainer.check(config, explicit, can_ask=at_terminal)
      # The run directory as resolved (absolute): the launcher names its log after it.
      print(f"output_dir: {config.output_dir}")
      return 0
    sharding.initialize_distributed(config)
    result = trainer.train_and_evaluate(config, explicit=explicit, log_file=log_file,
                                        confirm=ask if at_terminal else None)
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
    full = disk_full(e)
    if full is not None:
      print(f"error: disk full{f' writing {full}' if full else ''} (output_dir "
            f"{config.output_dir}); free space, then run the same command with --resume --yes: "
            "what was saved before is intact", file=sys.stderr)
      return 1
    failed_io = os_error(e)
    if failed_io is not None:
      print(f"error: {failed_io.strerror or type(failed_io).__name__}: {failed_io.filename}",
            file=sys.stderr)
      return 1
    if out_of_memory(e):
      print(f"error: out of memory (batch_size {config.batch_size}, max_seq_len "
            f"{config.max_seq_len}, model {config.model_preset or 'manual'}, d_model "
            f"{config.d_model} x {config.num_layers} layers); lower --batch_size (try 16, then 8; "
            "--grad_accum_steps 2 or 4 keeps the effective batch) or --max_seq_len, use a "
            "smaller --model_preset, or add --remat",
            file=sys.stderr)
      return 1
    raise
  if result.get("status") == "interrupted":
    return 128 + result["signal"]
  return 0


if __name__ == "__main__":
  sys.exit(main())
