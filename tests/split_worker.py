"""One rank of a cell trained by several CPU processes over gloo, for tests/test_split.py.

Usage: python split_worker.py RANK SIZE ADDRESS CONFIG_JSON CHECKPOINT_DIR [RECORD_FILE]
With RECORD_FILE, every micro-batch the rank trains (after Mixup/CutMix) is saved there.
"""
import json
import sys
from pathlib import Path

import torch

from ablate import train
from ablate.cell_group import CellGroup
from ablate.config import CellConfig


def main() -> None:
    rank, size, address, config, ckpt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    record = sys.argv[6] if len(sys.argv) > 6 else None
    torch.set_num_threads(1)
    seen = []
    if record:
        real = train._pass

        def recording(forward, criterion, images, targets, *args):
            seen.append((images.clone(), targets.clone()))
            return real(forward, criterion, images, targets, *args)
        train._pass = recording
    group = CellGroup.join(rank, size, address, torch.device("cpu"))
    try:
        train.train_cell(CellConfig(**json.loads(config)), device=torch.device("cpu"), checkpoint_dir=Path(ckpt),
                         group=group, log=lambda m: None, progress=False)
    finally:
        group.leave()
    if record:
        torch.save(seen, record)


if __name__ == "__main__":
    main()
