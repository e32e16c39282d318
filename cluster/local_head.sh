#!/usr/bin/env bash
# Local single-node Ray head for developing and smoke-testing codebook jobs.
#
# Usage:
#   cluster/local_head.sh start                 start a head and wait until the job API answers
#   cluster/local_head.sh submit [ARGS...]      ray job submit ... -- python pipelines/train.py ARGS
#                                               (ARGS default: --config configs/fsm.yaml)
#   cluster/local_head.sh stop                  stop the head that `start` started on RAY_PORT
#
# Knobs (environment, all optional):
#   NUM_CPUS=2              CPUs the head advertises to Ray
#   DASHBOARD_PORT=8265     dashboard + job API port (on 127.0.0.1, like every port of the head)
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
# Security: anyone who can reach a Ray head's ports can run arbitrary code as this user (the
# job API and the GCS accept work without authentication unless RAY_AUTH_MODE=token). So this
# head is a single-machine cluster whose every listener is on 127.0.0.1: the node IP is
# 127.0.0.1 (--node-ip-address plus RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, without which Ray on
# Linux swaps 127.0.0.1 for the machine's outward address and binds GCS, raylet, object manager,
# agents and workers to all interfaces), and the dashboard host is 127.0.0.1. That covers the
# GCS (RAY_PORT), dashboard/job API (DASHBOARD_PORT), dashboard metrics (44227), autoscaler
# metrics (44217), Ray Client server (10001), raylet node manager and object manager, dashboard
# agent (HTTP on a free port, gRPC, metrics export), runtime-env agent and every worker's gRPC port
# (10002-19999); tests/test_cluster_security.py checks it. Other machines cannot join or reach
# it (use `ssh -L 8265:127.0.0.1:8265 host` to look at the dashboard remotely). Loopback is
# still reachable by other users of this machine: on a shared machine use RAY_AUTH_MODE=token.
# The default is RAY_AUTH_MODE=disabled, which Ray 2.60 otherwise turns on for new local
# clusters; the CLI then needs the same mode, so the value is exported once here and used by
# start, submit and stop alike. Multi-machine clusters (gpu-cluster.yaml,
# rayjob-pythia410m.yaml) always run with token auth.
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

head_record() {
  # Where `start` notes the head's session id, per user and GCS port.
  printf '%s/codebook-ray-head-%s-%s.sid' "${TMPDIR:-/tmp}" "$(id -u)" "${RAY_PORT}"
}

session_pids() {
  # Live (not zombie) processes of session $1, the head's, plus all their descendants: Ray's
  # workers keep the session, job drivers get a session of their own under their supervisor.
  ps -e -o pid=,ppid=,sid=,stat= | awk -v s="$1" '
    { pid[NR] = $1; ppid[NR] = $2; sid[NR] = $3; st[NR] = $4 }
    END {
      for (i = 1; i <= NR; i++) if (sid[i] == s) keep[pid[i]] = 1
      do {
        changed = 0
        for (i = 1; i <= NR; i++)
          if (!(pid[i] in keep) && (ppid[i] in keep)) { keep[pid[i]] = 1; changed = 1 }
      } while (changed)
      for (i = 1; i <= NR; i++) if ((pid[i] in keep) && st[i] !~ /^Z/) print pid[i]
    }'
}

