"""klvae: KL autoencoder (SD1.x/2.x, SDXL, SD3, Flux.1 VAE) library and ComfyUI node pack.

This file is what ComfyUI imports when the repo sits in custom_nodes/; it only registers nodes and
imports cleanly without ComfyUI. The library itself is `klvae.vae` (plain torch).
"""
__version__ = "0.1.0"
