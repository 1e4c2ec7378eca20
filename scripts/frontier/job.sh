# shellcheck shell=bash
# Shared body of the Frontier job scripts (train_*.sh, evaluate_*.sh): sourced by them, never run on its own.
# The calling script sets CONFIG_FILE (default train_configs/<name>.toml), ENTRY (the module torchrun runs),
# SCRIPT (its own path) and REPO, then sources this file; its arguments are this file's arguments.
#
#   bash train_X.sh [--preflight] [--section.key value ...]
#       Outside SLURM: derive the node count from the config's mesh (with the overrides), optionally dry-run the
#       layout at full scale (--preflight), then submit this script with sbatch --nodes=<derived>.
#   sbatch train_X.sh [--preflight] [--section.key value ...]
#       Inside the job: refuse unless nodes x GPUS_PER_NODE equals the mesh, set up modules, optionally dry-run, set
#       up RCCL over libfabric, caches and offline HF, optionally run the communication check on the allocated nodes
#       (--preflight: tools/comm_check), run the trainer's start-up checks once (--check), then srun one torchrun
#       per node. SLURM's USR1 (sent 600 s before the time limit: an 8B/131k step on 512 GCDs takes minutes, and the
#       save must fit too) makes the trainer finish its step, save a checkpoint and exit; the job is then requeued
#       and resumes from that checkpoint. TERM (scancel) also saves, but does not requeue.
#
# Optional environment: ACCOUNT, PARTITION, TIME (submission), GPUS_PER_NODE (8), PYTHON (python3), VENV (.venv),
# ROCM_VERSION (6.3.1), MODULES, PLUGIN (module: the site's rccl-net-plugin module; otherwise the plugin that
# aws_ofi_rccl.sh built in AWS_OFI_RCCL_DIR), CACHE_DIR, HF_HOME, MASTER_PORT, MAX_RESTARTS, SHUTDOWN_TIMEOUT,
# MAX_REQUEUES, CPUS_PER_TASK, DEVICE (dry-run and --check target), COMM_CHECK_MIN_GBPS (preflight), CHECKPOINT
# (evaluation), and any NCCL_*/FI_*/HSA_*/TORCH_* override.

die() {
  echo "error: $*" >&2
  exit 2
}

# The first NAME in the LD_LIBRARY_PATH directories (what RCCL's dlopen would find).
find_on_library_path() {
  local dir
  local -a dirs
  IFS=: read -ra dirs <<<"${LD_LIBRARY_PATH:-}"
  for dir in ${dirs[@]+"${dirs[@]}"}; do
    [[ -f $dir/$1 ]] && echo "$dir/$1" && return 0
  done
  return 1
}

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-mi250x}
SCRIPT="$(cd -- "$(dirname -- "$SCRIPT")" && pwd)/$(basename -- "$SCRIPT")"
cd "$REPO" || die "cannot enter $REPO" # CONFIG_FILE and the config's paths are relative to the repository

VENV=${VENV:-$REPO/.venv}
if [[ -f $VENV/bin/activate ]]; then
  # shellcheck disable=SC1091  # the project's virtual environment
  source "$VENV/bin/activate"
fi

preflight=0
args=()
for arg in "$@"; do
  if [[ $arg == --preflight ]]; then preflight=1; else args+=("$arg"); fi
done

# Evaluation scripts score one checkpoint on the held-out split and write under outputs_eval/.
entry_args=()
if [[ $ENTRY == torchtitan_hyena.evaluate ]]; then
  [[ -n ${CHECKPOINT:-} && -d ${CHECKPOINT:-} ]] ||
    die "set CHECKPOINT to the step folder to evaluate, e.g. CHECKPOINT=outputs/rodent_8B_131k/checkpoint/step-20790"
  export CHECKPOINT
  entry_args=(--checkpoint.initial_load_path "$CHECKPOINT" --validation.steps -1
    --job.dump_folder "./outputs_eval/$(basename "$CONFIG_FILE" .toml)")
