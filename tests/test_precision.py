"""fp16 / bf16 against fp32 for every family, and the fp16 overflow guard (CPU; GPU at the end)."""
import warnings

import pytest
import torch

from klvae.testing import NARROW, calibrated_vae, psnr, test_image
from klvae.vae import load_vae, resolve_dtype


def calibrated_sd(family, seed=0):
    d = calibrated_vae(family, seed=seed, **NARROW)
    return {k: v.clone() for k, v in d.state_dict().items()}


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux", "flux2"])
def test_low_precision_decodes_agree_with_fp32(family):
    sd = calibrated_sd(family)
    v32 = load_vae(sd, family=family)
    z = v32.encode(test_image(128)).mode()
    ref = v32.decode(z)
    for dtype, floor in (("fp16", 40), ("bf16", 32)):
        v = load_vae(sd, family=family, dtype=dtype)
        out = v.decode(z)
        assert out.dtype == resolve_dtype(dtype, "cpu") and torch.isfinite(out).all()
        db = psnr(out, ref)
        print(f"{family} {dtype}: {db:.1f} dB vs fp32")
        assert db >= floor, (family, dtype, db)
        assert not v.guard_log  # nothing overflowed: the guard stayed out of the way


@pytest.fixture(scope="module")
def overflowing():
    """An SDXL-shaped VAE built to overflow fp16 like SDXL's decoder: the residual branches of the
    last (highest-resolution) up level are scaled 2^15x, so the stream peaks near 1.9e5 > 65504.
    In fp32 the output is fine (norm_out normalises the stream)."""
    sd = {k: v.contiguous() for k, v in load_vae(calibrated_sd("sdxl"), family="sdxl").state_dict().items()}  # LDM keys
    assert any(k.startswith("decoder.up.0.block.") for k in sd)
    for k in sd:
        if k.startswith("decoder.up.0.block.") and ".conv2." in k:
            sd[k] = sd[k] * 2**15
    v32 = load_vae(sd, family="sdxl")
    z = v32.encode(test_image(128)).mode()
    return sd, z, v32.decode(z)


def test_the_overflow_trap_is_real(overflowing):
    sd, z, ref = overflowing
    assert torch.isfinite(ref).all()
    v16 = load_vae(sd, family="sdxl", dtype="fp16")
    v16.guard.enabled = False
    assert not torch.isfinite(v16.decode(z)).all()  # a plain fp16 decode: NaN/Inf (the black image)


def test_fp16_guard_recovers_exactly_and_remembers(overflowing):
    sd, z, ref = overflowing
    v16 = load_vae(sd, family="sdxl", dtype="fp16")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = v16.decode(z)
        out2 = v16.decode(z, tiling="exact")  # starts scaled: no second recovery
        v16.decode(z)
    assert torch.isfinite(out).all() and psnr(out, ref) >= 40, psnr(out, ref)
    assert torch.isfinite(out2).all() and psnr(out2, ref) >= 40
    assert len(v16.guard_log) == 1 and "2^-6" in v16.guard_log[0] and "1 of 1" in v16.guard_log[0]
    assert len([x for x in w if "non-finite" in str(x.message)]) == 1  # warned once
    bf = load_vae(sd, family="sdxl", dtype="bf16").decode(z)  # bf16 has fp32's range: no overflow
    assert torch.isfinite(bf).all() and psnr(bf, ref) >= 32


def test_guard_catches_a_single_bad_pixel_and_reruns_only_that_item():
    v = load_vae(calibrated_sd("sd1", seed=1), family="sd1", dtype="fp16")
    zz = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    clean = v.decode(zz)
    calls = []

    def flaky(module, inputs, out):  # the decoder (and the guard's rescaled copy of it) as a hook
        calls.append(inputs[0].shape[0])
        if len(calls) == 1:
            out[1, 0, 5, 7] = float("nan")  # partial: one value of one item (A1111 only catches all-NaN)
        return out

    v.decoder.register_forward_hook(flaky)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = v.decode(zz)
    assert calls == [3, 1] and torch.isfinite(out).all()
    assert torch.equal(out[[0, 2]], clean[[0, 2]])  # never re-run: bit for bit the first pass
    assert torch.allclose(out[1], clean[1], atol=1e-2) and "1 of 3" in v.guard_log[0]  # re-run stream-scaled


def test_stream_scaled_copy_is_exact_in_fp32():
    from klvae.vae.precision import stream_scaled
    v = load_vae(calibrated_sd("flux"), family="flux")
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    zz = v.post_quant_conv(z) if v.post_quant_conv is not None else z
    with torch.no_grad():
        a, b = v.decoder(zz), stream_scaled(v.decoder, 2.0**-12)(zz)
        x = test_image(64)
        c, d = v.encoder(x), stream_scaled(v.encoder, 2.0**-12)(x)
    assert (a - b).abs().max() < 1e-4 and (c - d).abs().max() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype,floor", [("fp32", 60), ("fp16", 40), ("bf16", 32)])
def test_gpu_decode_per_dtype(dtype, floor, overflowing):
    sd, z, ref = overflowing
    v = load_vae(sd, family="sdxl", device="cuda", dtype=dtype)
    out = v.decode(z.cuda()).cpu()
    assert torch.isfinite(out).all() and psnr(out, ref) >= floor
