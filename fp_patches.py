"""Stage 6's patches: cubes of HU around world positions, their augmentation, the training patch store and the
batch sampler (fp_reduction.py trains on them, fp_net.py scores them).

    side = patch_side(32.0, 1.0)                                             # voxels on a side
    x = extract_patches(hu, origin, spacing, direction, centers_xyz, side, 1.0)   # float32 HU (N, S, S, S)
    x = uint8_to_input(to_uint8(x, (-1000.0, 400.0)))                       # the network's input in [-1, 1]
    store = PatchStore(folder).build(key, paths, table, side, rng, "train", failed, cfg)
    for x, y in Sampler(store, side, cfg).batches(epoch, steps, batch_size): ...

A patch is a cube whose axes run along world z, y, x (index k along the world axis increasing), sampled
trilinearly from the scan through ct_io.world_to_voxel (origin, spacing and direction: flipped scans give the
same anatomy orientation); beyond the volume the edge voxels are repeated. Training patches are stored as
uint8 (the HU window in 256 levels) with a margin, so that a shifted, scaled or rotated view can be cropped
from them at each draw.

``cfg`` is stage 6's settings (fp_reduction.py's constants by name: VOXEL_MM, HU_WINDOW, JITTER, SHIFT_MM,
MAX_SHIFT_MM, SCALE, AUGMENT, POS_FRACTION, HARD_NEG_PER_SCAN, RANDOM_NEG_PER_SCAN, DENSE_NEG_PER_SCAN,
DENSE_HU, NEG_MARGIN_MM, SEED and the BLOB_* settings).
"""
import itertools
import json
import os
import sys

import numpy as np

import candidates
import ct_io
import metrics
import runfiles

# what a stored patch is centred on (the meta.npz "kind" column)
KIND_CANDIDATE, KIND_NODULE, KIND_RANDOM, KIND_DENSE = 0, 1, 2, 3


# ----------------------------------------------------------------------------- patches at world positions

def patch_side(patch_mm, voxel_mm):
    """Voxels on a side of a patch of ``patch_mm`` at ``voxel_mm`` (at least 2)."""
    return max(int(round(patch_mm / voxel_mm)), 2)


def patch_offsets(side, voxel_mm, origin, spacing, direction):
    """The fractional voxel (z, y, x) offsets of a patch's points from its centre -> (side^3, 3).

    The patch's axes are world z, y, x (index k along world axis increasing), spaced ``voxel_mm``; the world ->
    voxel map is affine, so the offsets of ct_io.world_to_voxel are the same for every centre of a scan."""
    d = (np.arange(side, dtype=np.float64) - (side - 1) / 2.0) * voxel_mm
    gz, gy, gx = np.meshgrid(d, d, d, indexing="ij")
    world = np.stack([gx.ravel(), gy.ravel(), gz.ravel()], axis=1) + np.asarray(origin, np.float64)
    return ct_io.world_to_voxel(world, origin, spacing, direction)


def extract_patches(hu, origin, spacing, direction, centers_xyz, side, voxel_mm, offsets=None):
    """Patches of HU around world centres -> float32 (N, side, side, side), axes world (z, y, x).

    Trilinear samples of ``hu`` (Z, Y, X) at ``voxel_mm`` spacing; points beyond the volume take the nearest edge
    voxel (a candidate at or beyond the edge gives a padded patch, never an error)."""
    from scipy import ndimage
    centers = np.asarray(centers_xyz, np.float64).reshape(-1, 3)
    if offsets is None:
        offsets = patch_offsets(side, voxel_mm, origin, spacing, direction)
    out = np.empty((len(centers), side, side, side), np.float32)
    if not len(centers):
        return out
    shape = np.asarray(hu.shape)
    vox = ct_io.world_to_voxel(centers, origin, spacing, direction).reshape(-1, 3)
    for i, c in enumerate(vox):
        pts = offsets + c
        lo = np.clip(np.floor(pts.min(axis=0)).astype(int) - 1, 0, shape - 1)
        hi = np.clip(np.ceil(pts.max(axis=0)).astype(int) + 2, lo + 1, shape)
        sub = np.asarray(hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], np.float32)
        out[i] = ndimage.map_coordinates(sub, (pts - lo).T, order=1, mode="nearest").reshape(side, side, side)
    return out


