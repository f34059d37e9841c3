"""A seeded fuzzer for klvae's public entry points: hostile files, odd folders, absurd arguments.

    python tests/fuzz.py --seed 1 --cases 400            # run it (two workers), print the table
    python tests/fuzz.py --worker SEED BASE               # (internal) one worker process

Every case builds its input from (seed, case index) alone, so a worker can rebuild any case and a
report names a case that can be replayed. Cases run in worker processes, many per process; the
parent kills a worker whose case runs past the time limit (a hang) or whose memory passes the
limit, records that case and starts a new worker after it. Outcomes:
  ok         the call succeeded (a harmless mutation, or valid input)
  klvae      KLVAEError with a one-line message   (what bad input must give)
  foreign    any other exception                   (a broken promise)
  multiline  KLVAEError whose message has several lines
  hang       past the time limit
  memory     past the memory limit
  crash      the worker died (signal, abort)
  payload    a pickle's code ran (its marker file exists)
  interrupted  the call was cancelled (Interrupted, or the host's own exception passed through)
  leak       a spill file or its memory mapping was left behind
"""
import io
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from klvae.testing import diffusers_vae, klvae_from
from klvae.vae import Interrupted, KLVAEError, Tiling, load_vae
from klvae.vae.memory import proc_status

CATEGORIES = ("safetensors", "pickle", "folder", "metadata", "arguments", "inputs", "tiling", "clips")
BAD = ("foreign", "multiline", "hang", "memory", "crash", "payload", "leak")


# -------------------------------------------------------------------------------------------------
# Base material: one small valid VAE in every format (made by the worker, seeded).
# -------------------------------------------------------------------------------------------------
def base_files(base: Path):
    if (base / "hunyuan.safetensors").exists():
        return
    base.mkdir(parents=True, exist_ok=True)
    # the two other networks' own layouts: Qwen-Image's original keys (3-D kernels), HunyuanImage's ComfyUI keys
    save_file({k: v.contiguous() for k, v in klvae_from(diffusers_vae("qwenimage", seed=0, ch=8, ch_mult=(1, 2)))
               .state_dict().items()}, str(base / "qwen.safetensors"))
    save_file({k: v.contiguous() for k, v in klvae_from(diffusers_vae("hunyuanimage", seed=0, ch=32, ch_mult=(1, 2),
                                                                      latent_channels=8)).state_dict().items()},
              str(base / "hunyuan.safetensors"))
    d = diffusers_vae("sd1", seed=0, ch=32, ch_mult=(1, 2), norm_groups=8)  # 2 levels: small and fast
    vae = klvae_from(d, family="sd1")
    sd = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(sd, str(base / "ok.safetensors"), metadata={"klvae.family": "sd1", "klvae.norm_groups": "8",
                                                          "klvae.scaling_factor": "0.18215", "klvae.shift_factor": "0.0"})
    torch.save(sd, base / "ok.ckpt")
    torch.save(sd, base / "legacy.ckpt", _use_new_zipfile_serialization=False)
    d.save_pretrained(base / "folder")


def read_safetensors(path: Path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path: Path, header: dict, data: bytes, raw_header: bytes | None = None):
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


class HostCancel(Exception):
    """What a host's cancel check raises (ComfyUI: InterruptProcessingException): passed through as is."""


def host_cancel():
    raise HostCancel("cancelled by the user")


