"""The training data source on a run's table: reads N_BATCHES batches of SliceTableDataset
(data_generator_sequence_table.py) with the augmentation of stage 4's defaults, and prints their shapes and the
batches per second in this process.

Reads WORK_DIR/2_table/slices.h5 (table.py) and WORK_DIR/3_split/train_idx.npy (slice_idx.py); writes nothing.

Run
    python benchmarks/bench_generator.py --WORK_DIR=work
    python benchmarks/bench_generator.py --WORK_DIR=work --TRAIN_CROP=192 --INTENSITY=0
"""
import os
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from configurator import configure  # noqa: E402

# ----------------------------------------------------------------------------- settings
WORK_DIR = "work"              # root of a run
TABLE = ""                     # the slice table; "" = WORK_DIR/2_table/slices.h5
INDEX = ""                     # row index .npy; "" = WORK_DIR/3_split/train_idx.npy
BATCH_SIZE = 12                # thesis: 12
ROT_DEG = 6.0                  # rotation uniform in +-ROT_DEG degrees (thesis: 6)
ZOOM = 0.0                     # zoom uniform in [1 - ZOOM, 1 + ZOOM] (thesis: none)
LABEL_INTERP = "nearest"       # "nearest", "threshold" (bilinear >= 0.5) or "truncate" (thesis bug)
TRAIN_CROP = 0                 # random crop side (px); 0 = whole slice
CROP_NODULE_P = 0.8            # share of crops placed on a nodule (when the slice has one)
INTENSITY = True               # intensity augmentation with the default ranges (False: geometry only)
SEED = 85                      # shuffle and augmentation seed
N_BATCHES = 20                 # batches read


def main(argv=None):
    from tqdm import tqdm
    from data_generator_sequence_table import SliceTableDataset, intensity_settings
    cfg = configure(globals(), argv)
    table = cfg.TABLE or os.path.join(cfg.WORK_DIR, "2_table", "slices.h5")
    index = np.load(cfg.INDEX or os.path.join(cfg.WORK_DIR, "3_split", "train_idx.npy"))
    ds = SliceTableDataset(table, index, batch_size=cfg.BATCH_SIZE, rot_deg=cfg.ROT_DEG, zoom=cfg.ZOOM,
                           label_interp=cfg.LABEL_INTERP, crop=cfg.TRAIN_CROP, crop_nodule_p=cfg.CROP_NODULE_P,
                           seed=cfg.SEED, intensity=intensity_settings() if cfg.INTENSITY else None)
    n = min(cfg.N_BATCHES, len(ds))
    t0 = time.time()
    for i in tqdm(range(n), desc="batches"):
        x, y = ds[i]
    dt = time.time() - t0
    print(f"{len(ds)} batches per epoch; x {x.shape} {x.dtype}, y {y.shape} {y.dtype}; "
          f"{n / max(dt, 1e-9):.1f} batches/s in this process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
