"""The core library: parity with diffusers, layouts, round trips, the posterior, and every bad input."""
import json
import os
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from klvae.testing import NARROW, diffusers_vae, klvae_from
from klvae.vae import AutoencoderKL, KLVAEError, load_vae, save_vae
from klvae.vae.diffusers_compat import ldm_to_diffusers


# ---- parity with diffusers at full width ------------------------------------------------------
# Flux.2 twice: full width, and its narrower "small decoder" (decoder_block_out_channels), whose
# group count lives only in diffusers' config (so it comes through from_diffusers).
FLUX2_SMALL_DECODER = dict(ch=32, ch_mult=(1, 2, 4, 4), decoder_ch=24, norm_groups=8)


@pytest.mark.parametrize("family,overrides", [("sd1", {}), ("sdxl", {}), ("sd3", {}), ("flux", {}), ("flux2", {}),
                                              ("flux2", FLUX2_SMALL_DECODER)], ids=lambda v: "small" if v else None)
def test_parity_with_diffusers_full_width(family, overrides):
    d = diffusers_vae(family, seed=3, **overrides)
    k = AutoencoderKL.from_diffusers(d) if overrides else klvae_from(d, family=family)
    assert k.config.family == family and k.config.latent_channels == {"sd3": 16, "flux": 16, "flux2": 32}.get(family, 4)
    assert (k.quant_conv is None) == (family in ("sd3", "flux")) and k.config.decoder_ch == overrides.get("decoder_ch")
    x = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ref = d.encode(x).latent_dist
        post = k.encode(x)
        torch.testing.assert_close(post.mean, ref.mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(post.logvar, ref.logvar, atol=1e-4, rtol=0)
        z = ref.mean
        torch.testing.assert_close(k.decode(z), d.decode(z).sample, atol=1e-4, rtol=0)
    back = k.to_diffusers()  # and back: the same class and widths diffusers started with
    assert type(back).__name__ == type(d).__name__
    assert back.config.get("decoder_block_out_channels") == d.config.get("decoder_block_out_channels")


def test_untiled_groupnorm_keeps_fp32_precision_on_large_channels_last_tensors():
    """klvae's activations are channels-last; PyTorch's channels-last CPU GroupNorm sums x and x^2
    in fp32 over the image and loses ~1e-4 at 512^2 when channel means dwarf their spread. The
    model's GroupNorm takes its statistics from Stats instead (float64, chunked deviations); under
    autograd it is the kernel, so training keeps its backward."""
    from klvae.vae.model import Normalize
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 512, 512, generator=g) * 0.5 + torch.randn(1, 64, 1, 1, generator=g) * 20
    x = x.contiguous(memory_format=torch.channels_last)
    norm = Normalize(64, 32)
    with torch.no_grad():
        norm.weight.normal_(generator=g), norm.bias.normal_(generator=g)
        ref = torch.nn.functional.group_norm(x.double().contiguous(), 32, norm.weight.double(), norm.bias.double(), 1e-6)
        y = norm(x)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    assert (y.double() - ref).abs().max() < 1e-5
    small = x[:, :, :16, :16].clone().requires_grad_()
    norm(small).square().sum().backward()
    assert small.grad is not None and small.grad.abs().sum() > 0 and norm.weight.grad.abs().sum() > 0


def test_config_read_from_shapes_not_assumed(tmp_path):
    d = diffusers_vae("flux", ch=32, ch_mult=(1, 2, 2, 2), norm_groups=8)
    d.save_pretrained(tmp_path / "f")  # norm_num_groups=8 lives only in config.json
    k = load_vae(tmp_path / "f", family="flux")
    c = k.config
    assert (c.ch, c.ch_mult, c.latent_channels, c.norm_groups) == (32, (1, 2, 2, 2), 16, 8)
    z = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(k.decode(z), d.decode(z).sample, atol=1e-5, rtol=0)
    k.save(tmp_path / "f.safetensors")
    assert load_vae(tmp_path / "f.safetensors").config.norm_groups == 8
    assert (c.scaling_factor, c.shift_factor) == (0.3611, 0.1159)
    assert not c.use_quant_conv and not c.use_post_quant_conv