fi

[[ -f $CONFIG_FILE ]] || die "config $CONFIG_FILE not found; set CONFIG_FILE=train_configs/<name>.toml"
world=$("$PYTHON" -m torchtitan_hyena.tools.world_size --job.config_file "$CONFIG_FILE" ${args[@]+"${args[@]}"}) ||
  exit 2
((world % GPUS_PER_NODE == 0)) ||
  die "$CONFIG_FILE needs $world ranks, not a whole number of $GPUS_PER_NODE-GPU nodes; change its parallel degrees"
nodes=$((world / GPUS_PER_NODE))

preflight_dry_run() {
  echo "preflight: dry run of $CONFIG_FILE on $world ranks ($DEVICE)"
  "$PYTHON" -m torchtitan_hyena.train --job.config_file "$CONFIG_FILE" ${args[@]+"${args[@]}"} \
    --dry_run --world_size "$world" --device "$DEVICE"
}

# ---------------------------------------------------------------- submission: the node count comes from the mesh
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  if ((preflight)); then preflight_dry_run; fi
  submit=(sbatch --nodes="$nodes")
  [[ -z ${ACCOUNT:-} ]] || submit+=(--account="$ACCOUNT")
  [[ -z ${PARTITION:-} ]] || submit+=(--partition="$PARTITION")
  [[ -z ${TIME:-} ]] || submit+=(--time="$TIME")
  export CONFIG_FILE
  echo "submitting $SCRIPT: $CONFIG_FILE on $nodes nodes ($world ranks)"
  exec "${submit[@]}" "$SCRIPT" ${args[@]+"${args[@]}"}
fi

# ---------------------------------------------------------------- inside the allocation: check before spending it
[[ ${SLURM_NNODES:-} =~ ^[0-9]+$ ]] || die "SLURM_NNODES is not set; submit with sbatch"
((SLURM_NNODES == nodes)) ||
  die "$CONFIG_FILE needs $world ranks = $nodes nodes x $GPUS_PER_NODE GPUs but job $SLURM_JOB_ID has $SLURM_NNODES nodes; resubmit with sbatch --nodes=$nodes (or run the script with bash, which derives it)"
if [[ -n ${SLURM_GPUS_ON_NODE:-} ]] && ((SLURM_GPUS_ON_NODE != GPUS_PER_NODE)); then
  die "job $SLURM_JOB_ID has $SLURM_GPUS_ON_NODE GPUs per node but the launch needs $GPUS_PER_NODE; submit with --gpus-per-node=$GPUS_PER_NODE"
fi

ROCM_VERSION=${ROCM_VERSION:-6.3.1}
MODULES=${MODULES-"PrgEnv-gnu/8.5.0 rocm/$ROCM_VERSION craype-accel-amd-gfx90a"}
need_module() {
  command -v module >/dev/null 2>&1 || die "no 'module' command: run on Frontier, or set MODULES= to skip module loads"
}
if [[ -n $MODULES ]]; then
  need_module
  # shellcheck disable=SC2086  # a list of module names
  module load $MODULES
fi
if ((preflight)); then preflight_dry_run; fi

# RCCL's network plugin (libfabric over Slingshot); without it RCCL silently falls back to TCP sockets between nodes.
# The site module or our build (aws_ofi_rccl.sh); the variables below only fill in what the module left unset.
plugin=""
if [[ ${PLUGIN:-} == module ]]; then
  need_module
  module load rccl-net-plugin
  plugin=${NCCL_NET_PLUGIN:-}
  [[ -n $plugin && -f $plugin ]] || plugin=$(find_on_library_path librccl-net.so) ||
    die "PLUGIN=module: 'module load rccl-net-plugin' set neither NCCL_NET_PLUGIN nor LD_LIBRARY_PATH to a librccl-net.so; check 'module show rccl-net-plugin', or build one with 'bash aws_ofi_rccl.sh' and unset PLUGIN"
