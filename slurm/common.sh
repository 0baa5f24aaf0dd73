# Shared by the sbatch scripts of this folder (sourced, not run). Every knob is an environment
# variable; nothing site-specific is hard-coded.
#
#   ACFT_RUN_DIR          run directory on a file system every node sees (required): config,
#                         model/, exchange/ (the two groups' artifacts and status),
#                         checkpoints, logs, export/
#   ACFT_CONFIG_NAME      Hydra config of conf/ (default tiny_cpu)
#   ACFT_PYTHON           the Python with nemo-acft installed (default: python3 on the PATH)
#   ACFT_SETUP            a command run first on every node, e.g. "module load cuda" (optional)
#   ACFT_CONTAINER_IMAGE  pyxis/enroot image: adds --container-image (optional)
#   ACFT_CONTAINER_MOUNTS pyxis mounts, e.g. /lustre:/lustre (optional)
#   ACFT_REQUEUE          1: on the time-limit signal, save, stop and `scontrol requeue` (default 1)
#   ACFT_LOG_DIR          per-step logs of srun (default $ACFT_RUN_DIR/slurm-logs)
#   ACFT_MASTER_ADDR      the rendezvous host of every world (default: the first node of the
#                         world's component, as `scontrol show hostnames` names it)
#   ACFT_MASTER_PORT      the first of the rendezvous ports (default 20000 + job id mod 20000;
#                         each step of the job takes its own: +0 prepare, +1 lm, +2 oracle,
#                         +3 finish)
# Hydra overrides are the script's arguments: sbatch acft_single.sbatch model.acft.lambda=1.0 ...
# Each step is one torch.distributed world of `srun` tasks (one per GPU), ranks from SLURM_PROCID.

set -uo pipefail

: "${ACFT_RUN_DIR:?set ACFT_RUN_DIR to a run directory on a shared file system}"
ACFT_CONFIG_NAME=${ACFT_CONFIG_NAME:-tiny_cpu}
ACFT_PYTHON=${ACFT_PYTHON:-python3}
ACFT_REQUEUE=${ACFT_REQUEUE:-1}
ACFT_LOG_DIR=${ACFT_LOG_DIR:-$ACFT_RUN_DIR/slurm-logs}
ACFT_MASTER_PORT=${ACFT_MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
mkdir -p "$ACFT_LOG_DIR" || { echo "acft: cannot create $ACFT_LOG_DIR on $(hostname)" >&2; exit 2; }

ACFT_SRUN_ARGS=(--kill-on-bad-exit=1)
if [[ -n "${ACFT_CONTAINER_IMAGE:-}" ]]; then
    ACFT_SRUN_ARGS+=("--container-image=$ACFT_CONTAINER_IMAGE")
    [[ -n "${ACFT_CONTAINER_MOUNTS:-}" ]] && ACFT_SRUN_ARGS+=("--container-mounts=$ACFT_CONTAINER_MOUNTS")
fi

# acft_master NODELIST: the rendezvous host of a world on NODELIST
acft_master() {
    if [[ -n "${ACFT_MASTER_ADDR:-}" ]]; then echo "$ACFT_MASTER_ADDR"; return; fi
    scontrol show hostnames "$1" | head -n 1
}

# acft_cmd ROLE PORT_OFFSET NODELIST [overrides...]: the command line of one role of the run,
# as every task of the step runs it (its world's rendezvous exported first)
acft_cmd() {
    local role=$1 offset=$2 nodes=$3; shift 3
    local setup=${ACFT_SETUP:-true}
    printf 'export MASTER_ADDR=%q MASTER_PORT=%q; %s && exec %q -m nemo_acft.train --config-name %q role=%q run_dir=%q progress=false' \
        "$(acft_master "$nodes")" "$((ACFT_MASTER_PORT + offset))" "$setup" "$ACFT_PYTHON" \
        "$ACFT_CONFIG_NAME" "$role" "$ACFT_RUN_DIR"
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

# acft_wait PID: wait for one step, also when the USR1 trap interrupts the wait
acft_wait() {
    local rc
    wait "$1"; rc=$?
    while [[ $rc -gt 128 && $ACFT_STOPPING == 1 ]] && kill -0 "$1" 2>/dev/null; do
        wait "$1"; rc=$?
    done
    return $rc
}
