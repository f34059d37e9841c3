class KLVAEError(ValueError):
    """The one exception klvae raises for bad input: a one-line message naming the problem and the fix."""
    # ComfyUI imports a node pack under its folder's path and shows an error's type by module:
    # "/.../custom_nodes/klvae.vae.errors.KLVAEError" without this, "klvae.vae.errors.KLVAEError" with it.
    __module__ = "klvae.vae.errors"


class Interrupted(RuntimeError):
    """Raised between band steps when Tiling(interrupt=...) says stop."""
    __module__ = "klvae.vae.errors"
