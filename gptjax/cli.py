"""Command line -> resolved config: `--config FILE`, `--config.FIELD=VALUE` and the guide's flags.

Every option of the PyTorch trainer's `train_lm.py` is accepted verbatim as an alias of a config
field (`--lr 6e-4` is `--config.lr=6e-4`); `--model_preset X` is `--config configs/X.py`.
The same field given two different values two ways is an error naming both.
"""
import os
import sys

from absl import flags
from ml_collections import config_flags

from gptjax import config as config_lib
from gptjax.config import FIELDS, ConfigError

DEFAULT_CONFIG = os.path.join(config_lib.CONFIGS_DIR, "default.py")

# Guide flags that are config fields under their own name.
ALIASES = ("dataset", "tokenizer", "max_samples", "epochs", "batch_size", "lr", "warmup_steps",
           "weight_decay", "min_lr_ratio", "gradient_clip", "d_model", "num_heads", "num_layers",
           "d_ff", "max_seq_len", "dropout", "snapshot_interval", "keep_last_n_snapshots",
           "delete_snapshots_after_training", "gradient_monitor", "gradient_monitor_interval",
           "weight_monitor", "weight_monitor_interval", "weight_monitor_sample_size",
           "sanity_check_interval", "early_stopping", "early_stop_patience",
           "early_stop_min_delta", "early_stop_overfit_patience", "early_stop_overfit_min_delta",
           "resume", "checkpoint_file", "yes", "output_dir", "seed")
# Guide flags that set a boolean field to False.
NEGATIONS = {"no_delete_snapshots_after_training": "delete_snapshots_after_training",
             "no_early_stop_restore_best": "early_stop_restore_best"}
ACTIONS = {"info": "print the comprehensive documentation and exit",
           "explain": "print a short explanation with runnable examples and exit",
           "check_only": "validate the options (nothing is written) and exit"}


def _define_flags(fv: flags.FlagValues, argv) -> None:
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "config file (configs/*.py)",
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  fv_kw = {"flag_values": fv}
  flags.DEFINE_enum("model_preset", None, list(config_lib.PRESETS),
                    "preset: same as --config configs/<preset>.py", **fv_kw)
  for name in ALIASES:
    default, help_text = FIELDS[name]
    define = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer,
              float: flags.DEFINE_float, str: flags.DEFINE_string}[type(default)]
    define(name, None, help_text, short_name="y" if name == "yes" else None, **fv_kw)
  for name, field in NEGATIONS.items():
    flags.DEFINE_boolean(name, False, f"set {field} to False", **fv_kw)
  for name, help_text in ACTIONS.items():
    flags.DEFINE_boolean(name, False, help_text, **fv_kw)
  flags.DEFINE_string("log_file", "", "write nothing but stdout (the launcher's nohup log)",
                      **fv_kw)


def _config_overrides(argv) -> dict:
  """{field: raw text} of every --config.FIELD=VALUE / --config.FIELD VALUE on the command line."""
  out = {}
  for i, arg in enumerate(argv):
    if arg.startswith("--config."):
      name, eq, value = arg[len("--config."):].partition("=")
      out[name] = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
  return out


def _preset_argv(argv) -> list:
  """Rewrites --model_preset X into --config configs/X.py (unless --config is also given)."""
  preset = None
  for i, arg in enumerate(argv):
    if arg == "--model_preset" and i + 1 < len(argv):
      preset = argv[i + 1]
    elif arg.startswith("--model_preset="):
      preset = arg.split("=", 1)[1]
  has_config = any(a == "--config" or a.startswith("--config=") for a in argv)
  if preset is None or has_config:
    return list(argv)
  return [argv[0], f"--config={config_lib.preset_path(preset)}"] + list(argv[1:])


def parse(argv):
  """(config, explicit_fields, actions, log_file); raises ConfigError on any bad input."""
  argv = _preset_argv(argv)
  fv = flags.FlagValues()
  _define_flags(fv, argv)
  try:
    rest = fv(argv)
  except flags.Error as e:
    raise ConfigError(str(e).splitlines()[0]) from None
  except Exception as e:  # config_flags: unknown field in a locked config, bad file, ...
    raise ConfigError(f"config: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
        from None
  if len(rest) > 1:
    raise ConfigError(f"unexpected argument {rest[1]!r}; options look like --name value")
  config = fv.config
  base = config_lib.base_config()
  explicit = {k for k in FIELDS if config[k] != base[k]}   # set by the config file
  overrides = _config_overrides(argv)
  explicit |= set(overrides)
  if len(argv) > 1 and any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
    explicit |= set(config_lib.ARCH_FIELDS) - {"tokenizer"}  # a config file names an architecture
  given = {name: fv[name].value for name in ALIASES if fv[name].present}
  given.update({field: False for name, field in NEGATIONS.items() if fv[name].value})
  if fv["model_preset"].present:
    if config.model_preset and config.model_preset != fv.model_preset:
      raise ConfigError(f"model_preset: given as {fv.model_preset!r} and, through --config, as "
                        f"{config.model_preset!r}; give one")
    given["model_preset"] = fv.model_preset
  for field, value in given.items():
    if field in overrides and config[field] != value:
      raise ConfigError(f"{field}: given two values, --{field}={value!r} and "
                        f"--config.{field}={overrides[field]}; give one")
    config[field] = value
    explicit.add(field)
  actions = {name for name in ACTIONS if fv[name].value}
  return config, frozenset(explicit), actions, fv.log_file


def help_text() -> str:
  lines = ["usage: python -m gptjax.train [--config FILE | --model_preset tiny|small|medium] "
           "[--FIELD VALUE ...] [--config.FIELD=VALUE ...]",
           "",
           "Every option below is a config field: --lr 6e-4 and --config.lr=6e-4 are the same.",
           "Booleans: --gradient_monitor / --nogradient_monitor (or =true/false).", "",
           "options (default: description):"]
  lines.append(f"  --config FILE                       (configs/default.py): config file")
  lines.append(f"  --model_preset {{tiny,small,medium}}  (none): same as --config configs/X.py")
  for name, (default, text) in FIELDS.items():
    if name == "model_preset":
      continue
    lines.append(f"  --{name:<34}({default!r}): {text}")
  for name, field in NEGATIONS.items():
    lines.append(f"  --{name:<34}: set {field} to False")
  lines.append(f"  {'-y, --yes':<36}: same as --yes")
  for name, text in ACTIONS.items():
    lines.append(f"  --{name:<34}: {text}")
  lines.append(f"  {'-h, --help':<36}: show this help and exit")
  return "\n".join(lines)


def fail(message: str) -> "NoReturn":
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)
