"""What ships with klvae, by name: the demo VAE (a small trained KL VAE: models/MODEL_CARD.md) and
the demo photo, so that examples, the nodes and a first script run with nothing downloaded."""
from pathlib import Path

MODELS = Path(__file__).resolve().parents[1] / "models"
DEMO_VAE = MODELS / "klvae-demo-f8c4.safetensors"   # SD1 conventions: 4 latent channels, f8
DEMO_PHOTO = MODELS / "demo_photo.png"              # scikit-image's chelsea.png (CC0), held out from training


def shipped_vaes() -> list:
    """Every VAE file that ships in models/ (the names the ComfyUI loader offers besides models/vae)."""
    return sorted(p for p in MODELS.glob("*.safetensors"))
