"""Procedural training images for the demo VAE, made on the fly by seeded code.

Photographs that ship in packages are few, and most of them are grayscale; a VAE trained on them
learns to pull colours toward grey. These images supply what the photos lack, with exact targets:
saturated and pastel colour fields, gradients (linear and radial, interpolated in RGB, HSV or
CIELAB), hard-edged shapes (polygons, ellipses, stripes, checkerboards, flag-like bands), rendered
text at many sizes (Pillow's own font, `ImageFont.load_default(size=...)`), and noise and texture
at several scales. Each image is a random composite of these, rendered at 1-2.5x the crop size and
then either downscaled (anti-aliased edges, denser detail) or cropped (pixel-hard edges).

    gen = Procedural(seed)
    img = gen.image(128)            # uint8 [128, 128, 3], RGB

Nothing is read from disk except Pillow's bundled font; the stream of images depends only on the
seed (and the Pillow/numpy/scikit-image versions).
"""
from __future__ import annotations

import colorsys
import string
import warnings

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

try:  # scikit-image does the HSV/CIELAB conversions of the gradient fields (it is needed for the evaluation anyway)
    from skimage.color import hsv2rgb, lab2rgb, rgb2lab
except ImportError:  # pragma: no cover - the training script checks for scikit-image first
    hsv2rgb = lab2rgb = rgb2lab = None

_TEXT_CHARS = string.ascii_letters + string.digits + "      .,:;!?-+=/()&%$#@*"
_WORDS = ("klvae", "VAE", "latent", "colour", "detail", "ComfyUI", "SD", "FLUX", "pixel", "Lab", "sRGB",
          "HELLO", "world", "2026", "3.14159", "AaBbCc", "#00ff00", "RGB", "Ω", "quick brown fox")


