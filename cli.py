"""klvae's command line: `klvae <command> ...` or `python -m klvae <command> ...`.

    klvae demo                                  the main job on a large photo, untiled vs tiled
    klvae info FILE                             what a VAE file is
    klvae encode IMAGE -o LATENT.safetensors    image -> latent (argmax or seeded sample)
    klvae encode FRAMES/ -o LATENT.safetensors  a clip (a folder of frames, Wan 2.1's VAE) -> latent
    klvae decode LATENT.safetensors -o IMAGE    latent -> image (a clip's latent: -o FOLDER of frames)
    klvae roundtrip IMAGE -o IMAGE              image -> latent -> image, with its PSNR
    klvae convert FILE -o OUT --layout ldm|diffusers

Every VAE option defaults to the small demo VAE shipped in models/ (a demo and test model, see
models/MODEL_CARD.md). Errors are one line on stderr and a non-zero exit status.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from .vae import DEMO_PHOTO, DEMO_VAE, DEFAULT_MODE, FAMILIES, KLVAEError, Tiling, images, load_vae, resolve_device, save_vae
from .vae.checkpoint import stored_dtypes, write_safetensors
from .vae.errors import reworded
from .vae.metrics import max_abs_vs_full, psnr_vs_full as psnr
from .vae.distributed import init_from_env
from .vae.memory import PeakMeter

SHIPPED_VAE = DEMO_VAE  # the default of every --vae option
DEMO_MAX_SIZE = 16384   # px: a 16K canvas is 3 GiB of pixels in fp32 before the VAE's activations
LATENT_KEY = "latent"


class CLIError(Exception):
    """A bad argument or file: reported as one line, exit status 2."""


# -- images ----------------------------------------------------------------------------------------
def read_image(path, vae=None) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1] (alpha dropped, greyscale replicated); [1, 4, H, W] for an RGBA VAE's
    (Qwen-Image 2.1's: an image without alpha is opaque)."""
    return images.read_image(path, alpha=vae is not None and vae.config.in_channels == 4)


def write_image(x: torch.Tensor, path) -> None:
    images.write_image(x, path)


# -- VAE and tiling options ------------------------------------------------------------------------
def open_vae(args):
    path = Path(args.vae) if args.vae else SHIPPED_VAE
    if not path.exists():
        hint = " (the shipped demo VAE is missing: reinstall klvae)" if not args.vae else ""
        raise CLIError(f"{path}: no such VAE file or folder{hint}")
    return load_vae(path, device=args.device, dtype=args.dtype)


class Bar:
    """One tqdm bar per phase (an encode, a decode), fed by klvae's progress(done, total) callback:
    its total is the plan's, from the first step on. Redrawn at most twice a second (tqdm's
    mininterval), not per step; off when stderr is not a terminal (a log file gets no bar lines)."""

    def __init__(self, desc):
        self.desc, self.bar = desc, None  # created on the first step: errors before it print alone

    def __call__(self, done, total):
        if self.bar is None and total <= 1:
            return  # the plain pass: one step, nothing to watch
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="step", leave=True, file=sys.stderr, mininterval=0.5,
                            disable=None if not os.environ.get("KLVAE_PROGRESS") else False)
        self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def tiling_of(args, desc, gather="rank0"):
    if getattr(args, "group", None) is not None:  # --distributed: exact, sharded
        bar = Bar(desc) if torch.distributed.get_rank() == 0 else None
        return Tiling(mode="exact", tile_size=args.tile, store=args.store, spill_dir=args.spill_dir, progress=bar,
                      process_group=args.group, gather=gather), bar
    if args.tiling == "none":
        return None, None
    bar = Bar(desc)
    return Tiling(mode=args.tiling, tile_size=args.tile, overlap=args.overlap, store=args.store,
                  spill_dir=args.spill_dir, progress=bar), bar


def run_tiled(fn, args, desc, gather="rank0"):
    tiling, bar = tiling_of(args, desc, gather)
    try:
        return fn(tiling)
    finally:
        if bar:
            bar.close()


def encode_image(vae, x, args):
    # --distributed: the latent on every rank (small), so a round trip's decode has it everywhere
    post = run_tiled(lambda t: vae.encode(x, tiling=t), args, "encode", gather="all")
    return post.mode() if args.mode == "argmax" else post.sample(seed=args.seed or 0)


def not_rank0(args) -> bool:
    """--distributed: every rank computes, rank 0 writes and prints."""
    return args.group is not None and torch.distributed.get_rank() != 0


