"""The node pack inside a real ComfyUI 0.3.75 (fixture `comfy` in conftest.py), driven over HTTP.

Every workflow's saved PNG is compared with what the library computes in this process from the
same file and the same picture, quantised as core's SaveImage quantises (<= 1 level apart).
"""
import asyncio
import json
import os
import re
import subprocess
import tomllib
import uuid
from pathlib import Path

import aiohttp  # one of the host's own requirements
import numpy as np
import pytest

from comfy_host import close, comfy_tree, error_of, example_reference, to_png_bytes
from klvae.vae import load_vae
from klvae.vae.memory import proc_status

NODES = ["KLVAELoader", "KLVAEFromVAE", "KLVAEEncodeArgMax", "KLVAEEncodeSample", "KLVAEEncodeTiled",
         "KLVAEDecode", "KLVAEDecodeTiled"]
VAE = "sdxl_vae.safetensors"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference(comfy):
    """The library's own results for the test picture and the served SD-shaped VAE."""
    vae = load_vae(comfy.base / "models" / "vae" / VAE)
    x = comfy.image.movedim(-1, 1) * 2 - 1
    post = vae.encode(x)
    to_img = lambda z: to_png_bytes(((vae.decode(z) + 1) / 2).clamp(0, 1).movedim(1, -1))
    return {"argmax": to_img(post.mode()), "sample7": to_img(post.sample(seed=7))}


def graph(loader, encode, decode, prefix):
    """LoadImage -> loader -> encode -> decode -> SaveImage in the API format."""
    load = {"class_type": loader, "inputs": {"vae_name": VAE}}
    if loader == "KLVAELoader":
        load["inputs"].update(dtype="auto", device="auto")
    enc_cls, enc_in = encode
    dec_cls, dec_in = decode
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "klvae_test.png"}},
        "2": load,
        "3": {"class_type": enc_cls, "inputs": {"pixels": ["1", 0], "vae": ["2", 0], **enc_in}},
        "4": {"class_type": dec_cls, "inputs": {"samples": ["3", 0], "vae": ["2", 0], **dec_in}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix}},
    }


OURS_TILED = ("KLVAEDecodeTiled", {"tile_size": 64, "overlap": 0, "tiling": "exact"})
ARGMAX = ("KLVAEEncodeArgMax", {})


def test_object_info_lists_every_node_with_tooltips(comfy):
    info = comfy.get("/object_info")
    for node in NODES:
        assert node in info, f"{node} not registered; server log:\n{comfy.tail()}"
        n = info[node]
        assert n["category"] == "latent/klvae" and n["description"], node
        inputs = {**n["input"].get("required", {}), **n["input"].get("optional", {})}
        assert inputs, node
        for name, spec in inputs.items():
            assert len(spec) > 1 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
    vae_files = info["KLVAELoader"]["input"]["required"]["vae_name"]
    options = vae_files[1].get("options") or vae_files[0]
    assert VAE in options and "flux_ae_small.safetensors" in options
    assert info["KLVAEDecodeTiled"]["input"]["required"]["tiling"][1]["default"] == "exact"
    assert "VAEDecodeTiled" in info and info["VAEDecodeTiled"]["category"] == "_for_testing"  # core untouched


def test_our_nodes_roundtrip_matches_library(comfy, reference):
    entry = comfy.run(graph("KLVAELoader", ARGMAX, OURS_TILED, "ours"))
    assert entry["status"]["status_str"] == "success", error_of(entry)
    (img,) = comfy.images(entry, "5")
    close(img, reference["argmax"])


def test_core_loader_into_our_nodes(comfy, reference):
    """Core VAELoader's VAE (a comfy.sd.VAE) is converted on first use by our nodes."""
    entry = comfy.run(graph("VAELoader", ARGMAX, OURS_TILED, "core_loader"))
    assert entry["status"]["status_str"] == "success", error_of(entry)
    close(comfy.images(entry, "5")[0], reference["argmax"])