# ---- layouts and round trips ------------------------------------------------------------------
def test_ldm_and_diffusers_layouts_give_identical_outputs(tmp_path):
    d = diffusers_vae("sd1", **NARROW)
    k = klvae_from(d, family="sd1")
    k.save(tmp_path / "ldm.safetensors", layout="ldm")
    k.save(tmp_path / "dif.safetensors", layout="diffusers")
    a, b = load_vae(tmp_path / "ldm.safetensors"), load_vae(tmp_path / "dif.safetensors")
    assert a.source_layout == "ldm" and b.source_layout == "diffusers"
    z = torch.randn(1, 4, 6, 5)
    assert torch.equal(a.decode(z), b.decode(z))
    x = torch.rand(1, 3, 48, 40) * 2 - 1
    assert torch.equal(a.encode(x).mean, b.encode(x).mean)


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_save_load_round_trip_is_bit_exact(tmp_path, layout):
    k = klvae_from(diffusers_vae("sd3", **NARROW), family="sd3")
    path = tmp_path / f"v_{layout}.safetensors"
    k.save(path, layout=layout)
    k2 = load_vae(path)
    assert k2.config.family == "sd3" and k2.config.shift_factor == 0.0609
    a, b = k.state_dict(), k2.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert k.state_dict(layout=layout).keys() == k2.state_dict(layout=layout).keys()


def test_diffusers_folder_from_diffusers_itself(tmp_path):
    d = diffusers_vae("sdxl", **NARROW)
    d.save_pretrained(tmp_path / "sdxl_vae")   # diffusers writes config.json with scaling_factor 0.13025
    k = load_vae(tmp_path / "sdxl_vae")
    assert k.config.family == "sdxl" and k.config.scaling_factor == 0.13025
    z = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(k.decode(z), d.decode(z).sample, atol=1e-5, rtol=0)


def test_klvae_diffusers_folder_loads_in_diffusers(tmp_path):
    from diffusers import AutoencoderKL as D
    k = klvae_from(diffusers_vae("flux", **NARROW), family="flux")
    k.save(tmp_path / "flux_vae", layout="diffusers")
    d = D.from_pretrained(tmp_path / "flux_vae")
    assert d.config.scaling_factor == 0.3611 and d.config.shift_factor == 0.1159
    assert d.config.latent_channels == 16 and not d.config.use_quant_conv
    z = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(d.decode(z).sample, k.decode(z), atol=1e-5, rtol=0)


