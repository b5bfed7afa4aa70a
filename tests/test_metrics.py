"""metrics.py (and evaluation.evaluate_scan, which measures a scan's volumes for it) on hand-made volumes and
candidate sets: every expected number below is worked out by hand, and the FROC / CPM is checked against an
independent re-implementation of LUNA16's evaluation script."""
import numpy as np
import pytest

import candidates
import ct_io
import evaluation
import metrics

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
        return evaluation.evaluate_scan(self.prob, self.prob > 0.5, self.nodule_mask, table(*self.rows),
                                self.origin, self.spacing, self.direction, self.uid)


def test_perfect_prediction():
    s = Scan()
    s.truth((8, 20, 20), 8.0)
    s.truth((15, 40, 44), 12.0)
    s.predict(s.nodule_mask > 0, 0.9)
    m, _ = metrics.summarize([s.evaluate()])
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
    m2, _ = metrics.summarize([s.evaluate()], size_edges=(10,))      # other bins: <10 and >=10
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
    m, _ = metrics.summarize([res])
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
    m, _ = metrics.summarize([res])
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
    m, _ = metrics.summarize([res])
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
    m, _ = metrics.summarize([res])
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
    f = metrics.froc([0.9, 0.6, 0.3, np.nan], [0.8, 0.5, 0.4, 0.2, 0.1], n_scans=2)
    np.testing.assert_allclose(f["sensitivities"], [0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 0.75])
    assert f["cpm"] == pytest.approx(3.75 / 7)
    np.testing.assert_allclose(f["fps"], [0, 0, 0.5, 0.5, 1, 1.5, 1.5, 2, 2.5])
    np.testing.assert_allclose(f["sens"], [0, .25, .25, .5, .5, .5, .75, .75, .75])

    # A tie (one TP and two FPs at 0.5) is one diagonal step of the curve, read by linear interpolation.
    # 4 scans, nodules 0.9 and 0.5, FPs 0.5, 0.5, 0.2: (0,0), (0, .5), (.5, 1), (.75, 1)
    # at 1/8: .5 + .5 * (.125 / .5) = .625; at 1/4: .75; from 1/2 on: 1.   CPM = 6.375 / 7
    f = metrics.froc([0.9, 0.5], [0.5, 0.5, 0.2], n_scans=4)
    np.testing.assert_allclose(f["sensitivities"], [0.625, 0.75, 1, 1, 1, 1, 1])
    assert f["cpm"] == pytest.approx(6.375 / 7)

    # The same numbers as LUNA16's script reads them (np.interp on the curve)
    g = metrics.froc([0.9, 0.6, 0.3, np.nan], [0.8, 0.5, 0.4, 0.2, 0.1], n_scans=2)
    np.testing.assert_allclose(np.interp(metrics.FROC_RATES, g["fps"], g["sens"]), g["sensitivities"])

    # no nodule found, no candidate at all
    assert metrics.froc([np.nan, np.nan], [], n_scans=3)["cpm"] == 0.0


def test_froc_over_scans_matches_summary():
    """FROC pools candidates of all scans; FP/scan divides by the number of scans."""
    a, b = Scan("a"), Scan("b")
    a.truth((8, 20, 20), 8.0)
    a.predict(a.nodule_mask > 0, 0.9)
    b.truth((8, 40, 40), 8.0)
    b.predict(ball(SHAPE, (16, 10, 50), (1, 1, 1)), 0.7)    # b: nodule missed, one false positive
    m, _ = metrics.summarize([a.evaluate(), b.evaluate()])
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
    np.testing.assert_allclose(res["component_world"][0], (72.0, 96.0, -25.0), atol=1e-6)
    np.testing.assert_allclose(res["candidate_world"][0], (72.0, 96.0, -25.0), atol=1e-6)
    assert res["nodules"][0]["found"]
    # ignoring the direction would put it 2 * 28 mm and 2 * 24 mm away, outside the 4 mm radius
    naive = np.array([100 + 0.7 * 40, 120 + 0.8 * 30, -50 + 2.5 * 10])
    assert not metrics.match_candidates(naive, [(72.0, 96.0, -25.0)], [8.0]).any()


