"""What ships with klvae, by name: the demo VAEs (small trained KL VAEs: models/MODEL_CARD.md) and
the demo photo, so that examples, the nodes and a first script run with nothing downloaded."""
from pathlib import Path

MODELS = Path(__file__).resolve().parents[1] / "models"
# The demo VAE: Flux.1's conventions (16 latent channels, f8, a shift), true colours on photographs.
DEMO_VAE = MODELS / "klvae-demo-f8c16.safetensors"
# SD 1.x's conventions (4 latent channels, f8, quant convs): what the SD-family tests load; it shifts hue.
DEMO_VAE_SD1 = MODELS / "klvae-demo-f8c4.safetensors"
DEMO_PHOTO = MODELS / "demo_photo.png"              # scikit-image's chelsea.png (CC0), held out from training


def shipped_vaes() -> list:
    """Every VAE file that ships in models/ (the names the ComfyUI loader offers besides models/vae)."""
    return sorted(p for p in MODELS.glob("*.safetensors"))
