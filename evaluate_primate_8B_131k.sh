#!/usr/bin/env bash
# Evaluate a primate-8B-131k checkpoint on the test split (same layout as training).
#   CHECKPOINT=outputs/primate_8B_131k/checkpoint/step-N sbatch evaluate_primate_8B_131k.sh [--preflight] [--section.key value ...]
#   CHECKPOINT=... bash evaluate_primate_8B_131k.sh [--preflight] [...]   # derives --nodes from the config, then submits itself
# Environment, checks and preemption handling: scripts/frontier/job.sh.
#SBATCH --job-name=primate_8B_131k_eval
#SBATCH --account=stf218
#SBATCH --partition=batch
#SBATCH --nodes=64
#SBATCH --gpus-per-node=8
#SBATCH --network=disable_rdzv_get
#SBATCH --time=00:30:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
CONFIG_FILE=${CONFIG_FILE:-train_configs/primate_8B_131k.toml}
ENTRY=torchtitan_hyena.evaluate
SCRIPT=${BASH_SOURCE[0]}
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd -- "$(dirname -- "$SCRIPT")" && pwd)}}
[[ -f $REPO/scripts/frontier/job.sh ]] || { echo "error: submit from the repository root (or set REPO)" >&2; exit 2; }
# shellcheck source=scripts/frontier/job.sh
source "$REPO/scripts/frontier/job.sh"
