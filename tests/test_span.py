"""A residual that spans several layers (verbs.residual around whole layers, layers.SpanStep): the
blocks of Wan 2.2's and Qwen-Image 2.1's VAEs, `x + shortcut(x)` around two resnets and a
resample, the shortcut a space-to-channel mean or a channel repeat then channel-to-space. On a
small network of our own (klvae.testing.SpanNet): the exact engine (device and disk stores, bands
of a few rows, the block's input kept alive across its layers) equals the untiled pass with
GroupNorm resnets and with RMS ones; bounded mode streams RMS blocks exactly in strips and bands;
the plan prices what the engine keeps alive. (Two processes: tests/test_distributed.py.)"""
import pytest
import torch

from klvae.testing import SpanNet
from klvae.vae import bounded, verbs
from klvae.vae.layers import steps_of
from klvae.vae.tiling import Tiling, execute, make_plan

F = 4  # SpanNet's scale


def run(net, direction, x, **tiling):
    B, C, H, W = x.shape
    shape = (B, C, H, W) if direction == "decode" else (B, 4, H // F, W // F)
    p = make_plan(net, direction, C, shape, x.dtype, x.device, Tiling(**tiling), F)
    with torch.no_grad():
        return execute(net, x, p)


def inputs(direction, B=1, h=10, w=14):
    """Latent h x w (10 x 14: odd band boundaries at every resolution)."""
    g = torch.Generator().manual_seed(7)
    if direction == "decode":
        return torch.randn(B, 4, h, w, generator=g)
    return torch.rand(B, 3, F * h, F * w, generator=g) * 2 - 1


@pytest.mark.parametrize("kind", ["group", "rms"])
@pytest.mark.parametrize("direction", ["decode", "encode"])
def test_exact_engine_equals_untiled_through_spanning_residuals(direction, kind, tmp_path):
    net = SpanNet(direction, kind).eval()
    x = inputs(direction, B=2)
    with torch.no_grad():
        full = net(x)
    steps = steps_of(net.layers(), x.shape[1], 1 if direction == "decode" else F)
    spans = [s for s in steps if type(s).__name__ == "SpanBlockStep"]
    assert len(spans) == 2 and all(s.r_out != s.r_in for s in spans)
    assert all(isinstance(verbs.sequence(s.describe())[0], verbs.Residual) for s in spans)
    for store in ("device", "disk"):
        seen = []
        out, report = run(net, direction, x, mode="exact", tile_size=8, store=store, spill_dir=str(tmp_path),
                          progress=lambda done, total: seen.append((done, total)))
        assert report.grid[0] >= 8 and report.store == store
        assert out.shape == full.shape and (out - full).abs().max().item() <= 1e-5, (store, report)
        assert seen[-1][0] == seen[-1][1] == report.steps > len(steps)  # every band pass counted, as planned
        # the plan prices what the engine keeps alive: the block's input across its inner layers
        assert report.store_bytes <= report.plan.store_bytes <= 1.3 * report.store_bytes, report
    assert list(tmp_path.iterdir()) == []


def test_the_plan_prices_the_blocks_input_kept_alive():
    """The exact engine's largest set of live stores is inside the second up block, during its
    upsample: the block's input (8 ch at 2x), the last resnet's output (8 ch at 2x) and the block's
    output (8 ch at 4x); the plan predicts that sum. An engine that freed the block's input early,
    or a plan that did not price it, fails here."""
    net = SpanNet("decode", "group").eval()
    x = inputs("decode")
    _, report = run(net, "decode", x, mode="exact", tile_size=8)
    B, _, h, w = x.shape
    unit = B * h * w * 4  # bytes of one fp32 channel at the latent resolution
    assert report.store_bytes == unit * (8 * 4 + 8 * 4 + 8 * 16)
    assert report.plan.store_bytes == report.store_bytes


@pytest.mark.parametrize("direction", ["decode", "encode"])
def test_bounded_mode_streams_spanning_residuals_exactly(direction):
    """RMS norms need no statistics, so bounded mode's strips and bands are exact: the spanning
    residual's shortcut rows are streamed beside its branch and added as the branch's rows arrive."""
    net = SpanNet(direction, "rms").eval()
    x = inputs(direction, h=64, w=8)  # tall and narrow: many bands of one strip
    with torch.no_grad():
        full = net(x)
    out, report = run(net, direction, x, mode="bounded", tile_size=8)
    assert report.mosaic_lattice == () and report.grid[0] > 1, report
    assert (out - full).abs().max().item() <= 1e-5, report
    tiled = bounded.split(steps_of(net.layers(), x.shape[1], 1 if direction == "decode" else F), direction)[1]
    assert any(type(s).__name__ == "SpanBlockStep" for s in tiled)


def test_the_halo_and_lag_of_a_spanning_block_come_from_its_description():
    net = SpanNet("decode", "group").eval()
    steps = steps_of(net.layers(), 4, 1)
    block = next(s for s in steps if type(s).__name__ == "SpanBlockStep")
    # the upsample's conv reads one row at 2x (one low-resolution row), each resnet two more; the
    # shortcut (a channel repeat, cell by cell) reads none
    assert block.halo(0) == 1 + 2 + 2 and block.reach == 1
    assert block.lag(0) == 2 * (2 + 2) + 1


def test_a_spanning_block_streams_row_by_row_in_any_chunks_and_strips():
    """bounded mode's machinery on one block: statistics recorded on the whole input, then rows
    pushed in uneven chunks over strips that start on odd and even columns. Every output row comes
    out once, in order, equal to the module's (the shortcut's cells and the branch's rows meet)."""
    from klvae.testing import SpanBlock
    from klvae.vae.bounded import Streamer
    from klvae.vae.ops import Progress, Scratch, Tile
    g = torch.Generator().manual_seed(1)
    SpanNet("decode")  # registers SpanBlock's Step
    for up in (True, False):
        torch.manual_seed(2)
        block = SpanBlock(8, 8 if up else 16, up, "group").eval()
        x = torch.randn(1, 8, 14, 18, generator=g)
        step = steps_of([block], 8, 4)[0]
        with torch.no_grad():
            ref = block(x)
            H, W = x.shape[2:]
            stats = []
            rec = Streamer(stats, True, Progress(0), Scratch()).build(step.describe()).push(Tile(x, 0, H, 0, W, H, W, 4))
            assert (rec.data - ref).abs().max().item() <= 1e-5
            for chunks, (x0, x1) in (([1], (0, W)), ([2, 1, 3], (3, W - 2)), ([5], (2, 13)), ([4, 7], (1, 14))):
                op = Streamer(stats, False, Progress(0), Scratch()).build(step.describe())
                parts, y, n = [], 0, 0
                while y < H:
                    y1 = min(H, y + chunks[n % len(chunks)])
                    out = op.push(Tile(x[:, :, y:y1, x0:x1], y, y1, x0, x1, H, W, 4))
                    parts += [out] if out is not None else []
                    y, n = y1, n + 1
                rows = [r for p in parts for r in range(p.y0, p.y1)]
                assert rows == list(range(ref.shape[2])), (up, chunks, rows)
                for p in parts:
                    assert (p.data - ref[:, :, p.y0:p.y1, p.x0:p.x1]).abs().max().item() <= 1e-5, (up, chunks)


@pytest.mark.parametrize("kind", ["device", "host", "disk"])
def test_stores_and_statistics_carry_a_time_extent(kind, tmp_path):
    """Room for clips: a store holds [B, C, T, H, W] and is read and written in bands of rows of
    every frame; GroupNorm statistics take a clip's frames as more rows. (The video issue adds time
    chunks and causal caches to the engines; no layer type changes.)"""
    from klvae.vae.engine import Store
    from klvae.vae.groupnorm import Stats
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, 11, 7, generator=g)
    s = Store(kind, x.shape, x.dtype, torch.device("cpu"), str(tmp_path), held=(2, 9))
    for a, b in ((2, 6), (6, 9)):
        s.write(a, x[:, :, :, a:b])
    assert s.H == 11 and s.nbytes == 2 * 5 * 3 * 7 * 7 * 4
    assert torch.equal(s.rows(2, 9), x[:, :, :, 2:9])
    assert torch.equal(s.add_(4, x[:, :, :, 4:6].clone()), 2 * x[:, :, :, 4:6])
    assert torch.equal(s.rows(4, 6), 2 * x[:, :, :, 4:6])
    st = Stats()
    for a, b in ((0, 4), (4, 11)):  # two bands of rows over every frame
        st.add(x[:, :, :, a:b].contiguous(memory_format=torch.channels_last_3d))
    assert st.n == 3 * 11 * 7
    assert torch.allclose(st.mean, x.double().mean(dim=(2, 3, 4)))
    assert torch.allclose(st.m2 / st.n, x.double().var(dim=(2, 3, 4), unbiased=False))
