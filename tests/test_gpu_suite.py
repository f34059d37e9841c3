"""The GPU benchmark (`python benchmarks/bench.py gpu`) runs end to end on the CPU at a toy size,
so that a session lent a GPU spends its minutes measuring, not debugging."""
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_runs_end_to_end_on_the_cpu(tmp_path):
    import diffusers
    import torch
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "gpu", "--device", "cpu", "--sizes", "64",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=400)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    v = res["versions"]  # what the device's figures will be read against
    assert (v["torch"], v["diffusers"], v["device"]) == (torch.__version__, diffusers.__version__, "cpu")
    cases = {(c["system"], c["op"], c["tiling"]): c for c in res["cases"]}
    failed = [c for c in res["cases"] if "error" in c]
    assert not failed, failed
    for key in [("klvae", "decode", "untiled"), ("klvae", "decode", "exact"), ("klvae", "decode", "bounded"),
                ("klvae", "encode", "exact"), ("klvae-flux", "decode", "exact"), ("diffusers", "decode", "tiled"),
                ("comfy", "decode", "tiled"), ("klvae-wan", "decode", "untiled"), ("klvae-wan", "decode", "exact"),
                ("diffusers-wan", "decode", "untiled"), ("diffusers-wan", "decode", "tiled"),
                ("diffusers-compile", "decode", "untiled"), ("klvae-qi21", "decode", "exact"),
                ("diffusers-qi21", "decode", "untiled"), ("klvae-wan22", "decode", "untiled"),
                ("klvae-wan22", "decode", "exact"), ("diffusers-wan22", "decode", "untiled")]:
        c = cases[key]
        assert c["finite"] is True and c["host_syncs"] == 0 and c["zero_tail_rows"] == 0, c
        assert 0 < c["seconds"] < wall and isinstance(c["peak"], int) and 0 <= c["peak"] < 2**31, c  # a 64 px case
    exact = cases[("klvae", "decode", "exact")]
    assert exact["predicted"] > 0 and exact["report"]["mode"] == "exact" and exact["psnr_vs_full"] >= 60
    clip = cases[("klvae-wan", "decode", "exact")]  # a 64x64 clip of 5 frames: time chunks x bands, exact
    assert clip["size"] == "64x64x5" and clip["report"]["mode"] == "exact" and clip["psnr_vs_full"] >= 60
    clip = cases[("klvae-wan22", "decode", "exact")]  # Wan 2.2's: 16x, its levels' spanning shortcuts in time
    assert clip["size"] == "64x64x5" and clip["report"]["mode"] == "exact" and clip["psnr_vs_full"] >= 60
    assert (tmp_path / "gpu.log").read_text().count("peak") == len(res["cases"])
    assert not list(tmp_path.glob("*.pt"))  # outputs removed: what comes back from a GPU is the JSON and the log
