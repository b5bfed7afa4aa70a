"""Stage 6's static findings pages (findings.py): one page per scan and an index, with a picture per finding.

    names = draw(folder, found)                      # <uid>_<k>.png: the axial slice through finding k
    write_page(path, found, info, names, files)      # <uid>.html: the findings by probability, measurements
    write_index(path, scans, threshold)              # index.html: one row per scan, linking its page

Pictures: the axial slice where the finding's longest axial diameter lies (its centre slice when it has no
voxels), cropped around it, lung window (-1000..400 HU), shown as radiologists read them (patient right on the
image's left, anterior up, whatever the scan's index directions), the finding's outline in red, its longest axial
diameter in yellow (a cyan circle at the centre of a finding without voxels).

The pages are self-contained: inline style, pictures beside them, no script, nothing loaded from elsewhere (a
Content-Security-Policy says so to the browser); every text that comes from a scan (series UID, description,
file names) is escaped (html.escape).
"""
import html
import os

import numpy as np

_WINDOW = (-1000, 400)                      # HU shown in the pictures (lung window)
_HEAD = ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
         '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src \'self\' file:; '
         'style-src \'unsafe-inline\'">\n<title>{title}</title>\n<style>\n'
         'body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}\n'
         'table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 6px; '
         'text-align: left; font-size: 90%; }}\n'
         '.finding {{ display: flex; gap: 1em; margin: 1em 0; align-items: flex-start; }}\n'
         '.note {{ color: #666; font-size: 85%; }}\n</style>\n</head>\n<body>\n')
_TAIL = "</body>\n</html>\n"
_ROWS = [("probability", "probability (final score)", ""), ("stage5_probability", "stage-5 probability", ""),
         ("stage6_probability", "stage-6 probability", ""), ("nodule_type", "type", ""),
         ("solid_fraction", "solid fraction", ""), ("volume_mm3", "volume", " mm³"),
         ("equivalent_diameter_mm", "equivalent diameter", " mm"),
         ("axial_diameter_mm", "longest axial diameter", " mm"),
         ("mean_hu", "mean HU", ""), ("max_hu", "max HU", ""), ("lung_side", "lung", ""),
         ("segmentation", "segmented from", "")]


def _e(v):
    return html.escape(str(v), quote=True)


# ----------------------------------------------------------------------------- pictures

def _oriented(pic, direction):
    """The picture's arrays and points flipped so that world +x runs right and +y (posterior) down."""
    img, outline, line, center = pic["hu"], pic["outline"], pic["line"], pic["center"]
    d = np.asarray(direction, np.float64).reshape(3, 3)
    h, w = img.shape
    points = [tuple(p) for p in (line or [])] + [tuple(center)]
    for axis, flip in ((0, d[1, 1] < 0), (1, d[0, 0] < 0)):
        if flip:
            img, outline = np.flip(img, axis), np.flip(outline, axis)
            n = (h, w)[axis]
            points = [tuple(n - 1 - v if k == axis else v for k, v in enumerate(p)) for p in points]
    return img, outline, (points[:-1] if line else None), points[-1]


def draw(folder, found):
    """One PNG per finding of a scan (findings.measure_scan's dict) in ``folder`` -> {finding number: file name}."""
    from matplotlib.figure import Figure
    from skimage import measure
    spacing = found["geometry"][1]
    names = {}
    for f in found["findings"]:
        img, outline, line, center = _oriented(f["_picture"], found["geometry"][2])
        fig = Figure(figsize=(3.2, 3.2), dpi=100, facecolor="black")
        ax = fig.add_axes((0, 0, 1, 1))
        ax.imshow(img, cmap="gray", vmin=_WINDOW[0], vmax=_WINDOW[1], aspect=float(spacing[1]) / float(spacing[0]),
                  interpolation="nearest")
        for c in measure.find_contours(outline.astype(float), 0.5):
            ax.plot(c[:, 1], c[:, 0], color="red", lw=1.2)
        if line:
            ax.plot([line[0][1], line[1][1]], [line[0][0], line[1][0]], color="yellow", lw=1.0)
        if not outline.any():
            ax.plot(center[1], center[0], "o", mfc="none", mec="cyan", ms=14)
        for x, label in ((0.02, "R"), (0.93, "L")):
            ax.text(x, 0.03, label, color="white", transform=ax.transAxes, fontsize=9)
        ax.text(0.02, 0.93, f"{f['finding']}: z={f['_picture']['z']}", color="white", transform=ax.transAxes,
                fontsize=8)
        ax.set_axis_off()
        names[f["finding"]] = f"{found['uid']}_{f['finding']:03d}.png"
        fig.savefig(os.path.join(folder, names[f["finding"]]), format="png", facecolor="black")
    return names


