"""ComfyUI nodes (V3 API). The only klvae module that imports ComfyUI (`comfy`, `comfy_api`,
`folder_paths`); the root __init__.py imports it lazily from `comfy_entrypoint`, so the package
imports cleanly outside ComfyUI. The work itself is in nodes/adapter.py.
"""
import torch
from typing_extensions import override

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
from comfy_api.latest import ComfyExtension, io

from . import adapter
from .adapter import KLVAE
from ..vae import DEFAULT_MODE, FAMILIES, Tiling
from ..vae.config import family_titles
from ..vae.shipped import shipped_vaes
from ..vae.tiling import MODES

CATEGORY = "latent/klvae"
DTYPES = ["auto", "fp32", "fp16", "bf16"]
DEVICES = ["auto", "cpu", "gpu"]


class ComfyHost(adapter.Host):
    """ComfyUI's services: its device/dtype policy, memory manager, progress bar and cancel button."""

    def device(self, choice):
        return mm.vae_device() if choice == "auto" else super().device(choice)

    def offload_device(self, device):
        return device if device.type == "cpu" else mm.vae_offload_device()

    def dtype(self, choice, device):
        # Under "auto" the host decides (its --fp16-vae / --bf16-vae / --fp32-vae flags included).
        return mm.vae_dtype(device, [torch.bfloat16, torch.float32]) if choice == "auto" else super().dtype(choice, device)

    def output_device(self):
        return mm.intermediate_device()

    def manage(self, vae: KLVAE):
        # A module holding ours: the patcher sets `.device` on what it manages, which on
        # AutoencoderKL is a read-only property. Its class name is what the log's "Requested to load"
        # line shows (core shows AutoencoderKL, WanVAE, ...).
        holder = KLVAEAutoencoder()
        holder.vae = vae.model
        return comfy.model_patcher.ModelPatcher(holder, load_device=vae.load_device, offload_device=vae.model.device)

    def load(self, vae: KLVAE, need):
        # Unloads other models (the diffusion model too) as needed, then moves our weights. Full
        # load: klvae's layers are plain torch and cannot run with weights left on another device.
        mm.load_models_gpu([vae.patcher], memory_required=need, force_full_load=True)
        return int(0.9 * mm.get_free_memory(vae.load_device))

    def progress(self):
        bar = comfy.utils.ProgressBar(1)
        return lambda done, total: bar.update_absolute(done, total)

    def interrupt(self):
        return mm.throw_exception_if_processing_interrupted


HOST = ComfyHost()


class KLVAEAutoencoder(torch.nn.Module):
    """klvae's VAE as ComfyUI's model manager holds it (a named holder, see ComfyHost.manage)."""


def _validate_tiling(tile_size, overlap) -> bool | str:
    """Checked when the prompt is queued (the schema's step is the frontend's, not the server's): a
    multiple of 8 (every family's tile is; a 32x family's finer rule is checked when it runs), or 0."""
    if not 0 <= tile_size <= 8192 or tile_size % 8:
        return f"tile_size {tile_size}: use 0 (the largest that fits) or a multiple of 8 up to 8192, e.g. 512"
    if not 0 <= overlap <= 1024:
        return f"overlap {overlap}: use 0 (the receptive field) to 1024"
    return True


def _tiling_inputs():
    return [
        io.Int.Input("tile_size", default=512, min=0, max=8192, step=8,
                     tooltip="A tile's side in image pixels (multiple of 8); 0: the largest that fits in memory. Exact "
                             "mode runs full-width bands holding as many values as one such tile (1024 px wide, 256: "
                             "bands of 64 rows); the log says how many bands of how many rows."),
        io.Int.Input("overlap", default=0, min=0, max=1024, step=8,
                     tooltip="Bounded mode: context at each strip's sides in image pixels. 0: the network's receptive field, "
                             "the minimum for an exact result; less is raised to it, never blended. Exact mode needs none."),
        io.Combo.Input("tiling", options=list(MODES), default=DEFAULT_MODE,
                       tooltip="exact: the same image as an untiled pass, at about its compute; full-size "
                               "activations live on the device, in RAM or in a spill file (KLVAE_SPILL_DIR), "
                               "whichever the memory plan allows. bounded: GroupNorm statistics from a small "
                               "mosaic, 38-49 dB from untiled; no full-size activation above the latent resolution "
                               "(memory grows with the latent's area only). auto: untiled if the plan fits, else "
                               "exact, else bounded."),
    ]


