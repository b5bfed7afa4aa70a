"""Stage 5's outputs: the prediction files, the mask images, the report's tables and pictures.

    report.write_prediction(path, prob, mask, attrs)     # 5_predictions/<seriesuid>.h5 (/prob, /mask)
    prob, mask, attrs = report.read_prediction(path)
    book = report.PictureBook(8, 32); book.offer(...); book.draw(folder)   # overlays of found, missed, false
    report.write_candidates(folder, results)           # candidates.csv + candidates_detail.csv
    report.print_table(metrics)                        # the metrics by nodule size, as `make demo` prints them

Every file is written under a temporary name and renamed when complete (runfiles.atomic).
"""
import heapq
import os

import numpy as np

import froc_plot
import runfiles
from candidates import CandidateWriter

_LUNG_WINDOW = (-1000, 400)     # HU range shown in pictures
_NODULE_FIELDS = ["seriesuid", "index", "world_x", "world_y", "world_z", "diameter_mm", "size_bin", "found",
                  "found_thesis_rule", "n_hits", "dice", "max_prob", "candidate_prob", "found_by_candidate",
                  "label_voxels", "center_z", "center_y", "center_x"]        # nodules.csv's columns
_DETAIL_FIELDS = ["n_voxels", "center_z", "center_y", "center_x", "status"]  # candidates_detail.csv's own columns


# ----------------------------------------------------------------------------- prediction files

def write_prediction(path, prob, mask, attrs):
    """/prob and /mask (one chunk per slice, zlib: readable by h5py, PyTables, MATLAB) and ``attrs``."""
    import tables
    filters = tables.Filters(complevel=1, complib="zlib", shuffle=True)
    with runfiles.atomic(path) as tmp:
        with tables.open_file(tmp, "w") as h5:
            for name, arr in (("prob", prob), ("mask", mask)):
                h5.create_carray("/", name, obj=arr, filters=filters, chunkshape=(1,) + arr.shape[1:])
            for k, v in attrs.items():
                setattr(h5.root._v_attrs, k, v)


def read_prediction(path):
    """A stage-5 file -> (prob, mask, attrs)."""
    import tables
    with tables.open_file(path, "r") as h5:
        a = h5.root._v_attrs
        return h5.root.prob.read(), h5.root.mask.read(), {k: a[k] for k in a._v_attrnamesuser}


def write_mask_image(path, mask, origin, spacing, direction):
    """The mask as an image file (.nii.gz, .mha, ...) in the scan's geometry (ITK x, y, z order)."""
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(np.ascontiguousarray(mask, np.uint8))
    img.SetOrigin([float(v) for v in origin])
    img.SetSpacing([float(v) for v in spacing])
    img.SetDirection([float(v) for v in np.asarray(direction).reshape(-1)])
    with runfiles.atomic(path) as tmp:
        sitk.WriteImage(img, tmp, True)


# ----------------------------------------------------------------------------- pictures

