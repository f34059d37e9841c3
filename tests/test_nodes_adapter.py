"""nodes/adapter.py without a host: the VAE object core nodes call, and the node work."""
import pytest
import torch

from klvae.testing import NARROW, diffusers_vae, klvae_from
from klvae.nodes import adapter
from klvae.vae import KLVAEError


@pytest.fixture(scope="module")
def kl():
    return adapter.KLVAE(klvae_from(diffusers_vae("sd1", seed=2, **NARROW), family="sd1"))


def test_core_tiled_calls_map_to_exact_tiles(kl):
    z = torch.randn(1, 4, 20, 20, generator=torch.Generator().manual_seed(0))
    full = kl.decode(z)
    tiled = kl.decode_tiled(z, tile_x=16, tile_y=16, overlap=2)  # core passes latent px
    r = kl.model.last_tiling
    # exact (not "auto", which could fall back to estimated statistics): bands of a 128 px tile's area
    assert r.mode == "exact" and r.tile_size == 128 and r.grid == (2, 1) and r.store == "device"
    assert not any("overlap" in n for n in r.notes)  # core's blending overlap is not needed, not passed on, not logged
    assert tiled.shape == (1, 160, 160, 3) and (tiled - full).abs().max() < 1e-4
    img = torch.rand(1, 160, 160, 3, generator=torch.Generator().manual_seed(1))
    z_tiled = kl.encode_tiled(img, tile_x=96, tile_y=128, overlap=16)  # core passes image px
    r = kl.model.last_tiling
    assert r.mode == "exact" and r.tile_size == 96 and r.grid[0] > 1
    assert (z_tiled - kl.encode(img)).abs().max() < 1e-4
    assert kl.spacial_compression_decode() == kl.downscale_ratio == 8 and kl.temporal_compression_decode() is None


def test_encode_crops_like_core_and_keeps_conventions(kl):
    img = torch.rand(2, 67, 90, 4)  # RGBA, sides not multiples of 8
    z = kl.encode(img)
    assert z.shape == (2, 4, 8, 11) and z.dtype == torch.float32
    ref = kl.model.encode(img[:, 1:65, 1:89, :3].movedim(-1, 1) * 2 - 1).mode()  # centre crop, alpha dropped
    assert torch.allclose(z, ref, atol=1e-5)
    out = kl.decode(z)
    assert out.shape == (2, 64, 88, 3) and 0 <= out.min() and out.max() <= 1 and out.is_contiguous()
    grey = kl.encode(torch.rand(1, 16, 16, 1))
    assert grey.shape == (1, 4, 2, 2)
    s1, s2 = adapter.encode(kl, img, "sample", 3), adapter.encode(kl, img, "sample", 3)
    assert torch.equal(s1["samples"], s2["samples"]) and not torch.equal(s1["samples"], z)
    sd = kl.get_sd()
    assert "decoder.conv_in.weight" in sd and all(v.is_contiguous() for v in sd.values())


def test_auto_decodes_untiled_when_the_plan_fits(kl):
    z = torch.randn(1, 4, 32, 32)
    steps = []
    kl.decode_image(z, adapter.Tiling(mode="auto", progress=lambda d, t: steps.append((d, t))))
    assert kl.model.last_tiling.mode == "untiled" and steps == [(0, 1), (1, 1)]  # the plain pass ran
    whole = kl.model.plan_decode(z.shape, adapter.Tiling(mode="auto", memory_budget=2**40))
    assert whole.mode == "untiled"
    kl.decode_image(z, adapter.Tiling(mode="auto", memory_budget=int(0.8 * whole.predicted)))
    r = kl.model.last_tiling
    assert r.mode == "exact" and r.n_tiles > 1 and r.predicted_peak <= 0.8 * whole.predicted


class FakeHostVAE:
    """What ComfyUI's VAELoader returns for a TAESD: a comfy.sd.VAE whose model is a TAESD."""
    def __init__(self, inner):
        self.first_stage_model = inner
        self.latent_channels = 4


def test_non_kl_host_vaes_are_refused_with_what_they_are():
    TAESD = type("TAESD", (torch.nn.Module,), {"__module__": "comfy.taesd.taesd"})
    with pytest.raises(KLVAEError, match=r"ArgMax only supported for AutoencoderKL .*got a TAESD"):
        adapter.encode(FakeHostVAE(TAESD()), torch.rand(1, 8, 8, 3), what="ArgMax")
    with pytest.raises(KLVAEError, match="without a model"):
        adapter.as_klvae(FakeHostVAE(None))
    with pytest.raises(KLVAEError, match="expected a LATENT"):
        adapter.decode(FakeHostVAE(TAESD()), torch.zeros(1, 4, 2, 2))
    with pytest.raises(KLVAEError, match="unknown tiling mode"):
        adapter.Tiling(mode="fast")


