"""Run under torchrun by tests/test_batching.py: the length-grouped sampler through accelerate's prepared DataLoader, as
training builds it (seedable sampler on), writing what this process was given to OUT/rank<N>.json.

    torchrun --nproc_per_node 2 tests/batching_worker.py DATASET_DIR OUT_DIR

Records, per epoch, the batches (dataset indices) this process got, and those it got after skipping its first 2
batches of epoch 1 (what a resumed run does).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from caption_train.data.dataset import CaptionDataset


class Indices(CaptionDataset):
    """A CaptionDataset that serves its indices (no image is decoded): which rows a batch holds is what is checked."""

    def __getitem__(self, index: int) -> int:
        return index


def main(dataset_dir: str, out_dir: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from caption_train.data.batching import LengthGroupedBatches
    from caption_train.data.scan import scan_dataset

    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    samples = scan_dataset(Path(dataset_dir), probe=False).samples
    dataset = Indices(samples, repeat=True)
    sampler = LengthGroupedBatches(dataset, np.array([len(s.caption) for s in samples]), batch_size=3, seed=7)
    loader = accelerator.prepare(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=list))
    record = {}
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        loader.set_epoch(epoch)
        record[str(epoch)] = [batch for batch in loader]
    dataset.set_epoch(1)
    loader.set_epoch(1)
    record["1-skip2"] = [batch for batch in accelerator.skip_first_batches(loader, 2)]
    Path(out_dir, f"rank{accelerator.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:])