def test_hit_rule_and_excluded_annotations():
    # a candidate inside an excluded and an included annotation is the included one's TP, not ignored
    hits = metrics.match_candidates([(0, 0, 0)], [(1, 0, 0), (2, 0, 0)], [6.0, 6.0])
    assert hits.tolist() == [[True, True]]
    found, score, is_fp, ignored = metrics.detect(hits, [0.7], excluded=[1, 0])
    assert found.tolist() == [False, True] and np.isnan(score[0]) and score[1] == pytest.approx(0.7)
    assert is_fp.tolist() == [False] and ignored.tolist() == [False]
    # the distance must be strictly below the radius: 3 mm from a 6 mm nodule does not hit it
    assert not metrics.match_candidates([(0, 0, 0), (10, 0, 0)], [(0, 0, 3)], [6.0]).any()
    # an unknown diameter (< 0) counts as 10 mm: 4.9 mm away hits, 5.1 mm away does not
    assert metrics.match_candidates([(4.9, 0, 0), (0, 5.1, 0)], [(0, 0, 0)], [-1.0])[:, 0].tolist() == [True, False]


def test_candidate_within_two_nodules_hits_both():
    """LUNA16's script keeps the candidate for every nodule it lies in ("CAD mark detected two nodules"): both
    nodules are found, with the candidate's score; the candidate is no false positive."""
    hits = metrics.match_candidates([(0, 0, 0), (30, 0, 0)], [(-2, 0, 0), (2, 0, 0)], [6.0, 8.0])
    assert hits.tolist() == [[True, True], [False, False]]
    found, score, is_fp, ignored = metrics.detect(hits, [0.4, 0.9], excluded=[0, 0])
    assert found.tolist() == [True, True] and score.tolist() == [0.4, 0.4]
    assert is_fp.tolist() == [False, True] and not ignored.any()
    f = metrics.froc(score, [0.9], n_scans=1)          # FP at 0.9 first: (1, 0), then both nodules at 0.4: (1, 1)
    assert f["sensitivities"].tolist() == [0, 0, 0, 1, 1, 1, 1]

    # the same on volumes: two touching nodules, one predicted blob between their centers
    s = Scan()
    s.truth((12, 30, 27), 8.0)                              # centers 6 voxels (mm) apart, radii 4 and 4
    s.truth((12, 30, 33), 8.0)
    s.predict(ball(SHAPE, (12, 30, 30), (1, 1, 1)), 0.8)     # 3 mm from both centers
    res = s.evaluate()
    assert len(res["components"]) == 1 and len(res["candidates"]) == 1
    assert [r["found"] for r in res["nodules"]] == [True, True]
    assert [r["found_by_candidate"] for r in res["nodules"]] == [True, True]
    m, _ = metrics.summarize([res])
    assert m["sensitivity"]["found"] == 2 and m["fp_per_scan"]["value"] == 0.0 and m["cpm"]["value"] == 1.0


def test_components_and_min_size():
    mask = np.zeros((5, 10, 10), bool)
    mask[1, 1, 1] = True                                   # 1 voxel
    mask[2:4, 5:7, 5:7] = True                             # 8 voxels
    prob = mask * 0.7
    prob[3, 6, 6] = 0.95
    labels, comps = candidates.find_components(mask, prob, min_voxels=2)
    assert len(comps) == 1 and comps["n_voxels"][0] == 8
    assert comps["prob"][0] == pytest.approx(0.95)
    np.testing.assert_allclose([comps["center_z"][0], comps["center_y"][0], comps["center_x"][0]], (2.5, 5.5, 5.5))
    assert labels[1, 1, 1] == 0 and labels.max() == 1
    d = np.zeros((3, 3, 3), bool)
    d[0, 0, 0] = d[1, 1, 1] = True                         # corner neighbours: 1 component at 26-, 2 at 6-connectivity
    assert len(candidates.find_components(d, d * 1.0, connectivity=3)[1]) == 1
    assert len(candidates.find_components(d, d * 1.0, connectivity=1)[1]) == 2


def test_size_bins():
    assert [metrics.size_bin(d) for d in (3.0, 4.99, 5.0, 9.9, 10.0, 19.9, 20.0, 35.0)] == \
        ["<5", "<5", "5-10", "5-10", "10-20", "10-20", ">=20", ">=20"]


def test_kmeans_binarize_thesis_option():
    rng = np.random.default_rng(0)
    prob = rng.uniform(0.0, 0.05, size=(2, 32, 32)).astype(np.float32)
    prob[0, 10:20, 10:20] = 0.9                            # a 10x10 blob
    out = evaluation.binarize(prob, "kmeans", erosion=3)
    assert out[0].sum() == 64 and out[0, 11:19, 11:19].all()   # the blob eroded by one pixel on each side
    assert out[1].any()                                    # like the original: noise always yields a foreground
    assert (evaluation.binarize(prob, "threshold", 0.5) == (prob > 0.5)).all()