def _vae_files() -> list:
    """models/vae's files, then the VAEs this pack ships (offered here only: core's VAELoader cannot load them)."""
    own = folder_paths.get_filename_list("vae")
    return own + [p.name for p in shipped_vaes() if p.name not in own]


def _vae_path(name: str) -> str:
    path = folder_paths.get_full_path("vae", name)
    if path is None:
        path = next((str(p) for p in shipped_vaes() if p.name == name), None)
    if path is None:  # as core's loaders say it
        raise FileNotFoundError(f"Model in folder 'vae' with filename '{name}' not found.")
    return path


def _vae_input(tooltip="A VAE: from klvae's loader, or the host's own (a checkpoint loader's or VAELoader's) "
                       "KL autoencoder, converted on first use."):
    return io.Vae.Input("vae", tooltip=tooltip)


class KLVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KLVAELoader", display_name="Load VAE (klvae)", category=CATEGORY,
            description=f"Loads a KL autoencoder ({family_titles()}) from the models/vae folder (or "
                        "the demo VAE this pack ships): LDM, "
                        "ComfyUI or diffusers layout, prefixed checkpoints included; the config is read from the "
                        "weights. A file that is not a VAE fails here, with what it is.",
            inputs=[
                io.Combo.Input("vae_name", options=_vae_files(),
                               tooltip="A file in models/vae (.safetensors, .ckpt, .pt, .bin), or the demo VAE this "
                                       "pack ships (klvae-demo-*: a small trained demo model, not your model's VAE)."),
                io.Combo.Input("dtype", options=DTYPES, default="auto",
                               tooltip="Compute dtype. auto: the host's VAE choice (bf16 on GPUs that have it, "
                                       "fp32 on the CPU)."),
                io.Combo.Input("device", options=DEVICES, default="auto",
                               tooltip="Where it computes. auto: the host's VAE device."),
            ],
            outputs=[io.Vae.Output(tooltip="klvae's VAE: for klvae's nodes and core's VAE nodes alike.")],
        )

    @classmethod
    def execute(cls, vae_name, dtype, device) -> io.NodeOutput:
        path = _vae_path(vae_name)
        return io.NodeOutput(adapter.load(path, dtype, device, HOST, name=vae_name))


class KLVAEFromVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KLVAEFromVAE", display_name="Use VAE with klvae", category=CATEGORY,
            description="Turns the host's VAE (e.g. the one bundled in a checkpoint) into a klvae VAE: exact tiling, "
                        "argmax/sampled encodes and klvae's checks, also when wired into core VAE nodes. Only KL "
                        "autoencoders convert; anything else fails with what it is.",
            inputs=[
                _vae_input("The host's VAE, e.g. CheckpointLoaderSimple's VAE output."),
                io.Combo.Input("dtype", options=DTYPES, default="auto",
                               tooltip="Compute dtype. auto: the dtype the host chose for this VAE."),
                io.Combo.Input("device", options=DEVICES, default="auto",
                               tooltip="Where it computes. auto: the host VAE's device."),
            ],
            outputs=[io.Vae.Output(tooltip="The same weights as klvae's VAE: exact tiling, argmax and seeded "
                                           "encodes, checks; for klvae's nodes and core's VAE nodes alike.")],
        )

    @classmethod
    def execute(cls, vae, dtype, device) -> io.NodeOutput:
        return io.NodeOutput(adapter.as_klvae(vae, "Use VAE with klvae", HOST, dtype, device))


class KLVAEEncodeArgMax(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KLVAEEncodeArgMax", display_name="VAE Encode (ArgMax, klvae)", category=CATEGORY,
            description="Encodes to the posterior mode: the deterministic argmax latent (what IC-Light style "
                        f"conditioning needs), for every KL VAE family klvae loads ({', '.join(FAMILIES)}). Tiles "
                        "exactly only when the memory plan says the untiled pass would not fit.",
            inputs=[io.Image.Input("pixels", tooltip="Image to encode; sides are centre-cropped to multiples of 8."),
                    _vae_input()],
            outputs=[io.Latent.Output(tooltip="Raw (unscaled) latent, as core's VAEEncode returns.")],
        )

    @classmethod
    def execute(cls, pixels, vae) -> io.NodeOutput:
        return io.NodeOutput(adapter.encode(vae, pixels, "argmax", host=HOST, what="ArgMax"))


