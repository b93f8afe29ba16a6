"""Masked gene modelling, for ``accelerate launch`` / ``torchrun`` (same flags as ``scrnalf pretrain``).

    accelerate launch --num_processes 2 scripts/pretrain.py --train-file cells.h5ad \\
        --preset default --output-dir runs/pretrained
"""

import sys

from scrnalf_hf.training.arguments import parse_arguments
from scrnalf_hf.training.finetune import train_from_arguments

if __name__ == "__main__":
    train_from_arguments(*parse_arguments(sys.argv[1:], "pretrain"))