def test_old_diffusers_attention_names_and_linear_weights():
    d = diffusers_vae("sd1", **NARROW)
    sd = d.state_dict()
    old = {}
    for key, v in sd.items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{legacy}.")
        old[key] = v
    assert any(".query." in key for key in old) and old["decoder.mid_block.attentions.0.query.weight"].dim() == 2
    k_old, k_new = klvae_from(old, family="sd1"), klvae_from(sd, family="sd1")
    z = torch.randn(1, 4, 4, 4)
    assert torch.equal(k_old.decode(z), k_new.decode(z))


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae."])
def test_whole_checkpoint_reads_only_the_vae(tmp_path, prefix):
    k = klvae_from(diffusers_vae("sd1", **NARROW), family="sd1")
    sd = {prefix + n: v.contiguous() for n, v in k.state_dict().items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.randn(10, 8)
    save_file(sd, str(tmp_path / "sd15_full_checkpoint.safetensors"))
    k2 = load_vae(tmp_path / "sd15_full_checkpoint.safetensors")
    assert k2.config.family == "sd1"
    z = torch.randn(1, 4, 4, 4)
    assert torch.equal(k.decode(z), k2.decode(z))


def test_ckpt_with_weights_only_and_lightning_wrapper(tmp_path):
    k = klvae_from(diffusers_vae("sd1", **NARROW), family="sd1")
    sd = {"state_dict": {"first_stage_model." + n: v for n, v in k.state_dict().items()}, "global_step": 10}
    sd["state_dict"]["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)  # training leftover
    torch.save(sd, tmp_path / "model.ckpt")
    k2 = load_vae(tmp_path / "model.ckpt", family="sd1")
    assert all(torch.equal(a, b) for a, b in zip(k.state_dict().values(), k2.state_dict().values()))


def test_load_converts_dtype():
    k = klvae_from(diffusers_vae("sd1", **NARROW), family="sd1", dtype="bf16")
    assert k.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in k.parameters())
    assert not any(p.requires_grad for p in k.parameters()) and not k.training
    assert not any(p.is_meta for p in k.parameters())


ONE_COPY = """
import json, sys, torch
from klvae.vae import load_vae
from klvae.vae.memory import PeakMeter
m = PeakMeter(torch.device("cpu"), anon=True)
vae = load_vae(sys.argv[1], dtype="bf16")
print(json.dumps(m.peak()))
"""


def test_load_keeps_one_copy_of_the_weights(tmp_path):
    """Loading a full-width fp32 file (335 MB) as bf16 grows the process's anonymous memory by the
    bf16 weights (167 MB) and not by a second, fp32 copy: tensors are read one at a time from the
    memory-mapped file into a model built on the meta device. (A fresh process, so nothing else
    lives in that memory.)"""
    import subprocess
    import sys
    k = klvae_from(diffusers_vae("sd1", seed=0), family="sd1")
    k.save(tmp_path / "sd_vae.safetensors")
    fp32 = sum(p.numel() * 4 for p in k.parameters())
    r = subprocess.run([sys.executable, "-c", ONE_COPY, str(tmp_path / "sd_vae.safetensors")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    grew = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"fp32 weights {fp32 / 2**20:.0f} MiB, anonymous memory grew {grew / 2**20:.0f} MiB")
    assert grew < 0.5 * fp32 + 48 * 2**20  # the bf16 copy (half) plus torch's own start-up


# ---- family inference -------------------------------------------------------------------------
def test_family_from_file_name_metadata_and_ambiguity(tmp_path):
    k = klvae_from(diffusers_vae("sd1", **NARROW), family="sd1")
    sd = {n: v.contiguous() for n, v in k.state_dict().items()}
    save_file(sd, str(tmp_path / "my_sdxl_vae.safetensors"))
    assert load_vae(tmp_path / "my_sdxl_vae.safetensors").config.family == "sdxl"
    save_file(sd, str(tmp_path / "a.safetensors"), metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/vae"})
    assert load_vae(tmp_path / "a.safetensors").config.family == "sdxl"
    save_file(sd, str(tmp_path / "mystery.safetensors"))
    with pytest.warns(UserWarning, match="ambiguous.*assumed sd1"):
        v = load_vae(tmp_path / "mystery.safetensors")
    assert v.config.family == "sd1" and any("ambiguous" in n for n in v.config.notes)
    assert load_vae(tmp_path / "mystery.safetensors", family="sdxl").config.scaling_factor == 0.13025


# ---- the posterior ----------------------------------------------------------------------------
def test_mode_is_deterministic_and_sample_is_seeded():
    k = klvae_from(diffusers_vae("sd3", **NARROW), family="sd3")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    p1, p2 = k.encode(x), k.encode(x)
    assert torch.equal(p1.mode(), p2.mode()) and torch.equal(p1.mode(), p1.mean)
    s1 = p1.sample(torch.Generator().manual_seed(7))
    s2 = p2.sample(torch.Generator().manual_seed(7))
    s3 = p1.sample(torch.Generator().manual_seed(8))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3) and torch.equal(p1.sample(seed=7), s1)
    assert not torch.equal(s1, p1.mode())
    # the noise has the posterior's std: (sample - mean) / std is standard normal
    eps = (s1 - p1.mean) / p1.std
    assert abs(eps.std().item() - 1) < 0.2


def test_sample_matches_diffusers_for_the_same_generator():
    d = diffusers_vae("sd1", **NARROW)
    k = klvae_from(d, family="sd1")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = d.encode(x).latent_dist.sample(torch.Generator().manual_seed(5))
    torch.testing.assert_close(k.encode(x).sample(torch.Generator().manual_seed(5)), ref, atol=1e-4, rtol=0)


def test_scaled_latent_helpers_round_trip():
    k = klvae_from(diffusers_vae("flux", **NARROW), family="flux")
    raw = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(k.to_scaled(raw), (raw - 0.1159) * 0.3611)
    torch.testing.assert_close(k.from_scaled(k.to_scaled(raw)), raw)


# ---- bad input: one exception type, one line, names the problem and the fix -------------------
def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def tiny_vae():
    return klvae_from(diffusers_vae("sd1", **NARROW), family="sd1")


def test_wrong_latent_channels_names_the_family(tiny_vae):
    with pytest.raises(KLVAEError) as e:
        tiny_vae.decode(torch.randn(1, 16, 8, 8))
    assert "16 channels" in _one_line(e) and "sd3/flux" in str(e.value) and "takes 4" in str(e.value)


def test_size_not_multiple_of_8(tiny_vae):
    with pytest.raises(KLVAEError) as e:
        tiny_vae.encode(torch.zeros(1, 3, 100, 64))
    assert "64x100 is not a positive multiple of 8" in _one_line(e) and "64x96" in str(e.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(tiny_vae, bad):
    z = torch.randn(1, 4, 4, 4)
    z[0, 1, 2, 3] = bad
    with pytest.raises(KLVAEError) as e:
        tiny_vae.decode(z)
    assert "1 NaN/Inf" in _one_line(e)
    x = torch.zeros(1, 3, 16, 16)
    x[0, 0, 0, 0] = bad
    with pytest.raises(KLVAEError, match="pixels contain 1 NaN/Inf"):
        tiny_vae.encode(x)


def test_finite_inputs_beyond_fp32s_range_are_an_error_not_nan_pixels(tiny_vae):
    """An fp32 decode of latents of 3e37 overflows inside the decoder: one line naming the largest
    magnitude and the family's range, never a NaN image (the fuzz run's second escape)."""
    with pytest.raises(KLVAEError, match=r"NaN/Inf in fp32 .* largest magnitude is 3e\+37, .* about \+-27") as e:
        tiny_vae.decode(torch.full((1, 4, 4, 4), 3e37))
    _one_line(e)
    assert torch.isfinite(tiny_vae.decode(torch.full((1, 4, 4, 4), 20.0))).all()  # large but sane: decoded
    with pytest.raises(KLVAEError, match=r"pixels range from 255 to 255; klvae encodes \[-1, 1\]: divide 0..255"):
        tiny_vae.encode(torch.full((1, 3, 16, 16), 255.0))
    tiny_vae.encode(torch.full((1, 3, 16, 16), 1.2))  # resampling overshoot is not refused


@pytest.mark.parametrize("call,words", [
    (lambda v: load_vae(v.state_dict(), family=["sd1"]), "unknown family \"\\['sd1'\\]\""),  # the fuzz run's first escape
    (lambda v: load_vae(v.state_dict(), family={"sd1": 1}), "unknown family"),
    (lambda v: v.encode(torch.zeros(1, 3, 8, 8)).sample(seed="1"), "seed must be a whole number"),
    (lambda v: v.encode(torch.zeros(1, 3, 8, 8)).sample(generator=5), "generator must be a torch.Generator"),
    (lambda v: v.enable_tiling(tile=512), "unknown option 'tile'"),
    (lambda v: v.plan_decode((1, 4, 64, 64, 1)), "not the shape of latents"),
    (lambda v: v.plan_decode((1, 16, 64, 64)), "have 16 channels, this VAE's have 4"),
    (lambda v: v.plan_encode((1, 3, 60, 64)), "not a positive multiple of 8"),
])
def test_public_arguments_get_the_strict_reading_of_file_values(tiny_vae, call, words):
    with pytest.raises(KLVAEError, match=words) as e:
        call(tiny_vae)
    _one_line(e)


def test_pixels_with_wrong_layout(tiny_vae):
    with pytest.raises(KLVAEError, match="pixels have 64 channels"):
        tiny_vae.encode(torch.zeros(1, 64, 64, 3))  # NHWC by mistake


@pytest.mark.parametrize("keys,expect", [
    ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)}, "diffusion model checkpoint without VAE"),
    ({"input_blocks.0.0.weight": (8, 4, 3, 3), "time_embed.0.weight": (8, 8)}, "a UNet"),
    ({"double_blocks.0.img_attn.qkv.weight": (8, 8)}, "Flux transformer"),
    ({"text_model.embeddings.token_embedding.weight": (10, 8)}, "text encoder"),
    ({"encoder.layers.0.weight": (8, 3, 3, 3), "decoder.layers.0.weight": (8, 4, 3, 3)}, "TAESD"),
    ({"1.weight": (8, 3, 3, 3), "3.conv.0.weight": (8, 8, 3, 3)}, "TAESD"),
    ({"lora_unet_down.lora_down.weight": (4, 8)}, "LoRA"),
])
def test_not_a_vae_says_what_it_is(tmp_path, keys, expect):
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(tmp_path / "x.safetensors"))
    with pytest.raises(KLVAEError) as e:
        load_vae(tmp_path / "x.safetensors")
    assert "is not a VAE" in _one_line(e) and expect in str(e.value)