# -- commands ----------------------------------------------------------------------------------------
def make_parent(path) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot write {path}: {e.strerror or e}") from e


def must_exist(path):
    if not Path(path).exists():
        raise CLIError(f"{path}: no such file or folder")


def cmd_info(args):
    must_exist(args.file)
    vae = load_vae(args.file, device="cpu", dtype="fp32")
    c = vae.config
    stored = ", ".join(stored_dtypes(args.file)).replace("pickle", "(pickle; see the tensors)")
    n = sum(p.numel() for p in vae.parameters())
    rows = [("file", str(args.file)), ("family", c.family), ("latent channels", c.latent_channels),
            ("scaling factor", c.scaling_factor), ("shift factor", c.shift_factor),
            ("key layout", vae.source_layout), ("stored dtype", stored), ("parameters", f"{n:,} ({n / 1e6:.1f} M)"),
            ("widths", f"{c.ch} x {list(c.ch_mult)}" + (f" (decoder {c.decoder_ch} x)" if c.decoder_ch else "")
             + f", {c.num_res_blocks} res blocks" + (f", {c.norm_groups} norm groups" if c.network.group_norms else "")),
            ("pixels", f"{c.in_channels} channels in, {c.out_channels} out"
             + (f", as {c.patch_size}x{c.patch_size} patches" if c.patch_size > 1 else "")),
            ("quant convs", c.use_quant_conv), ("downscale", c.downscale)]
    if c.clips:
        rows.append(("frames", f"images, and clips of 1 + {vae.temporal_compression_ratio}k frames"))
    if c.latents_mean is not None:
        rows.append(("latents mean/std", f"{list(c.latents_mean)} / {list(c.latents_std)}"))
    rows += [("how inferred", "; ".join(c.notes) or "-")]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


def _stored_float_dtype(path: Path) -> str:
    """The dtype most of a file's weights are stored in ('fp16', 'bf16' or 'fp32'; pickles: fp32)."""
    stored = stored_dtypes(path)
    for name, st in (("fp16", "F16"), ("bf16", "BF16")):
        if stored == [st]:
            return name
    return "fp32"


def cmd_encode(args):
    if Path(args.output).suffix != ".safetensors":
        raise CLIError(f"{args.output}: a latent is written as .safetensors; give a path ending in .safetensors")
    clip = Path(args.image).is_dir()
    vae = open_vae(args)
    if clip and not vae.config.network.video_shaped:
        raise CLIError(f"{args.image} is a folder: a clip's frames, and this {vae.config.family} VAE encodes images; "
                       f"encode a clip with Wan 2.1's (Qwen-Image's) VAE, or give one image file")
    img = images.read_frames(args.image) if clip else read_image(args.image, vae)
    H, W = img.shape[-2:]
    t0 = time.perf_counter()
    z = encode_image(vae, images.pad_to_multiple(img, vae.config.downscale * (2 if vae.config.batch_norm else 1)), args)
    if not_rank0(args):
        return
    kind = "scaled" if args.scaled else "raw"
    out = vae.to_scaled(z) if args.scaled else z
    c = vae.config
    meta = {"klvae.family": c.family, "klvae.scaling_factor": repr(c.scaling_factor),
            "klvae.shift_factor": repr(c.shift_factor), "klvae.latent": kind, "klvae.mode": args.mode,
            "klvae.seed": str(args.seed or 0) if args.mode == "sample" else "", "klvae.image_size": f"{W}x{H}",
            "klvae.vae": Path(args.vae).name if args.vae else SHIPPED_VAE.name}
    if clip:
        meta["klvae.frames"] = str(img.shape[2])
    if c.latents_mean is not None:
        meta["klvae.latents_mean"], meta["klvae.latents_std"] = json.dumps(c.latents_mean), json.dumps(c.latents_std)
    make_parent(args.output)
    write_safetensors({LATENT_KEY: out.float().contiguous().cpu()}, args.output, meta)
    what = f"{img.shape[2]} frames of {W}x{H}" if clip else f"{W}x{H}"
    print(f"{args.image} ({what}) -> {args.output}: {kind} latent {list(out.shape)} ({args.mode}) "
          f"in {time.perf_counter() - t0:.1f} s")


