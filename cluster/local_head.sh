#!/usr/bin/env bash
# Local single-node Ray head for developing and smoke-testing codebook jobs.
#
# Usage:
#   cluster/local_head.sh start                 start a head and wait until the job API answers
#   cluster/local_head.sh submit [ARGS...]      ray job submit ... -- python pipelines/train.py ARGS
#                                               (ARGS default: --config configs/fsm.yaml)
#   cluster/local_head.sh stop                  ray stop --force
#
# Knobs (environment, all optional):
#   NUM_CPUS=2              CPUs the head advertises to Ray
#   DASHBOARD_PORT=8265     dashboard + job API port (always bound to 127.0.0.1)
#   RAY_PORT=6379           GCS port
#   RAY_AUTH_MODE=disabled  "disabled" or "token" (see below); exported for every subcommand
#   START_TIMEOUT=90        seconds `start` waits for the job API before giving up
#   MLFLOW_TRACKING_URI     forwarded to the job if set (default: sqlite in run.storage_path)
#   STORAGE_PATH            forwarded as --set run.storage_path=... if set (default: the config's,
#                           ~/codebook-runs)
#   SUBMIT_NO_WAIT=1        return right after submitting instead of tailing the logs
#   SUBMISSION_ID=...       fixed job id (handy for `ray job logs -f ID` / `ray job stop ID`)
#   CODEBOOK_VENV=<repo>/.venv  virtual environment whose bin/ is put first on PATH, if it exists
#
# Security: Ray's dashboard and job API (port DASHBOARD_PORT) have NO authentication unless
# RAY_AUTH_MODE=token, and anyone who can reach the job API can run arbitrary code as this user.
# That is why the dashboard is bound to 127.0.0.1 only: it is reachable from this machine and
# nowhere else (use `ssh -L 8265:127.0.0.1:8265 host` to look at it remotely). The test head
# therefore defaults to RAY_AUTH_MODE=disabled, which Ray 2.60 otherwise turns on for new local
# clusters; the CLI then needs the same mode, so the value is exported once here and used by
# start, submit and stop alike. On a shared multi-user machine run with RAY_AUTH_MODE=token: the
# GCS port (RAY_PORT) listens on all interfaces, and token mode protects it and the job API.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd -- "${SCRIPT_DIR}/.." && pwd)"

NUM_CPUS="${NUM_CPUS:-2}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
RAY_PORT="${RAY_PORT:-6379}"
START_TIMEOUT="${START_TIMEOUT:-90}"
JOB_API="http://127.0.0.1:${DASHBOARD_PORT}"

# One auth mode for the head and every CLI call made by this script.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export RAY_USAGE_STATS_ENABLED=0

# Use the project's virtual environment when there is one, so that `ray`, and the `python` that
# the job's entrypoint resolves through the head's PATH, both have codebook installed.
CODEBOOK_VENV="${CODEBOOK_VENV:-${REPO_ROOT}/.venv}"
if [[ -x "${CODEBOOK_VENV}/bin/ray" ]]; then
  export PATH="${CODEBOOK_VENV}/bin:${PATH}"
fi

die() {
  printf 'local_head.sh: %s\n' "$*" >&2
  exit 1
}

usage() {
  sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

check_settings() {
  local name value
  for name in NUM_CPUS DASHBOARD_PORT RAY_PORT START_TIMEOUT; do
    value="${!name}"
    [[ "${value}" =~ ^[0-9]+$ ]] || die "${name} must be a non-negative integer, got '${value}'"
  done
  case "${RAY_AUTH_MODE}" in
    disabled | token) ;;
    *) die "RAY_AUTH_MODE must be 'disabled' or 'token', got '${RAY_AUTH_MODE}'" ;;
  esac
  command -v ray >/dev/null 2>&1 \
    || die "'ray' not found: install the project first (pip install torch==2.13.0 && pip install -e .)"
}

job_api_up() {
  ray job list --address "${JOB_API}" >/dev/null 2>&1
}

ensure_token() {
  # Token mode needs a token before `ray start`; Ray reads RAY_AUTH_TOKEN, then
  # RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token. Generate the default file if none is set
  # (the command also prints the token: keep it off the terminal and out of CI logs).
  [[ "${RAY_AUTH_MODE}" == "token" ]] || return 0
  if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "${HOME}/.ray/auth_token" ]]; then
    echo "Generating a Ray auth token in ~/.ray/auth_token"
    ray get-auth-token --generate >/dev/null
  fi
}