class KLVAEEncodeSample(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KLVAEEncodeSample", display_name="VAE Encode (Sample, klvae)", category=CATEGORY,
            description="Encodes to a seeded sample of the posterior (mean + std * noise): same seed, same latent; "
                        "the noise matches diffusers' latent_dist.sample for a CPU generator of the same seed.",
            inputs=[io.Image.Input("pixels", tooltip="Image to encode; sides are centre-cropped to multiples of 8."),
                    _vae_input(),
                    io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                                 tooltip="Seed of the posterior noise.")],
            outputs=[io.Latent.Output(tooltip="Raw (unscaled) latent.")],
        )

    @classmethod
    def execute(cls, pixels, vae, seed) -> io.NodeOutput:
        return io.NodeOutput(adapter.encode(vae, pixels, "sample", seed, host=HOST, what="Sampled encode"))


class KLVAEEncodeTiled(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KLVAEEncodeTiled", display_name="VAE Encode (Tiled, klvae)", category=CATEGORY,
            description="Tiled encode with GroupNorm statistics shared across tiles: exact mode equals the untiled "
                        "latent (no seams, no colour shift); bounded mode keeps memory flat for huge images.",
            inputs=[io.Image.Input("pixels", tooltip="Image to encode; sides are centre-cropped to multiples of 8."),
                    _vae_input(), *_tiling_inputs(),
                    io.Combo.Input("posterior", options=list(adapter.POSTERIORS), default="argmax",
                                   tooltip="argmax: the posterior mode (deterministic). sample: mean + std * noise."),
                    io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                                 tooltip="Seed of the posterior noise (posterior = sample only).")],
            outputs=[io.Latent.Output(tooltip="Raw (unscaled) latent.")],
        )

    @classmethod
    def validate_inputs(cls, tile_size, overlap) -> bool | str:
        return _validate_tiling(tile_size, overlap)

    @classmethod
    def execute(cls, pixels, vae, tile_size, overlap, tiling, posterior, seed) -> io.NodeOutput:
        t = Tiling(mode=tiling, tile_size=tile_size, overlap=overlap)
        return io.NodeOutput(adapter.encode(vae, pixels, posterior, seed, t, HOST, what="VAE Encode (Tiled)"))


class KLVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KLVAEDecode", display_name="VAE Decode (klvae)", category=CATEGORY,
            description="Decodes a latent. Plans memory before running: untiled when it fits, otherwise exact or "
                        "bounded tiles chosen up front (no out-of-memory first). A latent of the wrong family "
                        "(4 vs 16 channels) or with NaNs fails with what to do.",
            inputs=[io.Latent.Input("samples", tooltip="Raw latent (from a sampler or an encode node)."),
                    _vae_input()],
            outputs=[io.Image.Output(tooltip="Decoded image, [0, 1].")],
        )

    @classmethod
    def execute(cls, samples, vae) -> io.NodeOutput:
        return io.NodeOutput(adapter.decode(vae, samples, host=HOST, what="VAE Decode (klvae)"))


class KLVAEDecodeTiled(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KLVAEDecodeTiled", display_name="VAE Decode (Tiled, klvae)", category=CATEGORY,
            description="Tiled decode with GroupNorm statistics shared across tiles, one pass: exact mode equals "
                        "the untiled image (no seams, no tone shift); bounded mode keeps no full-size activation "
                        "above the latent resolution.",
            inputs=[io.Latent.Input("samples", tooltip="Raw latent (from a sampler or an encode node)."),
                    _vae_input(), *_tiling_inputs()],
            outputs=[io.Image.Output(tooltip="Decoded image, [0, 1].")],
        )

    @classmethod
    def validate_inputs(cls, tile_size, overlap) -> bool | str:
        return _validate_tiling(tile_size, overlap)

    @classmethod
    def execute(cls, samples, vae, tile_size, overlap, tiling) -> io.NodeOutput:
        t = Tiling(mode=tiling, tile_size=tile_size, overlap=overlap)
        return io.NodeOutput(adapter.decode(vae, samples, t, HOST, what="VAE Decode (Tiled, klvae)"))


NODES = [KLVAELoader, KLVAEFromVAE, KLVAEEncodeArgMax, KLVAEEncodeSample, KLVAEEncodeTiled, KLVAEDecode,
         KLVAEDecodeTiled]


class KLVAEExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
