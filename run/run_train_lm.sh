#!/usr/bin/env bash
# Launch gptjax language-model training in the background (nohup), with a timestamped log.
#
#   ./run/run_train_lm.sh [OPTIONS] [-- TRAINER_FLAGS...]
#
# Maps the wrapper options onto `python -m gptjax.train`, validates everything in the
# foreground (bash shape checks, then `python -m gptjax.train ... --check_only`), and only
# then starts training with nohup. Run `./run/run_train_lm.sh --help` for the options.
#
# Exit codes: 0 started, or finished within the first seconds (or --help),
#             2 bad option/value (nothing started),
#             1 environment problem (no python, trainer import failure; nothing started),
#               or the run failed within its first seconds (its log's last lines are printed).
set -euo pipefail

PROG="run_train_lm.sh"

PRESETS="tiny small medium"
HUB_DATASETS="wikitext wikitext-103"
STARTUP_WATCH_S=5   # a run that ends this soon after nohup is reported, not left to the log

# ----------------------------------------------------------------------------- locations
CALLER_PWD="$(pwd -P)"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
PROJECT_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd -P)"

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "${PROJECT_ROOT}/.venv/bin/python" ]]; then
  PY="${PROJECT_ROOT}/.venv/bin/python"
elif [[ -x "${PROJECT_ROOT}/venv/bin/python" ]]; then
  PY="${PROJECT_ROOT}/venv/bin/python"
else
  PY="python3"
fi

