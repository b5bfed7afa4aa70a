"""postprocess.py's metrics on hand-made volumes: every expected number below is worked out by hand."""
import numpy as np
import pytest

import ct_io
import postprocess as pp

IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)
SHAPE = (24, 64, 64)


def ball(shape, center_zyx, radius_zyx):
    """Boolean ellipsoid of the given radii (voxels) around a voxel center."""
    zz, yy, xx = np.ogrid[:shape[0], :shape[1], :shape[2]]
    (cz, cy, cx), (rz, ry, rx) = center_zyx, radius_zyx
    return ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def nodule(index, center_zyx, diameter, excluded=0, world=None):
    """A /nodules row; on the identity geometry with origin 0 and spacing 1, world (x, y, z) = (x, y, z) voxel."""
    z, y, x = center_zyx
    wx, wy, wz = world if world is not None else (x, y, z)
    return (index, z, y, x, wx, wy, wz, diameter, -1, b"sphere", excluded)


def table(*rows):
    return np.array(list(rows), dtype=ct_io.NODULE_DTYPE)


class Scan:
    """A hand-made scan: truth labels, an excluded-annotation list, and a prediction built up blob by blob."""

    def __init__(self, uid="scan", origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0), direction=IDENTITY, shape=SHAPE):
        self.uid, self.origin, self.spacing, self.direction = uid, origin, spacing, direction
        self.nodule_mask = np.zeros(shape, np.uint8)
        self.prob = np.zeros(shape, np.float32)
        self.rows = []

    def truth(self, center, diameter, excluded=0, world=None):
        """A truth nodule: a ball of radius diameter/2 voxels, drawn unless excluded."""
        index = len(self.rows) + 1
        if not excluded:
            r = diameter / 2.0
            self.nodule_mask[ball(self.nodule_mask.shape, center, (r / self.spacing[2], r / self.spacing[1],
                                                                   r / self.spacing[0]))] = index
        self.rows.append(nodule(index, center, diameter, excluded, world))
        return index

    def predict(self, region, p=0.9):
        self.prob[region] = np.maximum(self.prob[region], p)

    def evaluate(self):
        return pp.evaluate_scan(self.prob, self.prob > 0.5, self.nodule_mask, table(*self.rows),
                                self.origin, self.spacing, self.direction, self.uid)


def test_perfect_prediction():
    s = Scan()
    s.truth((8, 20, 20), 8.0)
    s.truth((15, 40, 44), 12.0)
    s.predict(s.nodule_mask > 0, 0.9)
    m, _ = pp.summarize([s.evaluate()])
    assert m["slice_dice"]["value"] == 1.0
    assert m["slice_dice_nodule_slices"]["value"] == 1.0
    assert m["nodule_dice"]["value"] == 1.0
    assert m["sensitivity"]["value"] == 1.0 and m["sensitivity"]["found"] == 2
    assert m["fp_per_scan"]["value"] == 0.0
    assert m["sensitivity_thesis_rule"]["value"] == 1.0
    assert m["cpm"]["value"] == 1.0
    assert m["froc"]["sensitivities"] == [1.0] * 7
    assert m["sensitivity"]["by_size"]["5-10"] == {"value": 1.0, "found": 1, "total": 1}
    assert m["sensitivity"]["by_size"]["10-20"] == {"value": 1.0, "found": 1, "total": 1}
    assert np.isnan(m["sensitivity"]["by_size"]["<5"]["value"])
    m2, _ = pp.summarize([s.evaluate()], size_edges=(10,))      # other bins: <10 and >=10
    assert m2["sensitivity"]["by_size"] == {"<10": {"value": 1.0, "found": 1, "total": 1},
                                            ">=10": {"value": 1.0, "found": 1, "total": 1}}
    for key in ("slice_dice", "nodule_dice", "sensitivity", "fp_per_scan", "sensitivity_thesis_rule", "froc", "cpm"):
        assert len(m[key]["definition"]) > 40


