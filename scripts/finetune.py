"""Training any head, for ``accelerate launch`` / ``torchrun`` (same flags as ``scrnalf finetune``).

    accelerate launch --num_processes 2 scripts/finetune.py --train-file cells.h5ad \\
        --label-key cell_type --preset default --output-dir runs/default
    torchrun --nproc_per_node 2 scripts/finetune.py ...   # CPU processes use gloo automatically
"""

import sys

from scrnalf_hf.training.arguments import parse_arguments
from scrnalf_hf.training.finetune import train_from_arguments

if __name__ == "__main__":
    train_from_arguments(*parse_arguments(sys.argv[1:], "finetune"))