class PictureBook:
    """Keeps, while scans stream past, small crops for the N most telling overlays of each kind (found and
    missed: the largest nodules; false: the most probable components) and draws them at the end. Memory is
    bounded by N crops per kind, whatever the number of scans."""

    def __init__(self, n, half):
        self.n, self.half, self.count = n, half, 0
        self.heaps = {"found": [], "missed": [], "false": [], "candidate": []}   # candidate: scans without truth

    def _wanted(self, kind, priority):
        heap = self.heaps[kind]
        return self.n > 0 and not (len(heap) >= self.n and priority <= heap[0][0])

    def _keep(self, kind, priority, rec):
        heap = self.heaps[kind]
        self.count += 1
        item = (priority, self.count, rec)
        heapq.heappush(heap, item) if len(heap) < self.n else heapq.heapreplace(heap, item)

    def offer(self, kind, priority, hu, prob, mask, nodule_mask, center_zyx, spacing, diameter_mm, title):
        """A crop around ``center_zyx`` (voxels) of one kind ("found", "missed", "false", "candidate"), kept
        when ``priority`` is among the N highest of its kind so far."""
        if not self._wanted(kind, priority):
            return
        z, y, x = (int(round(v)) for v in center_zyx)
        z = min(max(z, 0), hu.shape[0] - 1)
        half = max(self.half, int(np.ceil(1.5 * diameter_mm / float(spacing[1]))) if diameter_mm > 0 else 0)
        ys = slice(max(y - half, 0), min(y + half, hu.shape[1]))
        xs = slice(max(x - half, 0), min(x + half, hu.shape[2]))
        rec = {"hu": hu[z, ys, xs].copy(), "prob": np.asarray(prob[z, ys, xs], np.float32),
               "mask": mask[z, ys, xs] > 0, "truth": nodule_mask[z, ys, xs] > 0, "title": f"{title}\nslice z={z}"}
        self._keep(kind, priority, rec)

    def merge(self, heaps):
        """Offer another book's kept crops (its ``heaps``, e.g. a Dask worker's): this book keeps its N best."""
        for kind, heap in heaps.items():
            for priority, _, rec in heap:
                if self._wanted(kind, priority):
                    self._keep(kind, priority, rec)

    def draw(self, folder):
        """Draw the kept crops as <kind>_<rank>.png in ``folder`` -> the paths written."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from skimage import measure
        os.makedirs(folder, exist_ok=True)
        written = []
        for kind, heap in self.heaps.items():
            for rank, (_, _, rec) in enumerate(sorted(heap, key=lambda t: -t[0])):
                fig, axes = plt.subplots(1, 2, figsize=(7, 3.8))
                axes[0].imshow(rec["hu"], cmap="gray", vmin=_LUNG_WINDOW[0], vmax=_LUNG_WINDOW[1])
                for c in measure.find_contours(rec["truth"].astype(float), 0.5):
                    axes[0].plot(c[:, 1], c[:, 0], color="lime", lw=1.2)
                for c in measure.find_contours(rec["mask"].astype(float), 0.5):
                    axes[0].plot(c[:, 1], c[:, 0], color="red", lw=1.2, ls="--")
                axes[0].set_title("CT, prediction (red): no truth" if kind == "candidate" else
                                  "CT, truth (green), prediction (red)", fontsize=8)
                im = axes[1].imshow(rec["prob"], cmap="magma", vmin=0, vmax=1)
                axes[1].set_title("nodule probability", fontsize=8)
                fig.colorbar(im, ax=axes[1], fraction=0.046)
                for ax in axes:
                    ax.axis("off")
                fig.suptitle(rec["title"], fontsize=8)
                path = os.path.join(folder, f"{kind}_{rank:02d}.png")
                with runfiles.atomic(path) as tmp:
                    fig.savefig(tmp, dpi=100, format="png")
                plt.close(fig)
                written.append(path)
        return written


def write_mip(path, hu, prob, nodules, comps, seriesuid, spacing):
    """Axial and coronal maximum-intensity projections of the probability over the mean CT (lung window);
    truth centers circled green, the mask's components' centers marked cyan. Coronal: z drawn upwards, to scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    keep = [(n["center_z"], n["center_y"], n["center_x"]) for n in nodules if not n["excluded"]]
    for ax, axis, name in ((axes[0], 0, "axial (max over z)"), (axes[1], 1, "coronal (max over y)")):
        ct = np.zeros(hu.shape[:axis] + hu.shape[axis + 1:], np.float64)
        for z in range(hu.shape[0]):                       # slice by slice: no float copy of the volume
            s = np.clip(hu[z], *_LUNG_WINDOW)
            if axis == 0:
                ct += s
            else:
                ct[z] = s.mean(axis=0)
        ct = ct / hu.shape[0] if axis == 0 else ct
        p = np.max(prob, axis=axis).astype(np.float32)
        view = dict(origin="upper", aspect=1.0) if axis == 0 else \
            dict(origin="lower", aspect=float(spacing[2]) / float(spacing[0]))
        ax.imshow(ct, cmap="gray", **view)
        ax.imshow(np.ma.masked_less(p, 0.05), cmap="autumn", vmin=0, vmax=1, alpha=0.6, **view)
        for cz, cy, cx in keep:
            ax.plot(cx, cy if axis == 0 else cz, "o", mfc="none", mec="lime", ms=12)
        for c in comps:
            ax.plot(c["center_x"], c["center_y"] if axis == 0 else c["center_z"], "x", color="cyan", ms=6)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{seriesuid}: probability MIP (>= 0.05), {'truth (green o), ' if keep else ''}components (cyan x)",
                 fontsize=9)
    with runfiles.atomic(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- the report's files

def write_nodules(path, results):
    """nodules.csv: one row per truth nodule of every scan (evaluation.evaluate_scan's rows)."""
    runfiles.write_csv(path, [r for res in results for r in res["nodules"]], _NODULE_FIELDS)


def write_candidates(folder, results):
    """candidates.csv (LUNA16 format) and candidates_detail.csv (voxel center, size, TP / FP / ignored, or
    "no truth" for scans without annotations) of every scan's candidates, in ``folder``."""
    with CandidateWriter(folder, _DETAIL_FIELDS) as out:
        for res in results:
            for c, xyz, fp, ign in zip(res["candidates"], res["candidate_world"], res["candidate_is_fp"],
                                       res["candidate_is_ignored"]):
                out.write(res["seriesuid"], xyz, c["prob"], n_voxels=int(c["n_voxels"]),
                          center_z=f"{c['center_z']:.2f}", center_y=f"{c['center_y']:.2f}",
                          center_x=f"{c['center_x']:.2f}",
                          status=("no truth" if not res["annotated"] else "FP" if fp else ("ignored" if ign else "TP")))


def write_froc(path, curves, metrics, rates):
    """froc.png: the FROC curve overall (bold, its sensitivities at ``rates`` marked) and by size, with CPMs."""
    lines = [(c, f"{name}: CPM {c['cpm']:.3f}", dict(lw=2.2, color="black") if name == "all" else dict(lw=1.0),
              name == "all") for name, c in curves.items() if froc_plot.drawable(c)]   # a bin without nodules: none
    title = (f"FROC over {metrics['froc']['n_scans']} scans, {metrics['n_nodules']} nodules, "
             f"{metrics['n_candidates']} candidates")
    return froc_plot.write_froc(path, lines, rates, title, title_size=10, fontsize=8, loc="lower right")


def print_table(m):
    """The metrics by nodule size as plain-text tables (what `make demo` ends with): the operating point (the
    mask at THRESHOLD), then the FROC over the candidates: sensitivity at each rate, CPM, candidate recall."""
    def f(v, pct=True):
        return "  n/a" if v is None or not np.isfinite(v) else (f"{100 * v:5.1f}%" if pct else f"{v:5.3f}")
    bins = m["size_bins_mm"]
    print(f"{'diameter (mm)':>14} {'nodules':>8} {'found':>6} {'sensitivity':>12} {'nodule Dice':>12} "
          f"{'Dice found':>11} {'thesis rule':>12} {'CPM':>6}")
    for b in bins + ["all"]:
        s = m["sensitivity"]["by_size"][b] if b != "all" else m["sensitivity"]
        d = m["nodule_dice"]["by_size"][b] if b != "all" else m["nodule_dice"]["value"]
        t = m["sensitivity_thesis_rule"]["by_size"][b] if b != "all" else m["sensitivity_thesis_rule"]["value"]
        c = m["cpm"]["by_size"][b] if b != "all" else m["cpm"]["value"]
        g = m["nodule_dice_found"]["by_size"][b] if b != "all" else m["nodule_dice_found"]["value"]
        print(f"{b:>14} {s['total']:>8} {s['found']:>6} {f(s['value']):>12} {f(d):>12} {f(g):>11} {f(t):>12} "
              f"{f(c, False):>6}")
    print(f"false positives per scan {m['fp_per_scan']['value']:.2f} (at threshold {m.get('threshold')}); "
          f"slice Dice {f(m['slice_dice']['value'])} (pooled over all slices)")
    fr, rec = m["froc"], m["candidate_recall"]
    rates = [f"{r:g}" if r >= 1 else f"1/{round(1 / r)}" for r in fr["fp_rates"]]
    print(f"FROC: sensitivity at false positives per scan ({m['n_candidates']} candidates of prob > "
          f"{m.get('candidate_threshold')}, <= {m.get('max_candidates')} a scan; {fr['n_scans']} scans)")
    print(f"{'diameter (mm)':>14} {'nodules':>8} " + " ".join(f"{r:>6}" for r in rates) + f" {'CPM':>6} {'recall':>7}")
    for b in bins + ["all"]:
        s = fr["by_size"][b] if b != "all" else fr["sensitivities"]
        r = rec["by_size"][b] if b != "all" else rec
        c = m["cpm"]["by_size"][b] if b != "all" else m["cpm"]["value"]
        print(f"{b:>14} {r['total']:>8} " + " ".join(f"{f(v):>6}" for v in s) + f" {f(c, False):>6} "
              f"{f(r['value']):>7}")
