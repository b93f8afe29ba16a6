"""Masked gene modelling, for ``accelerate launch`` / ``torchrun`` (same flags as ``scrnalf pretrain``).

    accelerate launch --num_processes 2 scripts/pretrain.py --train-file cells.h5ad \\
        --preset default --output-dir runs/pretrained
"""

import sys

from scrnalf_hf.training.pretrain import run_pretrain

if __name__ == "__main__":
    run_pretrain(sys.argv[1:])
