"""Entry point users know: `python train2.py ARGS` is exactly `caption-train train ARGS`.

    python train2.py --dataset_dir dataset --output_dir runs --epochs 5
    python train2.py --config_file config.toml
"""

import sys

from caption_train.cli import run_command, train_main

if __name__ == "__main__":
    sys.exit(run_command(train_main, sys.argv[1:]))
