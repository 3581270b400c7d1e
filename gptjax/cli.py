"""Command line -> resolved config: `--config FILE`, `--config.FIELD=VALUE` and the guide's flags.

Every option of the PyTorch trainer's `train_lm.py` is accepted verbatim as an alias of a config
field (`--lr 6e-4` is `--config.lr=6e-4`); `--model_preset X` is `--config configs/X.py`.
The same field given two different values two ways is an error naming both.
"""
import os
import re
import sys
from typing import NoReturn
import textwrap

from absl import flags
from ml_collections import config_flags

from gptjax import config as config_lib
from gptjax.config import FIELDS, ConfigError

DEFAULT_CONFIG = os.path.join(config_lib.CONFIGS_DIR, "default.py")

# Every config field is also a flag under its own name: the guide's flags, and the rest.
ALIASES = tuple(name for name in FIELDS if name != "model_preset")
# Guide flags that set a boolean field to False.
NEGATIONS = {"no_delete_snapshots_after_training": "delete_snapshots_after_training",
             "no_early_stop_restore_best": "early_stop_restore_best"}
ACTIONS = {"info": "print the comprehensive documentation and exit",
           "explain": "print a short explanation with runnable examples and exit",
           "check_only": "validate the options (nothing is written), print the run directory "
                         "(output_dir: PATH) and exit"}


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


def _last_value(argv, name: str):
  """The value of the last `--name VALUE` / `--name=VALUE` on the command line, or None."""
  value = None
  for i, arg in enumerate(argv):
    if arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
  return value


def _config_file(argv) -> str:
  return _last_value(argv, "config") or DEFAULT_CONFIG


def _preset_argv(argv) -> list:
  """Rewrites --model_preset X into --config configs/X.py (unless --config is also given)."""
  preset = _last_value(argv, "model_preset")
  has_config = any(a == "--config" or a.startswith("--config=") for a in argv)
  if preset is None or has_config:
    return list(argv)
  return [argv[0], f"--config={config_lib.preset_path(preset)}"] + list(argv[1:])


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
_METAVARS = {int: "N", float: "X", str: "TEXT"}


def _flag_error(e: flags.Error) -> str:
  """absl's flag error as one line naming the option, the value and what is allowed."""
  text = str(e).splitlines()[0]
  if isinstance(e, flags.UnrecognizedFlagError):
    name = e.flagvalue.split("=", 1)[0] if e.flagvalue else f"--{e.flagname}"
    hint = text.partition("Did you mean: ")[2].rstrip(" ?")
    return (f"{e.flagname}: unknown option {name}; "
            + (f"did you mean --{hint}? " if hint else "")
            + "python -m gptjax.train --help lists the options")
  bad_value = re.match(r"flag --([\w.]+)=(.*?): ", text)
  if bad_value:
    name, value = bad_value.groups()
    field = name.removeprefix("config.")
    if field in FIELDS:
      kind = _KINDS[type(FIELDS[field][0])]
      return f"{field}: {value!r} is not allowed; must be {kind}"
  missing = re.match(r"Missing value for flag --([\w.]+)", text)
  if missing:
    return f"{missing.group(1).removeprefix('config.')}: the option needs a value"
  return text


def _no_arguments(rest) -> None:
  """absl leaves the program name and any positional argument: a positional is a mistake."""
  if len(rest) > 1:
    raise ConfigError(f"unexpected argument {rest[1]!r}; options look like --name value")


def parse_flags_and_arguments(argv, define, usage: str, names=()):
  """(a fresh absl FlagValues with `define`'s flags parsed from `argv`, the positional arguments),
  exactly one per entry of `names` (the tools' commands); errors are ConfigError. -h/--help
  prints the flags and exits 0."""
  fv = flags.FlagValues()
  define(fv)
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    print(f"usage: {usage}\n{fv.get_help(include_special_flags=False)}")
    sys.exit(0)
  try:
    rest = fv(argv)
  except flags.Error as e:
    raise ConfigError(str(e).splitlines()[0]) from None
  arguments = rest[1:]
  if len(arguments) < len(names):
    raise ConfigError(f"{names[len(arguments)]}: missing; usage: {usage}")
  _no_arguments(rest[len(names):])
  return fv, arguments