class Evil:
    """A pickle payload: unpickling it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -------------------------------------------------------------------------------------------------
# The cases. Each returns a zero-argument callable that makes the call under test.
# -------------------------------------------------------------------------------------------------
HOSTILE_VALUES = ["0", "-1", "banana", "", "32.0", "1e9", "nan", "inf", "-inf", "1.5", "[32]", "null", "true",
                  "99999999999999999999", "\u00e9\u00e8", "[1, 2]", "[null, null, null, null]", "abc", "5"]
DTYPES = ["I8", "U8", "BOOL", "C64", "F8_E4M3", "F8_E5M2", "I64", "F64", "BF16", "F16", "I32", "U64", "XX"]


def safetensors_case(rng, i, base, work, f, header, data, names, cat="safetensors"):
    """Malformed safetensors files: truncated, bit flips, header lengths, dtypes, shapes, offsets, key indices, dropped keys, values, junk JSON;
    of an SD-style VAE, or of Qwen-Image's or HunyuanImage's in their own layouts."""
    source = base / rng.choice(["ok.safetensors", "ok.safetensors", "qwen.safetensors", "hunyuan.safetensors"])
    if source.name != "ok.safetensors":
        header, data = read_safetensors(source)
        names = [k for k in header if k != "__metadata__"]
    kind = rng.choice(["truncate", "flip", "length", "dtype", "shape", "offsets", "indices", "drop", "values",
                       "junk_json"])
    h = json.loads(json.dumps(header))
    raw_header = None
    k = rng.choice(names)
    if kind == "truncate":
        blob = source.read_bytes()
        f.write_bytes(blob[:rng.randrange(0, len(blob))])
        return cat, kind, lambda: load_vae(f)
    if kind == "flip":
        blob = bytearray(source.read_bytes())
        n = struct.unpack("<Q", bytes(blob[:8]))[0]
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(0, 8 + n) if rng.random() < 0.7 else rng.randrange(0, len(blob))
            blob[pos] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(blob))
        return cat, kind, lambda: load_vae(f)
    if kind == "length":
        blob = source.read_bytes()
        n = rng.choice([0, 1, 7, 2**63 - 1, 2**40, len(blob), len(blob) * 3, 100_000_001])
        f.write_bytes(struct.pack("<Q", n) + blob[8:])
        return cat, kind, lambda: load_vae(f)
    if kind == "dtype":
        h[k]["dtype"] = rng.choice(DTYPES)
    elif kind == "shape":
        h[k]["shape"] = rng.choice([[0] + h[k]["shape"][1:], [], [1], [2**31, 2**31], [-1, 3], h[k]["shape"][::-1],
                                    [1] * 5, [3, 3]])
    elif kind == "offsets":
        a, b = h[k]["data_offsets"]
        h[k]["data_offsets"] = rng.choice([[b, a], [a, a], [a, b + 10**12], [-1, b], [a, "x"], None])
    elif kind == "indices":  # the 40-byte DoS and friends
        a, b = h[names[0]]["data_offsets"]
        extra = rng.choice(["encoder.down.0.block.99999999.conv1.weight", "decoder.up.0.block.100000000.conv1.weight",
                            "encoder.down.7.block.0.conv2.weight", "encoder.down.1000.block.0.conv2.weight",
                            "decoder.up.3.block.63.conv1.weight", "encoder.mid.block_99999.norm1.weight",
                            "encoder.down.00000000000000000001.block.0.conv1.weight"])
        h[extra] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
        if rng.random() < 0.5:
            h["decoder.up.0.block.100000000.conv1.weight"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
        del a, b
    elif kind == "drop":
        for key in rng.sample(names, rng.randint(1, 5)):
            del h[key]
    elif kind == "values":
        return cat, kind, values_case(rng, base, work, i)
    elif kind == "junk_json":
        raw_header = rng.choice([b"{", b"[]", b"null", b'{"a": 1}', b"\xff\xfe", b'{"__metadata__": 5}',
                                 json.dumps({**h, "__metadata__": {"a": 1}}).encode(), b" " * 10,
                                 json.dumps({k: {"dtype": "F32"}}).encode()])
    write_safetensors(f, h, data, raw_header)
    return cat, kind, lambda: load_vae(f)


def metadata_case(rng, i, base, work, f, header, data, names, cat="metadata"):
    """Hostile values in klvae's and modelspec's metadata."""
    h = json.loads(json.dumps(header))
    key = rng.choice(["klvae.norm_groups", "klvae.scaling_factor", "klvae.shift_factor", "klvae.latents_mean",
                      "klvae.latents_std", "klvae.family", "klvae.force_upcast", "modelspec.architecture"])
    h["__metadata__"] = dict(h.get("__metadata__", {}))
    h["__metadata__"][key] = rng.choice(HOSTILE_VALUES)
    if key == "klvae.latents_mean" and rng.random() < 0.5:
        h["__metadata__"]["klvae.latents_std"] = rng.choice(HOSTILE_VALUES + ["[1, 1, 1, 1]"])
    write_safetensors(f, h, data)
    fam = rng.choice([None, None, "sd1", "sdxl"])
    dtype = rng.choice(["auto", "fp16", "bf16"])
    return cat, key, lambda: load_vae(f, family=fam, dtype=dtype).decode(torch.zeros(1, 4, 2, 2))


def pickle_case(rng, i, base, work, f, header, data, names, cat="pickle"):
    """Pickles: truncated, flipped, payloads (which must never run), odd contents."""
    kind = rng.choice(["one_byte", "truncate_zip", "truncate_legacy", "flip_zip", "payload", "payload_zip",
                       "nonstring_keys", "odd_tensors", "not_a_dict", "byteorder"])
    p = work / f"case{i}.ckpt"
    marker = work / f"PAYLOAD_RAN_{i}"
    if kind == "one_byte":
        p.write_bytes(bytes([rng.randrange(256)]))
    elif kind in ("truncate_zip", "truncate_legacy"):
        blob = (base / ("ok.ckpt" if kind == "truncate_zip" else "legacy.ckpt")).read_bytes()
        p.write_bytes(blob[:rng.choice([20, rng.randrange(1, len(blob))])])
    elif kind == "flip_zip":
        blob = bytearray((base / rng.choice(["ok.ckpt", "legacy.ckpt"])).read_bytes())
        for _ in range(rng.randint(1, 16)):
            blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        p.write_bytes(bytes(blob))
    elif kind == "payload":
        p.write_bytes(pickle.dumps({"x": Evil(marker)}, protocol=rng.choice([2, 4])))
    elif kind == "payload_zip":
        torch.save({"encoder.conv_in.weight": torch.zeros(1), "x": Evil(marker)}, p)
    elif kind == "nonstring_keys":
        torch.save({rng.choice([1, 2.5, (1, 2), None, b"k"]): torch.zeros(2)}, p)
    elif kind == "odd_tensors":
        sd = torch.load(base / "ok.ckpt", weights_only=True)
        k = rng.choice(sorted(sd))
        t = sd[k]
        sd[k] = rng.choice([lambda: t.to_sparse(), lambda: torch.quantize_per_tensor(t.float(), 0.1, 0, torch.qint8),
                            lambda: t.to(torch.int8), lambda: t.to(torch.bool), lambda: t.to(torch.complex64),
                            lambda: torch.nested.nested_tensor([t.flatten(), t.flatten()[:2]]),
                            lambda: t.to(torch.float8_e4m3fn)])()
        torch.save(sd, p)
    elif kind == "not_a_dict":
        torch.save(rng.choice([[torch.zeros(1)], torch.zeros(3), 5, "text", None]), p)
    else:  # a zip whose byteorder record is odd
        buf = io.BytesIO()
        with zipfile.ZipFile(base / "ok.ckpt") as zin, zipfile.ZipFile(buf, "w") as zout:
            for item in zin.infolist():
                payload = zin.read(item)
                if item.filename.endswith("byteorder"):
                    payload = rng.choice([b"middle", b"", b"\x00" * 100])
                zout.writestr(item, payload)
        p.write_bytes(buf.getvalue())
    return cat, kind, lambda: load_vae(p)


def folder_case(rng, i, base, work, f, header, data, names, cat="folder"):
    """Diffusers folders: broken config.json values, classes, missing weights, pipeline folders."""
    folder = work / f"folder{i}"
    shutil.copytree(base / "folder", folder)
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    kind = rng.choice(["not_json", "empty", "not_utf8", "list", "string", "null", "dir", "value", "class", "no_weights",
                       "pipeline"])
    if kind == "not_json":
        cfg_file.write_text("{'scaling_factor': 0.18,")
    elif kind == "empty":
        cfg_file.write_text("")
    elif kind == "not_utf8":
        cfg_file.write_bytes(b"\xff\xfe{\x00}")
    elif kind in ("list", "string", "null"):
        cfg_file.write_text({"list": "[1, 2]", "string": '"AutoencoderKL"', "null": "null"}[kind])
    elif kind == "dir":
        cfg_file.unlink()
        cfg_file.mkdir()
    elif kind == "value":
        key = rng.choice(["scaling_factor", "shift_factor", "norm_num_groups", "latents_mean", "latents_std",
                          "force_upcast"])
        cfg[key] = rng.choice([None, [32], -1, 1.5, 0, "x", "no", float("nan"), 1e300, [0.1] * 3, [None] * 4,
                               {"a": 1}, True, 32])
        cfg_file.write_text(json.dumps(cfg))
    elif kind == "class":
        cfg["_class_name"] = rng.choice([5, None, "AutoencoderTiny", ["AutoencoderKL"], ""])
        cfg_file.write_text(json.dumps(cfg))
    elif kind == "no_weights":
        for w in folder.glob("*.safetensors"):
            w.unlink()
    else:  # a pipeline folder around it, with a broken model_index
        pipe = work / f"pipe{i}"
        (pipe / "vae").mkdir(parents=True)
        for x in folder.iterdir():
            x.rename(pipe / "vae" / x.name)
        (pipe / "model_index.json").write_text("{")
        folder = pipe
    return cat, kind, lambda: load_vae(folder)


def arguments_case(rng, i, base, work, f, header, data, names, cat="arguments"):
    """The public API's arguments: paths, devices, dtypes, families of the wrong type or value."""
    kind = rng.choice(["long_path", "none", "int", "bytes", "device", "dtype", "family", "list", "missing_dir"])
    if kind == "long_path":
        return cat, kind, lambda: load_vae(work / ("x" * rng.choice([300, 5000]) + ".safetensors"))
    if kind == "missing_dir":
        return cat, kind, lambda: load_vae(work / "nope" / "vae")
    if kind in ("none", "int", "bytes", "list"):
        arg = {"none": None, "int": 5, "bytes": b"/tmp/x", "list": [1, 2]}[kind]
        return cat, kind, lambda: load_vae(arg)
    if kind == "device":
        dev = rng.choice(["banana", "meta", "cuda:7", "cpu:0:1", 7, "mps", "", None.__class__])
        return cat, kind, lambda: load_vae(base / "ok.safetensors", device=dev)
    if kind == "dtype":
        dt = rng.choice([torch.int8, "fp8", torch.complex64, 5, torch.bool, "float64", torch.float64])
        return cat, kind, lambda: load_vae(base / "ok.safetensors", dtype=dt)
    fam = rng.choice(["banana", 3, "", "SD1", "custom", ["sd1"], {"sd1": 1}, b"sd1"])
    return cat, kind, lambda: load_vae(base / "ok.safetensors", family=fam)


