"""klvae against diffusers and ComfyUI, side by side in one run, each case in a fresh process.

    python benchmarks/bench.py core            # untiled decode/encode, 512 and 1024 (issue: core library)
    python benchmarks/bench.py tiling          # tiled decode/encode at 1024 (+ 2048 decode), all systems
    python benchmarks/bench.py big             # a 4096x4096 exact decode (bf16 with AMX, else fp32); the 8192 plan
    python benchmarks/bench.py precision       # 1024 decode in fp32 and bf16 (CPU AMX), all systems
    python benchmarks/bench.py dist            # 1024 decode over 1, 2, 4 gloo ranks (1 thread each), and DistVAE
    python benchmarks/bench.py dist --sizes 256x448x9   # a clip through Wan 2.1's VAE: 1 process, 2 ranks
    python benchmarks/bench.py qwenimage       # Qwen-Image's VAE at 1024: klvae's modes, diffusers' and ComfyUI's untiled and tiled
    python benchmarks/bench.py hunyuanimage    # HunyuanImage-2.1's, the same
    python benchmarks/bench.py wan             # clips through Wan 2.1's VAE: klvae untiled/exact, diffusers, ComfyUI (video.py)
    python benchmarks/bench.py wan22           # the same through Wan 2.2's VAE (16x, residual blocks across each level)
    python benchmarks/bench.py qwenimage21 --sizes 1024 --systems klvae,diffusers   # Qwen-Image 2.1's VAE (RGBA, 16x)
    python benchmarks/bench.py gpu --out DIR   # the GPU suite (CUDA tests, klvae/diffusers/ComfyUI at 1K-8K)
    python benchmarks/bench.py gpu --device cpu --sizes 256 --out DIR   # the same script end to end on the CPU
    python benchmarks/bench.py tiling --sizes 1024 --systems klvae,diffusers
    python benchmarks/bench.py tiling --sizes 2048 --modes untiled,exact-device,bounded

Every system gets the same calibrated random SD1.x weights (klvae/testing.py) and the same
synthetic image; decode cases decode the klvae argmax latent of that image. Time is wall time of
the call; peak is the rise of the process's peak RSS (VmHWM) over its RSS just before the call.
Fidelity is each tiled output against the untiled output (klvae's; diffusers' and ComfyUI's
untiled outputs agree with it to ~1e-5, checked by the core suite). Results: benchmarks/out/*.json,
a markdown table on stdout, heat maps in benchmarks/out/.

Files: bench.py (this dispatcher), common.py (shared), single.py (core, tiling, precision, big),
dist.py (distributed), video.py (clips), gpu.py (the GPU suite).
"""
import argparse
import json
import os

import torch

import dist
import gpu
import single
import video
from common import FAMILY_SUITES, OUT


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=["core", "tiling", "big", "precision", "dist", "gpu", *video.SUITES, *FAMILY_SUITES])
    ap.add_argument("--sizes", default="", help="comma-separated image sizes (wan: HxW, e.g. 256x448)")
    ap.add_argument("--frames", default="17", help="wan: comma-separated clip lengths in frames (1 + 4k)")
    ap.add_argument("--systems", default="klvae,diffusers,comfy")
    ap.add_argument("--modes", default="", help="only these modes, e.g. untiled,bounded (default: all)")
    ap.add_argument("--ops", default="decode,encode", help="only these directions, e.g. decode")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    ap.add_argument("--rank-case", help=argparse.SUPPRESS)  # internal: one rank of a distributed case
    ap.add_argument("--gpu-case", help=argparse.SUPPRESS)   # internal: GPU-suite cases (a JSON list) in this process
    ap.add_argument("--out", default=os.path.join(OUT, "gpu"), help="gpu suite: where the JSON and the log go")
    ap.add_argument("--device", default="cuda", help="gpu suite: cuda, or cpu for the end-to-end smoke run")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--plans", action="store_true", help="big suite: print the plans from the last run's big.json")
    a = ap.parse_args()
    if a.plans:
        with open(os.path.join(OUT, "big.json")) as f:
            print(single.big_plans(json.load(f)[0]))
        return
    if a.gpu_case:
        torch.set_num_threads(2 if a.device == "cpu" else torch.get_num_threads())
        for case in json.loads(a.gpu_case):
            print("RESULT " + json.dumps(gpu.gpu_case(*case, a.device, a.out, a.smoke)), flush=True)
        return
    if a.suite == "gpu":
        gpu.gpu_suite(a.out, a.device, [int(s) for s in a.sizes.split(",") if s])
        return
    if a.rank_case:
        system, size, rank, world, port = a.rank_case.split(":")
        size = size if "x" in size else int(size)
        print("RESULT " + json.dumps(dist.run_rank(system, size, int(rank), int(world), int(port))))
        return
    if a.suite == "dist":  # image sizes, or clips HxWxframes
        return dist.dist_suite([s if "x" in s else int(s) for s in a.sizes.split(",") if s])
    if a.suite in video.SUITES:
        if a.case:
            system, op, H, W, T, mode, tile = a.case.split(":")
            print("RESULT " + json.dumps(video.run_case(system, op, int(H), int(W), int(T), mode, int(tile), a.suite)))
            return
        sizes = [tuple(map(int, s.split("x"))) for s in (a.sizes or "256x448").split(",")]
        frames = [1 + (int(n) - 1) // 4 for n in a.frames.split(",")]
        return video.run_suite(sizes, frames, a.systems.split(","), [m for m in a.modes.split(",") if m], a.suite)
    if a.case:
        system, op, size, mode, tile = a.case.split(":")
        family = a.suite if a.suite in FAMILY_SUITES else "sd1"
        print("RESULT " + json.dumps(single.run_case(system, op, int(size), mode, int(tile), family)))
        return
    single.run_suite(a.suite, [int(s) for s in a.sizes.split(",") if s], a.systems.split(","),
                     [m for m in a.modes.split(",") if m], a.ops.split(","))


if __name__ == "__main__":
    main()
