# Shared by the sbatch scripts of this folder (sourced, not run). Every knob is an environment
# variable; nothing site-specific is hard-coded.
#
#   ACFT_RUN_DIR          run directory on a file system every node sees (required): config,
#                         exchange/ (the two groups' artifacts and status), checkpoints, logs
#   ACFT_CONFIG_NAME      Hydra config of conf/ (default tiny_cpu)
#   ACFT_PYTHON           the Python with nemo-acft installed (default: python3 on the PATH)
#   ACFT_SETUP            a command run first on every node, e.g. "module load cuda" (optional)
#   ACFT_CONTAINER_IMAGE  pyxis/enroot image: adds --container-image (optional)
#   ACFT_CONTAINER_MOUNTS pyxis mounts, e.g. /lustre:/lustre (optional)
#   ACFT_REQUEUE          1: on the time-limit signal, save, stop and `scontrol requeue` (default 1)
#   ACFT_LOG_DIR          per-group logs of srun (default $ACFT_RUN_DIR/slurm-logs)
# Hydra overrides are the script's arguments: sbatch acft_single.sbatch acft.lambda=1.0 ...

set -uo pipefail

: "${ACFT_RUN_DIR:?set ACFT_RUN_DIR to a run directory on a shared file system}"
ACFT_CONFIG_NAME=${ACFT_CONFIG_NAME:-tiny_cpu}
ACFT_PYTHON=${ACFT_PYTHON:-python3}
ACFT_REQUEUE=${ACFT_REQUEUE:-1}
ACFT_LOG_DIR=${ACFT_LOG_DIR:-$ACFT_RUN_DIR/slurm-logs}
mkdir -p "$ACFT_LOG_DIR" || { echo "acft: cannot create $ACFT_LOG_DIR on $(hostname)" >&2; exit 2; }

ACFT_SRUN_ARGS=()
if [[ -n "${ACFT_CONTAINER_IMAGE:-}" ]]; then
    ACFT_SRUN_ARGS+=("--container-image=$ACFT_CONTAINER_IMAGE")
    [[ -n "${ACFT_CONTAINER_MOUNTS:-}" ]] && ACFT_SRUN_ARGS+=("--container-mounts=$ACFT_CONTAINER_MOUNTS")
fi

# acft_cmd ROLE [overrides...]: the command line of one role of the run
acft_cmd() {
    local role=$1; shift
    local setup=${ACFT_SETUP:-true}
    printf '%s && exec %q -m nemo_acft.train --config-name %q role=%q run_dir=%q progress=false' \
        "$setup" "$ACFT_PYTHON" "$ACFT_CONFIG_NAME" "$role" "$ACFT_RUN_DIR"
    printf ' %q' "$@"
}

acft_log() { echo "[acft $(date +%H:%M:%S) job ${SLURM_JOB_ID:-?}] $*"; }

# The time-limit warning (#SBATCH --signal=B:USR1@SECONDS) or a scancel --signal=USR1: forward
# SIGUSR1 to the running steps, which checkpoint and exit 143; then requeue.
ACFT_STEP_PIDS=()
ACFT_STOPPING=0
acft_on_usr1() {
    ACFT_STOPPING=1
    acft_log "time-limit signal: asking the steps to checkpoint and stop"
    for pid in "${ACFT_STEP_PIDS[@]}"; do kill -USR1 "$pid" 2>/dev/null; done
}
trap acft_on_usr1 USR1

acft_requeue_or_exit() {
    if [[ $ACFT_STOPPING == 1 && $ACFT_REQUEUE == 1 ]]; then
        acft_log "requeueing job ${SLURM_JOB_ID}: the rerun resumes from the last checkpoint"
        scontrol requeue "${SLURM_JOB_ID}"
        exit 0
    fi
    exit "$1"
}