def test_our_vae_into_core_nodes(comfy, reference):
    """Our VAE wired into core's VAEEncode and VAEDecodeTiled (which then tiles exactly)."""
    core_tiled = ("VAEDecodeTiled", {"tile_size": 64, "overlap": 32, "temporal_size": 64, "temporal_overlap": 8})
    entry = comfy.run(graph("KLVAELoader", ("VAEEncode", {}), core_tiled, "core_nodes"))
    assert entry["status"]["status_str"] == "success", error_of(entry)
    close(comfy.images(entry, "5")[0], reference["argmax"])
    core_enc_tiled = ("VAEEncodeTiled", {"tile_size": 64, "overlap": 32, "temporal_size": 64, "temporal_overlap": 8})
    entry = comfy.run(graph("KLVAELoader", core_enc_tiled, ("VAEDecode", {}), "core_nodes2"))
    assert entry["status"]["status_str"] == "success", error_of(entry)
    close(comfy.images(entry, "5")[0], reference["argmax"])


def test_inpaint_encode_keeps_noise_mask_and_decodes(comfy, reference):
    """VAEEncodeForInpaint with our VAE; its LATENT (with noise_mask) goes through our decode.
    The test picture has no alpha, so the mask is empty and the pixels are the plain round trip."""
    g = graph("KLVAELoader", ("VAEEncodeForInpaint", {"grow_mask_by": 6}), ("KLVAEDecode", {}), "inpaint")
    g["3"]["inputs"]["mask"] = ["1", 1]
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    close(comfy.images(entry, "5")[0], reference["argmax"])


def test_seeded_sample_node(comfy, reference):
    entry = comfy.run(graph("KLVAELoader", ("KLVAEEncodeSample", {"seed": 7}), ("KLVAEDecode", {}), "sample"))
    assert entry["status"]["status_str"] == "success", error_of(entry)
    img = comfy.images(entry, "5")[0]
    close(img, reference["sample7"])
    assert np.abs(img.astype(int) - reference["argmax"].astype(int)).mean() > 0.5  # it did sample


def test_from_host_vae_node_and_encode_tiled(comfy, reference):
    g = graph("VAELoader", ("KLVAEEncodeTiled", {"tile_size": 64, "overlap": 0, "tiling": "exact",
                                                 "posterior": "argmax", "seed": 0}),
              ("KLVAEDecode", {}), "from_host")
    g["6"] = {"class_type": "KLVAEFromVAE", "inputs": {"vae": ["2", 0], "dtype": "fp32", "device": "cpu"}}
    g["3"]["inputs"]["vae"] = g["4"]["inputs"]["vae"] = ["6", 0]
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    close(comfy.images(entry, "5")[0], reference["argmax"])


@pytest.mark.parametrize("case", ["wrong_family", "not_a_vae", "taesd_argmax"])
def test_bad_inputs_are_node_errors_and_server_keeps_serving(comfy, case):
    if case == "wrong_family":  # a 16-channel (Flux) latent into the 4-channel VAE's decode
        g = graph("KLVAELoader", ARGMAX, ("KLVAEDecode", {}), "bad")
        g["2"]["inputs"]["vae_name"] = "flux_ae_small.safetensors"
        g["6"] = {"class_type": "KLVAELoader", "inputs": {"vae_name": VAE, "dtype": "auto", "device": "auto"}}
        g["4"]["inputs"]["vae"] = ["6", 0]
        node, words = "4", ["16 channels", "takes 4", "flux"]
    elif case == "not_a_vae":
        g = graph("KLVAELoader", ARGMAX, OURS_TILED, "bad")
        g["2"]["inputs"]["vae_name"] = "unet.safetensors"
        node, words = "2", ["unet.safetensors is not a VAE", "diffusion model"]
    else:  # core's loader gives a TAESD; the argmax node must refuse, naming it
        g = graph("VAELoader", ARGMAX, ("KLVAEDecode", {}), "bad")
        g["2"]["inputs"]["vae_name"] = "taesd.safetensors"
        node, words = "3", ["ArgMax only supported for AutoencoderKL", "TAESD"]
    entry = comfy.run(g)
    err = error_of(entry)
    assert entry["status"]["status_str"] == "error" and err, entry["status"]
    assert err["node_id"] == node, err
    msg = err["exception_message"]
    assert "\n" not in msg.strip() and all(w.lower() in msg.lower() for w in words), msg
    assert err["exception_type"] == "klvae.vae.errors.KLVAEError", err["exception_type"]  # not ".../custom_nodes/klvae..."
    # ... and the next prompt runs (a fresh tile size, so nothing comes from the cache)
    ok = comfy.run(graph("KLVAELoader", ARGMAX, ("KLVAEDecodeTiled", {"tile_size": 128, "overlap": 0,
                                                                        "tiling": "exact"}), f"after_{case}"))
    assert ok["status"]["status_str"] == "success", error_of(ok)


