"""klvae: KL autoencoder (SD1.x/2.x, SDXL, SD3, Flux.1, Flux.2, Qwen-Image, HunyuanImage-2.1 VAE) library
and ComfyUI node pack.

ComfyUI imports this file when the repo sits in custom_nodes/ (or is installed from the Comfy
Registry). It registers the nodes through the V3 API only, and lazily: nothing ComfyUI-specific is
imported until the host calls `comfy_entrypoint`, so `import klvae` works anywhere. The library
itself is `klvae.vae` (plain torch).
"""
__version__ = "0.1.0"
# The frontend's node help pages (web/docs/<node id>.md), served under /extensions/klvae/.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """ComfyUI's V3 registration hook (ComfyUI >= 0.3.4x; no V1 NODE_CLASS_MAPPINGS alongside:
    a host that finds both ignores V3)."""
    from .nodes.host import KLVAEExtension

    return KLVAEExtension()