def inputs_case(rng, i, base, work, f, header, data, names, cat="inputs"):
    """Decode and encode inputs: empty, wrong rank, dtype, channels, NaN, huge, out of range."""
    vae = load_vae(base / "ok.safetensors")
    kind = rng.choice(["h0", "b0", "int", "3d", "5d", "nan", "channels", "huge_side", "huge_area", "pixels_odd",
                       "pixels_nan", "not_tensor", "scaled_wrong", "huge_values", "pixels_255", "seed"])
    z = {"h0": lambda: torch.zeros(1, 4, 0, 4), "b0": lambda: torch.zeros(0, 4, 4, 4),
         "int": lambda: torch.zeros(1, 4, 4, 4, dtype=torch.int64), "3d": lambda: torch.zeros(4, 4, 4),
         "5d": lambda: torch.zeros(1, 4, 1, 4, 4), "nan": lambda: torch.full((1, 4, 4, 4), float("nan")),
         "channels": lambda: torch.zeros(1, 16, 4, 4), "huge_side": lambda: torch.zeros(1, 4, 100000, 1),
         "huge_area": lambda: torch.zeros(1, 4, 3000, 3000), "not_tensor": lambda: [[1.0]],
         "scaled_wrong": lambda: torch.zeros(1, 3, 4, 4)}
    if kind == "pixels_odd":
        return cat, kind, lambda: vae.encode(torch.zeros(1, 3, rng.choice([0, 7, 9, 100]), 16))
    if kind == "huge_values":  # finite, but past fp32's range inside the decoder: never NaN pixels
        return cat, kind, lambda: vae.decode(torch.full((1, 4, 4, 4), rng.choice([3e37, -1e30, 1e20])))
    if kind == "pixels_255":
        return cat, kind, lambda: vae.encode(torch.full((1, 3, 16, 16), rng.choice([255.0, 1e30, -7.0])))
    if kind == "seed":
        return cat, kind, lambda: vae.encode(torch.zeros(1, 3, 16, 16)).sample(
            seed=rng.choice(["1", -1, 2**64, 1.5, [1]]))
    if kind == "pixels_nan":
        return cat, kind, lambda: vae.encode(torch.full((1, 3, 16, 16), float("inf")))
    if kind == "scaled_wrong":
        return cat, kind, lambda: vae.to_scaled(z[kind]())
    # (a huge latent *with* tiling is a legitimate long job, planned and run: not a fuzz case)
    tiled = rng.random() < 0.5 and not kind.startswith("huge")
    return cat, kind, lambda: vae.decode(z[kind](), tiling="exact" if tiled else None)