def test_a_tile_size_no_vae_can_use_is_refused_when_queued(comfy):
    """The schema's step is the frontend's; the server checks min/max only, so tile_size 7 used to
    pass validation and fail when it ran. Now validate_inputs refuses it before anything runs."""
    g = graph("KLVAELoader", ARGMAX, ("KLVAEDecodeTiled", {"tile_size": 7, "overlap": 0, "tiling": "exact"}), "t7")
    entry = comfy.run(g)
    assert "refused" in entry, entry.get("status")
    errors = entry["refused"]["node_errors"]["4"]["errors"]
    assert any("tile_size 7" in e["details"] and "multiple of 8" in e["details"] for e in errors), errors


def _watch(comfy, prompt, on_progress=None, timeout=300):
    """Queue a prompt over a websocket client as the frontend does; return its messages in order."""
    async def go():
        cid = uuid.uuid4().hex
        msgs = []
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"{comfy.url}/ws?clientId={cid}") as ws:
                r = await s.post(f"{comfy.url}/prompt", json={"prompt": prompt, "client_id": cid})
                pid = (await r.json())["prompt_id"]
                async for m in ws:
                    if m.type != aiohttp.WSMsgType.TEXT:
                        continue
                    d = json.loads(m.data)
                    msgs.append(d)
                    if d["type"] == "progress" and on_progress:
                        await on_progress(s, d)
                    if d["type"] in ("execution_success", "execution_error", "execution_interrupted") \
                            and d["data"].get("prompt_id") == pid:
                        return msgs
    return asyncio.run(asyncio.wait_for(go(), timeout))


def test_progress_bar_per_tile_step(comfy):
    g = graph("KLVAELoader", ARGMAX, ("KLVAEDecodeTiled", {"tile_size": 40, "overlap": 0, "tiling": "exact"}),
              "progress")
    msgs = _watch(comfy, g)
    prog = [(m["data"]["value"], m["data"]["max"]) for m in msgs if m["type"] == "progress" and m["data"]["node"] == "4"]
    assert msgs[-1]["type"] == "execution_success"
    # bands of a 40 px tile's area, stepping through every segment of the decoder
    assert len(prog) > 10 and prog[-1][0] == prog[-1][1] and [v for v, _ in prog] == sorted(v for v, _ in prog)


MODEL_MANAGER = """
import sys, torch
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, {tree!r})
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_management as mm
from klvae.nodes import adapter, host
from klvae.testing import NARROW, diffusers_vae, klvae_from
kl = adapter.KLVAE(klvae_from(diffusers_vae("sd1", seed=0, **NARROW), family="sd1"), host.HOST)
asked = []
load = mm.load_models_gpu
mm.load_models_gpu = lambda models, **kw: asked.append(kw["memory_required"]) or load(models, **kw)
img = kl.decode_image(torch.randn(1, 4, 16, 16))
loaded = [m.model for m in mm.current_loaded_models]
plan = kl.model.plan_decode((1, 4, 16, 16), adapter.Tiling(mode="auto", memory_budget=2**62))
assert any(m is kl.patcher for m in loaded), loaded
assert asked == [plan.predicted], (asked, plan.predicted)
assert type(kl.patcher.model).__name__ == "KLVAEAutoencoder"  # the log's "Requested to load ..." (was "Module")
print("OK", img.shape)
"""


