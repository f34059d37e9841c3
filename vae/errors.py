import re


class KLVAEError(ValueError):
    """The one exception klvae raises for bad input: a one-line message naming the problem and the fix."""
    # ComfyUI imports a node pack under its folder's path and shows an error's type by module:
    # "/.../custom_nodes/klvae.vae.errors.KLVAEError" without this, "klvae.vae.errors.KLVAEError" with it.
    __module__ = "klvae.vae.errors"


class Interrupted(RuntimeError):
    """Raised between band steps when Tiling(interrupt=...) says stop."""
    __module__ = "klvae.vae.errors"


def reworded(message: str, table) -> str:
    """A library message in another audience's words: (regex, replacement) pairs applied in order
    (the CLI names flags, the nodes name inputs, where the library names its Python arguments)."""
    for pattern, words in table:
        message = re.sub(pattern, words, message)
    return message