def test_empty_truncated_and_missing_files(tmp_path, tiny_vae):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(KLVAEError, match="empty"):
        load_vae(tmp_path / "empty.safetensors")
    with pytest.raises(KLVAEError, match="no such file"):
        load_vae(tmp_path / "nope.safetensors")
    tiny_vae.save(tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(KLVAEError) as e:
        load_vae(tmp_path / "cut.safetensors")
    assert "truncated or corrupt" in _one_line(e)
    torch.save(tiny_vae.state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(KLVAEError, match="truncated or corrupt"):
        load_vae(tmp_path / "cut.pt")
    save_file({}, str(tmp_path / "none.safetensors"))
    with pytest.raises(KLVAEError, match="no tensors at all"):
        load_vae(tmp_path / "none.safetensors")


class Payload:  # any non-tensor object in a pickle must be refused, never constructed
    pass


def test_pickle_with_objects_is_refused(tmp_path, tiny_vae):
    sd = dict(tiny_vae.state_dict())
    sd["extra"] = Payload()
    torch.save(sd, tmp_path / "evil.ckpt")
    with pytest.raises(KLVAEError) as e:
        load_vae(tmp_path / "evil.ckpt")
    assert "pickled Python objects" in _one_line(e) and ".safetensors" in str(e.value)


def test_missing_and_unexpected_keys_are_named(tiny_vae):
    sd = dict(tiny_vae.state_dict())
    del sd["decoder.up.1.block.2.conv2.weight"]
    sd["decoder.mystery.weight"] = torch.zeros(1)
    with pytest.raises(KLVAEError) as e:
        load_vae(sd, family="sd1")
    msg = _one_line(e)
    assert "decoder.up.1.block.2.conv2.weight" in msg and "decoder.mystery.weight" in msg


def test_video_vae_and_non_kl_diffusers_folder(tmp_path):
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3, 3)},
              str(tmp_path / "video.safetensors"))
    with pytest.raises(KLVAEError, match="video VAE"):
        load_vae(tmp_path / "video.safetensors")
    (tmp_path / "taesd").mkdir()
    (tmp_path / "taesd" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    with pytest.raises(KLVAEError, match="AutoencoderTiny, which klvae does not load: it loads AutoencoderKL, AutoencoderKLFlux2"):
        load_vae(tmp_path / "taesd")


def test_unknown_family_and_dtype(tiny_vae):
    with pytest.raises(KLVAEError, match="unknown family"):
        load_vae(tiny_vae.state_dict(), family="sd9")
    with pytest.raises(KLVAEError, match="unknown dtype"):
        load_vae(tiny_vae.state_dict(), family="sd1", dtype="fp8")


def test_ldm_to_diffusers_keys_match_diffusers_exactly():
    d = diffusers_vae("sd1", **NARROW)
    k = klvae_from(d, family="sd1")
    conv = ldm_to_diffusers(k.state_dict())
    ref = d.state_dict()
    assert conv.keys() == ref.keys()
    assert all(conv[n].shape == ref[n].shape and torch.equal(conv[n], ref[n]) for n in ref)


def test_a_family_argument_never_overrides_what_the_file_states(tmp_path):
    """The file's own scale and shift win; a family argument only names the family and fills what
    the file cannot say (and says so); one the file contradicts is a one-line error. (It used to
    write Flux.1's preset over a 16-channel file's calibrated numbers for any family asked for.)"""
    k = klvae_from(diffusers_vae("flux", **NARROW), family="flux")
    k.config = replace(k.config, scaling_factor=0.5378, shift_factor=-0.1968)  # calibrated, not the preset
    save_vae(k, tmp_path / "own.safetensors")
    for fam in ("flux", None):
        c = load_vae(tmp_path / "own.safetensors", family=fam).config
        assert (c.family, c.scaling_factor, c.shift_factor) == ("flux", 0.5378, -0.1968), fam
        assert "scale 0.5378 and shift -0.1968 from klvae metadata" in c.notes, c.notes
    for fam in ("sdxl", "sd1", "sd3", "flux2", "qwenimage", "hunyuanimage"):
        with pytest.raises(KLVAEError, match=f"says it is a flux VAE \\(klvae metadata\\), not {fam}") as e:
            load_vae(tmp_path / "own.safetensors", family=fam)
        assert "\n" not in str(e.value)
    bare = {n: v.contiguous() for n, v in k.state_dict().items()}
    save_file(bare, str(tmp_path / "bare.safetensors"))  # no metadata: the family fills scale and shift
    c = load_vae(tmp_path / "bare.safetensors", family="flux").config
    assert (c.scaling_factor, c.shift_factor) == (0.3611, 0.1159)
    assert "scale 0.3611 and shift 0.1159: the flux preset (the file states none)" in c.notes, c.notes
    with pytest.raises(KLVAEError, match="not a sdxl VAE: sdxl has 4 latent channels with quant convs, this file 16 "
                                         "without quant convs: drop the family argument or use sd3 / flux"):
        load_vae(tmp_path / "bare.safetensors", family="sdxl")
    with pytest.raises(KLVAEError, match="not a qwenimage VAE: the file holds an SD-style network"):
        load_vae(tmp_path / "bare.safetensors", family="qwenimage")
    k.save(tmp_path / "folder", layout="diffusers")  # config.json states the scale: it wins too
    (tmp_path / "folder" / "diffusion_pytorch_model.safetensors").write_bytes(
        (tmp_path / "bare.safetensors").read_bytes())  # weights without klvae metadata
    c = load_vae(tmp_path / "folder", family="sd3").config
    assert (c.family, c.scaling_factor, c.shift_factor) == ("sd3", 0.5378, -0.1968), c
    assert any("from config.json" in n for n in c.notes), c.notes


def test_save_keeps_the_files_other_metadata_and_writes_readable_files(tmp_path):
    k = klvae_from(diffusers_vae("sd1", **NARROW), family="sd1")
    save_file({n: v.contiguous() for n, v in k.state_dict().items()}, str(tmp_path / "a.safetensors"),
              metadata={"modelspec.title": "my vae", "klvae.family": "sd1"})
    load_vae(tmp_path / "a.safetensors").save(tmp_path / "b.safetensors")
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as h:
        meta = h.metadata()
    assert meta["modelspec.title"] == "my vae" and meta["klvae.family"] == "sd1"
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "b.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # safetensors alone: 0600
    assert not list(tmp_path.glob(".*partial"))
