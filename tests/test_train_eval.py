"""train_top1: after every epoch a fixed subset of the training split is evaluated like the
validation split, on every loader path and over several processes, without changing any training
result (ablate/data/subset.py, Loaders.train_eval, train.evaluate_train_subset)."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from ablate import names
from ablate.cell_group import free_port
from ablate.config import CellConfig
from ablate.data.array_loader import PackedImages
from ablate.data.cache import build_cache
from ablate.data.digits import load_digits_split
from ablate.data.loaders import build_loaders
from ablate.data.subset import fixed_subset
from ablate.data.synthetic import SyntheticBatches
from ablate.train import evaluate_train_subset, train_cell
from test_data import folder_cfg, tree  # noqa: F401 - tree is a fixture: a small image tree with bad files

CPU = torch.device("cpu")
QUIET = dict(log=lambda m: None)


def _digits(**train) -> CellConfig:
    return CellConfig.model_validate({
        "data": {"name": "digits"},
        "model": {"image_size": 8, "patch_size": 2, "width": 16, "depth": 1, "mlp_ratio": 2},
        "train": {"epochs": 3, "batch_size": 64, "lr": 3e-3, "warmup_epochs": 1, "hflip": 0.5,
                  "crop_scale": 0.6, "mixup": 0.2, "cutmix": 0.5, **train}})


def _synthetic(**train) -> CellConfig:
    return CellConfig.model_validate({
        "data": {"name": "synthetic", "train_size": 50, "val_size": 9, "num_classes": 3},
        "model": {"image_size": 8, "patch_size": 2, "width": 16, "depth": 1, "in_chans": 1},
        "train": {"batch_size": 8, **train}})


def _all(batches) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in batches])
    return torch.cat(xs), torch.cat(ys)


def _global_rngs():
    return torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def _same_rngs(a, b) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


# ---- the subset ----------------------------------------------------------------------------------

def test_the_subset_is_evenly_spaced_and_the_whole_split_when_smaller():
    assert fixed_subset(10, 4).tolist() == [0, 2, 5, 7]
    assert fixed_subset(5, 10).tolist() == fixed_subset(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert fixed_subset(5, 0) is None and fixed_subset(0, 3) is None
    big = fixed_subset(1_281_167, 10_000)
    assert len(big) == len(set(big.tolist())) == 10_000 and big[-1] < 1_281_167


def test_digits_subset_is_the_same_images_for_every_seed_and_epoch_through_the_validation_transform():
    a = build_loaders(_digits(eval_train_images=100), CPU)
    b = build_loaders(_digits(eval_train_images=100, seed=7), CPU)
    b.set_epoch(5)
    assert (a.n_train_eval, b.n_train_eval) == (100, 100)
    xa, ya = _all(a.train_eval)
    xb, yb = _all(b.train_eval)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    d = load_digits_split()
    rows = fixed_subset(len(d.train_labels), 100)
    assert torch.equal(ya, d.train_labels[rows])
    images = PackedImages.from_fixed(d.train_images[rows]).gather(torch.arange(100))
    assert torch.equal(xa, a.val.transform(images, 0))  # exactly validation's transform
    whole = build_loaders(_digits(), CPU)  # the default (10,000) is more than digits' 1,437
    assert whole.n_train_eval == whole.n_train == 1437
    assert build_loaders(_digits(eval_train_images=0), CPU).train_eval is None


def test_synthetic_subset_is_what_the_first_epoch_trained_on():
    loaders = build_loaders(_synthetic(eval_train_images=20), CPU)
    assert loaders.n_train_eval == 20
    trained = SyntheticBatches(50, 3, (1, 8, 8), batch_size=8, train=True, seed=0, device=CPU)
    x_train, y_train = _all(trained)  # epoch 0: 6 whole batches of 8
    x, y = _all(loaders.train_eval)
    assert torch.equal(x, x_train[:20]) and torch.equal(y, y_train[:20])
    assert build_loaders(_synthetic(), CPU).n_train_eval == 48  # the images an epoch trains on


@pytest.mark.parametrize("make", [_digits, _synthetic], ids=["memory", "synthetic"])
def test_ranks_share_the_subset_each_image_once(make):
    whole = _all(build_loaders(make(eval_train_images=45), CPU).train_eval)
    for processes in (2, 3):
        shares = [_all(build_loaders(make(eval_train_images=45), CPU, processes=processes, rank=r).train_eval)
                  for r in range(processes)]
        assert torch.equal(torch.cat([x for x, _ in shares]), whole[0])
        assert torch.equal(torch.cat([y for _, y in shares]), whole[1])


def test_folder_and_cache_subsets_are_the_same_images_with_bad_files_counted_once(tree):  # noqa: F811
    folder = build_loaders(folder_cfg(tree, loader="folder"), CPU, **QUIET)
    assert (folder.kind, folder.n_train_eval) == ("folder", 16)  # the broken JPEG is found when read
    before = _global_rngs()
    xf, yf = _all(folder.train_eval)
    assert _same_rngs(before, _global_rngs())  # its DataLoader draws no seed from torch's generator
    _all(folder.train)
    assert (len(yf), folder.skipped()) == (15, 2)  # broken.jpg (read by both loaders) and notes.txt, once each
    shares = [_all(build_loaders(folder_cfg(tree, loader="folder"), CPU, processes=2, rank=r, **QUIET).train_eval)
              for r in range(2)]
    assert torch.equal(torch.cat([y for _, y in shares]), yf)
    assert torch.equal(torch.cat([x for x, _ in shares]), xf)

    build_cache(tree, 36, workers=1, progress=False, **QUIET)
    cache = build_loaders(folder_cfg(tree), CPU, **QUIET)
    assert (cache.kind, cache.n_train_eval) == ("cache", 15)  # the cache holds the decodable images only
    xc, yc = _all(cache.train_eval)
    assert torch.equal(yc, yf)
    assert torch.allclose(xc, xf, atol=1e-5)  # the folder loader's resize and centre crop, as validation's
    assert cache.skipped() == 2
    cfg = folder_cfg(tree)
    few = build_loaders(cfg.model_copy(update={"train": cfg.train.model_copy(update={"eval_train_images": 4})}),
                        CPU, **QUIET)
    assert torch.equal(_all(few.train_eval)[1], yc[fixed_subset(15, 4)])


# ---- training -------------------------------------------------------------------------------------

def _epochs(cfg: CellConfig, folder) -> tuple[list, dict]:
    seen = []
    final = train_cell(cfg, device=CPU, checkpoint_dir=folder, on_epoch=seen.append, **QUIET)
    return seen, final


def test_measuring_the_training_subset_changes_no_training_result(tmp_path):
    off, off_final = _epochs(_digits(eval_train_images=0), tmp_path / "off")
    on, on_final = _epochs(_digits(), tmp_path / "on")  # the default: all 1,437 training images
    assert len(on) == len(off) == 3
    for a, b in zip(off, on):
        assert (a.val_top1, a.val_loss, a.val_top5, a.train_loss) == (b.val_top1, b.val_loss, b.val_top5, b.train_loss)
        assert a.train_top1 is None and names.TRAIN_TOP1 not in a.metrics()
        assert 0 <= b.train_top1 <= 100 and math.isfinite(b.train_loss_eval) and b.train_loss_eval > 0
        assert {names.TRAIN_TOP1, names.TRAIN_LOSS_EVAL} <= set(b.metrics())
    assert on[-1].train_top1 != on[0].train_top1  # measured anew each epoch
    for k in ("val_top1", "val_top5", "val_loss", "train_loss"):
        assert off_final[k] == on_final[k], k
    assert on_final[names.TRAIN_TOP1] == on[-1].train_top1
    assert on_final[names.TRAIN_LOSS_EVAL] == on[-1].train_loss_eval
    assert on_final[names.GAP_TOP1] == on_final[names.TRAIN_TOP1] - on_final["val_top1"]
    assert not {names.TRAIN_TOP1, names.TRAIN_LOSS_EVAL, names.GAP_TOP1} & set(off_final)


def test_evaluating_the_subset_leaves_the_global_generators_as_they_were():
    loaders = build_loaders(_digits(), CPU)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(3 * 8 * 8, 10))
    before = _global_rngs()
    loss, top1 = evaluate_train_subset(model, loaders, CPU, "off")
    assert _same_rngs(before, _global_rngs())
    assert not model.training and 0 <= top1 <= 100 and loss > 0
    assert evaluate_train_subset(model, build_loaders(_digits(eval_train_images=0), CPU), CPU, "off") == (None, None)


#: one rank of a two-process group: its share of the subset, summed over the group by evaluate
RANK = """
import json, sys, torch
from ablate.cell_group import CellGroup
from ablate.config import CellConfig
from ablate.data.array_loader import PackedImages
from ablate.data.loaders import build_loaders
from ablate.train import evaluate_train_subset
rank, size, address, cfg = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], CellConfig(**json.loads(sys.argv[4]))
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
group = CellGroup.join(rank, size, address, torch.device("cpu"))
try:
    loaders = build_loaders(cfg, "cpu", processes=size, rank=rank)
    print(json.dumps(evaluate_train_subset(model, loaders, torch.device("cpu"), "off", group)))
finally:
    group.leave()
"""


@pytest.mark.slow  # two processes that import torch and the loaders: about 10 s on two busy cores
def test_a_cell_split_over_two_processes_measures_the_same_subset():
    cfg = _digits(eval_train_images=999)  # shares of 499 and 500 images: no batch boundary between them
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    alone = evaluate_train_subset(model, build_loaders(cfg, CPU), CPU, "off")
    address = f"tcp://127.0.0.1:{free_port()}"
    settings = json.dumps(cfg.model_dump(mode="json"))
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(r), "2", address, settings], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for r in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    for out in outputs:
        loss, top1 = json.loads(out.strip().splitlines()[-1])
        assert top1 == pytest.approx(alone[1], abs=1e-9)  # the same hits over the same 999 images
        assert loss == pytest.approx(alone[0], rel=1e-6)  # float32 batch sums, taken over other batches
