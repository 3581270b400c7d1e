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

# ----------------------------------------------------------------------------- defaults
DEF_PRESET=""
DEF_DATASET="wikitext-103"
DEF_EPOCHS=20
DEF_BATCH_SIZE=32
DEF_LR="3e-4"
DEF_WARMUP=0
DEF_SNAPSHOT=10000
DEF_MONITOR_INTERVAL=10000
DEF_SANITY_CHECK_INTERVAL=10000
PRESETS="tiny small medium"
HUB_DATASETS="wikitext wikitext-103"
STARTUP_WATCH_S=5   # a run that ends this soon after nohup is reported, not left to the log

usage() {
  cat <<EOF
Usage: ./run/run_train_lm.sh [OPTIONS] [-- TRAINER_FLAGS...]

Train the gptjax GPT language model in the background (nohup) with a timestamped log.
Works from any directory; paths you give are taken relative to your current directory.

Options:
  --preset PRESET             model preset: tiny | small | medium (default: none = manual
                              configuration / the trainer's defaults)
  --dataset DATASET           wikitext (WikiText-2) | wikitext-103 | a folder holding
                              train.txt, valid.txt, test.txt (default: ${DEF_DATASET})
  --epochs N                  passes over the training data, positive integer (default: ${DEF_EPOCHS})
  --batch_size N              sequences per optimizer step, positive integer (default: ${DEF_BATCH_SIZE})
  --lr RATE                   peak learning rate, e.g. 3e-4, 6e-4 (default: ${DEF_LR})
  --warmup STEPS              linear LR warmup steps, 0 disables (default: ${DEF_WARMUP})
  --snapshot N                save a snapshot every N steps, 0 = only at epoch ends (default: ${DEF_SNAPSHOT})
  --monitor_interval N        steps between gradient/weight monitor reports; both monitors are
                              enabled (default: ${DEF_MONITOR_INTERVAL})
  --sanity_check_interval N   steps between NaN/Inf checks, 0 disables (default: ${DEF_SANITY_CHECK_INTERVAL})
  -h, --help                  show this help and exit
  --                          pass every following flag unchanged to python -m gptjax.train,
                              e.g. -- --max_samples 100 --d_model 64 --output_dir DIR
                              (see: python -m gptjax.train --help)

Runs (a new run; a resumed one gets only what you typed, see Resuming):
  python -m gptjax.train [--model_preset P] --dataset D --epochs N --batch_size N --lr X
      --warmup_steps N --snapshot_interval N --gradient_monitor --gradient_monitor_interval N
      --weight_monitor --weight_monitor_interval N --sanity_check_interval N
      [TRAINER_FLAGS...] --output_dir DIR --log_file DIR/logs/train_TIMESTAMP.log

Output directory: result/lm_{dataset name} in the project root (a dataset folder's base
name), unless --output_dir is given after --. The log is DIR/logs/train_TIMESTAMP.log,
e.g. train_2026FEB15_215234_GMT+00.log.

Resuming: pass -- --resume --yes (or -- --checkpoint_file PATH --yes; any spelling the trainer
accepts, e.g. --resume=true, --config.resume). A resumed run gets only the options you typed,
wrapper options included: the trainer takes everything else from the snapshot, so the defaults
above apply to new runs only. Without --dataset or --output_dir the output directory is still
result/lm_${DEF_DATASET}: give the same --dataset (or --output_dir) as the run you resume.

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
EOF
}

die() {  # die CODE MESSAGE: one line on stderr, nothing started
  echo "${PROG}: error: $2" >&2
  exit "$1"
}

# ----------------------------------------------------------------------------- locations
CALLER_PWD="$(pwd -P)"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
PROJECT_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd -P)"

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
PRESET="$DEF_PRESET"
DATASET="$DEF_DATASET"
EPOCHS="$DEF_EPOCHS"
BATCH_SIZE="$DEF_BATCH_SIZE"
LR="$DEF_LR"
WARMUP="$DEF_WARMUP"
SNAPSHOT="$DEF_SNAPSHOT"
MONITOR_INTERVAL="$DEF_MONITOR_INTERVAL"
SANITY_CHECK_INTERVAL="$DEF_SANITY_CHECK_INTERVAL"
PASSTHROUGH=()
declare -A TYPED=()   # the wrapper options given on the command line

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
      opt="${arg#--}"
      val="$2"
      shift 2
      ;;
    --preset=*|--dataset=*|--epochs=*|--batch_size=*|--lr=*|--warmup=*|--snapshot=*|--monitor_interval=*|--sanity_check_interval=*)
      opt="${arg%%=*}"
      opt="${opt#--}"
      val="${arg#*=}"
      shift
      ;;
    -*)
      die 2 "unknown option '${arg}'; trainer flags go after '--' (see --help)"
      ;;
    *)
      die 2 "unexpected argument '${arg}' (see --help)"
      ;;
  esac
  case "$opt" in
    preset) PRESET="$val" ;;
    dataset) DATASET="$val" ;;
    epochs) EPOCHS="$val" ;;
    batch_size) BATCH_SIZE="$val" ;;
    lr) LR="$val" ;;
    warmup) WARMUP="$val" ;;
    snapshot) SNAPSHOT="$val" ;;
    monitor_interval) MONITOR_INTERVAL="$val" ;;
    sanity_check_interval) SANITY_CHECK_INTERVAL="$val" ;;
  esac
  TYPED[$opt]=1
