"""Hostile files and absurd inputs: one clear error, never a hang, never a crash (tests/fuzz.py)."""
import time

import pytest
import torch
from safetensors.torch import save_file

import fuzz
from klvae.testing import NARROW, diffusers_vae, klvae_from
from klvae.vae import KLVAEError, load_vae

SEED, CASES = 20261130, 280


def test_fuzz_cases_give_klvae_errors_only():
    """Seeded cases over every family (malformed safetensors headers and tensors, pickles and
    payloads, diffusers folders, metadata, arguments, decode inputs, tiling options), in worker
    processes with a time and a memory limit: each either works or raises KLVAEError with one line;
    no other exception, no hang, no crash, no pickle payload ran."""
    results = fuzz.run(SEED, CASES, workers=2, case_timeout=20.0, mem_limit=3 * 2**30)
    print("\n" + fuzz.table(results))
    assert len(results) == CASES
    bad = [r for r in results if r["outcome"] in fuzz.BAD]
    assert not bad, "\n".join(f"case {r['case']} {r['category']}/{r['kind']}: {r['outcome']} {r['detail']}"
                              for r in bad[:20])
    for cat in fuzz.CATEGORIES:  # the generator reaches every family, and klvae refuses there
        assert sum(r["outcome"] == "klvae" and r["category"] == cat for r in results) >= 20, cat


def test_absurd_block_indices_are_refused_at_once(tmp_path):
    """The 40-byte denial of service: two extra keys asking for 10^8 resnet blocks."""
    sd = {k: v.contiguous() for k, v in klvae_from(diffusers_vae("sd1", **NARROW), family="sd1").state_dict().items()}
    sd["encoder.down.0.block.99999999.conv1.weight"] = torch.zeros(1)
    sd["decoder.up.0.block.100000000.conv1.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "dos.safetensors"))
    t0 = time.perf_counter()
    with pytest.raises(KLVAEError, match=r"has the index (99999999|100000000), beyond any KL VAE") as e:
        load_vae(tmp_path / "dos.safetensors")
    assert time.perf_counter() - t0 < 0.5 and "\n" not in str(e.value)


@pytest.mark.parametrize("key,value,words", [
    ("klvae.norm_groups", "0", "norm_groups is 0"), ("klvae.norm_groups", "banana", "expected a whole number"),
    ("klvae.norm_groups", "1e9", "expected a whole number"), ("klvae.norm_groups", "-1", "norm_groups is -1"),
    ("klvae.scaling_factor", "banana", "not a number"), ("klvae.scaling_factor", "nan", "finite number"),
    ("klvae.scaling_factor", "0", "scaling_factor is 0.0"), ("klvae.latents_mean", "abc", "not a JSON list"),
    ("klvae.family", "banana", "not a family klvae knows"), ("klvae.force_upcast", "no", "true or false"),
])
def test_metadata_values_are_checked(tmp_path, key, value, words):
    k = klvae_from(diffusers_vae("sd1", **NARROW), family="sd1")
    sd = {n: v.contiguous() for n, v in k.state_dict().items()}
    meta = {"klvae.family": "sd1", "klvae.scaling_factor": "0.18215", "klvae.norm_groups": "32", key: value}
    save_file(sd, str(tmp_path / "m.safetensors"), metadata=meta)
    with pytest.raises(KLVAEError, match=words) as e:
        load_vae(tmp_path / "m.safetensors")
    assert "\n" not in str(e.value) and "m.safetensors" in str(e.value)


def test_weights_that_do_not_fit_fp16_or_are_not_finite(tmp_path):
    k = klvae_from(diffusers_vae("sd1", **NARROW), family="sd1")
    sd = {n: v.contiguous().clone() for n, v in k.state_dict().items()}
    sd["decoder.conv_out.weight"].view(-1)[0] = 1e5
    save_file(sd, str(tmp_path / "big.safetensors"), metadata={"klvae.family": "sd1"})
    with pytest.raises(KLVAEError, match=r"beyond fp16's 65504: load it in bf16 or fp32"):
        load_vae(tmp_path / "big.safetensors", dtype="fp16")
    assert torch.isfinite(load_vae(tmp_path / "big.safetensors", dtype="bf16").decoder.conv_out.weight).all()
    sd["decoder.conv_out.weight"].view(-1)[0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(KLVAEError, match="NaN or Inf"):
        load_vae(tmp_path / "nan.safetensors")
    sd["decoder.conv_out.weight"] = sd["decoder.conv_out.weight"].to(torch.int8)
    save_file(sd, str(tmp_path / "int8.safetensors"))
    with pytest.raises(KLVAEError, match="stored as torch.int8"):
        load_vae(tmp_path / "int8.safetensors")