def tiling_case(rng, i, base, work, f, header, data, names, cat="tiling"):
    """Tiling options, and faults during a tiled run (spill folder removed, interrupts, plan shapes)."""
    vae = load_vae(base / "ok.safetensors")
    kind = rng.choice(["tile_size", "overlap", "memory_budget", "mosaic_size", "progress", "interrupt", "mode", "store",
                       "spill_dir", "auto_huge", "bounded_tiny", "spill_gone", "interrupt_first", "plan_shape"])
    z = torch.zeros(1, 4, 4, 4)
    if kind == "spill_gone":  # the spill folder is removed (or replaced by a file) one band in
        folder = work / f"spill{i}"
        folder.mkdir()

        def gone(done, total):
            if done == 1:
                folder.rmdir()
                if rng.random() < 0.5:
                    folder.write_text("not a folder")
        return cat, kind, lambda: vae.decode(torch.zeros(1, 4, 8, 8), tiling=Tiling(
            mode="exact", store="disk", tile_size=8, spill_dir=str(folder), progress=gone))
    if kind == "interrupt_first":
        return cat, kind, lambda: vae.decode(torch.zeros(1, 4, 8, 8), tiling=Tiling(
            mode=rng.choice(["exact", "bounded"]), store=rng.choice(["device", "disk"]) if rng.random() < 0.7 else "auto",
            tile_size=8, spill_dir=str(work), interrupt=rng.choice([lambda: True, host_cancel])))
    if kind == "plan_shape":
        shape = rng.choice([(1, 4, 64, 64, 1), (1, 16, 8, 8), (0, 4, 8, 8), (1, 4, -8, 8), (1.5, 4, 8, 8), "1x4x8x8", None])
        return cat, kind, lambda: vae.plan_decode(shape, rng.choice([None, "exact", "auto"]))
    if kind == "auto_huge":
        side = rng.choice([4096, 8192, 6000])
        return cat, kind, lambda: vae.plan_decode((1, 4, side, side), Tiling(mode="auto"))
    if kind == "bounded_tiny":
        return cat, kind, lambda: vae.decode(torch.zeros(1, 4, rng.randint(1, 3), rng.randint(1, 3)),
                                             tiling=Tiling(mode=rng.choice(["bounded", "exact"]), tile_size=8))
    value = rng.choice(["512", 1.5, -8, 7, 10**12, True, None, [8], "exact", object(), 0, lambda: 1, "/proc", 3])
    return cat, kind, lambda: vae.decode(z, tiling=Tiling(**{kind: value}))


