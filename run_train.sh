#!/usr/bin/env bash
# Launch training on one node with torchrun.
#   CONFIG_FILE=train_configs/debug_model.toml NGPU=4 ./run_train.sh --training.steps 20
# NGPU is the number of processes (GPUs, or CPU ranks with gloo); extra arguments are forwarded. PYTHON (default
# python) runs the start-up checks.
set -euo pipefail

NGPU=${NGPU:-8}
CONFIG_FILE=${CONFIG_FILE:-"./train_configs/debug_model.toml"}
LOG_RANK=${LOG_RANK:-0}
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-"expandable_segments:True"}

# Every start-up check of the trainer, once, before torchrun starts NGPU ranks: a mistake is one line here,
# not one per rank followed by torchrun's failure report.
"${PYTHON:-python}" -m torchtitan_hyena.train --job.config_file "${CONFIG_FILE}" "$@" --check --world_size "${NGPU}"

exec torchrun --nproc_per_node="${NGPU}" --rdzv_backend c10d --rdzv_endpoint="localhost:0" \
  --local-ranks-filter "${LOG_RANK}" --role rank --tee 3 \
  -m torchtitan_hyena.train --job.config_file "${CONFIG_FILE}" "$@"