class Procedural:
    """A seeded stream of synthetic RGB images (uint8 HxWx3)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self._fonts: dict[int, ImageFont.ImageFont] = {}
        self._yy_xx: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # ---------------------------------------------------------------- colours
    def color(self, kind: str | None = None) -> np.ndarray:
        """One RGB colour in [0, 1]: saturated, pastel, dark, neutral or uniform."""
        r = self.rng
        if kind is None:
            kind = r.choice(("saturated", "pastel", "dark", "neutral", "any"), p=(0.4, 0.2, 0.12, 0.1, 0.18))
        h = r.random()
        if kind == "saturated":
            c = colorsys.hsv_to_rgb(h, r.uniform(0.75, 1.0), r.uniform(0.55, 1.0))
        elif kind == "pastel":
            c = colorsys.hsv_to_rgb(h, r.uniform(0.08, 0.4), r.uniform(0.82, 1.0))
        elif kind == "dark":
            c = colorsys.hsv_to_rgb(h, r.uniform(0.3, 1.0), r.uniform(0.06, 0.35))
        elif kind == "neutral":
            c = (r.random(),) * 3
        else:
            c = tuple(r.random(3))
        return np.asarray(c, dtype=np.float32)

    def palette(self, n: int) -> list[np.ndarray]:
        kind = self.rng.choice(("saturated", "pastel", "mixed"), p=(0.45, 0.2, 0.35))
        return [self.color(None if kind == "mixed" else kind) for _ in range(n)]

    # ---------------------------------------------------------------- fields
    def _grid(self, s: int):
        if s not in self._yy_xx:
            yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / max(s - 1, 1)
            self._yy_xx[s] = (yy, xx)
        return self._yy_xx[s]

    def _ramp(self, t: np.ndarray, colours: list[np.ndarray], space: str) -> np.ndarray:
        """Map t in [0, 1] (HxW) through a ramp of colours interpolated in RGB, HSV or CIELAB."""
        t = np.clip(t, 0.0, 1.0)
        k = len(colours) - 1
        seg = np.minimum((t * k).astype(np.int64), k - 1)
        u = (t * k - seg)[..., None]
        if space == "hsv":
            hsv = np.stack([colorsys.rgb_to_hsv(*c) for c in colours]).astype(np.float32)
            if self.rng.random() < 0.5:  # sometimes the long way round the hue circle: a rainbow
                hsv[1:, 0] += np.arange(1, k + 1) * self.rng.choice((-1, 1))
            a, b = hsv[seg], hsv[seg + 1]
            out = a + (b - a) * u
            out[..., 0] = np.mod(out[..., 0], 1.0)
            return hsv2rgb(out).astype(np.float32)
        if space == "lab":
            lab = rgb2lab(np.stack(colours)[None].astype(np.float64))[0].astype(np.float32)
            a, b = lab[seg], lab[seg + 1]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # out-of-gamut blends are clipped, which is fine here
                return np.clip(lab2rgb((a + (b - a) * u).astype(np.float64)), 0, 1).astype(np.float32)
        arr = np.stack(colours)
        a, b = arr[seg], arr[seg + 1]
        return a + (b - a) * u

    def value_noise(self, s: int, cells: int, channels: int = 1) -> np.ndarray:
        """Smooth noise in [0, 1]: a random cells x cells grid, bicubic-upsampled to s x s."""
        cells = max(2, min(cells, s))
        g = (self.rng.random((cells, cells, channels)) * 255).astype(np.uint8)
        chans = [np.asarray(Image.fromarray(g[..., c]).resize((s, s), Image.BICUBIC), dtype=np.float32) / 255.0
                 for c in range(channels)]
        return np.stack(chans, -1)

    def fractal(self, s: int, channels: int = 1) -> np.ndarray:
        """Sum of value-noise octaves from a few cells to near pixel scale, normalised to [0, 1]."""
        base = int(self.rng.integers(2, 9))
        octaves = int(self.rng.integers(2, 7))
        persistence = self.rng.uniform(0.35, 0.8)
        out = np.zeros((s, s, channels), np.float32)
        amp, total = 1.0, 0.0
        for o in range(octaves):
            cells = base * 2 ** o
            if cells > s:
                break
            out += amp * self.value_noise(s, cells, channels)
            total += amp
            amp *= persistence
        out /= total
        lo, hi = out.min(), out.max()
        return (out - lo) / max(hi - lo, 1e-6)

    def background(self, s: int) -> np.ndarray:
        """HxWx3 float in [0, 1]: a flat colour, a gradient, a colour-mapped noise field or a grating."""
        r = self.rng
        yy, xx = self._grid(s)
        kind = r.choice(("flat", "linear", "radial", "noise", "noise_rgb", "grating"),
                        p=(0.16, 0.24, 0.16, 0.2, 0.12, 0.12))
        space = r.choice(("rgb", "hsv", "lab"))
        if kind == "flat":
            return np.broadcast_to(self.color(), (s, s, 3)).copy()
        if kind == "linear":
            ang = r.uniform(0, 2 * np.pi)
            t = np.cos(ang) * xx + np.sin(ang) * yy
            t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
            return self._ramp(t, self.palette(int(r.integers(2, 5))), space)
        if kind == "radial":
            cy, cx = r.uniform(-0.2, 1.2, 2)
            t = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / r.uniform(0.4, 1.5)
            if r.random() < 0.3:
                t = np.mod(t * r.integers(2, 6), 1.0)  # concentric repeats
            return self._ramp(t, self.palette(int(r.integers(2, 4))), space)
        if kind == "noise":
            return self._ramp(self.fractal(s)[..., 0], self.palette(int(r.integers(2, 5))), space)
        if kind == "noise_rgb":
            n = self.fractal(s, 3)
            lo, hi = r.uniform(0, 0.4), r.uniform(0.6, 1.0)
            return lo + (hi - lo) * n
        # sinusoidal grating or zone plate, colour-mapped
        if r.random() < 0.5:
            ang = r.uniform(0, np.pi)
            f = r.uniform(2, s / 4)
            t = 0.5 + 0.5 * np.sin(2 * np.pi * f * (np.cos(ang) * xx + np.sin(ang) * yy))
        else:
            k = r.uniform(s / 8, s / 1.5)
            t = 0.5 + 0.5 * np.cos(np.pi * k * ((xx - r.random()) ** 2 + (yy - r.random()) ** 2))
        return self._ramp(t, self.palette(2), space)

    # ---------------------------------------------------------------- layers
    def _rgb8(self, c: np.ndarray) -> tuple[int, int, int]:
        return tuple(int(v) for v in np.clip(np.round(c * 255), 0, 255))

    def _polygon(self, s: int, n: int | None = None, scale: float | None = None):
        r = self.rng
        n = n or int(r.integers(3, 9))
        cx, cy = r.uniform(-0.1, 1.1, 2) * s
        rad = (scale or r.uniform(0.05, 0.6)) * s
        ang = np.sort(r.uniform(0, 2 * np.pi, n))
        radii = rad * r.uniform(0.4, 1.0, n)
        return [(float(cx + rr * np.cos(a)), float(cy + rr * np.sin(a))) for a, rr in zip(ang, radii)]

    def _pattern(self, s: int, kind: str) -> np.ndarray:
        """Stripes or a checkerboard at a random angle and period, in 2-4 colours (aliased, hard)."""
        r = self.rng
        yy, xx = self._grid(s)
        ang = r.choice((0.0, np.pi / 2, r.uniform(0, np.pi)))
        u = (np.cos(ang) * xx + np.sin(ang) * yy) * s
        v = (-np.sin(ang) * xx + np.cos(ang) * yy) * s
        period = float(np.exp(r.uniform(np.log(2), np.log(s / 2))))
        cols = np.stack(self.palette(int(r.integers(2, 5))))
        if kind == "stripes":
            idx = np.floor(u / period).astype(np.int64) % len(cols)
        else:
            idx = (np.floor(u / period) + np.floor(v / period)).astype(np.int64) % 2
        return cols[idx]

    def _flag(self, s: int) -> np.ndarray:
        """Flag-like bands: 2-5 horizontal or vertical bands, sometimes a cross, a canton or a disc."""
        r = self.rng
        yy, xx = self._grid(s)
        cols = np.stack(self.palette(int(r.integers(2, 6))))
        coord = yy if r.random() < 0.5 else xx
        idx = np.minimum((coord * len(cols)).astype(np.int64), len(cols) - 1)
        img = cols[idx]
        extra = r.choice(("none", "cross", "canton", "disc"))
        c = self.color("saturated")
        if extra == "cross":
            w = r.uniform(0.06, 0.2)
            cx, cy = r.uniform(0.3, 0.6), 0.5
            img[(np.abs(xx - cx) < w / 2) | (np.abs(yy - cy) < w / 2)] = c
        elif extra == "canton":
            h, w = r.uniform(0.3, 0.6), r.uniform(0.3, 0.5)
            img[(yy < h) & (xx < w)] = c
            star = self.color(r.choice(("pastel", "neutral")))
            n = int(r.integers(1, 13))
            for _ in range(n):  # small dots, like stars on a canton
                sy, sx, sr = r.uniform(0, h), r.uniform(0, w), r.uniform(0.01, 0.04)
                img[(yy - sy) ** 2 + (xx - sx) ** 2 < sr ** 2] = star
        elif extra == "disc":
            img[(yy - 0.5) ** 2 + (xx - r.uniform(0.35, 0.65)) ** 2 < r.uniform(0.1, 0.35) ** 2] = c
        return img

    def _font(self, size: int):
        if size not in self._fonts:
            try:
                self._fonts[size] = ImageFont.load_default(size=size)
            except TypeError:  # Pillow < 10.1: only the fixed bitmap font
                self._fonts[size] = ImageFont.load_default()
        return self._fonts[size]

    def _text(self, draw: ImageDraw.ImageDraw, s: int, bg_mean: np.ndarray) -> None:
        r = self.rng
        size = int(np.exp(r.uniform(np.log(7), np.log(max(8, s / 2.5)))))
        font = self._font(size)
        fg = self.color()
        if r.random() < 0.6:  # mostly legible: push the text colour away from the background's lightness
            lum_bg = float(bg_mean @ np.array([0.299, 0.587, 0.114], np.float32))
            if abs(float(fg @ np.array([0.299, 0.587, 0.114], np.float32)) - lum_bg) < 0.35:
                fg = fg * 0.25 if lum_bg > 0.5 else 1 - (1 - fg) * 0.25
        lines = int(r.integers(1, 6))
        x, y = r.uniform(-0.1, 0.8) * s, r.uniform(-0.1, 0.9) * s
        for _ in range(lines):
            if r.random() < 0.5:
                txt = " ".join(r.choice(_WORDS) for _ in range(int(r.integers(1, 5))))
            else:
                txt = "".join(r.choice(list(_TEXT_CHARS), int(r.integers(3, 30))))
            draw.text((x, y), txt, fill=self._rgb8(fg), font=font)
            y += size * r.uniform(1.0, 1.6)

    def layers(self, img: np.ndarray) -> np.ndarray:
        """Composite 0-6 layers (shapes, patterns in shapes, flags, text) over the background."""
        r = self.rng
        s = img.shape[0]
        pil = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
        for _ in range(int(r.integers(0, 7))):
            kind = r.choice(("polygon", "ellipse", "rect", "pattern", "flag", "text", "lines"),
                            p=(0.18, 0.16, 0.1, 0.14, 0.08, 0.24, 0.1))
            draw = ImageDraw.Draw(pil)
            if kind == "polygon":
                outline = self._rgb8(self.color()) if r.random() < 0.3 else None
                draw.polygon(self._polygon(s), fill=self._rgb8(self.color()), outline=outline,
                             width=int(r.integers(1, max(2, s // 40))))
            elif kind in ("ellipse", "rect"):
                x0, y0 = r.uniform(-0.2, 0.9, 2) * s
                w, h = r.uniform(0.03, 0.7, 2) * s
                box = [x0, y0, x0 + w, y0 + h]
                outline = self._rgb8(self.color()) if r.random() < 0.3 else None
                width = int(r.integers(1, max(2, s // 30)))
                (draw.ellipse if kind == "ellipse" else draw.rectangle)(box, fill=self._rgb8(self.color()),
                                                                         outline=outline, width=width)
            elif kind in ("pattern", "flag"):
                pat = self._pattern(s, r.choice(("stripes", "checker"))) if kind == "pattern" else self._flag(s)
                patim = Image.fromarray((np.clip(pat, 0, 1) * 255 + 0.5).astype(np.uint8))
                if r.random() < 0.35:
                    pil = patim  # the whole canvas
                else:
                    mask = Image.new("L", (s, s), 0)
                    md = ImageDraw.Draw(mask)
                    if r.random() < 0.5:
                        md.polygon(self._polygon(s, scale=r.uniform(0.2, 0.8)), fill=255)
                    else:
                        x0, y0 = r.uniform(-0.1, 0.7, 2) * s
                        w, h = r.uniform(0.2, 0.9, 2) * s
                        md.rectangle([x0, y0, x0 + w, y0 + h], fill=255)
                    pil = Image.composite(patim, pil, mask)
            elif kind == "text":
                bg_mean = np.asarray(pil, dtype=np.float32).mean((0, 1)) / 255.0
                if r.random() < 0.3:  # text on a label, like a sign or a badge
                    x0, y0 = r.uniform(-0.1, 0.6, 2) * s
                    w, h = r.uniform(0.3, 1.0) * s, r.uniform(0.1, 0.5) * s
                    lab_c = self.color()
                    draw.rectangle([x0, y0, x0 + w, y0 + h], fill=self._rgb8(lab_c))
                    bg_mean = lab_c
                if r.random() < 0.25:  # rotated text: draw on a transparent layer, rotate, paste
                    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
                    self._text(ImageDraw.Draw(layer), s, bg_mean)
                    layer = layer.rotate(float(r.uniform(-60, 60)), resample=Image.BICUBIC)
                    pil = pil.convert("RGBA")
                    pil.alpha_composite(layer)
                    pil = pil.convert("RGB")
                else:
                    self._text(draw, s, bg_mean)
            else:  # thin lines: hair, wires, grid lines
                col = self._rgb8(self.color())
                width = int(r.integers(1, 4))
                for _ in range(int(r.integers(1, 30))):
                    p = r.uniform(-0.1, 1.1, 4) * s
                    draw.line([float(p[0]), float(p[1]), float(p[2]), float(p[3])], fill=col, width=width)
        return np.asarray(pil, dtype=np.float32) / 255.0

    def finish(self, img: np.ndarray) -> np.ndarray:
        """Optional grain (mono or colour), texture modulation, or a slight blur."""
        r = self.rng
        s = img.shape[0]
        u = r.random()
        if u < 0.2:
            sigma = r.uniform(0.01, 0.08)
            ch = 3 if r.random() < 0.5 else 1
            img = img + r.normal(0, sigma, (s, s, ch)).astype(np.float32)
        elif u < 0.35:
            tex = self.fractal(s, 1 if r.random() < 0.6 else 3)
            amt = r.uniform(0.1, 0.5)
            img = img * (1 - amt + amt * 2 * tex)
        img = np.clip(img, 0, 1)
        if r.random() < 0.12:
            pil = Image.fromarray((img * 255 + 0.5).astype(np.uint8)).filter(
                ImageFilter.GaussianBlur(float(r.uniform(0.4, 2.0))))
            return np.asarray(pil, dtype=np.float32) / 255.0
        return img

    # ---------------------------------------------------------------- public
    def image(self, size: int) -> np.ndarray:
        """One uint8 [size, size, 3] image: background + layers + finish, rendered at 1-2.5x size,
        then box-downscaled (anti-aliased) or randomly cropped (hard edges at pixel scale)."""
        r = self.rng
        render = int(round(size * float(np.exp(r.uniform(0.0, np.log(2.5))))))
        img = self.finish(self.layers(self.background(render)))
        im8 = (img * 255 + 0.5).astype(np.uint8)
        if render == size:
            return im8
        if r.random() < 0.55:
            return np.asarray(Image.fromarray(im8).resize((size, size), Image.BOX if r.random() < 0.5 else Image.LANCZOS))
        y, x = r.integers(0, render - size + 1, 2)
        return np.ascontiguousarray(im8[y:y + size, x:x + size])


def preview(path: str, seed: int = 0, size: int = 128, n: int = 24, cols: int = 8) -> None:
    """A contact sheet of n procedural images (to look at what training sees)."""
    gen = Procedural(seed)
    rows = (n + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (size + 4), rows * (size + 4)), "white")
    for i in range(n):
        sheet.paste(Image.fromarray(gen.image(size)), ((i % cols) * (size + 4), (i // cols) * (size + 4)))
    sheet.save(path)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="write a contact sheet of procedural training images")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("-n", type=int, default=24)
    a = ap.parse_args()
    preview(a.out, a.seed, a.size, a.n)
