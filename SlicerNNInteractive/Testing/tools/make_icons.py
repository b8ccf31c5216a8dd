"""Draw the extension's PNG icons (deterministic; run from anywhere, writes into the repository).

    python SlicerNNInteractive/Testing/tools/make_icons.py

Outputs: Resources/SlicerNNInteractive.png (extension, 128x128), SlicerNNInteractive/Resources/Icons/
SlicerNNInteractive.png (module, 128x128) and Icons/{light,dark}/{point,box,scribble,lasso}.png (48x48;
"light" icons are dark strokes for light themes, "dark" ones light strokes for dark themes).
Needs Pillow and numpy only.
"""

import math
import os

from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.dirname(os.path.dirname(HERE))
REPO = os.path.dirname(MODULE)
SS = 8  # supersampling factor


def canvas(size):
    return Image.new("RGBA", (size * SS, size * SS), (0, 0, 0, 0))


def finish(img, size, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.resize((size, size), Image.LANCZOS).save(path, optimize=True)
    print(path)


def brand(size, path):
    img = canvas(size)
    d = ImageDraw.Draw(img)
    s = size * SS
    # dark rounded square, a slice with a blob segmented by a point prompt
    d.rounded_rectangle([s * 0.04, s * 0.04, s * 0.96, s * 0.96], radius=s * 0.18, fill=(28, 40, 58, 255))
    d.ellipse([s * 0.18, s * 0.20, s * 0.82, s * 0.80], fill=(70, 84, 104, 255))
    d.ellipse([s * 0.30, s * 0.32, s * 0.68, s * 0.66], fill=(60, 200, 120, 230))
    d.ellipse([s * 0.30, s * 0.32, s * 0.68, s * 0.66], outline=(170, 255, 200, 255), width=int(s * 0.025))
    cx, cy, r = s * 0.49, s * 0.49, s * 0.05
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 255, 255, 255))
    w = int(s * 0.022)
    d.line([cx - 3 * r, cy, cx - 1.6 * r, cy], fill=(255, 255, 255, 255), width=w)
    d.line([cx + 1.6 * r, cy, cx + 3 * r, cy], fill=(255, 255, 255, 255), width=w)
    d.line([cx, cy - 3 * r, cx, cy - 1.6 * r], fill=(255, 255, 255, 255), width=w)
    d.line([cx, cy + 1.6 * r, cx, cy + 3 * r], fill=(255, 255, 255, 255), width=w)
    finish(img, size, path)


def tool(kind, color, size, path):
    img = canvas(size)
    d = ImageDraw.Draw(img)
    s = size * SS
    w = max(SS, int(s * 0.085))
    if kind == "point":
        r = s * 0.13
        d.ellipse([s / 2 - r, s / 2 - r, s / 2 + r, s / 2 + r], fill=color)
        for a, b in ((0.08, 0.30), (0.70, 0.92)):
            d.line([s * a, s / 2, s * b, s / 2], fill=color, width=w)
            d.line([s / 2, s * a, s / 2, s * b], fill=color, width=w)
    elif kind == "box":
        m = s * 0.16
        d.rectangle([m, m, s - m, s - m], outline=color, width=w)
        c = s * 0.09
        for x, y in ((m, m), (s - m, m), (m, s - m), (s - m, s - m)):
            d.rectangle([x - c, y - c, x + c, y + c], fill=color)
    elif kind == "scribble":
        pts = []
        for n in range(60):
            t = n / 59.0
            x = s * (0.12 + 0.76 * t)
            y = s * (0.5 + 0.22 * math.sin(t * 3.2 * math.pi) * (1 - 0.3 * t))
            pts.append((x, y))
        d.line(pts, fill=color, width=int(w * 1.3), joint="curve")
        r = w * 0.65
        for x, y in (pts[0], pts[-1]):
            d.ellipse([x - r, y - r, x + r, y + r], fill=color)
    elif kind == "lasso":
        pts = []
        for n in range(80):
            a = 2 * math.pi * n / 80
            rr = 0.33 + 0.05 * math.sin(3 * a)
            pts.append((s * (0.5 + rr * math.cos(a)), s * (0.44 + 0.8 * rr * math.sin(a))))
        d.line(pts + [pts[0]], fill=color, width=w, joint="curve")
        d.line([pts[20], (s * 0.62, s * 0.92)], fill=color, width=w)
    finish(img, size, path)


def main():
    brand(128, os.path.join(REPO, "Resources", "SlicerNNInteractive.png"))
    brand(128, os.path.join(MODULE, "Resources", "Icons", "SlicerNNInteractive.png"))
    themes = {"light": (48, 48, 48, 255), "dark": (232, 232, 232, 255)}
    for theme, color in themes.items():
        for kind in ("point", "box", "scribble", "lasso"):
            tool(kind, color, 48, os.path.join(MODULE, "Resources", "Icons", theme, kind + ".png"))


if __name__ == "__main__":
    main()