alive() {
  # The given pids that are still live (not zombie) processes, one a line.
  local pid
  for pid in "$@"; do
    if [[ "$(ps -o stat= -p "${pid}" 2>/dev/null)" =~ ^[^Z] ]]; then
      echo "${pid}"
    fi
  done
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
  command -v setsid >/dev/null 2>&1 || die "'setsid' not found: install util-linux"
  local record pid
  record="$(head_record)"
  if [[ -s "${record}" ]] && [[ -n "$(session_pids "$(<"${record}")")" ]]; then
    die "the head this script started on port ${RAY_PORT} (session $(<"${record}")) still" \
      "runs but its job API at ${JOB_API} does not answer; run '$0 stop' first"
  fi
  ensure_token
  # Everything on loopback (see the header): with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray keeps
  # --node-ip-address 127.0.0.1 instead of replacing it by this machine's outward IP, and every
  # server it starts (GCS, raylet, agents, Ray Client, workers) binds to that address. setsid
  # gives the head a session of its own, recorded so that `stop` ends this head and nothing
  # else (`ray stop` would end every Ray process of this user, other clusters included).
  # The dashboard agent's HTTP port (default 52365, which every Ray instance on the machine
  # wants) is picked free: on a clash the agent cannot serve, and job submission fails with
  # "No available agent to submit job".
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 setsid ray start --head \
    --num-cpus "${NUM_CPUS}" \
    --node-ip-address 127.0.0.1 \
    --dashboard-host 127.0.0.1 \
    --dashboard-port "${DASHBOARD_PORT}" \
    --dashboard-agent-listen-port 0 \
    --port "${RAY_PORT}" &
  pid=$!
  printf '%s\n' "${pid}" >"${record}"
  wait "${pid}" || die "'ray start' failed (exit $?); '$0 stop' cleans up what it left"

  # `ray start` returns before the dashboard's job server is up: poll it, bounded.
  local deadline=$((SECONDS + START_TIMEOUT))
  until job_api_up; do
    if ((SECONDS >= deadline)); then
      die "job API at ${JOB_API} did not answer within ${START_TIMEOUT}s" \
        "(logs: /tmp/ray/session_latest/logs/dashboard*.log); '$0 stop' cleans up"
    fi
    sleep 2
  done
  echo "Ray head is up: job API and dashboard at ${JOB_API}; every port on 127.0.0.1" \
    "(auth: ${RAY_AUTH_MODE}, session $(<"${record}"))"
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
  # Ends the head `start` recorded for RAY_PORT, with its workers and job drivers: SIGTERM,
  # then SIGKILL to what is left after 15 s. Without a record (a head started by hand or by an
  # older version of this script) it falls back to `ray stop --force`, which ends every Ray
  # process of this user on this machine.
  local record sid
  local -a pids
  record="$(head_record)"
  if [[ ! -s "${record}" ]]; then
    echo "No head recorded in ${record}:" \
      "running 'ray stop --force' (every Ray process of this user)"
    ray stop --force
    return
  fi
  sid="$(<"${record}")"
  [[ "${sid}" =~ ^[0-9]+$ ]] || die "${record} holds '${sid}', not a session id; remove the file"
  mapfile -t pids < <(session_pids "${sid}")
  if ((${#pids[@]} == 0)) || [[ "$(ps -o args= -p "$(IFS=,; echo "${pids[*]}")")" != *ray* ]]; then
    echo "The head on port ${RAY_PORT} (session ${sid}) is not running"
    rm -f -- "${record}"
    return 0
  fi
  kill -TERM "${pids[@]}" 2>/dev/null || true
  local deadline=$((SECONDS + 15)) n="${#pids[@]}"
  local -a left
  while :; do
    # still running, plus anything the session started meanwhile
    mapfile -t left < <(alive "${pids[@]}"; session_pids "${sid}")
    ((${#left[@]} > 0 && SECONDS < deadline)) || break
    sleep 0.5
  done
  if ((${#left[@]} > 0)); then
    kill -KILL "${left[@]}" 2>/dev/null || true
    # SIGKILL is delivered at once but a process leaves only once the kernel has torn it down
    # (longer for big address spaces on a busy machine): wait for that, bounded, so that what
    # `stop` reports as stopped is gone when it returns.
    deadline=$((SECONDS + 30))
    while mapfile -t left < <(alive "${left[@]}") && ((${#left[@]} > 0)); do
      if ((SECONDS >= deadline)); then
        die "processes ${left[*]} of the head (session ${sid}) outlived SIGKILL for 30 s"
      fi
      sleep 0.2
    done
  fi
  rm -f -- "${record}"
  echo "Stopped the Ray head on port ${RAY_PORT} (session ${sid}, ${n} processes)"
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
