"""Images as tensors: a file to [1, 3, H, W] in [-1, 1] (what encode takes), and back; heat maps of
differences that read without a caption (each panel titled, a colour scale)."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import KLVAEError

FORMATS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def read_image(path, size: int | None = None, alpha: bool = False) -> torch.Tensor:
    """An image file as [1, 3, H, W] in [-1, 1] (alpha dropped, greyscale replicated), at its own
    size; alpha: [1, 4, H, W], RGBA (an image without alpha opaque), for an RGBA VAE. With `size`: a
    square, size x size: the image's centre square (the longer side's ends are cut off) resized with
    Lanczos. Sides that are not multiples of 8: pad_to_multiple."""
    try:
        im = Image.open(path)
        im.load()
    except FileNotFoundError:
        raise KLVAEError(f"{path}: no such file") from None
    except OSError as e:
        raise KLVAEError(f"{path}: not a readable image ({e})") from e
    im = im.convert("RGBA" if alpha else "RGB")
    if size:
        s = min(im.size)
        box = ((im.width - s) // 2, (im.height - s) // 2, (im.width + s) // 2, (im.height + s) // 2)
        im = im.crop(box).resize((size, size), Image.LANCZOS)
    a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()


def pad_to_multiple(x: torch.Tensor, f: int = 8) -> torch.Tensor:
    """[B, C, H, W] padded at the right and bottom to multiples of f, by reflection (replication where
    the image is too small to reflect), so encode takes it; crop the decode back with [..., :H, :W].
    f is vae.config.downscale (8; Flux.2's scaled latents are 2x2 patches: 16)."""
    if not isinstance(f, int) or isinstance(f, bool) or f < 1:
        raise KLVAEError(f"pad_to_multiple: f={f!r}, expected a positive whole number (the VAE's downscale, e.g. 8)")
    H, W = x.shape[-2:]
    ph, pw = -H % f, -W % f
    if ph or pw:
        mode = "reflect" if ph < H and pw < W else "replicate"
        if x.dim() == 5:  # a clip [B, C, T, H, W]: its frames, each as an image
            return pad_to_multiple(x.transpose(1, 2).flatten(0, 1), f).unflatten(0, (x.shape[0], -1)).transpose(1, 2)
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode)
    return x


def check_image_path(path) -> Path:
    """A path an image can be written to (its suffix a format Pillow writes), checked before any work."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise KLVAEError(f"{path}: unknown image format {path.suffix or '(none)'!r}; use {', '.join(FORMATS)}")
    return path


NO_ALPHA = (".jpg", ".jpeg", ".bmp")  # formats Pillow writes without an alpha channel


def write_image(x: torch.Tensor, path) -> None:
    """The first image of [B, 3, H, W] in [-1, 1] to a file (8-bit, rounded); [B, 4, H, W] is RGBA,
    its alpha kept where the format has one (PNG, WebP, TIFF) and dropped where not (JPEG, BMP)."""
    path = check_image_path(path)
    x = x[:, :3] if path.suffix.lower() in NO_ALPHA else x
    a = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(path)
    except (OSError, ValueError, KeyError) as e:
        raise KLVAEError(f"cannot write {path}: {e}") from e


# -- clips as folders of frames ------------------------------------------------------------------------
FRAME = "frame_{:05d}.png"


def read_frames(folder) -> torch.Tensor:
    """The image files of a folder, in name order, as one clip [1, 3, N, H, W] in [-1, 1]."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FORMATS)
    if not files:
        raise KLVAEError(f"{folder}: no image files in it ({', '.join(FORMATS)}): a clip is a folder of frames")
    frames = []
    for p in files:
        x = read_image(p)
        if frames and x.shape != frames[0].shape:
            raise KLVAEError(f"{p.name} is {x.shape[3]}x{x.shape[2]}, {files[0].name} is {frames[0].shape[3]}x"
                             f"{frames[0].shape[2]}: the frames of a clip must all be the same size")
        frames.append(x)
    return torch.stack(frames, dim=2)