def test_model_manager_loads_our_vae_with_the_plans_need(comfy):
    """ComfyUI's own model manager (in a process of its own with the host's modules): our VAE's
    patcher is among its loaded models after a decode, asked for with our plan's prediction."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", MODEL_MANAGER.format(tree=str(comfy.tree))], capture_output=True,
                       text=True, timeout=300, cwd=comfy.tree)
    assert r.returncode == 0 and "OK" in r.stdout, (r.stdout[-1000:], r.stderr[-3000:])


def test_cancel_button_stops_between_tiles(comfy):
    """The frontend's cancel (POST /interrupt) stops a long tiled encode after its first steps."""
    g = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1, "color": 8421504}},
        "2": {"class_type": "KLVAELoader", "inputs": {"vae_name": VAE, "dtype": "auto", "device": "auto"}},
        "3": {"class_type": "KLVAEEncodeTiled", "inputs": {"pixels": ["1", 0], "vae": ["2", 0], "tile_size": 64,
                                                          "overlap": 0, "tiling": "exact", "posterior": "argmax",
                                                          "seed": 0}},
        "4": {"class_type": "KLVAEDecode", "inputs": {"samples": ["3", 0], "vae": ["2", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "cancelled"}},
    }
    sent = []

    async def cancel(session, d):
        if d["data"]["node"] == "3" and not sent:
            sent.append(d["data"]["value"])
            await session.post(f"{comfy.url}/interrupt")

    msgs = _watch(comfy, g, on_progress=cancel)
    assert sent and msgs[-1]["type"] == "execution_interrupted", [m["type"] for m in msgs][-5:]
    steps = [m["data"] for m in msgs if m["type"] == "progress" and m["data"]["node"] == "3"]
    assert steps[-1]["value"] < steps[-1]["max"] / 4  # stopped early, between tile steps
    ok = comfy.run(graph("KLVAELoader", ARGMAX, ("KLVAEDecode", {}), "after_cancel"))
    assert ok["status"]["status_str"] == "success"


def test_hostile_vae_file_is_a_node_error_and_the_server_survives(comfy):
    """A file whose key indices ask for 10^8 resnet blocks, picked in the loader: the loader node
    fails with one line, the server's memory is where it was, and the next prompt runs."""
    warm = comfy.run(graph("KLVAELoader", ARGMAX, ("KLVAEDecode", {}), "before_hostile"))
    assert warm["status"]["status_str"] == "success", error_of(warm)
    rss0 = proc_status("VmRSS", comfy.proc.pid)
    g = graph("KLVAELoader", ARGMAX, ("KLVAEDecode", {}), "hostile")
    g["2"]["inputs"]["vae_name"] = "hostile.safetensors"
    t0 = __import__("time").time()
    entry = comfy.run(g)
    err = error_of(entry)
    assert entry["status"]["status_str"] == "error" and err["node_id"] == "2", entry["status"]
    assert "beyond any KL VAE" in err["exception_message"] and "\n" not in err["exception_message"].strip()
    assert __import__("time").time() - t0 < 30
    assert proc_status("VmRSS", comfy.proc.pid) <= rss0 + 64 * 2**20, (rss0, proc_status("VmRSS", comfy.proc.pid))
    ok = comfy.run(graph("KLVAELoader", ARGMAX, ("KLVAEDecodeTiled", {"tile_size": 192, "overlap": 0,
                                                                        "tiling": "exact"}), "after_hostile"))
    assert ok["status"]["status_str"] == "success", error_of(ok)