def test_failed_scans_count_in_fp_per_scan():
    """FP/scan divides by every scan of the evaluated part: a scan that failed counts as one without candidates."""
    s = Scan()
    s.truth((8, 20, 20), 8.0)
    s.predict(s.nodule_mask > 0, 0.6)
    s.predict(ball(SHAPE, (16, 50, 50), (2, 2, 2)), 0.9)     # one false positive, scored above the nodule
    res = s.evaluate()
    m1, _ = metrics.summarize([res])
    m3, _ = metrics.summarize([res], n_failed=2)
    assert m1["fp_per_scan"]["value"] == 1.0 and m1["froc"]["n_scans"] == 1
    assert m3["fp_per_scan"]["value"] == pytest.approx(1 / 3) and m3["fp_per_scan"]["n_scans"] == 3
    assert m3["n_scans"] == 1 and m3["n_scans_failed"] == 2 and m3["froc"]["n_scans"] == 3
    # 1 scan: (0,0) -> FP (1, 0) -> TP (1, 1): 0 below 1 FP/scan, CPM 4/7; 3 scans: the FP is at 1/3 FP/scan:
    # 1/8 -> 0, 1/4 -> 0, 1/2 and beyond -> 1: CPM 5/7
    assert m1["froc"]["sensitivities"] == [0, 0, 0, 1, 1, 1, 1] and m1["cpm"]["value"] == pytest.approx(4 / 7)
    assert m3["froc"]["sensitivities"] == [0, 0, 1, 1, 1, 1, 1] and m3["cpm"]["value"] == pytest.approx(5 / 7)


def test_no_nodules_cpm_is_undefined():
    f = metrics.froc([], [0.9, 0.5], n_scans=2)
    assert f["cpm"] is None and np.isnan(f["sensitivities"]).all()
    s = Scan()
    s.predict(ball(SHAPE, (16, 50, 50), (2, 2, 2)), 0.9)     # a scan without nodules: one false positive
    m, curves = metrics.summarize([s.evaluate()])
    assert m["n_nodules"] == 0 and m["cpm"]["value"] is None and m["fp_per_scan"]["value"] == 1.0
    assert all(v is None for v in m["cpm"]["by_size"].values())
    assert np.isnan(m["candidate_recall"]["value"]) and m["candidate_recall"]["total"] == 0
    # with nodules, a bin without nodules is undefined too, and nothing found at all is 0, not undefined
    s.truth((8, 20, 20), 8.0)
    m, _ = metrics.summarize([s.evaluate()])
    assert m["cpm"]["value"] == 0.0 and m["cpm"]["by_size"]["5-10"] == 0.0 and m["cpm"]["by_size"]["<5"] is None


def test_max_candidates_cut():
    """LUNA16's script: with more than N candidates, keep those strictly above the (N+1)-th highest score."""
    keep = metrics.top_candidates([0.1, 0.9, 0.5, 0.7, 0.3], 3)
    assert keep.tolist() == [False, True, True, True, False]
    assert metrics.top_candidates([0.2, 0.5, 0.5, 0.9], 2).tolist() == [False, False, False, True]   # tie at the cut
    assert metrics.top_candidates([0.2, 0.5], 2).all() and metrics.top_candidates(np.zeros(0), 2).size == 0
    # on a volume: 12 separate blobs scored 0.10 ... 0.65; MAX_CANDIDATES = 5 keeps the 5 highest, best first
    prob = np.zeros((4, 40, 40), np.float32)
    for i in range(12):
        prob[1:3, 3 * i + 1, 3 * (i % 3) + 2] = 0.10 + 0.05 * i
    cands = candidates.find_candidates(prob, threshold=0.05, max_candidates=5)
    np.testing.assert_allclose(cands["prob"], [0.65, 0.60, 0.55, 0.50, 0.45], rtol=1e-6)
    assert len(candidates.find_candidates(prob, threshold=0.05, max_candidates=100)) == 12
    assert len(candidates.find_candidates(prob, threshold=0.32, max_candidates=100)) == 7      # 0.35 ... 0.65