else
  AWS_OFI_RCCL_DIR=${AWS_OFI_RCCL_DIR-$REPO/.cache/aws-ofi-rccl}
  if [[ -n $AWS_OFI_RCCL_DIR ]]; then
    plugin=$AWS_OFI_RCCL_DIR/lib/librccl-net.so
    [[ -f $plugin ]] ||
      die "aws-ofi-rccl plugin not found in $AWS_OFI_RCCL_DIR/lib; build it with 'bash aws_ofi_rccl.sh', use the site module with PLUGIN=module, or set AWS_OFI_RCCL_DIR (empty: run over TCP sockets)"
    export NCCL_NET_PLUGIN=${NCCL_NET_PLUGIN:-$plugin}
    export LD_LIBRARY_PATH="$AWS_OFI_RCCL_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  else
    echo "warning: AWS_OFI_RCCL_DIR is empty: RCCL will use TCP sockets between nodes (slow)" >&2
  fi
fi
# OLCF's recommendations for RCCL over Slingshot (PyTorch on Frontier guide); the README says why each is set.
# NCCL_NET=OFI makes RCCL fail instead of silently using TCP when the plugin does not load; one node has no network
# for the plugin to initialize, so single-node jobs (and runs without a plugin) use sockets.
if [[ -n $plugin ]] && ((SLURM_NNODES > 1)); then export NCCL_NET=${NCCL_NET:-OFI}; else export NCCL_NET=${NCCL_NET:-Socket}; fi
export NCCL_NET_GDR_LEVEL=${NCCL_NET_GDR_LEVEL:-PHB}
export NCCL_CROSS_NIC=${NCCL_CROSS_NIC:-1}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-hsn0,hsn1,hsn2,hsn3}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-hsn0}
export HSA_FORCE_FINE_GRAIN_PCIE=${HSA_FORCE_FINE_GRAIN_PCIE:-1}
export FI_MR_CACHE_MONITOR=${FI_MR_CACHE_MONITOR:-kdreg2}
export FI_CXI_DISABLE_HOST_REGISTER=${FI_CXI_DISABLE_HOST_REGISTER:-1}
export FI_CXI_DEFAULT_CQ_SIZE=${FI_CXI_DEFAULT_CQ_SIZE:-131072}
export FI_CXI_DEFAULT_TX_SIZE=${FI_CXI_DEFAULT_TX_SIZE:-2048}
export FI_CXI_RX_MATCH_MODE=${FI_CXI_RX_MATCH_MODE:-hybrid}
export FI_CXI_RDZV_PROTO=${FI_CXI_RDZV_PROTO:-alt_read} # needs #SBATCH --network=disable_rdzv_get
export FI_CXI_RDZV_EAGER_SIZE=${FI_CXI_RDZV_EAGER_SIZE:-0}
export FI_CXI_RDZV_THRESHOLD=${FI_CXI_RDZV_THRESHOLD:-0}
export FI_CXI_RDZV_GET_MIN=${FI_CXI_RDZV_GET_MIN:-0}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3} # a failed collective ends the process
export TORCHELASTIC_ENABLE_FILE_TIMER=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}
export LOGLEVEL=${LOGLEVEL:-INFO}
# torchrun passes USR1 on to the trainer and gives it SHUTDOWN_TIMEOUT seconds (within the 600 s lead) to save;
# torchrun before torch 2.12 ignores the setting and kills the workers after 30 s.
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-570}