def mix_both_ways(comfy, name: str, prefix: str, ours_tiled: bool = False):
    """Core's VAE Loader and klvae's loader on the same file: core's encode into our decode and ours
    into core's, each against the other side's own result, and ours against the library's."""
    ours_decode = (("KLVAEDecodeTiled", {"tile_size": 32, "overlap": 0, "tiling": "exact"}) if ours_tiled
                   else ("KLVAEDecode", {}))
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "klvae_test.png"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": name}},
        "3": {"class_type": "KLVAELoader", "inputs": {"vae_name": name, "dtype": "auto", "device": "auto"}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 0]}},          # core's latent
        "5": {"class_type": "KLVAEDecode", "inputs": {"samples": ["4", 0], "vae": ["2", 0]}},       # ... by us
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["2", 0]}},         # ... by core
        "7": {"class_type": "KLVAEEncodeArgMax", "inputs": {"pixels": ["1", 0], "vae": ["3", 0]}},  # our latent
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["2", 0]}},         # ... by core
        "9": {"class_type": ours_decode[0], "inputs": {"samples": ["7", 0], "vae": ["3", 0], **ours_decode[1]}},  # ... by us
    }
    for n, src in (("10", "5"), ("11", "6"), ("12", "8"), ("13", "9")):
        g[n] = {"class_type": "SaveImage", "inputs": {"images": [src, 0], "filename_prefix": f"{prefix}_{n}"}}
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    ours_of_core, core_of_core, core_of_ours, ours_of_ours = (comfy.images(entry, n)[0] for n in ("10", "11", "12", "13"))
    lib = load_vae(comfy.base / "models" / "vae" / name)
    f, (H, W) = lib.config.downscale, comfy.image.shape[1:3]  # both sides centre-crop the 96x80 picture to multiples of f
    h, w = H // f * f, W // f * f
    assert ours_of_core.shape == (h, w, 3)
    close(ours_of_core, core_of_core)
    close(core_of_ours, ours_of_ours)
    pixels = comfy.image[:, (H - h) // 2:(H - h) // 2 + h, (W - w) // 2:(W - w) // 2 + w]
    z = lib.encode(pixels.movedim(-1, 1) * 2 - 1).mode()
    close(ours_of_ours, to_png_bytes(((lib.decode(z) + 1) / 2).clamp(0, 1).movedim(1, -1)))


def test_flux2_latents_mix_with_core_nodes_both_ways(comfy):
    """ComfyUI's Flux.2 LATENT is patchified and normalised (128 channels at 1/16)."""
    mix_both_ways(comfy, "flux2-vae.safetensors", "flux2")


def test_qwen_image_latents_mix_with_core_nodes_both_ways(comfy):
    """Qwen-Image's VAE (Wan 2.1's) in ComfyUI: its LATENT is [B, 16, 1, h, w]; our decode tiled."""
    mix_both_ways(comfy, "qwen_image_vae.safetensors", "qwen", ours_tiled=True)


def test_wan_clips_through_core_and_klvae_nodes_both_ways(comfy):
    """Wan 2.1's VAE on a clip (the test picture repeated into 9 frames: core's RepeatImageBatch):
    core's VAE Encode makes a [1, 16, 3, h, w] LATENT that klvae's exact tiled decode and core's VAE
    Decode turn into the same 9 frames; klvae's encode of the batch (one clip, as core's WanVAE takes
    it) into core's VAE Decode (Tiled) with klvae's VAE (exact; its temporal inputs set to tile
    core-style, and not used) and into core's VAE Decode: the same frames, and the library's."""
    name = "wan_2.1_vae.safetensors"
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "klvae_test.png"}},
        "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 9}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": name}},
        "4": {"class_type": "KLVAELoader", "inputs": {"vae_name": name, "dtype": "auto", "device": "auto"}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["3", 0]}},              # core's clip latent
        "6": {"class_type": "KLVAEDecodeTiled", "inputs": {"samples": ["5", 0], "vae": ["3", 0], "tile_size": 32,
                                                           "overlap": 0, "tiling": "exact"}},          # ... by us
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["3", 0]}},             # ... by core
        "8": {"class_type": "KLVAEEncodeArgMax", "inputs": {"pixels": ["2", 0], "vae": ["4", 0]}},      # our clip latent
        "9": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["8", 0], "vae": ["4", 0], "tile_size": 64,
                                                         "overlap": 32, "temporal_size": 8, "temporal_overlap": 4}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},            # ... by core
    }
    for n in ("6", "7", "9", "10"):
        g[f"s{n}"] = {"class_type": "SaveImage", "inputs": {"images": [n, 0], "filename_prefix": f"wan_{n}"}}
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    ours_of_core, core_of_core, ours_of_ours, core_of_ours = (comfy.images(entry, f"s{n}") for n in ("6", "7", "9", "10"))
    assert len(ours_of_core) == len(core_of_core) == len(ours_of_ours) == len(core_of_ours) == 9
    lib = load_vae(comfy.base / "models" / "vae" / name)
    H, W = comfy.image.shape[1:3]
    h, w = H // 8 * 8, W // 8 * 8
    pixels = comfy.image[:, (H - h) // 2:(H - h) // 2 + h, (W - w) // 2:(W - w) // 2 + w]
    clip = (pixels.movedim(-1, 1) * 2 - 1).unsqueeze(2).expand(-1, -1, 9, -1, -1)
    frames = ((lib.decode(lib.encode(clip).mode()) + 1) / 2).clamp(0, 1)[0].permute(1, 2, 3, 0)
    for t in range(9):
        assert ours_of_core[t].shape == (h, w, 3)
        close(ours_of_core[t], core_of_core[t])
        close(ours_of_ours[t], core_of_ours[t])
        close(ours_of_ours[t], to_png_bytes(frames[t:t + 1]))


def test_hunyuan_image_latents_mix_with_core_nodes_both_ways(comfy):
    """HunyuanImage-2.1's VAE in ComfyUI: 64 channels at 1/32 (the picture is cropped to 64x96)."""
    mix_both_ways(comfy, "hunyuan_image_2.1_vae.safetensors", "hunyuan")



# ---- a well-behaved node pack: examples, help pages, the shipped VAE, what Manager installs ---------
EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))


