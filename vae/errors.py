class KLVAEError(ValueError):
    """The one exception klvae raises for bad input: a one-line message naming the problem and the fix."""


class Interrupted(RuntimeError):
    """Raised between band steps when Tiling(interrupt=...) says stop."""
