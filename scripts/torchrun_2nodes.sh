#!/bin/bash
# Two nodes with torchrun. On node 0:  NODE_RANK=0 MASTER_ADDR=<node0 ip> bash scripts/torchrun_2nodes.sh
#                        on node 1:  NODE_RANK=1 MASTER_ADDR=<node0 ip> bash scripts/torchrun_2nodes.sh
# GPUS_PER_NODE defaults to all visible GPUs; extra arguments go to train.py.
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
torchrun --nnodes 2 --node_rank "${NODE_RANK:?set NODE_RANK}" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}" \
  train.py --config configs/multinode.yaml --trainer.num_nodes 2 --trainer.devices "$GPUS_PER_NODE" "$@"