def clips_case(rng, i, base, work, f, header, data, names, cat="clips"):
    """Clips through the video network (qwen.safetensors: Wan 2.1's, narrowed: 2x in time): wrong
    frame counts, channels, ranks, NaNs, plans of odd 5-D shapes, faults between time chunks."""
    vae = load_vae(base / "qwen.safetensors")
    kind = rng.choice(["frames", "channels", "zero_t", "nan", "to_image_vae", "bounded", "plan_shape", "huge_values",
                       "interrupt_mid", "spill_gone_mid", "frames_sizes"])
    T = rng.choice([2, 3, 5])
    tiling = rng.choice([None, "exact", Tiling(mode="exact", tile_size=4, store=rng.choice(["device", "disk"]),
                                              spill_dir=str(work))])
    if kind == "frames":  # 1 + 2k frames are what this network encodes
        return cat, kind, lambda: vae.encode(torch.zeros(1, 3, rng.choice([2, 4, 6]), 8, 8), tiling=tiling)
    if kind == "channels":
        return cat, kind, lambda: vae.decode(torch.zeros(1, rng.choice([3, 4, 15, 32]), T, 4, 4), tiling=tiling)
    if kind == "zero_t":
        return cat, kind, lambda: vae.decode(torch.zeros(1, 16, 0, 4, 4), tiling=tiling)
    if kind == "nan":
        z = torch.zeros(1, 16, T, 4, 4)
        z[0, 0, -1, 0, 0] = float(rng.choice(["nan", "inf"]))
        return cat, kind, lambda: vae.decode(z, tiling=tiling)
    if kind == "to_image_vae":  # a clip's latent into an image VAE
        img = load_vae(base / "ok.safetensors")
        return cat, kind, lambda: img.decode(torch.zeros(1, 4, T, 4, 4), tiling=tiling)
    if kind == "bounded":
        return cat, kind, lambda: vae.decode(torch.zeros(1, 16, T, 4, 4), tiling="bounded")
    if kind == "plan_shape":
        shape = rng.choice([(1, 16, 0, 4, 4), (1, 16, 3, 4), (1, 16, 3, 4, 4, 1), (1, 16, -3, 4, 4), (1, 16, 2.5, 4, 4)])
        return cat, kind, lambda: vae.plan_decode(shape, "exact")
    if kind == "huge_values":
        return cat, kind, lambda: vae.decode(torch.full((1, 16, T, 4, 4), rng.choice([3e37, -1e30])), tiling=tiling)
    if kind == "frames_sizes":  # a frame batch whose sides are not multiples of the downscale
        return cat, kind, lambda: vae.encode(torch.zeros(1, 3, 3, rng.choice([7, 9]), 8), tiling=tiling)
    seen = []
    if kind == "interrupt_mid":
        return cat, kind, lambda: vae.decode(torch.zeros(1, 16, 3, 4, 4), tiling=Tiling(
            mode="exact", tile_size=4, store=rng.choice(["device", "disk"]), spill_dir=str(work),
            progress=lambda done, total: seen.append(done), interrupt=lambda: bool(seen)))
    folder = work / f"spill{i}"  # spill_gone_mid: the spill folder is removed after the first chunk
    folder.mkdir()
    return cat, kind, lambda: vae.decode(torch.zeros(1, 16, 3, 4, 4), tiling=Tiling(
        mode="exact", store="disk", tile_size=4, spill_dir=str(folder), progress=lambda d, t: folder.exists() and folder.rmdir()))


