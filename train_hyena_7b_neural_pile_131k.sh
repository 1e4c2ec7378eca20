#!/usr/bin/env bash
# StripedHyena 2, Evo2-7B shape, 131k context on Neural Pile spikes, 512 MI250X GCDs on 64 nodes.
#   sbatch train_hyena_7b_neural_pile_131k.sh [--preflight] [--section.key value ...]
#   bash train_hyena_7b_neural_pile_131k.sh [--preflight] [...]   # derives --nodes from the config, then submits itself
# Environment, checks and preemption handling: scripts/frontier/job.sh.
#SBATCH --job-name=hyena_7b_neural_pile_131k
#SBATCH --account=stf218
#SBATCH --partition=extended
#SBATCH --nodes=64
#SBATCH --gpus-per-node=8
#SBATCH --network=disable_rdzv_get
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
CONFIG_FILE=${CONFIG_FILE:-train_configs/hyena_7b_neural_pile_131k.toml}
ENTRY=torchtitan_hyena.train
SCRIPT=${BASH_SOURCE[0]}
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd -- "$(dirname -- "$SCRIPT")" && pwd)}}
[[ -f $REPO/scripts/frontier/job.sh ]] || { echo "error: submit from the repository root (or set REPO)" >&2; exit 2; }
# shellcheck source=scripts/frontier/job.sh
source "$REPO/scripts/frontier/job.sh"