def test_candidates_apart_from_the_mask():
    """A nodule the network scores 0.3 is no component of the mask (THRESHOLD 0.5) but a candidate: missed at
    the operating point, found by the FROC at the rate of its false positives."""
    s = Scan()
    s.truth((8, 20, 20), 8.0)
    s.truth((16, 44, 40), 8.0)
    s.predict(s.nodule_mask == 1, 0.9)
    s.predict(ball(SHAPE, (16, 44, 40), (2, 2, 2)), 0.3)
    s.predict(ball(SHAPE, (5, 50, 10), (1, 1, 1)), 0.4)      # two false candidates, below the threshold
    s.predict(ball(SHAPE, (20, 10, 50), (1, 1, 1)), 0.2)
    s.predict(ball(SHAPE, (3, 5, 5), (1, 1, 1)), 0.015)      # below CANDIDATE_THRESHOLD (0.02): nothing
    res = s.evaluate()
    assert len(res["components"]) == 1 and len(res["candidates"]) == 4
    np.testing.assert_allclose(res["candidates"]["prob"], [0.9, 0.4, 0.3, 0.2], rtol=1e-6)   # highest first
    assert res["candidate_is_fp"].tolist() == [False, True, False, True]
    m, _ = metrics.summarize([res])
    assert m["sensitivity"]["found"] == 1 and m["fp_per_scan"]["value"] == 0.0
    assert m["candidate_recall"]["found"] == 2 and m["candidate_recall"]["by_size"]["5-10"]["value"] == 1.0
    assert m["n_components"] == 1 and m["n_candidates"] == 4 and m["n_false_positives"] == 0
    # curve: (0,0), 0.9 TP (0, .5), 0.4 FP (1, .5), 0.3 TP (1, 1), 0.2 FP (2, 1): .5 below 1 FP/scan, then 1
    assert m["froc"]["sensitivities"] == [0.5, 0.5, 0.5, 1, 1, 1, 1]
    assert m["cpm"]["value"] == pytest.approx(5.5 / 7)


def test_candidate_center_is_its_peak():
    """A vessel touching a nodule at low probability joins its component; the candidate's center stays on the
    nodule (center of mass of the voxels >= half the maximum), where the whole component's would not."""
    prob = np.zeros((20, 40, 60), np.float32)
    prob[ball(prob.shape, (10, 20, 15), (3, 3, 3))] = 0.8                # the nodule
    prob[9:12, 19:22, 15:58] = np.maximum(prob[9:12, 19:22, 15:58], 0.1)  # a long faint vessel leaving it
    c = candidates.find_candidates(prob, threshold=0.05)
    assert len(c) == 1 and c["n_voxels"][0] > 300
    assert (c["center_z"][0], c["center_y"][0]) == pytest.approx((10, 20)) and c["center_x"][0] == pytest.approx(15)
    whole = candidates.find_candidates(prob, threshold=0.05, peak=0.0)
    assert whole["center_x"][0] > 25                                     # the vessel pulls the plain centroid away


def test_split_candidates_give_a_faint_nodule_on_a_vessel_its_own_candidate():
    """CANDIDATE_SPLIT_MM: a faint small nodule (0.35) touching a bright vessel (0.6) is one component; split at
    its local maxima it is a second candidate, centred on the nodule and scored by its own maximum; the flat,
    nearly saturated top of a large nodule stays one candidate (non-maximum suppression); anisotropic voxels
    are measured in mm; MAX_CANDIDATES still applies."""
    prob = np.zeros((20, 60, 80), np.float32)
    prob[9:12, 29:32, 2:78] = 0.6                                          # vessel along x
    zz, yy, xx = np.indices(prob.shape)
    r = np.sqrt((zz - 10) ** 2 + (yy - 34) ** 2 + (xx - 40) ** 2)
    prob[r <= 3] = (0.35 - 0.07 * r)[r <= 3]                               # faint nodule touching it: 0.35 -> 0.14
    big = ball(prob.shape, (10, 12, 40), (6, 6, 6))                        # large nodule, tiny ripples on ~0.99
    prob[big] = 0.99 + 0.005 * np.random.default_rng(0).random(int(big.sum()))
    whole = candidates.find_candidates(prob, threshold=0.05)
    assert len(whole) == 2                                                  # the vessel + nodule, the big nodule
    split = candidates.find_candidates(prob, threshold=0.05, split_mm=5.0)
    assert len(split) == 3
    assert split["prob"][0] > 0.99 and split["center_y"][0] == pytest.approx(12, abs=3)
    assert split["prob"][1] == pytest.approx(0.6)
    faint = split[2]
    assert faint["prob"] == pytest.approx(0.35, abs=1e-6)
    assert (faint["center_z"], faint["center_y"], faint["center_x"]) == pytest.approx((10, 34, 40), abs=0.5)
    assert faint["label"] == split["label"][1]                               # same component as the vessel
    assert len(candidates.find_candidates(prob, threshold=0.05, split_mm=5.0, max_candidates=2)) == 2
    assert len(candidates.find_candidates(prob, threshold=0.05, split_mm=5.0, spacing_zyx=(4.0, 1.0, 1.0))) == 3
    flat = prob.copy()
    flat[r <= 3] = 0.35                                                     # no dip towards the vessel: no split
    assert len(candidates.find_candidates(flat, threshold=0.05, split_mm=5.0)) == 2