GENERATORS = {"safetensors": safetensors_case, "pickle": pickle_case, "folder": folder_case, "metadata": metadata_case,
              "arguments": arguments_case, "inputs": inputs_case, "tiling": tiling_case, "clips": clips_case}


def case(seed: int, i: int, base: Path, work: Path):
    """Case i of a seeded run: (category, description, callable), from its category's generator."""
    rng = random.Random(seed * 1_000_003 + i)
    cat = CATEGORIES[i % len(CATEGORIES)]
    header, data = read_safetensors(base / "ok.safetensors")
    names = [k for k in header if k != "__metadata__"]
    return GENERATORS[cat](rng, i, base, work, work / f"case{i}.safetensors", header, data, names)


def values_case(rng, base, work, i):
    """Weights that parse but are not usable: non-finite, or beyond fp16 for an fp16 load."""
    sd = load_file(str(base / "ok.safetensors"))
    k = rng.choice(sorted(sd))
    t = sd[k].clone()
    t.view(-1)[0] = rng.choice([float("nan"), float("inf"), 1e6, -1e30])
    sd[k] = t
    p = work / f"values{i}.safetensors"
    save_file(sd, str(p), metadata={"klvae.norm_groups": "8", "klvae.family": "sd1"})
    return lambda: load_vae(p, dtype=rng.choice(["fp16", "fp32", "bf16"]))


# -------------------------------------------------------------------------------------------------
# The worker: runs cases in order, one JSON line per case.
# -------------------------------------------------------------------------------------------------
def worker(seed: int, base: str, first: int, stride: int, count: int):
    torch.set_num_threads(1)
    base = Path(base)
    base_files(base)
    work = Path(tempfile.mkdtemp(prefix="klvae-fuzz-"))
    for i in range(first, count, stride):
        print(json.dumps({"start": i}), flush=True)
        outcome, detail, cat, kind = "ok", "", "?", "?"
        try:
            cat, kind, call = case(seed, i, base, work)
            print(json.dumps({"kind": kind}), flush=True)
            call()
        except KLVAEError as e:
            msg = str(e)
            outcome, detail = ("klvae" if "\n" not in msg.strip() and msg.strip() else "multiline"), msg[:200]
        except (Interrupted, HostCancel) as e:  # a cancel: the documented exception, or the host's own
            outcome, detail = "interrupted", str(e)[:200]
        except Exception as e:  # the broken promise we are looking for
            outcome, detail = "foreign", f"{type(e).__module__}.{type(e).__name__}: {str(e)[:200]}"
        with open("/proc/self/maps") as f:  # whatever happened, no spill file or mapping is left
            left = [ln.split()[-2] for ln in f if "klvae-store-" in ln] + [p.name for p in work.rglob("klvae-store-*")]
        if left:
            outcome, detail = "leak", f"left behind: {left[:3]}"
        if any(work.glob(f"PAYLOAD_RAN_{i}")):
            outcome = "payload"
        print(json.dumps({"case": i, "category": cat, "kind": kind, "outcome": outcome, "detail": detail}), flush=True)