def check_frames_folder(folder) -> Path:
    """A folder frames can be written to without replacing any (checked before the work)."""
    folder = Path(folder)
    if folder.suffix.lower() in FORMATS or folder.is_file():
        raise KLVAEError(f"{folder}: a clip's frames are written into a folder; give a folder path (no image suffix)")
    if folder.is_dir() and any(folder.glob("frame_*.png")):
        raise KLVAEError(f"{folder} holds frames already (frame_*.png): give a new or empty folder, nothing is "
                         f"overwritten")
    return folder


def write_frames(x: torch.Tensor, folder, first: int = 0) -> list:
    """The first clip of [B, 3, T, H, W] in [-1, 1] as frame_<first>.png, frame_<first + 1>.png, ...
    in a folder (made if needed; check_frames_folder before the first, so nothing is replaced)."""
    paths = [Path(folder) / FRAME.format(first + t) for t in range(x.shape[2])]
    for t, p in enumerate(paths):
        write_image(x[:1, :, t], p)
    return paths


def _font(size: int):
    from PIL import ImageFont
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def save_png(im: Image.Image, path, text: dict) -> None:
    """A picture with the figures it shows in its text chunks, so a test can hold it to the run that
    printed them (`Image.open(path).text`)."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, str(v))
    im.save(path, pnginfo=info)


def side_by_side(panels, panel_px: int = 768) -> Image.Image:
    """Images in a row, each resized to panel_px square (Lanczos) under its caption: [(caption, PIL image)]."""
    from PIL import ImageDraw
    cap_h, gap = 34, 8
    im = Image.new("RGB", (len(panels) * panel_px + (len(panels) - 1) * gap, cap_h + panel_px), "white")
    draw, font = ImageDraw.Draw(im), _font(20)
    for k, (caption, picture) in enumerate(panels):
        x0 = k * (panel_px + gap)
        draw.text((x0 + 6, 6), caption, fill="black", font=font)
        im.paste(picture.convert("RGB").resize((panel_px, panel_px), Image.LANCZOS), (x0, cap_h))
    return im


def heat(d: np.ndarray, scale: float) -> np.ndarray:
    """|difference| [H, W] (units of the 0..1 pixel range) -> RGB uint8: black, red, yellow, white at `scale`."""
    t = np.clip(d / scale, 0, 1)[..., None]
    return (np.clip(np.concatenate([3 * t, 3 * t - 1, 3 * t - 2], -1), 0, 1) * 255).astype(np.uint8)


def heat_map(panels, scale: float, panel_px: int = 384, note: str = "") -> Image.Image:
    """Side by side, one heat map per (title, |difference| [H, W]) with its title above it and a colour
    scale below all of them: what each panel is and how large an error each colour means."""
    from PIL import ImageDraw
    title_h, bar_h, gap = 44, 86, 8
    W = len(panels) * panel_px + (len(panels) - 1) * gap
    im = Image.new("RGB", (W, title_h + panel_px + bar_h), "white")
    draw = ImageDraw.Draw(im)
    font, small = _font(15), _font(13)
    for k, (title, d) in enumerate(panels):
        x0 = k * (panel_px + gap)
        lines = title.split("\n")
        for n, line in enumerate(lines[:2]):
            draw.text((x0 + 4, 4 + 19 * n), line, fill="black", font=font if n == 0 else small)
        im.paste(Image.fromarray(heat(d, scale)).resize((panel_px, panel_px), Image.BOX), (x0, title_h))
    bar = heat(np.linspace(0, scale, 256)[None].repeat(12, 0), scale)
    y = title_h + panel_px + 10
    im.paste(Image.fromarray(bar).resize((256, 12)), (4, y))
    for v, x in ((0, 4), (scale / 2, 132), (scale, 260)):
        draw.text((x - 4, y + 14), f"{v:g}" if v < scale else f">= {v:g}", fill="black", font=small)
    draw.text((4, y + 32), "|tiled - untiled|, mean over RGB, in units of the 0..1 pixel range", fill="black", font=small)
    if note:
        draw.text((4, y + 48), note, fill="black", font=small)
    return im