def test_one_nodule_missed():
    s = Scan()
    a = s.truth((8, 20, 20), 8.0)
    s.truth((15, 40, 44), 8.0)
    s.predict(s.nodule_mask == a, 0.8)
    res = s.evaluate()
    m, _ = pp.summarize([res])
    assert [r["found"] for r in res["nodules"]] == [True, False]
    assert [r["dice"] for r in res["nodules"]] == [1.0, 0.0]
    assert m["sensitivity"]["value"] == 0.5
    assert m["nodule_dice"]["value"] == 0.5
    assert m["fp_per_scan"]["value"] == 0.0
    assert m["sensitivity_thesis_rule"]["value"] == 0.5
    # FROC: one TP at 0.8, no false positive: sensitivity 1/2 at every rate
    assert m["cpm"]["value"] == 0.5
    # pooled slice Dice: P = label a (n voxels), T = labels a and b (2n voxels): 2n / 3n
    assert m["slice_dice"]["value"] == pytest.approx(2.0 / 3.0)


def test_false_positive_counted():
    s = Scan()
    s.truth((8, 20, 20), 8.0)
    s.predict(s.nodule_mask > 0, 0.9)
    s.predict(ball(SHAPE, (16, 50, 50), (2, 2, 2)), 0.95)     # far from any annotation
    res = s.evaluate()
    m, _ = pp.summarize([res])
    assert m["sensitivity"]["value"] == 1.0
    assert m["n_false_positives"] == 1 and m["fp_per_scan"]["value"] == 1.0
    assert list(res["is_fp"]) == [False, True] or list(res["is_fp"]) == [True, False]
    # FROC by hand: FP at 0.95 -> (1 FP/scan, 0), TP at 0.9 -> (1, 1); curve (0,0), (1,0), (1,1):
    # 1/8, 1/4, 1/2 -> 0 (flat from (0,0) to (1,0)); 1, 2, 4, 8 -> 1.  CPM = 4/7
    assert m["froc"]["sensitivities"] == [0, 0, 0, 1, 1, 1, 1]
    assert m["cpm"]["value"] == pytest.approx(4 / 7)
    assert m["slice_dice"]["value"] < 1.0


def test_candidate_on_excluded_annotation_ignored():
    s = Scan()
    s.truth((8, 20, 20), 8.0)
    s.truth((16, 48, 48), 6.0, excluded=1)                  # not drawn, listed as excluded
    s.truth((5, 50, 12), -1.0, excluded=1)                  # unknown diameter: 10 mm as in LUNA16's script
    s.predict(s.nodule_mask > 0, 0.9)
    s.predict(ball(SHAPE, (16, 49, 48), (1, 1, 1)), 0.7)     # 1 mm from the excluded center: inside its 3 mm
    s.predict(ball(SHAPE, (5, 50, 16), (1, 1, 1)), 0.7)      # 4 mm from the unknown-size one: inside 5 mm
    res = s.evaluate()
    m, _ = pp.summarize([res])
    assert len(res["components"]) == 3
    assert res["is_ignored"].sum() == 2 and res["is_fp"].sum() == 0
    assert m["n_ignored_candidates"] == 2
    assert m["fp_per_scan"]["value"] == 0.0
    assert m["sensitivity"]["value"] == 1.0 and m["n_nodules"] == 1 and m["n_excluded_annotations"] == 2
    assert m["cpm"]["value"] == 1.0


