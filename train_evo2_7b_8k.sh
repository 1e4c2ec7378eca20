#!/usr/bin/env bash
# Evo 2 7B fine-tune at 8k context on DNA, seeded from the converted Evo 2 checkpoint, 64 GCDs on 8 nodes.
#   sbatch train_evo2_7b_8k.sh [--preflight] [--section.key value ...]
#   bash train_evo2_7b_8k.sh [--preflight] [...]   # derives --nodes from the config, then submits itself
# Environment, checks and preemption handling: scripts/frontier/job.sh.
#SBATCH --job-name=evo2_7b_8k
#SBATCH --account=stf218
#SBATCH --partition=extended
#SBATCH --nodes=8
#SBATCH --gpus-per-node=8
#SBATCH --network=disable_rdzv_get
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
CONFIG_FILE=${CONFIG_FILE:-train_configs/evo2_7b_8k.toml}
ENTRY=torchtitan_hyena.train
SCRIPT=${BASH_SOURCE[0]}
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd -- "$(dirname -- "$SCRIPT")" && pwd)}}
[[ -f $REPO/scripts/frontier/job.sh ]] || { echo "error: submit from the repository root (or set REPO)" >&2; exit 2; }
# shellcheck source=scripts/frontier/job.sh
source "$REPO/scripts/frontier/job.sh"
