"""`python -m gptjax.train`: parse the command line, validate, train. See --help, --info, --explain."""
import os
import sys


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    from gptjax.cli import help_text
    print(help_text())
    return 0
  if any(a in ("--info", "--explain") for a in argv[1:]):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # documentation never touches an accelerator
  from gptjax import cli
  from gptjax.config import ConfigError
  try:
    config, explicit, actions, log_file = cli.parse(argv)
    if "info" in actions or "explain" in actions:
      from gptjax import docs
      print(docs.info() if "info" in actions else docs.explain())
      return 0
    if "check_only" in actions:
      from gptjax.config import validate
      validate(config)
      return 0
    from gptjax import trainer
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
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      print("error: out of device memory; lower --batch_size (try 16, then 8), --max_seq_len, "
            "or use a smaller --model_preset (or turn on --config.remat=true)", file=sys.stderr)
      return 1
    raise
  if result.get("status") == "interrupted":
    return 128 + result["signal"]
  return 0


if __name__ == "__main__":
  sys.exit(main())