def test_two_components_on_one_nodule_count_once():
    s = Scan()
    s.truth((12, 30, 30), 12.0)                             # radius 6
    s.predict(ball(SHAPE, (12, 30, 27), (1, 1, 1)), 0.6)     # two separate blobs, both within the radius
    s.predict(ball(SHAPE, (12, 30, 33), (1, 1, 1)), 0.8)
    res = s.evaluate()
    m, _ = pp.summarize([res])
    assert len(res["components"]) == 2
    assert res["nodules"][0]["found"] and res["nodules"][0]["n_hits"] == 2
    assert res["nodules"][0]["candidate_prob"] == pytest.approx(0.8)   # the highest of the two
    assert m["sensitivity"]["found"] == 1 and m["sensitivity"]["value"] == 1.0
    assert m["fp_per_scan"]["value"] == 0.0 and m["n_false_positives"] == 0
    assert m["cpm"]["value"] == 1.0                        # the second hit is ignored, not a false positive
    # nodule Dice: both blobs (7 voxels each) lie inside the label: 2 * 14 / (14 + |label|)
    n_label = int((s.nodule_mask == 1).sum())
    assert res["nodules"][0]["dice"] == pytest.approx(2 * 14 / (14 + n_label))


def test_froc_cpm_hand_computed():
    # 2 scans, 4 nodules (scores 0.9, 0.6, 0.3, one missed), 5 false positives.
    # Curve (FP/scan, sensitivity) as the threshold falls: (0, 0) start, 0.9 TP -> (0, .25), 0.8 FP -> (.5, .25),
    # 0.6 TP -> (.5, .5), 0.5 FP -> (1, .5), 0.4 FP -> (1.5, .5), 0.3 TP -> (1.5, .75), 0.2 -> (2, .75),
    # 0.1 -> (2.5, .75)
    # at 1/8: .25, 1/4: .25, 1/2: .5 (the curve's best at exactly 1/2), 1: .5, 2: .75, 4: .75, 8: .75
    f = pp.froc([0.9, 0.6, 0.3, np.nan], [0.8, 0.5, 0.4, 0.2, 0.1], n_scans=2)
    np.testing.assert_allclose(f["sensitivities"], [0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 0.75])
    assert f["cpm"] == pytest.approx(3.75 / 7)
    np.testing.assert_allclose(f["fps"], [0, 0, 0.5, 0.5, 1, 1.5, 1.5, 2, 2.5])
    np.testing.assert_allclose(f["sens"], [0, .25, .25, .5, .5, .5, .75, .75, .75])

    # A tie (one TP and two FPs at 0.5) is one diagonal step of the curve, read by linear interpolation.
    # 4 scans, nodules 0.9 and 0.5, FPs 0.5, 0.5, 0.2: (0,0), (0, .5), (.5, 1), (.75, 1)
    # at 1/8: .5 + .5 * (.125 / .5) = .625; at 1/4: .75; from 1/2 on: 1.   CPM = 6.375 / 7
    f = pp.froc([0.9, 0.5], [0.5, 0.5, 0.2], n_scans=4)
    np.testing.assert_allclose(f["sensitivities"], [0.625, 0.75, 1, 1, 1, 1, 1])
    assert f["cpm"] == pytest.approx(6.375 / 7)

    # The same numbers as LUNA16's script reads them (np.interp on the curve)
    g = pp.froc([0.9, 0.6, 0.3, np.nan], [0.8, 0.5, 0.4, 0.2, 0.1], n_scans=2)
    np.testing.assert_allclose(np.interp(pp.FROC_RATES, g["fps"], g["sens"]), g["sensitivities"])

    # no nodule found, no candidate at all
    assert pp.froc([np.nan, np.nan], [], n_scans=3)["cpm"] == 0.0


def test_froc_over_scans_matches_summary():
    """FROC pools candidates of all scans; FP/scan divides by the number of scans."""
    a, b = Scan("a"), Scan("b")
    a.truth((8, 20, 20), 8.0)
    a.predict(a.nodule_mask > 0, 0.9)
    b.truth((8, 40, 40), 8.0)
    b.predict(ball(SHAPE, (16, 10, 50), (1, 1, 1)), 0.7)    # b: nodule missed, one false positive
    m, _ = pp.summarize([a.evaluate(), b.evaluate()])
    assert m["sensitivity"]["value"] == 0.5 and m["fp_per_scan"]["value"] == 0.5
    # curve: (0,0), 0.9 TP -> (0, .5), 0.7 FP -> (.5, .5): .5 at every rate
    assert m["cpm"]["value"] == 0.5