def read_latent(path):
    try:
        with safe_open(str(path), "pt") as h:
            meta, keys = h.metadata() or {}, list(h.keys())
            key = LATENT_KEY if LATENT_KEY in keys else "latent_tensor" if "latent_tensor" in keys else None
            if key is None:
                raise CLIError(f"{path}: no latent in it (keys {keys[:4]}); expected a file written by `klvae "
                               f"encode` or ComfyUI's SaveLatent")
            z = h.get_tensor(key)
    except FileNotFoundError:
        raise CLIError(f"{path}: no such file") from None
    except (SafetensorError, OSError) as e:
        raise CLIError(f"{path}: not a readable safetensors latent ({e})") from None
    if key == "latent_tensor" and "latent_format_version_0" not in keys:
        z = z / FAMILIES["sd1"].scaling_factor  # ComfyUI's pre-2023 .latent files stored SD1 latents scaled
    return z.float(), meta


def cmd_decode(args):
    z, meta = read_latent(args.latent)
    clip = z.dim() == 5 and z.shape[2] > 1
    # before the work, not after it
    images.check_frames_folder(args.output) if clip else images.check_image_path(args.output)
    vae = open_vae(args)
    if meta.get("klvae.latent") == "scaled":
        z = vae.from_scaled(z)
    elif vae.bn is not None and "klvae.latent" not in meta and z.shape[1] == vae.config.scaled_channels:
        z = vae.from_scaled(z)  # ComfyUI's Flux.2 LATENT: patchified and normalised
    fam = meta.get("klvae.family")
    if fam and fam != vae.config.family and z.shape[1] == vae.config.latent_channels:
        print(f"note: latent came from a {fam} VAE, decoding with a {vae.config.family} one", file=sys.stderr)
    t0 = time.perf_counter()
    size = tuple(int(v) for v in meta["klvae.image_size"].split("x"))[::-1] if "klvae.image_size" in meta else None
    if clip:  # frames written as each time chunk finishes: the clip never has to fit in memory
        paths, side = [], []

        def write(first, frames):
            frames = frames[..., :size[0], :size[1]] if size else frames  # undo encode's padding
            paths.extend(images.write_frames(frames, args.output, first))
            side[:] = frames.shape[-1], frames.shape[-2]
        if args.tiling == "none" and args.group is None:
            write(0, vae.decode(z, tiling=None).float().cpu())
        else:
            run_tiled(lambda t: vae.decode_clip(z, write, tiling=t), args, "decode")  # --distributed: rank 0 writes
        if not_rank0(args):
            return
        print(f"{args.latent} -> {args.output}: {len(paths)} frames of {side[0]}x{side[1]} "
              f"({paths[0].name} .. {paths[-1].name}) in {time.perf_counter() - t0:.1f} s")
        return
    x = run_tiled(lambda t: vae.decode(z, tiling=t), args, "decode")
    if not_rank0(args):
        return
    if size:  # undo encode's padding to multiples of 8
        x = x[..., :size[0], :size[1]]
    write_image(x[:, :, 0] if x.dim() == 5 else x, args.output)
    print(f"{args.latent} -> {args.output} ({x.shape[-1]}x{x.shape[-2]}) in {time.perf_counter() - t0:.1f} s")


def cmd_roundtrip(args):
    images.check_image_path(args.output)
    vae = open_vae(args)
    img = read_image(args.image, vae)
    H, W = img.shape[2:]
    t0 = time.perf_counter()
    z = encode_image(vae, images.pad_to_multiple(img, vae.config.downscale * (2 if vae.config.batch_norm else 1)), args)
    x = run_tiled(lambda t: vae.decode(z, tiling=t), args, "decode")
    if not_rank0(args):
        return
    x = x[:, :, :H, :W]
    write_image(x, args.output)
    print(f"{args.image} -> {args.output} ({W}x{H}) in {time.perf_counter() - t0:.1f} s, "
          f"PSNR vs input {psnr(x, img):.2f} dB")


def _overwrites(src: Path, out: Path, layout: str) -> bool:
    """Whether writing `out` would write over the input: the same file (links resolved), a file
    inside the input folder, or the input weights inside an output folder."""
    src, written = src.resolve(), out.resolve()
    if layout == "diffusers" and out.suffix == "":
        return written == src or written / "diffusion_pytorch_model.safetensors" == src
    return written == src or (src.is_dir() and src in written.parents)