def run(seed: int, count: int, workers: int = 2, case_timeout: float = 20.0, mem_limit: int = 3 * 2**30,
        base: str | None = None) -> list:
    """All cases of a seeded run, in `workers` processes; returns one dict per case."""
    base = base or tempfile.mkdtemp(prefix="klvae-fuzz-base-")
    results = {}
    # Make the base files once, before the workers start (they all read them).
    if not (Path(base) / "ok.safetensors").exists():
        subprocess.run([sys.executable, __file__, "--worker", str(seed), base, "0", "1", "0"], check=True,
                       capture_output=True, timeout=300)
    todo = [list(range(w, count, workers)) for w in range(workers)]
    procs = {}

    def start(w):
        if not todo[w]:
            return
        first = todo[w][0]
        p = subprocess.Popen([sys.executable, __file__, "--worker", str(seed), base, str(first), str(workers),
                              str(count)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        os.set_blocking(p.stdout.fileno(), False)
        procs[w] = dict(p=p, current=None, since=time.time(), buf="")

    for w in range(workers):
        start(w)
    while procs:
        time.sleep(0.05)
        for w, st in list(procs.items()):
            p = st["p"]
            try:
                st["buf"] += os.read(p.stdout.fileno(), 1 << 20).decode()
            except BlockingIOError:
                pass
            *lines, st["buf"] = st["buf"].split("\n")
            for line in lines:
                if not line.startswith("{"):
                    continue
                msg = json.loads(line)
                if "start" in msg:
                    st["current"], st["since"], st["kind"] = msg["start"], time.time(), "?"
                elif "kind" in msg and "case" not in msg:
                    st["kind"] = msg["kind"]
                else:
                    results[msg["case"]] = msg
                    todo[w].remove(msg["case"])
                    st["current"] = None
            rss = proc_status("VmRSS", p.pid)
            over_time = st["current"] is not None and time.time() - st["since"] > case_timeout
            over_mem = rss is not None and rss > mem_limit
            if p.poll() is not None or over_time or over_mem:
                if p.poll() is None:
                    p.kill()
                p.wait()
                if st["current"] is None and p.returncode and not any(r for r in results.values()):
                    raise RuntimeError(f"fuzz worker failed before its first case (exit {p.returncode})")
                if st["current"] is not None:
                    c = st["current"]
                    outcome = "hang" if over_time else "memory" if over_mem else "crash"
                    results[c] = {"case": c, "category": CATEGORIES[c % len(CATEGORIES)], "kind": st.get("kind", "?"),
                                  "outcome": outcome, "detail": f"exit {p.returncode}"}
                    todo[w].remove(c)
                del procs[w]
                start(w)
    return [results[i] for i in sorted(results)]


def table(results) -> str:
    outcomes = ("ok", "klvae", "interrupted") + BAD
    rows = ["| category | cases | " + " | ".join(outcomes) + " |", "|---" * (len(outcomes) + 2) + "|"]
    for cat in CATEGORIES + ("all",):
        rs = [r for r in results if cat == "all" or r["category"] == cat]
        rows.append(f"| {cat} | {len(rs)} | " + " | ".join(str(sum(r['outcome'] == o for r in rs)) for o in outcomes) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        seed, base, first, stride, count = sys.argv[2:7]
        worker(int(seed), base, int(first), int(stride), int(count))
    else:
        import argparse
        ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--seed", type=int, default=1)
        ap.add_argument("--cases", type=int, default=400)
        ap.add_argument("--workers", type=int, default=2)
        ap.add_argument("--show", default="foreign,multiline,hang,memory,crash,payload")
        ap.add_argument("--base", help="folder of base files to reuse (made by an earlier run)")
        ap.add_argument("--categories", default=",".join(CATEGORIES), help="only cases of these categories")
        a = ap.parse_args()
        t0 = time.time()
        res = [r for r in run(a.seed, a.cases, a.workers, base=a.base) if r["category"] in a.categories.split(",")]
        print(table(res))
        for r in res:
            if r["outcome"] in a.show.split(","):
                print(f"case {r['case']:4} {r['category']:11} {r['kind']:14} {r['outcome']:9} {r['detail'][:150]}")
        print(f"{len(res)} cases in {time.time() - t0:.0f} s")