# The defaults are the trainer's own (gptjax/config.py), asked for --help rather than copied
# here: a copy drifted from them (warmup 0 against 1000, snapshots 10000 against 0). Without a
# working Python, --help names the fields without their values.
declare -A TRAINER_DEFAULT=()
load_trainer_defaults() {
  local line
  while IFS= read -r line; do
    TRAINER_DEFAULT[${line%%=*}]="${line#*=}"
  done < <(cd "$PROJECT_ROOT" && PYTHONPATH="${PROJECT_ROOT}${PYTHONPATH:+:${PYTHONPATH}}" \
    "$PY" -c 'import sys; from gptjax.config import FIELDS
for f in sys.argv[1:]: print(f"{f}={FIELDS[f][0]}")' "$@" 2>/dev/null || true)
}
default_of() {  # default_of FIELD...: "FIELD=VALUE, ..." as the trainer has them
  local f out=""
  for f in "$@"; do out+="${out:+, }${f}${TRAINER_DEFAULT[$f]+=${TRAINER_DEFAULT[$f]}}"; done
  printf '%s' "$out"
}

usage() {
  load_trainer_defaults dataset epochs batch_size lr warmup_steps snapshot_interval \
    gradient_monitor gradient_monitor_interval weight_monitor weight_monitor_interval \
    sanity_check_interval
  cat <<EOF
Usage: ./run/run_train_lm.sh [OPTIONS] [-- TRAINER_FLAGS...]

Train the gptjax GPT language model in the background (nohup) with a timestamped log.
Works from any directory; paths you give are taken relative to your current directory.

Every default is the trainer's (python -m gptjax.train --help), or the preset's where a preset
sets the field: the launcher passes on only the options you type.

Options:
  --preset PRESET             model preset: tiny | small | medium
                              (default: none, the trainer's manual configuration)
  --dataset DATASET           wikitext (WikiText-2) | wikitext-103 | hf:NAME[:CONFIG] (a hub
                              dataset with a text column) | a folder of .txt, .jsonl or
                              .parquet files per split (train.txt, valid.txt, test.txt, ...)
                              (default: the preset's, else the trainer's $(default_of dataset))
  --epochs N                  passes over the training data, positive integer
                              (default: the trainer's $(default_of epochs))
  --batch_size N              sequences per optimizer step, positive integer
                              (default: the trainer's $(default_of batch_size))
  --lr RATE                   peak learning rate, e.g. 3e-4, 6e-4
                              (default: the trainer's $(default_of lr))
  --warmup STEPS              linear LR warmup steps, 0 disables
                              (default: the trainer's $(default_of warmup_steps))
  --snapshot N                save a snapshot every N steps, 0 = only at epoch ends
                              (default: the trainer's $(default_of snapshot_interval))
  --monitor_interval N        steps between gradient/weight monitor reports; turns both
                              monitors on (default: the trainer's
                              $(default_of gradient_monitor gradient_monitor_interval),
                              $(default_of weight_monitor weight_monitor_interval))
  --sanity_check_interval N   steps between NaN/Inf checks, 0 disables
                              (default: the trainer's $(default_of sanity_check_interval))
  -h, --help                  show this help and exit
  --                          pass every following flag unchanged to python -m gptjax.train,
                              e.g. -- --max_samples 100 --d_model 64 --output_dir DIR
                              (see: python -m gptjax.train --help)

Runs (new and resumed alike):
  python -m gptjax.train [--model_preset P] [--dataset D] [--epochs N] [--batch_size N]
      [--lr X] [--warmup_steps N] [--snapshot_interval N] [--gradient_monitor
      --gradient_monitor_interval N --weight_monitor --weight_monitor_interval N]
      [--sanity_check_interval N] [TRAINER_FLAGS...] --output_dir DIR
      --log_file DIR/logs/train_TIMESTAMP.log
  with only the options you typed; DIR is the run directory the trainer's --check_only names.

Output directory: as the trainer names it, result/lm_{dataset name} in the project root (the
dataset you give, else the preset's, else the trainer's; a dataset folder's base name), unless
--output_dir is given after --. The log is DIR/logs/train_TIMESTAMP.log,
e.g. train_2026FEB15_215234_GMT+00.log.

Resuming: pass -- --resume --yes (or -- --checkpoint_file PATH --yes; any spelling the trainer
accepts, e.g. --resume=true, --config.resume). A resumed run gets only the options you typed,
as a new one does: the trainer takes everything else from the snapshot. The run directory is
found as for a new run: give the same --preset and --dataset (or --output_dir) as the run you
resume.

Before starting, \`--check_only\` validates the options, the dataset's files, the tokenizer and
the snapshot to resume. After starting, the launcher watches the run for ${STARTUP_WATCH_S} s: a run that
fails in that time (e.g. a snapshot that does not restore) is reported with its log's last
lines, exit 1; one that finishes in that time, exit 0.

Python: \$PYTHON if set, else the project's .venv/ or venv/ python, else python3.

Examples:
  ./run/run_train_lm.sh --preset small
  ./run/run_train_lm.sh --preset tiny --dataset wikitext --epochs 10
  ./run/run_train_lm.sh --preset small --warmup 4000 --lr 6e-4 --snapshot 5000
  ./run/run_train_lm.sh --preset tiny -- --max_samples 100 --d_model 64
  ./run/run_train_lm.sh --dataset wikitext -- --resume --yes
  # the guide's launcher defaults, where the trainer's differ:
  ./run/run_train_lm.sh --warmup 0 --snapshot 10000 --monitor_interval 10000 \\
      --sanity_check_interval 10000
EOF
}

die() {  # die CODE MESSAGE: one line on stderr, nothing started
  echo "${PROG}: error: $2" >&2
  exit "$1"
}

# A path the user typed, made usable after we cd to the project root.
from_caller() {
  local p="$1"
  if [[ -z "$p" || "$p" == /* || "$CALLER_PWD" == "$PROJECT_ROOT" ]]; then
    printf '%s' "$p"
  else
    printf '%s' "${CALLER_PWD}/${p}"
  fi
}

is_hub_dataset() {
  local d
  for d in $HUB_DATASETS; do [[ "$1" == "$d" ]] && return 0; done
  return 1
}

# A dataset name stays a name; a folder path is made usable from the project root.
resolve_dataset() {
  local d="$1"
  if is_hub_dataset "$d" || [[ "$d" == /* ]]; then
    printf '%s' "$d"
  elif [[ "$CALLER_PWD" != "$PROJECT_ROOT" && -d "${CALLER_PWD}/${d}" ]]; then
    (cd "${CALLER_PWD}/${d}" && pwd -P)
  else
    printf '%s' "$d"   # not found: left for the trainer's validation to report
  fi
}

# ----------------------------------------------------------------------------- parse
PASSTHROUGH=()
declare -A TYPED=()   # the wrapper options given on the command line, with their values

while [[ $# -gt 0 ]]; do
  arg="$1"
  case "$arg" in
    -h|--help)
      usage
      exit 0
      ;;
    --)
      shift
      PASSTHROUGH=("$@")
      break
      ;;
    --preset|--dataset|--epochs|--batch_size|--lr|--warmup|--snapshot|--monitor_interval|--sanity_check_interval)
      [[ $# -ge 2 ]] || die 2 "option ${arg} needs a value (see --help)"
      TYPED[${arg#--}]="$2"
      shift 2
      ;;
    --preset=*|--dataset=*|--epochs=*|--batch_size=*|--lr=*|--warmup=*|--snapshot=*|--monitor_interval=*|--sanity_check_interval=*)
      opt="${arg%%=*}"
      TYPED[${opt#--}]="${arg#*=}"
      shift
      ;;
    -*)
      die 2 "unknown option '${arg}'; trainer flags go after '--' (see --help)"
      ;;
    *)
      die 2 "unexpected argument '${arg}' (see --help)"
      ;;
  esac
done
typed() { [[ -n "${TYPED[$1]+set}" ]]; }

# ----------------------------------------------------------------------------- shape checks
# Only of typed values: everything else is the trainer's, and its --check_only validates it all.
need_positive_int() {
  [[ "$2" =~ ^[0-9]+$ && "$2" =~ [1-9] ]] || die 2 "--$1: '$2' is not allowed; must be a positive integer"
}
need_nonneg_int() {
  [[ "$2" =~ ^[0-9]+$ ]] || die 2 "--$1: '$2' is not allowed; must be 0 or a positive integer"
}

if typed preset; then
  ok=0
  for p in $PRESETS; do [[ "${TYPED[preset]}" == "$p" ]] && ok=1; done
  [[ $ok -eq 1 ]] || die 2 "--preset: '${TYPED[preset]}' is not allowed; allowed: ${PRESETS// /, }"
fi
if typed dataset; then
  [[ -n "${TYPED[dataset]}" ]] || die 2 "--dataset: must not be empty"
fi
for opt in epochs batch_size monitor_interval; do
  typed "$opt" && need_positive_int "$opt" "${TYPED[$opt]}"
done
for opt in warmup snapshot sanity_check_interval; do
  typed "$opt" && need_nonneg_int "$opt" "${TYPED[$opt]}"
done
if typed lr; then
  [[ "${TYPED[lr]}" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] \
    || die 2 "--lr: '${TYPED[lr]}' is not allowed; must be a non-negative number such as 3e-4"
fi

typed dataset && TYPED[dataset]="$(resolve_dataset "${TYPED[dataset]}")"

# Trainer flags after `--`, in every spelling absl accepts (-x, --x, --config.x; =VALUE or a
# separate VALUE): make path values usable from the project root, and note a log file given
# (the last one wins).
USER_LOG_FILE=""
for ((i = 0; i < ${#PASSTHROUGH[@]}; i++)); do
  a="${PASSTHROUGH[$i]}"
  [[ "$a" == -?* ]] || continue
  flag="${a%%=*}"
  name="${flag#-}"
  name="${name#-}"
  case "$name" in
    dataset|output_dir|log_file|checkpoint_file|data_cache_dir) ;;
    config.dataset|config.output_dir|config.checkpoint_file|config.data_cache_dir)
      name="${name#config.}"
      ;;
    *)
      continue
      ;;
  esac
  if [[ "$a" == *=* ]]; then
    j=$i
    v="${a#*=}"
  else
    [[ $((i + 1)) -lt ${#PASSTHROUGH[@]} ]] || die 2 "trainer option ${a} needs a value"
    j=$((i + 1))
    v="${PASSTHROUGH[$j]}"
  fi
  if [[ "$name" == dataset ]]; then
    v="$(resolve_dataset "$v")"
  else
    v="$(from_caller "$v")"
  fi
  [[ "$name" == log_file ]] && USER_LOG_FILE="$v"
  if [[ $j -eq $i ]]; then
    PASSTHROUGH[$j]="${flag}=${v}"
  else
    PASSTHROUGH[$j]="$v"
    i=$j
  fi
done

# ----------------------------------------------------------------------------- environment
cd "$PROJECT_ROOT"
export PYTHONPATH="${PROJECT_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1
command -v "$PY" >/dev/null 2>&1 || die 1 "python interpreter '${PY}' not found (set PYTHON)"

abs_path() {  # absolute form of a path relative to the project root (for the printed commands)
  if [[ "$1" == /* ]]; then printf '%s' "$1"; else printf '%s' "${PROJECT_ROOT}/$1"; fi
}

# ----------------------------------------------------------------------------- command
# Only what the user typed, for a new run as for a resumed one: the trainer's config (or the
# preset, or the snapshot being resumed) decides everything else.
CMD=("$PY" -m gptjax.train)
typed preset && CMD+=(--model_preset "${TYPED[preset]}")
typed dataset && CMD+=(--dataset "${TYPED[dataset]}")
typed epochs && CMD+=(--epochs "${TYPED[epochs]}")
typed batch_size && CMD+=(--batch_size "${TYPED[batch_size]}")
typed lr && CMD+=(--lr "${TYPED[lr]}")
typed warmup && CMD+=(--warmup_steps "${TYPED[warmup]}")
typed snapshot && CMD+=(--snapshot_interval "${TYPED[snapshot]}")
typed monitor_interval && CMD+=(
  --gradient_monitor --gradient_monitor_interval "${TYPED[monitor_interval]}"
  --weight_monitor --weight_monitor_interval "${TYPED[monitor_interval]}")
typed sanity_check_interval && CMD+=(--sanity_check_interval "${TYPED[sanity_check_interval]}")
[[ ${#PASSTHROUGH[@]} -gt 0 ]] && CMD+=("${PASSTHROUGH[@]}")

# ----------------------------------------------------------------------------- validate (foreground)
set +e
# stdin as the background run will have it (none): a resume without --yes is refused here.
CHECK_OUT="$("${CMD[@]}" --check_only 2>&1 </dev/null)"
CHECK_RC=$?
set -e
if [[ $CHECK_RC -ne 0 ]]; then
  last="$(printf '%s\n' "$CHECK_OUT" | sed -e '/^[[:space:]]*$/d' | tail -n 1)"
  last="${last#error: }"  # the trainer's own prefix; die adds ours
  [[ -n "$last" ]] || last="python -m gptjax.train --check_only failed with exit code ${CHECK_RC}"
  if [[ $CHECK_RC -eq 2 ]]; then
    die 2 "$last"
  fi
  die 1 "configuration check failed (exit ${CHECK_RC}): ${last}"
fi
# The run directory as the trainer resolves it (--output_dir, else result/lm_{dataset} of the
# dataset given, the preset's or the trainer's default), from --check_only's last line.
OUTPUT_DIR="$(printf '%s\n' "$CHECK_OUT" | sed -n -e 's/^output_dir: \(\/.*\)$/\1/p' | tail -n 1)"
[[ -n "$OUTPUT_DIR" ]] || die 1 \
  "python -m gptjax.train --check_only did not name the run directory (no 'output_dir: PATH' line)"

# ----------------------------------------------------------------------------- launch
if [[ -n "$USER_LOG_FILE" ]]; then
  LOG_FILE="$USER_LOG_FILE"
  mkdir -p "$(dirname -- "$LOG_FILE")" 2>/dev/null \
    || die 1 "cannot create the log folder $(abs_path "$(dirname -- "$LOG_FILE")")"
else
  TIMESTAMP="$(LC_ALL=C date -u +%Y%b%d_%H%M%S | tr '[:lower:]' '[:upper:]')_GMT+00"
  LOG_STEM="${OUTPUT_DIR}/logs/train_${TIMESTAMP}"
  mkdir -p "${OUTPUT_DIR}/logs" 2>/dev/null \
    || die 1 "cannot create the log folder ${OUTPUT_DIR}/logs"
  # Taken atomically (noclobber creates with O_EXCL): two launches in one second, even at once,
  # get two files.
  LOG_N=0
  LOG_FILE="${LOG_STEM}.log"
  until (set -o noclobber; : >"$LOG_FILE") 2>/dev/null; do
    [[ -e "$LOG_FILE" ]] || die 1 "cannot create the log file ${LOG_FILE}"
    LOG_N=$((LOG_N + 1))
    LOG_FILE="${LOG_STEM}_${LOG_N}.log"
  done
fi
CMD+=(--output_dir "$OUTPUT_DIR" --log_file "$LOG_FILE")
{
  printf '# %s: started %s in %s\n' "$PROG" "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" "$PROJECT_ROOT"
  printf '# command:'
  printf ' %q' "${CMD[@]}"
  printf '\n'
} >>"$LOG_FILE"
nohup "${CMD[@]}" >>"$LOG_FILE" 2>&1 </dev/null &
PID=$!

# What --check_only cannot see (a snapshot that does not restore, a tokenizer download, memory)
# fails in the first seconds: watch for it, so that a dead run is not reported as started.
micros() {  # EPOCHREALTIME from bash 5 on, its separator following the locale
  local now="${EPOCHREALTIME:-$(date +%s.%6N)}"
  printf '%s' "${now//[!0-9]/}"
}
deadline=$(($(micros) + STARTUP_WATCH_S * 1000000))
while kill -0 "$PID" 2>/dev/null && [[ $(micros) -lt $deadline ]]; do
  sleep 0.1
done
STATUS=""
if ! kill -0 "$PID" 2>/dev/null; then
  set +e
  wait "$PID"
  STATUS=$?
  set -e
fi

LOG_ABS="$(abs_path "$LOG_FILE")"
if [[ -n "$STATUS" && "$STATUS" -ne 0 ]]; then
  {
    echo "${PROG}: error: training exited with status ${STATUS} within ${STARTUP_WATCH_S} s of starting; the log ends:"
    { grep -v '^# \|^nohup: ' "$LOG_FILE" || true; } | sed -e '/^[[:space:]]*$/d' | tail -n 15 \
      | sed -e 's/^/    /'
    echo "  Log: ${LOG_ABS}"
  } >&2
  exit 1
fi
if [[ -n "$STATUS" ]]; then
  echo "Training finished within ${STARTUP_WATCH_S} s of starting (exit status 0)."
else
  echo "Training started in the background."
fi
echo "  PID:        ${PID}"
echo "  Log:        ${LOG_ABS}"
echo "  Output dir: ${OUTPUT_DIR}"
printf '  Command:   '
printf ' %q' "${CMD[@]}"
printf '\n\n'
if [[ -z "$STATUS" ]]; then
  echo "Follow the log:      tail -f $(printf '%q' "$LOG_ABS")"
  echo "Check the process:   ps -p ${PID}"
  echo "Stop training:       kill ${PID}"
fi
echo "TensorBoard:         tensorboard --logdir $(printf '%q' "${OUTPUT_DIR}/tensorboard")"