def cmd_convert(args):
    must_exist(args.file)
    src = Path(args.file)
    if args.in_place:
        if args.output is not None:
            raise CLIError("--in-place writes over FILE itself: give it without -o")
        if (args.layout == "diffusers") != src.is_dir():
            raise CLIError(f"--in-place keeps the file's form: {args.layout} layout is "
                           f"{'a folder' if args.layout == 'diffusers' else 'one .safetensors file'} and {src} is not; "
                           f"give -o OUT instead")
        out = src
    elif args.output is None:
        raise CLIError("give -o OUT (a new path), or --in-place to replace FILE itself")
    else:
        out = Path(args.output)
        if _overwrites(src, out, args.layout):
            raise CLIError(f"{out} would write over the input {args.file}: give another -o path, or --in-place to replace it "
                           f"(written to a temporary file first, then renamed over it)")
        if args.layout == "diffusers" and out.suffix == ".safetensors":
            raise CLIError(f"{out}: a diffusers VAE is a folder (config.json + weights); give a folder path")
        if args.layout == "ldm" and out.suffix != ".safetensors":
            raise CLIError(f"{out}: an LDM VAE is one .safetensors file; give a path ending in .safetensors")
    dtype = args.dtype if args.dtype != "keep" else _stored_float_dtype(src)
    vae = load_vae(src, device="cpu", dtype=dtype, family=args.family)
    save_vae(vae, out, layout=args.layout)
    c = vae.config
    print(f"{args.file} ({vae.source_layout}, {c.family}) -> {out} ({args.layout}, {vae.dtype}); "
          f"scaling {c.scaling_factor:g}, shift {c.shift_factor:g}\nhow inferred: {'; '.join(c.notes) or '-'}")


def cmd_demo(args):
    """The shipped VAE on a large canvas: untiled and tiled round trips, written and compared."""
    if not 8 <= args.size <= DEMO_MAX_SIZE or args.size % 8:
        raise CLIError(f"--size {args.size}: give a positive multiple of 8 up to {DEMO_MAX_SIZE} (e.g. 2048)")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot write {out}: {e.strerror or e}") from e
    if not DEMO_PHOTO.exists():
        raise CLIError(f"{DEMO_PHOTO}: the bundled demo photo is missing: reinstall klvae")
    vae = open_vae(args)
    img = images.read_image(DEMO_PHOTO, size=args.size)  # centre square, Lanczos to size x size
    side = min(Image.open(DEMO_PHOTO).size)
    write_image(img, out / "input.png")
    img = read_image(out / "input.png")  # what was written: 8-bit, as every other image here
    resized = "upscaled" if args.size > side else "downscaled" if args.size < side else "cropped"
    print(f"klvae demo: {DEMO_PHOTO.name}'s centre square {resized} to {args.size}x{args.size}, VAE {SHIPPED_VAE.name if not args.vae else args.vae} "
          f"({vae.dtype}, {vae.device}), {torch.get_num_threads()} threads")
    results = {}
    for name in ("untiled", "tiled"):
        bars = [Bar(f"{name} encode"), Bar(f"{name} decode")]  # one bar per phase, each with its plan's total
        tiling = [None if name == "untiled" else Tiling(mode=args.tiling, tile_size=args.tile, progress=bar)
                  for bar in bars]
        meter, t0 = PeakMeter(vae.device), time.perf_counter()
        try:
            z = vae.encode(img, tiling=tiling[0]).mode()
            enc_report = vae.last_tiling
            bars[0].close()
            x = vae.decode(z, tiling=tiling[1])
        finally:
            for bar in bars:
                bar.close()
        seconds, peak = time.perf_counter() - t0, meter.peak()
        results[name] = x
        write_image(x, out / f"{name}.png")
        line = (f"{name:8} {seconds:6.1f} s   peak +{(peak or 0) / 2**30:.2f} GiB   "
                f"PSNR vs input {psnr(x, img):5.2f} dB")
        if name == "tiled":
            r, full = vae.last_tiling, results["untiled"]
            # the one definition of "max" the demo prints and draws: max_abs_vs_full (the largest
            # difference of any pixel's channel, pixels in [-1, 1], as the benchmark tables' column)
            figures = {"klvae.psnr_vs_full": f"{psnr(x, full):.1f}", "klvae.max_abs_vs_full": f"{max_abs_vs_full(x, full):.1e}"}
            line += (f"   {r.mode}: decode {r.describe()}, encode {enc_report.describe()}; "
                     f"psnr_vs_full {figures['klvae.psnr_vs_full']} dB, max_abs_vs_full "
                     f"{figures['klvae.max_abs_vs_full']} (any channel, pixels in [-1, 1])")
        print(line, flush=True)
    tiled, full = results["tiled"], results["untiled"]
    diff = ((tiled.clamp(-1, 1) - full.clamp(-1, 1)).abs().mean(1)[0] / 2).numpy()
    title = (f"klvae {args.tiling} tiles ({args.tile} px) against untiled\n"
             f"psnr_vs_full {figures['klvae.psnr_vs_full']} dB, max_abs_vs_full {figures['klvae.max_abs_vs_full']}")
    images.save_png(images.heat_map([(title, diff)], args.heat_scale, panel_px=512,
                                    note=f"{args.size}x{args.size} round trip; max_abs_vs_full: any channel, pixels in [-1, 1]"),
                    out / "heatmap.png", figures)
    captions = ("input", "untiled round trip", f"{args.tiling} tiles round trip ({args.tile} px)")
    images.side_by_side([(f"{c}, {args.size} px" if i == 0 else c, Image.open(out / f"{name}.png"))
                         for i, (c, name) in enumerate(zip(captions, ("input", "untiled", "tiled")))]
                        ).save(out / "side_by_side.png")
    print(f"wrote {out}/: input.png, untiled.png, tiled.png, side_by_side.png (input | untiled | tiled, captioned), "
          f"heatmap.png (|tiled - untiled|, white = {args.heat_scale})")
    print("(peak = rise of this process's memory during each round trip; untiled runs first)")