def test_host_kl_vaes_convert_once(kl):
    AutoencoderKL = type("AutoencoderKL", (torch.nn.Module,), {})

    class HostVAE(FakeHostVAE):
        device, vae_dtype = torch.device("cpu"), torch.float32

        def get_sd(self):
            return kl.get_sd()

    host = HostVAE(AutoencoderKL())
    a, b = adapter.as_klvae(host), adapter.as_klvae(host)
    assert a is b and a is not kl
    z = torch.randn(1, 4, 4, 4)
    assert torch.equal(a.decode(z), kl.decode(z))


def test_node_errors_name_inputs_and_settings_not_python_arguments(kl, tmp_path):
    """A node error is read in ComfyUI: it names the KLVAE_SPILL_DIR setting and the tiling input, not
    Tiling(spill_dir=...), mode='bounded' or the CLI's flags."""
    z = torch.randn(1, 4, 8, 8)
    with pytest.raises(KLVAEError) as e:
        kl.decode_image(z, adapter.Tiling(mode="exact", store="disk", spill_dir=str(tmp_path / "gone")))
    msg = str(e.value)
    assert "KLVAE_SPILL_DIR environment variable" in msg and "does not exist" in msg, msg
    assert "Tiling(" not in msg and "--" not in msg and "klvae " not in msg, msg
    assert isinstance(e.value.__cause__, KLVAEError)  # the library's words, chained
    with pytest.raises(KLVAEError, match="is a PNG image, not a VAE") as e:
        (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
        adapter.load(tmp_path / "x.png")
    assert "klvae encode" not in str(e.value)


def test_wan_clips_through_the_nodes_as_core_passes_them(caplog):
    """A video network's LATENT [1, 16, T, h, w] decodes to its frames [T', H, W, 3], as core's VAE
    Decode gives them (exact: the library's untiled clip to float noise); an IMAGE batch encodes as
    the frames of one clip, as core's WanVAE takes it (1 + 4k of them: the rest left out, and the log
    says so); core's VAE Decode (Tiled) with its temporal inputs: exact, and they are said unused."""
    k = klvae_from(diffusers_vae("qwenimage", seed=22, ch=16, ch_mult=(1, 2, 2, 2)))
    kl = adapter.KLVAE(k)
    assert kl.not_video is False and kl.temporal_compression_decode() == 4 and kl.latent_dim == 3
    z = torch.randn(1, 16, 3, 6, 5, generator=torch.Generator().manual_seed(3))
    ref = ((k.decode(z) + 1) / 2).clamp(0, 1)[0].permute(1, 2, 3, 0)  # [9, 48, 40, 3]
    seen = []
    host = type("H", (adapter.Host,), {"progress": lambda self: lambda done, total: seen.append((done, total))})()
    frames = adapter.decode(adapter.KLVAE(k, host), {"samples": z}, host=host)
    assert frames.shape == (9, 48, 40, 3) and (frames - ref).abs().max() <= 1e-5
    assert k.last_tiling.mode == "exact" and k.last_tiling.chunks == 3 and seen[-1] == (3, 3)
    with caplog.at_level("INFO", logger="klvae"):
        tiled = kl.decode_tiled(z, tile_x=2, tile_y=2, overlap=1, tile_t=16, overlap_t=2)  # core's node: latent units
    assert (tiled - ref).abs().max() <= 1e-5 and k.last_tiling.grid[0] > 1
    assert "temporal_size and temporal_overlap are not used" in caplog.text
    eleven = torch.cat([frames, frames[:2]])
    with caplog.at_level("INFO", logger="klvae"):
        lat = adapter.encode(kl, eleven)["samples"]
    assert "11 frames encode as 9 (1 + 4k): the last 2 left out" in caplog.text
    lib = k.encode(frames.movedim(-1, 0)[None] * 2 - 1).mode()
    assert lat.shape == (1, 16, 3, 6, 5) and (lat - lib).abs().max() <= 1e-5
    one = adapter.encode(kl, frames[:1])["samples"]  # one image: T = 1, as before
    assert one.shape == (1, 16, 1, 6, 5) and (one - lat[:, :, :1]).abs().max() <= 1e-5