done

# ----------------------------------------------------------------------------- shape checks
need_positive_int() {
  [[ "$2" =~ ^[0-9]+$ && "$2" =~ [1-9] ]] || die 2 "--$1: '$2' is not allowed; must be a positive integer"
}
need_nonneg_int() {
  [[ "$2" =~ ^[0-9]+$ ]] || die 2 "--$1: '$2' is not allowed; must be 0 or a positive integer"
}

if [[ -n "$PRESET" ]]; then
  ok=0
  for p in $PRESETS; do [[ "$PRESET" == "$p" ]] && ok=1; done
  [[ $ok -eq 1 ]] || die 2 "--preset: '${PRESET}' is not allowed; allowed: ${PRESETS// /, }"
fi
[[ -n "$DATASET" ]] || die 2 "--dataset: must not be empty"
need_positive_int epochs "$EPOCHS"
need_positive_int batch_size "$BATCH_SIZE"
[[ "$LR" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] \
  || die 2 "--lr: '${LR}' is not allowed; must be a non-negative number such as 3e-4"
need_nonneg_int warmup "$WARMUP"
need_nonneg_int snapshot "$SNAPSHOT"
need_positive_int monitor_interval "$MONITOR_INTERVAL"
need_nonneg_int sanity_check_interval "$SANITY_CHECK_INTERVAL"

DATASET="$(resolve_dataset "$DATASET")"

is_true() {  # absl's spellings of a true boolean
  case "${1,,}" in true|t|1) return 0 ;; *) return 1 ;; esac
}