# -- argument parsing ---------------------------------------------------------------------------------
def _with_help(add_parser):
    """Sub-commands formatted as the main parser: their defaults shown in --help, and their one-line
    help as the description of their own --help page."""
    return lambda *a, **k: add_parser(*a, formatter_class=Help, description=k.get("help"), **k)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise CLIError(f"{message} (see `{self.prog} --help`)")


def vae_options(p):
    p.add_argument("--vae", help="VAE file or diffusers folder (default: the shipped demo VAE)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="compute dtype (auto: bf16 on GPUs that have it, fp32 on the CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, gpu or cuda:N")
    p.add_argument("--tiling", default="auto", choices=["none", "exact", "bounded", "auto"],
                   help="auto: untiled when the memory plan fits, else tiled; none: untiled always; exact: tiles "
                        "equal to untiled; bounded: estimated statistics, no full-size activation above the latent "
                        "resolution")
    p.add_argument("--tile", type=int, default=0, help="a tile's side in px, multiple of 8 (0: largest that fits); exact "
                                                       "mode runs full-width bands of one such tile's values")
    p.add_argument("--overlap", type=int, default=0, help="bounded mode's context at a strip's side edges in px (0: the receptive field)")
    p.add_argument("--store", default="auto", choices=["auto", "device", "host", "disk"],
                   help="exact mode: where full-size activations live (auto: the plan picks)")
    p.add_argument("--spill-dir", default=None, help="folder for the disk store (default: $KLVAE_SPILL_DIR or the temp folder)")
    p.add_argument("--distributed", action="store_true",
                   help="under torchrun: exact tiling sharded over its ranks (gloo on CPUs, NCCL on GPUs); rank 0 "
                        "writes the output")


def encode_options(p):
    p.add_argument("--mode", default="argmax", choices=["argmax", "sample"],
                   help="argmax: the posterior mode (deterministic); sample: mean + std * noise")
    p.add_argument("--seed", type=int, default=None, help="noise seed for --mode sample (default: 0)")


class Help(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default (where it has one)."""

    def _get_help_string(self, action):
        h = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if shown and "(default:" not in h and action.option_strings:
            h += " (default: %(default)s)"
        return h


def build_parser():
    ap = Parser(prog="klvae", description=__doc__, formatter_class=Help)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    sub = ap.add_subparsers(dest="command", metavar="command", parser_class=Parser)
    sub.add_parser = _with_help(sub.add_parser)
    sub.required = True

    p = sub.add_parser("demo", help="round-trip a bundled photo on a large canvas, untiled and tiled")
    p.add_argument("--size", type=int, default=2048, help="canvas side in px (multiple of 8)")
    p.add_argument("--tile", type=int, default=512, help="tile side in px")
    p.add_argument("--tiling", default=DEFAULT_MODE, choices=["exact", "bounded", "auto"], help="the tiled round trip's mode")
    p.add_argument("--out", default="out/demo", help="output folder")
    p.add_argument("--vae", help="another VAE instead of the shipped one")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="compute dtype (auto: bf16 on GPUs that have it, fp32 on the CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, gpu or cuda:N")
    p.add_argument("--heat-scale", type=float, default=0.01, help="|difference| shown as white in the heat map")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("info", help="what a VAE file is: family, channels, scale/shift, layout, dtype, size")
    p.add_argument("file")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("encode", help="image (or a folder of a clip's frames) -> latent .safetensors (raw unless --scaled)")
    p.add_argument("image", help="an image file, or a folder of frames (1 + 4k of them, in name order: a clip, Wan 2.1's VAE)")
    p.add_argument("-o", "--output", required=True, help="latent file (.safetensors)")
    p.add_argument("--scaled", action="store_true", help="store diffusers-scaled latents instead of raw")
    encode_options(p)
    vae_options(p)
    p.set_defaults(fn=cmd_encode)

    p = sub.add_parser("decode", help="latent .safetensors -> image (a clip's latent -> a folder of frames)")
    p.add_argument("latent")
    p.add_argument("-o", "--output", required=True,
                   help="image file (.png, .jpg, .webp); for a clip's latent, a new folder: frame_00000.png, ...")
    vae_options(p)
    p.set_defaults(fn=cmd_decode)

    p = sub.add_parser("roundtrip", help="image -> latent -> image, printing the PSNR")
    p.add_argument("image")
    p.add_argument("-o", "--output", required=True, help="image file (.png, .jpg, .webp)")
    encode_options(p)
    vae_options(p)
    p.set_defaults(fn=cmd_roundtrip)

    p = sub.add_parser("convert", help="rewrite a VAE in the LDM (one file) or diffusers (folder) layout")
    p.add_argument("file")
    p.add_argument("-o", "--output", help="LDM: a .safetensors path; diffusers: a folder (never the input itself)")
    p.add_argument("--in-place", action="store_true",
                   help="replace FILE itself (written to a temporary file first, renamed over it when complete)")
    p.add_argument("--layout", required=True, choices=["ldm", "diffusers"])
    p.add_argument("--family", choices=list(FAMILIES),
                   help="names the family when the file cannot say; fills only what the file does not state "
                        "(its own scale and shift win); a family the file contradicts is an error")
    p.add_argument("--dtype", default="keep", choices=["keep", "fp32", "fp16", "bf16"],
                   help="stored dtype (keep: the input file's)")
    p.set_defaults(fn=cmd_convert)
    return ap


# The library's errors name its arguments; on the command line the same advice names the flags.
API_TO_FLAGS = ((r"Tiling\(spill_dir=\.\.\.\)", "--spill-dir"), (r"an image is what encode takes", "for images: klvae encode"),
                (r"\btile_size (\d+)", r"--tile \1"),
                (r"mode='exact' with store='disk'", "--tiling exact --store disk"),
                (r"mode='(exact|bounded|auto)'", r"--tiling \1"), (r"tiling='(\w+)' \(or '(\w+)'\)", r"--tiling \1 (or \2)"),
                (r", raise Tiling\(memory_budget=\.\.\.\)", ""), (r"Tiling overlap=", "--overlap "))


def ignored_options(args) -> list[str]:
    """Options this call gives that the others make meaningless: said, not silently dropped."""
    said = []
    if getattr(args, "mode", None) == "argmax" and args.seed is not None:
        said.append(f"--seed {args.seed} is ignored with --mode argmax (the posterior mode draws no noise); "
                    f"use --mode sample")
    if getattr(args, "tiling", None) == "none":
        extra = [f for f, v, unset in (("--tile", args.tile, 0), ("--overlap", args.overlap, 0),
                                       ("--store", args.store, "auto"), ("--spill-dir", args.spill_dir, None))
                 if v != unset]
        if extra:
            said.append(f"{', '.join(extra)} {'is' if len(extra) == 1 else 'are'} ignored with --tiling none "
                        f"(the untiled pass)")
    return said


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.threads:
            cores = os.cpu_count() or 1
            if not 1 <= args.threads <= 4 * cores:
                raise CLIError(f"--threads {args.threads}: give 1 to {4 * cores} (this machine has {cores} cores), "
                               f"or 0 for all cores")
            torch.set_num_threads(args.threads)
        for note in ignored_options(args):
            print(f"klvae: note: {note}", file=sys.stderr)
        args.group = None
        if getattr(args, "distributed", False):
            args.group = init_from_env(resolve_device(args.device))
        try:
            args.fn(args)
        finally:
            if args.group is not None:
                torch.distributed.destroy_process_group()
        return 0
    except (CLIError, KLVAEError) as e:
        print(f"klvae: error: {reworded(str(e), API_TO_FLAGS)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("klvae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