def luna16_froc(scans, rates=(0.125, 0.25, 0.5, 1, 2, 4, 8), max_marks=100):
    """LUNA16's evaluation (noduleCADEvaluationLUNA16.py, evaluateCAD + computeFROC), re-implemented here from
    the script's method with loops and scikit-learn, sharing no code with metrics.py.

    scans: one (candidates [(x, y, z, p)], annotations [(x, y, z, diameter, excluded)]) per scan of the part.
    Returns the sensitivities at ``rates`` and their mean."""
    import warnings
    from sklearn.metrics import roc_curve
    gt, probs, excl = [], [], []
    for cands, annots in scans:
        if len(cands) > max_marks:                           # keep the most suspicious marks
            ranked = sorted((c[3] for c in cands), reverse=True)
            cands = [c for c in cands if c[3] > ranked[max_marks]][:max_marks]
        left = set(range(len(cands)))                        # candidates not yet matched: the false positives
        for x, y, z, d, excluded in sorted(annots, key=lambda a: a[4]):   # included first, then excluded
            d = 10.0 if d < 0 else d
            matches = []
            for i, (x2, y2, z2, p) in enumerate(cands):
                if (x - x2) ** 2 + (y - y2) ** 2 + (z - z2) ** 2 < (d / 2.0) ** 2:
                    if not excluded:
                        matches.append(p)
                    left.discard(i)
            if not excluded:
                gt.append(1.0)
                probs.append(max(matches) if matches else -1e9)
                excl.append(not matches)                     # a missed nodule only counts in the total
        for i in sorted(left):
            gt.append(0.0)
            probs.append(cands[i][3])
            excl.append(False)
    gt_l = [g for g, e in zip(gt, excl) if not e]
    p_l = [p for p, e in zip(probs, excl) if not e]
    found, total, n_cand = sum(gt_l), sum(gt), len(p_l)
    with warnings.catch_warnings():                         # no false positive: the script's own border case
        warnings.simplefilter("ignore")
        fpr, tpr, _ = roc_curve(gt_l, p_l)
    fps = np.zeros(len(fpr)) if sum(gt) == len(gt) else fpr * (n_cand - found) / len(scans)
    sens = tpr * found / total
    at = np.interp(rates, fps, sens)
    return at, float(np.mean(at))