# Trainer flags after `--`, in every spelling absl accepts (-x, --x, --config.x; =VALUE or a
# separate VALUE): make path values usable from the project root, and note the values that
# decide the output directory / log file and whether this is a resume (the last one wins).
USER_OUTPUT_DIR=""
USER_LOG_FILE=""
EFFECTIVE_DATASET="$DATASET"
RESUME_FLAG=0
CHECKPOINT_FILE=""
for ((i = 0; i < ${#PASSTHROUGH[@]}; i++)); do
  a="${PASSTHROUGH[$i]}"
  [[ "$a" == -?* ]] || continue
  flag="${a%%=*}"
  name="${flag#-}"
  name="${name#-}"
  case "$name" in
    resume|config.resume)
      if [[ "$a" == *=* ]]; then
        is_true "${a#*=}" && RESUME_FLAG=1 || RESUME_FLAG=0
      else
        RESUME_FLAG=1
      fi
      continue
      ;;
    noresume|noconfig.resume)
      RESUME_FLAG=0
      continue
      ;;
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
    EFFECTIVE_DATASET="$v"
  else
    v="$(from_caller "$v")"
  fi
  [[ "$name" == output_dir ]] && USER_OUTPUT_DIR="$v"
  [[ "$name" == log_file ]] && USER_LOG_FILE="$v"
  [[ "$name" == checkpoint_file ]] && CHECKPOINT_FILE="$v"
  if [[ $j -eq $i ]]; then
    PASSTHROUGH[$j]="${flag}=${v}"
  else
    PASSTHROUGH[$j]="$v"
    i=$j
  fi
done
RESUME=0
[[ $RESUME_FLAG -eq 1 || -n "$CHECKPOINT_FILE" ]] && RESUME=1

# ----------------------------------------------------------------------------- environment
cd "$PROJECT_ROOT"
export PYTHONPATH="${PROJECT_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "${PROJECT_ROOT}/.venv/bin/python" ]]; then
  PY="${PROJECT_ROOT}/.venv/bin/python"
elif [[ -x "${PROJECT_ROOT}/venv/bin/python" ]]; then
  PY="${PROJECT_ROOT}/venv/bin/python"
else
  PY="python3"
fi
command -v "$PY" >/dev/null 2>&1 || die 1 "python interpreter '${PY}' not found (set PYTHON)"

# ----------------------------------------------------------------------------- output paths
if [[ -n "$USER_OUTPUT_DIR" ]]; then
  OUTPUT_DIR="$USER_OUTPUT_DIR"
else
  if is_hub_dataset "$EFFECTIVE_DATASET"; then
    NAME="$EFFECTIVE_DATASET"
  else
    d="$EFFECTIVE_DATASET"
    while [[ "$d" == */ && "$d" != / ]]; do d="${d%/}"; done
    NAME="$(basename -- "$d")"
  fi
  OUTPUT_DIR="result/lm_${NAME}"
fi

if [[ -n "$USER_LOG_FILE" ]]; then
  LOG_FILE="$USER_LOG_FILE"
else
  TIMESTAMP="$(LC_ALL=C date -u +%Y%b%d_%H%M%S | tr '[:lower:]' '[:upper:]')_GMT+00"
  LOG_STEM="${OUTPUT_DIR}/logs/train_${TIMESTAMP}"
  LOG_N=0
  LOG_FILE="${LOG_STEM}.log"
  while [[ -e "$LOG_FILE" ]]; do   # an earlier launch in the same second
    LOG_N=$((LOG_N + 1))
    LOG_FILE="${LOG_STEM}_${LOG_N}.log"
  done
fi

abs_path() {  # absolute form of a path relative to the project root (for the printed commands)
  if [[ "$1" == /* ]]; then printf '%s' "$1"; else printf '%s' "${PROJECT_ROOT}/$1"; fi
}

# ----------------------------------------------------------------------------- command
# A new run gets the launcher's defaults; a resumed one only what the user typed, so that the
# trainer takes everything else from the snapshot instead of taking our defaults as the user's.
given() { [[ $RESUME -eq 0 || -n "${TYPED[$1]:-}" ]]; }
CMD=("$PY" -m gptjax.train)
[[ -n "$PRESET" ]] && CMD+=(--model_preset "$PRESET")
given dataset && CMD+=(--dataset "$DATASET")
given epochs && CMD+=(--epochs "$EPOCHS")
given batch_size && CMD+=(--batch_size "$BATCH_SIZE")
given lr && CMD+=(--lr "$LR")
given warmup && CMD+=(--warmup_steps "$WARMUP")
given snapshot && CMD+=(--snapshot_interval "$SNAPSHOT")
given monitor_interval && CMD+=(
  --gradient_monitor --gradient_monitor_interval "$MONITOR_INTERVAL"
  --weight_monitor --weight_monitor_interval "$MONITOR_INTERVAL")
given sanity_check_interval && CMD+=(--sanity_check_interval "$SANITY_CHECK_INTERVAL")
[[ ${#PASSTHROUGH[@]} -gt 0 ]] && CMD+=("${PASSTHROUGH[@]}")
CMD+=(--output_dir "$OUTPUT_DIR" --log_file "$LOG_FILE")

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

# ----------------------------------------------------------------------------- launch
mkdir -p "$(dirname -- "$LOG_FILE")" 2>/dev/null \
  || die 1 "cannot create the log folder $(abs_path "$(dirname -- "$LOG_FILE")")"
if [[ -z "$USER_LOG_FILE" ]]; then
  # Taken atomically (noclobber creates with O_EXCL): two launches in one second, even at once,
  # get two files.
  until (set -o noclobber; : >"$LOG_FILE") 2>/dev/null; do
    [[ -e "$LOG_FILE" ]] || die 1 "cannot create the log file $(abs_path "$LOG_FILE")"
    LOG_N=$((LOG_N + 1))
    LOG_FILE="${LOG_STEM}_${LOG_N}.log"
  done
  CMD[${#CMD[@]}-1]="$LOG_FILE"
fi
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
OUT_ABS="$(abs_path "$OUTPUT_DIR")"
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
echo "  Output dir: ${OUT_ABS}"
printf '  Command:   '
printf ' %q' "${CMD[@]}"
printf '\n\n'
if [[ -z "$STATUS" ]]; then
  echo "Follow the log:      tail -f $(printf '%q' "$LOG_ABS")"
  echo "Check the process:   ps -p ${PID}"
  echo "Stop training:       kill ${PID}"
fi
echo "TensorBoard:         tensorboard --logdir $(printf '%q' "${OUT_ABS}/tensorboard")"
