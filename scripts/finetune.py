"""Cell-type fine-tuning, for ``accelerate launch`` / ``torchrun`` (same flags as ``scrnalf finetune``).

    accelerate launch --num_processes 2 scripts/finetune.py --train-file cells.h5ad \\
        --label-key cell_type --preset default --output-dir runs/default
    torchrun --nproc_per_node 2 scripts/finetune.py ...   # CPU processes use gloo automatically
"""

import sys

from scrnalf_hf.training.finetune import run_finetune

if __name__ == "__main__":
    run_finetune(sys.argv[1:])