cmd_start() {
  if job_api_up; then
    echo "A Ray job API already answers at ${JOB_API}; not starting another head."
    return 0
  fi
  ensure_token
  ray start --head \
    --num-cpus "${NUM_CPUS}" \
    --dashboard-host 127.0.0.1 \
    --dashboard-port "${DASHBOARD_PORT}" \
    --port "${RAY_PORT}"

  # `ray start` returns before the dashboard's job server is up: poll it, bounded.
  local deadline=$((SECONDS + START_TIMEOUT))
  until job_api_up; do
    if ((SECONDS >= deadline)); then
      die "job API at ${JOB_API} did not answer within ${START_TIMEOUT}s" \
        "(logs: /tmp/ray/session_latest/logs/dashboard*.log); '$0 stop' cleans up"
    fi
    sleep 2
  done
  echo "Ray head is up: job API and dashboard at ${JOB_API} (loopback only, auth: ${RAY_AUTH_MODE})"
}

has_storage_override() {
  local arg
  for arg in "$@"; do
    [[ "${arg}" == run.storage_path=* ]] && return 0
  done
  return 1
}

runtime_env_json() {
  # Built with Python so that paths with quotes or spaces stay valid JSON. Excludes are
  # gitignore-style and anchored at the repository root: nothing local-only (virtual env, MLflow
  # store, checkpoints, outputs) is zipped and uploaded. Ray also honours .gitignore; this list
  # keeps the upload small even if that is turned off (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1).
  python3 - "$1" <<'PY'
import json
import sys

excludes = [
    "/.git", "/.venv", "/venv", "/mlruns", "/mlartifacts", "/mlflow.db*",
    "/outputs", "/runs", "/ray_results", "/build", "/dist",
    "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".ruff_cache",
]
env = {"MLFLOW_TRACKING_URI": sys.argv[1]} if sys.argv[1] else {}
print(json.dumps({"excludes": excludes, "env_vars": env}))
PY
}

cmd_submit() {
  local -a train_args=("$@")
  if ((${#train_args[@]} == 0)); then
    train_args=(--config configs/fsm.yaml)
  fi
  job_api_up || die "no Ray job API at ${JOB_API}; run '$0 start' first"

  # The job runs from a temporary copy of the repository, so relative paths would land in
  # that copy and vanish. The configs default to absolute places (run.storage_path
  # ~/codebook-runs, MLflow in <storage>/mlflow.db); STORAGE_PATH and MLFLOW_TRACKING_URI,
  # when set, are forwarded to the job.
  local mlflow_uri="${MLFLOW_TRACKING_URI:-}"
  local storage="${STORAGE_PATH:-}"
  if [[ -n "${storage}" ]] && ! has_storage_override "${train_args[@]}"; then
    if [[ "${storage}" == /* ]]; then
      mkdir -p -- "${storage}"
    fi
    # Put first so that any --set given by the caller comes later and wins.
    train_args=(--set "run.storage_path=${storage}" "${train_args[@]}")
  fi

  local -a submit_opts=(
    --address "${JOB_API}"
    --working-dir "${REPO_ROOT}"
    --runtime-env-json "$(runtime_env_json "${mlflow_uri}")"
  )
  if [[ -n "${SUBMISSION_ID:-}" ]]; then
    submit_opts+=(--submission-id "${SUBMISSION_ID}")
  fi
  if [[ "${SUBMIT_NO_WAIT:-0}" == "1" ]]; then
    submit_opts+=(--no-wait)
  fi

  echo "MLflow: ${mlflow_uri:-<storage>/mlflow.db (config default)}"
  ray job submit "${submit_opts[@]}" -- python pipelines/train.py "${train_args[@]}"
}

cmd_stop() {
  # Stops every Ray process of this user on this machine, not only the head started here.
  ray stop --force
}

main() {
  local cmd="${1:-}"
  if (($# > 0)); then
    shift
  fi
  case "${cmd}" in
    start)
      check_settings
      cmd_start
      ;;
    submit)
      check_settings
      cmd_submit "$@"
      ;;
    stop)
      check_settings
      cmd_stop
      ;;
    -h | --help | help)
      usage
      ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