# Compiled-kernel caches on node-local storage (no Lustre metadata storms, no sqlite locking across nodes).
CACHE_DIR=${CACHE_DIR:-/tmp/${USER:-$(id -un)}/torchtitan_hyena}
export MIOPEN_USER_DB_PATH=${MIOPEN_USER_DB_PATH:-$CACHE_DIR/miopen}
export MIOPEN_CUSTOM_CACHE_DIR=${MIOPEN_CUSTOM_CACHE_DIR:-$MIOPEN_USER_DB_PATH}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$CACHE_DIR/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$CACHE_DIR/inductor}
export PYTORCH_KERNEL_CACHE_PATH=${PYTORCH_KERNEL_CACHE_PATH:-$CACHE_DIR/kernels}
# Datasets come from a pre-filled cache (see README): compute nodes have no internet.
export HF_HOME=${HF_HOME:-$REPO/.cache/huggingface}
export HF_DATASETS_CACHE=${HF_DATASETS_CACHE:-$HF_HOME/datasets}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}

mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
((${#hosts[@]} > 0)) || die "scontrol show hostnames gave no host for SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}"
MASTER_ADDR=${hosts[0]}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_REQUEUES=${MAX_REQUEUES:-20}

# Every start-up check of the trainer (config, layout, model, output folders, the checkpoint to seed from), once,
# before srun starts any rank: a mistake is one line here, not one per rank followed by torchrun's failure report.
"$PYTHON" -m torchtitan_hyena.train --job.config_file "$CONFIG_FILE" ${entry_args[@]+"${entry_args[@]}"} \
  ${args[@]+"${args[@]}"} --check --world_size "$world" --device "$DEVICE" || exit 2

srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 \
  mkdir -p "$MIOPEN_USER_DB_PATH" "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR" "$PYTORCH_KERNEL_CACHE_PATH"

per_node=(srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="${CPUS_PER_TASK:-56}" --kill-on-bad-exit=1
  torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS_PER_NODE" --rdzv_backend=c10d)

# Preflight on the allocated nodes: warm every process group of the mesh (a group that cannot form fails in one line
# naming it), measure bus bandwidth per mesh dimension, and warn when the inter-node bandwidth looks like TCP.
if ((preflight)); then
  echo "preflight: communication check of $CONFIG_FILE on $SLURM_NNODES nodes"
  "${per_node[@]}" --max_restarts=0 --rdzv_id="$SLURM_JOB_ID-comm" --rdzv_endpoint="$MASTER_ADDR:$((MASTER_PORT + 1))" \
    -m torchtitan_hyena.tools.comm_check --job.config_file "$CONFIG_FILE" ${args[@]+"${args[@]}"} \
    --min_internode_gbps "${COMM_CHECK_MIN_GBPS:-5}" ||
    die "preflight: the communication check failed (its error is above); nothing was trained"
fi

launch=("${per_node[@]}" --max_restarts="${MAX_RESTARTS:-3}" --rdzv_id="$SLURM_JOB_ID"
  --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"
  -m "$ENTRY" --job.config_file "$CONFIG_FILE" ${entry_args[@]+"${entry_args[@]}"} ${args[@]+"${args[@]}"})
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): ${launch[*]}"

requeue=0
# shellcheck disable=SC2329  # the trap handlers below call these
forward() { kill "-$1" "$srun_pid" 2>/dev/null || true; }
# shellcheck disable=SC2329
on_usr1() {
  requeue=1
  echo "USR1: time limit near; the trainer saves after its current step, then the job is requeued" >&2
  forward USR1
}
# shellcheck disable=SC2329
on_term() {
  echo "TERM: the trainer saves after its current step; no requeue" >&2
  forward TERM
}
trap on_usr1 USR1
trap on_term TERM
"${launch[@]}" &
srun_pid=$!
status=0
wait "$srun_pid" || status=$?
while kill -0 "$srun_pid" 2>/dev/null; do # wait returns early when a trapped signal arrives
  status=0
  wait "$srun_pid" || status=$?
done

if ((requeue && status != 0)); then
  if ((${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES)); then
    echo "error: not requeueing job $SLURM_JOB_ID: it has restarted $SLURM_RESTART_COUNT times (MAX_REQUEUES)" >&2
    exit "$status"
  fi
  echo "requeueing job $SLURM_JOB_ID; it resumes from its latest complete checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
