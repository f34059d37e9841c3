"""Which dtype a VAE runs in. One place decides; everything else asks here."""
import torch

from .errors import KLVAEError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "gpu":
        device = "cuda"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KLVAEError(f"device {device} requested but this machine has no usable CUDA device: use 'auto' or 'cpu'")
    return device


def resolve_dtype(dtype, device) -> torch.dtype:
    """'auto': bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        device = torch.device(device)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise KLVAEError(f"unknown dtype {dtype!r}: use one of auto, fp32, fp16, bf16") from None