def to_uint8(patches, window):
    """HU patches -> uint8 (window clipped, 256 levels): how training patches are stored."""
    lo, hi = float(window[0]), float(window[1])
    return np.rint((np.clip(patches, lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def uint8_to_input(patches):
    """Stored uint8 patches -> the network's float32 input in [-1, 1]."""
    return np.asarray(patches, np.float32) * (2.0 / 255.0) - 1.0


# ----------------------------------------------------------------------------- augmentation

_CUBE = []                      # the 48 symmetries of the cube, made on first use


def cube_symmetries():
    """The 48 signed permutation matrices (rotations and reflections of the cube), as an (48, 3, 3) array."""
    if not _CUBE:
        mats = []
        for perm in itertools.permutations(range(3)):
            for signs in itertools.product((1, -1), repeat=3):
                m = np.zeros((3, 3))
                for r, (c, s) in enumerate(zip(perm, signs)):
                    m[r, c] = s
                mats.append(m)
        _CUBE.append(np.asarray(mats))
    return _CUBE[0]


def augment_crop(stored, side, rng, shift_vox, scale, augment=True):
    """A training view of one stored patch (uint8, S^3 with a margin) -> float32 (side^3) in [-1, 1]: the centre
    crop, or (``augment``) a random cube symmetry, a shift of up to ``shift_vox`` voxels (scalar, or 3 per-axis
    values) and a scale in [1 - scale, 1 + scale], sampled trilinearly."""
    from scipy import ndimage
    s = stored.shape[0]
    c_in, c_out = (s - 1) / 2.0, (side - 1) / 2.0
    if not augment:
        a = int(round(c_in - c_out))
        return uint8_to_input(stored[a:a + side, a:a + side, a:a + side])
    m = cube_symmetries()[rng.integers(48)] * rng.uniform(1 - scale, 1 + scale)
    shift = rng.uniform(-1, 1, 3) * np.asarray(shift_vox, np.float64)
    offset = c_in + shift - m @ np.full(3, c_out)
    out = ndimage.affine_transform(stored.astype(np.float32), m, offset=offset, output_shape=(side,) * 3,
                                   order=1, mode="nearest")
    return out * (2.0 / 255.0) - 1.0


# ----------------------------------------------------------------------------- what a patch is centred on

def nodule_arrays(nodules):
    """A stage-1 /nodules table -> (world xyz (M, 3), diameter_mm (M,), excluded bool (M,))."""
    nod = np.asarray(nodules, dtype=ct_io.NODULE_DTYPE).reshape(-1)
    xyz = np.stack([nod["world_x"], nod["world_y"], nod["world_z"]], axis=1).astype(np.float64)
    return xyz, nod["diameter_mm"].astype(np.float64), nod["excluded"].astype(bool)


def label_candidates(xyz, nod_xyz, diam, excluded):
    """LUNA16's rule (metrics.py) -> (is_tp, is_fp, is_ignored) per candidate."""
    hits = metrics.match_candidates(xyz, nod_xyz, diam)
    _, _, is_fp, is_ign = metrics.detect(hits, np.zeros(len(hits)), excluded)
    return ~is_fp & ~is_ign, is_fp, is_ign


def random_lung_points(hu, lung, origin, spacing, direction, n, rng, nod_xyz, diam, margin_mm, min_hu=None):
    """Up to ``n`` random world points (N, 3) of lung-mask voxels (denser than ``min_hu`` when given), each
    farther than radius + ``margin_mm`` from every annotation. Rejection sampling: no index array of the lung."""
    if n <= 0:
        return np.zeros((0, 3))
    shape = np.asarray(lung.shape)
    got = []
    for _ in range(20):
        zyx = (rng.random((200_000, 3)) * shape).astype(np.int64)
        ok = lung[zyx[:, 0], zyx[:, 1], zyx[:, 2]] > 0
        if min_hu is not None:
            ok &= hu[zyx[:, 0], zyx[:, 1], zyx[:, 2]] > min_hu
        zyx = zyx[ok]
        if len(zyx):
            world = ct_io.voxel_to_world(zyx.astype(np.float64), origin, spacing, direction).reshape(-1, 3)
            if len(nod_xyz):
                d2 = ((world[:, None, :] - nod_xyz[None, :, :]) ** 2).sum(-1)
                far = (d2 >= (np.maximum(diam, 0) / 2.0 + margin_mm)[None, :] ** 2).all(axis=1)
                world = world[far]
            got.append(world)
        if sum(len(g) for g in got) >= n:
            break
    world = np.concatenate(got) if got else np.zeros((0, 3))
    if len(world) > n:
        world = world[rng.choice(len(world), n, replace=False)]
    return world


def sample_groups(scan, uid, table, rng, what, cfg):
    """The training (``what`` = "train") or validation ("val") samples of one stage-1 scan (read with hu and
    lung_mask) -> ([(world xyz, label, kind, stage-5 probability or None), ...], (nodule xyz, diameters,
    excluded)). Candidates of ``table`` plus blobs (cfg BLOB_*): positives on included nodules, the
    HARD_NEG_PER_SCAN highest-scored false positives (every one for validation); the included nodules' centres;
    random and dense lung points away from every annotation."""
    a = scan["attrs"]
    geo = (a["origin"], a["spacing"], a["direction"])
    nod_xyz, diam, excl = nodule_arrays(scan["nodules"])
    xyz, p5, _ = table.of(uid)
    xyz, p5, _, _ = candidates.with_blobs(scan, xyz, p5, candidates.BlobSettings.from_config(cfg))
    tp, fp, _ = label_candidates(xyz, nod_xyz, diam, excl)       # blobs: hard negatives, or positives on nodules
    hard = np.nonzero(fp)[0]
    if len(hard) > cfg["HARD_NEG_PER_SCAN"]:                     # the highest scored (random when no scores)
        order = (np.argsort(-p5[hard], kind="stable") if np.isfinite(p5[hard]).all()
                 else rng.permutation(len(hard)))
        hard = hard[order[:cfg["HARD_NEG_PER_SCAN"]]]
    pos = np.nonzero(tp)[0]
    if what == "val":                                            # validation: every candidate, scored as at the end
        hard = np.nonzero(fp)[0]
    incl = np.nonzero(~excl)[0]
    rnd = random_lung_points(scan["hu"], scan["lung_mask"], *geo, cfg["RANDOM_NEG_PER_SCAN"], rng,
                             nod_xyz, diam, cfg["NEG_MARGIN_MM"])
    dense = random_lung_points(scan["hu"], scan["lung_mask"], *geo, cfg["DENSE_NEG_PER_SCAN"], rng,
                               nod_xyz, diam, cfg["NEG_MARGIN_MM"], cfg["DENSE_HU"])
    groups = [(xyz[pos], 1, KIND_CANDIDATE, p5[pos]), (xyz[hard], 0, KIND_CANDIDATE, p5[hard]),
              (nod_xyz[incl], 1, KIND_NODULE, None), (rnd, 0, KIND_RANDOM, None), (dense, 0, KIND_DENSE, None)]
    return groups, (nod_xyz, diam, excl)


# ----------------------------------------------------------------------------- the patch store

def _sig(path):
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def store_key(what, sampling, table_paths, paths):
    """What a store was made from (the settings, the candidate files and the scans, with their sizes and times):
    a store is reused only when its key is the same."""
    return json.dumps({"what": what, "sampling": sampling, "candidates": [_sig(p) for p in table_paths],
                       "scans": [_sig(p) if os.path.isfile(p) else [p] for p in paths]}, sort_keys=True)


def stored_side(side, cfg):
    """Side of a stored patch: ``side`` plus the margin the largest shift and scale of augmentation need."""
    margin_vox = cfg["MAX_SHIFT_MM"] / cfg["VOXEL_MM"] + side * cfg["SCALE"] / 2.0
    return side + 2 * int(np.ceil(margin_vox))


class PatchStore:
    """Training or validation patches on disk: patches.u8 (uint8, (N, S, S, S), memory-mapped when read) and
    meta.npz (label, kind, largest jitter in voxels, scan number, stage-5 probability, world xyz; each scan's
    nodules); written scan by scan, meta.npz last (it marks the store complete, with the settings that made it)."""

    def __init__(self, folder):
        self.folder = folder
        self.data_path, self.meta_path = os.path.join(folder, "patches.u8"), os.path.join(folder, "meta.npz")

    def load(self, key):
        """The stored patches if complete and made with ``key`` -> True."""
        if not os.path.isfile(self.meta_path) or not os.path.isfile(self.data_path):
            return False
        try:
            meta = dict(np.load(self.meta_path, allow_pickle=False))
        except Exception:
            return False
        if str(meta.get("key")) != key:
            return False
        self.meta = meta
        n, s = int(meta["n"]), int(meta["side"])
        if os.path.getsize(self.data_path) != n * s ** 3:
            return False
        self.patches = np.memmap(self.data_path, np.uint8, "r", shape=(n, s, s, s)) if n else np.zeros((0, s, s, s), np.uint8)
        return True

    def build(self, key, paths, table, side, rng, what, failed, cfg):
        """Extract the patches of ``paths`` (stage-1 files; candidates from ``table``, a CandidateTable) ->
        self (loaded). A scan that fails is reported in one line, appended to ``failed`` and skipped."""
        from tqdm import tqdm
        os.makedirs(self.folder, exist_ok=True)
        runfiles.clean_stale(self.folder)
        if os.path.exists(self.meta_path):
            os.remove(self.meta_path)
        cols = {k: [] for k in ("label", "kind", "jitter_vox", "scan", "p5", "xyz",
                                "nod_scan", "nod_xyz", "nod_diam", "nod_excl")}
        scan_uids, n, s = [], 0, stored_side(side, cfg)
        with open(self.data_path, "wb") as f:
            bar = tqdm(paths, desc=f"fp_reduction {what} patches", unit="scan")
            for path in bar:
                try:
                    scan = ct_io.read_stage1(path, ("hu", "lung_mask"))
                    a = scan["attrs"]
                    uid = str(a.get("seriesuid", runfiles.uid_of(path)))
                    groups, nodules = sample_groups(scan, uid, table, rng, what, cfg)
                    centers = np.concatenate([g[0].reshape(-1, 3) for g in groups])
                    hu_patches = extract_patches(scan["hu"], a["origin"], a["spacing"], a["direction"], centers, s,
                                                 cfg["VOXEL_MM"])
                    f.write(to_uint8(hu_patches, cfg["HU_WINDOW"]).tobytes())
                except Exception as e:
                    msg = runfiles.one_line(e)
                    msg = msg if isinstance(e, ct_io.ScanError) else f"{path}: {type(e).__name__}: {msg}"
                    tqdm.write(f"FAILED {msg}; skipped", file=sys.stderr)
                    failed.append({"path": path, "error": msg})
                    continue
                _add_columns(cols, len(scan_uids), groups, nodules, cfg)
                scan_uids.append(uid)
                n += len(centers)
                bar.set_postfix(patches=n)
        self._write_meta(cols, key, n, s, scan_uids)
        if not self.load(key):
            raise RuntimeError(f"{self.folder}: patch store unreadable after writing")
        return self

    def _write_meta(self, cols, key, n, side, scan_uids):
        meta = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols.items()}
        meta["xyz"] = meta["xyz"].reshape(-1, 3)
        meta["nod_xyz"] = meta["nod_xyz"].reshape(-1, 3)
        meta.update(key=np.array(key), n=np.array(n), side=np.array(side),
                    uids=np.array(scan_uids if scan_uids else [""]))
        with runfiles.atomic(self.meta_path) as tmp:
            np.savez(tmp, **meta)


def _add_columns(cols, k, groups, nodules, cfg):
    """Append scan number ``k``'s samples (sample_groups) to the store's columns: label, kind, scan, p5, xyz and
    the largest jitter in voxels (nodule centres: JITTER x radius; the others: SHIFT_MM; both at most
    MAX_SHIFT_MM); and its nodules."""
    nod_xyz, diam, excl = nodules
    voxel = cfg["VOXEL_MM"]
    incl = np.nonzero(~excl)[0]
    for g_xyz, label, kind, p in groups:
        m = len(g_xyz)
        cols["label"].append(np.full(m, label, np.uint8))
        cols["kind"].append(np.full(m, kind, np.int8))
        cols["scan"].append(np.full(m, k, np.int32))
        cols["p5"].append(np.full(m, np.nan, np.float32) if p is None else np.asarray(p, np.float32))
        cols["xyz"].append(np.asarray(g_xyz, np.float64).reshape(-1, 3))
        if kind == KIND_NODULE:
            jit = np.minimum(cfg["JITTER"] * diam[incl] / 2.0, cfg["MAX_SHIFT_MM"]) / voxel
        else:
            jit = np.full(m, min(cfg["SHIFT_MM"], cfg["MAX_SHIFT_MM"]) / voxel)
        cols["jitter_vox"].append(np.asarray(jit, np.float32))
    cols["nod_scan"].append(np.full(len(diam), k, np.int32))
    cols["nod_xyz"].append(nod_xyz)
    cols["nod_diam"].append(diam)
    cols["nod_excl"].append(excl)


def store_counts(train, val):
    """What the training store holds, by kind, and the validation store's size -> dict (printed, and recorded in
    metrics.json)."""
    meta = train.meta
    kind, label = meta["kind"], meta["label"]
    return {"positive_candidates": int(((kind == KIND_CANDIDATE) & (label == 1)).sum()),
            "nodule_centres": int((kind == KIND_NODULE).sum()),
            "hard_negatives": int(((kind == KIND_CANDIDATE) & (label == 0)).sum()),
            "random_negatives": int((kind == KIND_RANDOM).sum()),
            "dense_negatives": int((kind == KIND_DENSE).sum()),
            "scans": int(len(meta["uids"])) if int(meta["n"]) else 0,
            "validation_patches": int(val.meta["n"])}


# ----------------------------------------------------------------------------- training batches

class Sampler:
    """Training batches from a PatchStore: POS_FRACTION positives (with replacement: oversampled), the rest
    negatives, each augmented (AUGMENT, SCALE); seeded by (SEED, epoch)."""

    def __init__(self, store, side, cfg):
        self.store, self.side = store, side
        self.seed, self.pos_fraction = cfg["SEED"], cfg["POS_FRACTION"]
        self.scale, self.augment = cfg["SCALE"], cfg["AUGMENT"]
        label = store.meta["label"]
        self.pos, self.neg = np.nonzero(label == 1)[0], np.nonzero(label == 0)[0]
        if not len(self.pos) or not len(self.neg):
            raise SystemExit(f"{store.folder}: {len(self.pos)} positive and {len(self.neg)} negative training "
                             "patches; need both (nodules in the training part, lung in the masks)")

    def batches(self, epoch, steps, batch_size, prefetch=2):
        """The epoch's ``steps`` batches (x, y); up to ``prefetch`` of them made ahead in one thread while the
        network trains on the last (the same batches in the same order: one thread draws them all)."""
        if prefetch <= 0:
            yield from self._batches(epoch, steps, batch_size)
            return
        import queue
        import threading
        q, done = queue.Queue(maxsize=prefetch), object()

        def produce():
            try:
                for b in self._batches(epoch, steps, batch_size):
                    q.put(b)
            except BaseException as e:        # handed to the consumer, raised there
                q.put(e)
            q.put(done)
        threading.Thread(target=produce, daemon=True).start()
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _batches(self, epoch, steps, batch_size):
        rng = np.random.default_rng([self.seed, epoch])
        n_pos = max(1, int(round(self.pos_fraction * batch_size)))
        jit = self.store.meta["jitter_vox"]
        for _ in range(steps):
            idx = np.concatenate([rng.choice(self.pos, n_pos), rng.choice(self.neg, batch_size - n_pos)])
            x = np.empty((batch_size, self.side, self.side, self.side, 1), np.float32)
            for j, i in enumerate(idx):
                x[j, ..., 0] = augment_crop(self.store.patches[i], self.side, rng, jit[i], self.scale, self.augment)
            y = self.store.meta["label"][idx].astype(np.float32)[:, None]
            yield x, y