def parse_flags(argv, define, usage: str) -> flags.FlagValues:
  """parse_flags_and_arguments for a command that takes no positional argument (evaluate,
  generate)."""
  return parse_flags_and_arguments(argv, define, usage)[0]


def parse(argv):
  """(config, explicit_fields, actions, log_file); raises ConfigError on any bad input."""
  argv = _preset_argv(argv)
  overrides = _config_overrides(argv)
  for name in overrides:  # config_flags would raise a bare AttributeError for these
    if name not in FIELDS:
      raise ConfigError(f"{name}: unknown config field (--config.{name}); "
                        "python -m gptjax.train --help lists the fields")
  fv = flags.FlagValues()
  try:
    _define_flags(fv, argv)  # config_flags applies the --config.FIELD overrides here
    rest = fv(argv)
    config = fv.config
    config.to_dict()  # a config file that failed to load raises on first use: here, not later
  except flags.Error as e:
    raise ConfigError(_flag_error(e)) from None
  except Exception as e:  # config_flags: a missing or broken config file
    path = _config_file(argv)
    lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
    reason = lines[-1] if os.path.isfile(path) else "no such file"
    raise ConfigError(f"config: cannot load {path!r} ({reason}); give a file like "
                      "configs/small.py") from None
  _no_arguments(rest)
  base = config_lib.base_config()
  explicit = {k for k in FIELDS if config[k] != base[k]}   # set by the config file
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


def help_text(width: int = 100) -> str:
  """Every option with its default and a one-line description."""
  col = 38

  def entry(name, text):
    if len(name) >= col - 3:  # too long for the column: the text starts on the next line
      return f"  {name}\n" + textwrap.fill(text, width, initial_indent=" " * col,
                                           subsequent_indent=" " * col, break_on_hyphens=False)
    return textwrap.fill(text, width, initial_indent=f"  {name:<{col - 3}} ",
                         subsequent_indent=" " * col, break_on_hyphens=False)

  lines = ["usage: python -m gptjax.train [--config FILE | --model_preset tiny|small|medium]",
           "                              [--FIELD VALUE ...] [--config.FIELD=VALUE ...]",
           "",
           "Every option is a config field: --lr 6e-4 and --config.lr=6e-4 are the same.",
           "Booleans: --gradient_monitor, --nogradient_monitor, or --gradient_monitor=false.",
           "python -m gptjax.train --info documents the model, presets, monitors and resume.",
           "",
           "options:",
           entry("--config FILE", "config file, e.g. configs/small.py (default: "
                 "configs/default.py, the manual configuration)"),
           entry("--model_preset PRESET", f"{' | '.join(config_lib.PRESETS)}: the same as "
                 "--config configs/PRESET.py (default: none)")]
  for name, (default, text) in FIELDS.items():
    if name == "model_preset":
      continue
    flag = "-y, --yes" if name == "yes" else f"--{name}"
    if not isinstance(default, bool):
      flag += f" {_METAVARS[type(default)]}"
    lines.append(entry(flag, f"{text} (default: {default!r})"))
  for name, field in NEGATIONS.items():
    lines.append(entry(f"--{name}", f"set {field} to False"))
  lines.append(entry("--log_file PATH", "stdout already goes to this log file (as in the "
                     "launcher's nohup): write no log file of our own (default: none)"))
  for name, text in ACTIONS.items():
    lines.append(entry(f"--{name}", text))
  lines.append(entry("-h, --help", "show this help and exit"))
  return "\n".join(lines)


def fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def entry_point(run, argv=None) -> int:
  """`python -m gptjax.<tool>`: run(argv); a ConfigError is one line on stderr and exit code 2."""
  try:
    run(list(sys.argv if argv is None else argv))
  except ConfigError as e:
    fail(str(e))
  return 0