# ----------------------------------------------------------------------------- pages

def _value(f, key, unit):
    v = f.get(key)
    return "-" if v is None else f"{v}{unit}"


def _finding_html(f, picture):
    """One finding's block: its picture and its table."""
    x, y, z = f["center_world_mm"]
    vz, vy, vx = f["center_voxel_zyx"]
    rows = [("centre (world, mm)", f"x {x:.1f}, y {y:.1f}, z {z:.1f}"),
            ("centre (voxel z, y, x)", f"{vz:.1f}, {vy:.1f}, {vx:.1f}")]
    rows += [(label, _value(f, key, unit)) for key, label, unit in _ROWS]
    table = "".join(f"<tr><th>{_e(a)}</th><td>{_e(b)}</td></tr>" for a, b in rows)
    img = (f'<img src="{_e(picture)}" alt="finding {f["finding"]}, axial slice" width="320" height="320">'
           if picture else "")
    return (f'<section class="finding" id="finding-{f["finding"]}">{img}<div><h2>Finding {f["finding"]}</h2>'
            f"<table>{table}</table></div></section>\n")


def write_page(path, found, info, pictures, files):
    """A scan's page at ``path``: its findings (``found``, findings.measure_scan's dict) by probability with their
    pictures (``pictures``: {finding: file name}), links to ``files`` ({what: file name}); ``info``: description,
    threshold, rules (lines of text)."""
    uid = found["uid"]
    out = [_HEAD.format(title=_e(f"Findings: {uid}")), '<p><a href="index.html">All scans</a></p>\n',
           f"<h1>Findings: {_e(uid)}</h1>\n"]
    if info.get("description"):
        out.append(f"<p>Series description: {_e(info['description'])}</p>\n")
    out.append(f"<p>Source: {_e(os.path.basename(found['source_path'].rstrip(os.sep)) or '-')}</p>\n")
    n = len(found["findings"])
    out.append(f"<p>{n} finding{'s' if n != 1 else ''} with a final score above {_e(info['threshold'])}"
               + (": none." if not n else ", by probability.") + "</p>\n")
    if files:
        links = ", ".join(f'<a href="{_e(name)}">{_e(what)}</a>' for what, name in files.items())
        out.append(f"<p>Files: {links}</p>\n")
    for f in sorted(found["findings"], key=lambda f: f["finding"]):
        out.append(_finding_html(f, pictures.get(f["finding"])))
    out.append('<div class="note"><p>Automatic detections and measurements, not a diagnosis.</p><ul>'
               + "".join(f"<li>{_e(line)}</li>" for line in info.get("rules", [])) + "</ul></div>\n")
    out.append(_TAIL)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("".join(out))


def write_index(path, scans, threshold):
    """index.html at ``path``: one row per scan (``scans``: dicts of uid, page, description, n, top probability,
    types), linking its page."""
    out = [_HEAD.format(title="Findings"), "<h1>Findings</h1>\n",
           f"<p>{len(scans)} scan(s); findings: candidates with a final score above {_e(threshold)}.</p>\n",
           "<table><tr><th>series</th><th>description</th><th>findings</th><th>highest probability</th>"
           "<th>types</th></tr>\n"]
    for s in scans:
        top = "-" if s["top"] is None else f"{s['top']:.3f}"
        out.append(f'<tr><td><a href="{_e(s["page"])}">{_e(s["uid"])}</a></td><td>{_e(s["description"])}</td>'
                   f"<td>{s['n']}</td><td>{_e(top)}</td><td>{_e(s['types'])}</td></tr>\n")
    out.append("</table>\n" + _TAIL)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("".join(out))