def test_flipped_direction_candidate_world_equals_annotation():
    # direction diag(-1, -1, 1): x and y run backwards. Voxel (z, y, x) = (10, 30, 40) with origin
    # (100, 120, -50) and spacing (0.7, 0.8, 2.5) is world x = 100 - 0.7*40 = 72, y = 120 - 0.8*30 = 96,
    # z = -50 + 2.5*10 = -25 (by hand, not through ct_io).
    flip = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    s = Scan(origin=(100.0, 120.0, -50.0), spacing=(0.7, 0.8, 2.5), direction=flip, shape=(20, 60, 60))
    s.truth((10, 30, 40), 8.0, world=(72.0, 96.0, -25.0))
    s.predict(s.nodule_mask > 0, 0.9)
    res = s.evaluate()
    assert len(res["components"]) == 1
    np.testing.assert_allclose(res["cand_world"][0], (72.0, 96.0, -25.0), atol=1e-6)
    assert res["nodules"][0]["found"]
    # ignoring the direction would put it 2 * 28 mm and 2 * 24 mm away, outside the 4 mm radius
    naive = np.array([100 + 0.7 * 40, 120 + 0.8 * 30, -50 + 2.5 * 10])
    assert pp.match_candidates(naive, [(72.0, 96.0, -25.0)], [8.0], [0])[0] == -1


def test_hit_goes_to_first_included_annotation():
    # a candidate inside an excluded and an included annotation is the included one's TP
    hits = pp.match_candidates([(0, 0, 0)], [(1, 0, 0), (2, 0, 0)], [6.0, 6.0], [1, 0])
    assert list(hits) == [1]
    assert list(pp.match_candidates([(0, 0, 0), (10, 0, 0)], [(0, 0, 3)], [6.0], [0])) == [-1, -1]  # 3 mm: not < 3


def test_components_and_min_size():
    mask = np.zeros((5, 10, 10), bool)
    mask[1, 1, 1] = True                                   # 1 voxel
    mask[2:4, 5:7, 5:7] = True                             # 8 voxels
    prob = mask * 0.7
    prob[3, 6, 6] = 0.95
    labels, comps = pp.find_components(mask, prob, min_voxels=2)
    assert len(comps) == 1 and comps["n_voxels"][0] == 8
    assert comps["prob"][0] == pytest.approx(0.95)
    np.testing.assert_allclose([comps["center_z"][0], comps["center_y"][0], comps["center_x"][0]], (2.5, 5.5, 5.5))
    assert labels[1, 1, 1] == 0 and labels.max() == 1
    d = np.zeros((3, 3, 3), bool)
    d[0, 0, 0] = d[1, 1, 1] = True                         # corner neighbours: 1 component at 26-, 2 at 6-connectivity
    assert len(pp.find_components(d, d * 1.0, connectivity=3)[1]) == 1
    assert len(pp.find_components(d, d * 1.0, connectivity=1)[1]) == 2


def test_size_bins():
    assert [pp.size_bin(d) for d in (3.0, 4.99, 5.0, 9.9, 10.0, 19.9, 20.0, 35.0)] == \
        ["<5", "<5", "5-10", "5-10", "10-20", "10-20", ">=20", ">=20"]


def test_kmeans_binarize_thesis_option():
    rng = np.random.default_rng(0)
    prob = rng.uniform(0.0, 0.05, size=(2, 32, 32)).astype(np.float32)
    prob[0, 10:20, 10:20] = 0.9                            # a 10x10 blob
    out = pp.binarize(prob, "kmeans", erosion=3)
    assert out[0].sum() == 64 and out[0, 11:19, 11:19].all()   # the blob eroded by one pixel on each side
    assert out[1].any()                                    # like the original: noise always yields a foreground
    assert (pp.binarize(prob, "threshold", 0.5) == (prob > 0.5)).all()