def test_froc_cpm_equal_luna16_computefroc():
    """metrics.py against luna16_froc (above) on 300 random parts: 2-40 scans (a fifth without candidates, as a
    failed scan), 0-4 annotations each (some excluded, some of unknown diameter, some overlapping so that a
    candidate lies within two), 1-11 candidates a scan or, in a tenth of the scans, 95-159 (so the 100-per-scan
    cut applies within the first 8 FP/scan), scores drawn from 21 values (many ties, also across true and false
    positives and at the cut), part of them near the nodules.
    Agreement: over the 296 parts compared, the max abs difference of the sensitivities at the 7 rates and of
    the CPM is 1.4e-16 (asserted <= 1e-12). The comparison has teeth: without the 100-per-scan cut the max
    difference is 0.146, with a candidate hitting only the first of two nodules 0.308. Parts where the script
    itself cannot compute a curve (no nodule found: its roc_curve gives NaN) are skipped here; those are the
    hand-worked cases above (nothing found: sensitivity 0; no nodules: CPM None)."""
    rng = np.random.default_rng(14)
    worst, compared = 0.0, 0
    for trial in range(300):
        scans, truth = [], []
        for s in range(int(rng.integers(2, 41))):
            annots = []
            for a in range(int(rng.integers(0, 5))):
                centre = rng.uniform(0, 60, 3)
                if annots and rng.random() < 0.3:               # overlapping its predecessor
                    centre = np.array(annots[-1][:3]) + rng.uniform(-3, 3, 3)
                d = float(rng.choice([-1.0, rng.uniform(3, 30)], p=[0.1, 0.9]))
                annots.append((*centre, d, bool(rng.random() < 0.2)))
            n = int(rng.choice([0, rng.integers(1, 12), rng.integers(95, 160)], p=[0.2, 0.7, 0.1]))
            xyz = rng.uniform(0, 60, (n, 3))
            for i in range(n):                                 # some candidates near an annotation
                if annots and rng.random() < 0.3:
                    xyz[i] = np.array(annots[rng.integers(len(annots))][:3]) + rng.normal(0, 2.5, 3)
            p = rng.integers(0, 21, n) / 20.0
            scans.append(([(*c, float(q)) for c, q in zip(xyz, p)], annots))
            truth.append((xyz, p, annots))
        # metrics.py, as postprocess.py and fp_reduction.py use it
        scores, fp_scores = [], []
        for xyz, p, annots in truth:
            keep = metrics.top_candidates(p, 100)
            nod = np.array([a[:3] for a in annots]).reshape(-1, 3)
            hits = metrics.match_candidates(xyz[keep], nod, [a[3] for a in annots])
            found, score, is_fp, _ = metrics.detect(hits, p[keep], [a[4] for a in annots])
            scores += [sc for sc, a in zip(score, annots) if not a[4]]
            fp_scores += list(p[keep][is_fp])
        n_found = int(np.sum(~np.isnan(scores)))
        if n_found == 0:
            continue
        ours = metrics.froc(scores, fp_scores, n_scans=len(scans))
        ref, ref_cpm = luna16_froc(scans)
        worst = max(worst, float(np.max(np.abs(ours["sensitivities"] - ref))), abs(ours["cpm"] - ref_cpm))
        compared += 1
    assert compared > 200
    assert worst <= 1e-12, worst


def test_no_scan_evaluated_gives_no_dice():
    """Every scan failed: no Dice of 1.0 made up from two empty sets, no CPM; the failed scans are counted."""
    m, _ = metrics.summarize([], n_failed=3)
    assert m["slice_dice"]["value"] is None and m["slice_dice_nodule_slices"]["value"] is None
    assert m["cpm"]["value"] is None and m["n_scans_failed"] == 3 and m["n_nodules"] == 0


def test_bootstrap_interval_over_scans():
    """The CPM's 95 % interval resamples scans: identical scans give a zero-width interval at the CPM; scans that
    differ give an interval around it, the same on a rerun (seeded), and narrower with more scans."""
    from metrics import bootstrap_cpm, froc_summary
    per_scan_nod, per_scan_fp = [0.9, 0.4, np.nan], [0.8, 0.3, 0.2, 0.1]
    n = 6
    nod = np.tile(per_scan_nod, n)
    fp = np.tile(per_scan_fp, n)
    nod_scan, fp_scan = np.repeat(np.arange(n), 3), np.repeat(np.arange(n), 4)
    m, _ = froc_summary(np.full(len(nod), 8.0), nod, fp, n, nodule_scan=nod_scan, fp_scan=fp_scan, n_boot=200)
    assert m["cpm"]["ci95"] == pytest.approx([m["cpm"]["value"]] * 2)
    rng = np.random.default_rng(3)

    def cohort(n_scans):
        nod_scan = rng.integers(0, n_scans, 10 * n_scans)
        scores = np.where(rng.random(len(nod_scan)) < 0.7, rng.random(len(nod_scan)), np.nan)
        fp_scan = rng.integers(0, n_scans, 30 * n_scans)
        return rng.uniform(3, 30, len(nod_scan)), scores, nod_scan, rng.random(len(fp_scan)) * 0.9, fp_scan
    small, large = cohort(8), cohort(80)
    m, _ = froc_summary(small[0], small[1], small[3], 8, nodule_scan=small[2], fp_scan=small[4])
    lo, hi = m["cpm"]["ci95"]
    assert lo < m["cpm"]["value"] < hi and "bootstrap" in m["cpm"]["ci95_definition"]
    again = bootstrap_cpm(small[0], small[1], small[2], small[3], small[4], 8)
    assert again["cpm"] == [lo, hi]
    wide = bootstrap_cpm(large[0], large[1], large[2], large[3], large[4], 80)["cpm"]
    assert wide[1] - wide[0] < hi - lo