def test_examples_and_help_pages_are_served(comfy):
    """The frontend's template browser lists example_workflows/ and serves each file and its
    thumbnail; each node's help page (web/docs/<node id>.md) and its picture are served where the
    frontend asks for them."""
    listed = comfy.get("/workflow_templates")
    assert sorted(listed["klvae"]) == sorted(p.stem for p in EXAMPLES)
    for p in EXAMPLES:
        assert json.loads(comfy.get_bytes(f"/api/workflow_templates/klvae/{p.name}")) == json.loads(p.read_text())
        assert comfy.get_bytes(f"/api/workflow_templates/klvae/{p.stem}.jpg")[:3] == b"\xff\xd8\xff"  # a JPEG
    info = comfy.get("/object_info")
    for node in NODES:
        assert info[node]["python_module"] == "custom_nodes.klvae"  # the frontend's help lookup starts here
        page = comfy.get_bytes(f"/extensions/klvae/docs/{node}.md").decode()
        assert page.startswith(f"# {info[node]['display_name']}") and "## Inputs" in page, node
        inputs = {**info[node]["input"].get("required", {}), **info[node]["input"].get("optional", {})}
        assert all(f"`{name}`" in page for name in inputs), (node, [n for n in inputs if f"`{n}`" not in page])
    assert comfy.get_bytes("/extensions/klvae/docs/heatmap_decode_1024.png")[:4] == b"\x89PNG"


def test_the_shipped_vaes_are_offered_by_our_loader_only(comfy):
    info = comfy.get("/object_info")
    options = lambda spec: spec[0] if isinstance(spec[0], list) else spec[1]["options"]  # V1 list, V3 "COMBO"
    ours = options(info["KLVAELoader"]["input"]["required"]["vae_name"])
    core = options(info["VAELoader"]["input"]["required"]["vae_name"])
    for shipped in ("klvae-demo-f8c16.safetensors", "klvae-demo-f8c4.safetensors"):
        assert shipped in ours and shipped not in core
    assert VAE in ours and VAE in core  # models/vae is listed by both


@pytest.mark.parametrize("name", ["klvae_argmax_roundtrip", "klvae_vae_in_core_nodes", "klvae_flux2_with_core_nodes",
                                  "klvae_wan_clip_exact"])
def test_api_twins_of_the_examples_run_as_shipped(comfy, name):
    """A script's path: the API-format twin posted as is. (The 2048 example runs in the browser test.)
    The clip example saves its 17 frames, each the library's."""
    api = json.loads((ROOT / "example_workflows" / "api" / f"{name}.json").read_text())
    entry = comfy.run(api)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    save = next(k for k, n in api.items() if n["class_type"] == "SaveImage")
    images = comfy.images(entry, save)
    close(np.stack(images) if len(images) > 1 else images[0], example_reference(comfy, api))


def test_runtime_dependencies_are_comfyuis_own():
    """Why there is no requirements.txt: ComfyUI-Manager installs a pack with `pip install -r
    requirements.txt` and never installs torch; every runtime dependency klvae declares is already
    a requirement of ComfyUI itself."""
    ours = {re.split(r"[<>=!~ \[]", d)[0].lower() for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    comfy_reqs = {re.split(r"[<>=!~ \[;]", line.strip())[0].lower()
                  for line in (comfy_tree() / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert ours <= comfy_reqs, ours - comfy_reqs
    assert not (ROOT / "requirements.txt").exists()


def test_registry_validation_passes(tmp_path):
    """`comfy node validate` (comfy-cli 1.23.0, the registry's own check, offline; the Makefile
    installs it in .venv/comfy-cli) on this repo."""
    comfy_cli = ROOT / ".venv" / "comfy-cli" / "bin" / "comfy"
    if not comfy_cli.exists():
        pytest.skip("comfy-cli is not installed (make install puts it in .venv/comfy-cli)")
    r = subprocess.run([str(comfy_cli), "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(tmp_path)})
    said = r.stdout + r.stderr  # rich prints the verdict where it likes
    assert r.returncode == 0 and "All validation checks passed" in said and "warnings found" not in said, said[-3000:]
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = meta["tool"]["comfy"]
    assert comfy["Icon"].endswith("web/icon.jpg") and (ROOT / "web" / "icon.jpg").exists()
    assert meta["project"]["urls"]["Repository"] and comfy["requires-comfyui"] == ">=0.3.75"
