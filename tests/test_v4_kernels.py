"""kernels/fp4.py bit for bit against the independent decoders of tests/v4_ref.py (written from the format facts):
E8M0, FP4 -> BF16 for every byte at every scale, FP4 -> FP8 lossless where the block's exponents allow and refused
exactly where they do not, the FP4 quantizer synth uses; and, when ``DSV4_UPSTREAM_DIR`` points at a copy of the
official ``inference/`` folder, FP4 -> FP8 against the official converter's own function."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
from v4_ref import E2M1, E8M0, bits_equal, fp4_values, fp8_values

from dsv3_tools.kernels import fp4 as F


def test_e8m0_every_byte() -> None:
    e = torch.arange(256, dtype=torch.uint8)
    got = F.e8m0_to_f32(e).double()
    assert torch.equal(got[:255], E8M0[:255]) and math.isnan(got[255])
    # torch's own float8_e8m0fnu conversion agrees (format-v4.md 3.2: 0 -> 2**-127, 255 -> NaN)
    assert bits_equal(F.e8m0_to_f32(e)[:255], e.view(torch.float8_e8m0fnu).float()[:255])
    pow2 = torch.tensor([2.0**-127, 2.0**-1, 1.0, 2.0**127])
    assert F.f32_to_e8m0(pow2).tolist() == [0, 126, 127, 254]
    for bad in (0.75, 0.0, 2.0**-128, float("inf")):
        with pytest.raises(ValueError):
            F.f32_to_e8m0(torch.tensor([bad]))


def test_dequant_fp4_every_byte_at_every_scale() -> None:
    """All 256 bytes x all 256 scale bytes: both the reference and the fast path give the BF16 of the exact value
    (NaN for scale 255, inf where the product leaves BF16's range)."""
    packed = torch.arange(256, dtype=torch.uint8).repeat(256, 1).view(torch.int8)  # row e: every byte
    scale = torch.arange(256, dtype=torch.uint8).view(256, 1).expand(256, 16).contiguous()
    want = fp4_values(packed, scale).to(torch.bfloat16)  # exact values: one rounding is no rounding
    assert bits_equal(F.dequant_fp4_ref(packed, scale), want)
    assert bits_equal(F.dequant_fp4(packed, scale), want)
    # the sign of zero is kept: nibble 8 is -0
    neg_zero = torch.full((1, 16), 0x88, dtype=torch.uint8).view(torch.int8)
    for f in (F.dequant_fp4, F.dequant_fp4_ref):
        z = f(neg_zero, scale[:1, :1])
        assert bool((z == 0).all()) and bool(torch.signbit(z).all())


def test_fp4_packing_and_group_scales() -> None:
    """Low nibble first along the input dim; scale g covers columns 32g .. 32g+31."""
    packed = torch.zeros(1, 32, dtype=torch.uint8)
    packed[0, 0] = 0x71  # column 0: nibble 1 (0.5), column 1: nibble 7 (6)
    packed[0, 16] = 0xA2  # column 32: nibble 2 (1), column 33: nibble 10 (-1)
    scale = torch.tensor([[127, 130]], dtype=torch.uint8)  # 1 and 8
    got = F.dequant_fp4(packed.view(torch.int8), scale).float()
    assert got[0, :2].tolist() == [0.5, 6.0] and got[0, 32:34].tolist() == [8.0, -8.0]
    g = torch.Generator().manual_seed(1)
    p = torch.randint(-128, 128, (96, 160), dtype=torch.int8, generator=g)
    s = torch.randint(100, 150, (96, 10), dtype=torch.uint8, generator=g)
    assert bits_equal(F.dequant_fp4(p, s), fp4_values(p, s).to(torch.bfloat16))
    assert not F.fp4_overflows(p, s)
    assert F.fp4_overflows(p, torch.full_like(s, 254)) and F.fp4_overflows(p, torch.full_like(s, 255))


def _blocks_exact(packed: torch.Tensor, scale: torch.Tensor) -> set[tuple[int, int]]:
    """The blocks the official rule cannot encode, decided here from the values: with the block scale 2**(e_max - 6)
    (E8M0 bytes), a value is exact in e4m3 iff value / block scale is a multiple of 2**-9 (below 448 it always is)."""
    v = fp4_values(packed, scale)
    rows, cols = v.shape
    out = set()
    for bi in range(rows // 128):
        for bj in range(cols // 128):
            blk = scale.view(torch.uint8)[bi * 128 : (bi + 1) * 128, bj * 4 : (bj + 1) * 4].long()
            new = max(int(blk.max()) - 6, 0)
            q = v[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128] / E8M0[new] * 2**9
            if not bool(torch.equal(q, q.round())):
                out.add((bi, bj))
    return out


def _scales(g: torch.Generator, rows: int, groups: int, spread: int) -> torch.Tensor:
    """E8M0 group scales whose exponents span exactly ``spread`` within every 128x128 block."""
    e = 100 + torch.randint(0, spread + 1, (rows, groups), generator=g)
    e[::128, ::4] = 100
    e[1::128, ::4] = 100 + spread
    return e.to(torch.uint8)


@pytest.mark.parametrize("spread", [0, 6, 14])
def test_fp4_to_fp8_lossless(spread: int) -> None:
    g = torch.Generator().manual_seed(spread)
    packed = torch.randint(-128, 128, (256, 192), dtype=torch.int8, generator=g)  # [256, 384]
    scale = _scales(g, 256, 12, spread)
    assert F.inexact_blocks(packed, scale) == [] and _blocks_exact(packed, scale) == set()
    q, s = F.fp4_to_fp8(packed, scale)
    qr, sr = F.fp4_to_fp8_ref(packed, scale)
    assert bits_equal(q, qr) and bits_equal(s, sr)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (256, 384) and s.shape == (2, 3)
    # decode both and compare exactly, the sign of zero included
    assert bits_equal(fp8_values(q, s), fp4_values(packed, scale))


def test_fp4_to_fp8_refuses_exactly_the_inexact_blocks() -> None:
    g = torch.Generator().manual_seed(7)
    packed = torch.full((256, 128), 0x22, dtype=torch.uint8)  # every value 1.0: exact down to a spread of 15
    scale = torch.full((256, 8), 120, dtype=torch.uint8)
    scale[0, 0] = 135  # block (0, 0): spread 15; its group at 120 holds only 1.0 -> 1 * 2**-9 is exact
    scale[128, 4] = 135  # block (1, 1): spread 15, and a 0.5 planted in a group at 120: 2**-10 is not
    packed[129, 64] = 0x21  # row 129, columns 128, 129: 0.5, 1.0 (block (1, 1), group at 120)
    scale[0, 4] = 137  # block (0, 1): spread 17, a 1.0 at 120: 2**-11 is not exact either
    assert _blocks_exact(packed.view(torch.int8), scale) == {(1, 1), (0, 1)}
    assert sorted(F.inexact_blocks(packed.view(torch.int8), scale)) == [(0, 1), (1, 1)]
    ok = scale.clone()
    ok[128, 4], ok[0, 4] = 120, 120
    q, s = F.fp4_to_fp8(packed.view(torch.int8), ok)
    assert F.inexact_blocks(packed.view(torch.int8), ok) == []
    assert bits_equal(fp8_values(q, s), fp4_values(packed.view(torch.int8), ok))
    # random spreads 15-20: the criterion agrees with the values block by block
    for seed in range(3):
        g.manual_seed(seed)
        p = torch.randint(-128, 128, (256, 256), dtype=torch.int8, generator=g)
        p.view(torch.uint8)[:, ::3] &= 0xEE  # more codes whose lowest bit is high (1, 2, 4, 6 and zeros)
        s = _scales(g, 256, 16, 15 + seed * 2)
        assert set(F.inexact_blocks(p, s)) == _blocks_exact(p, s)
        q, sq = F.fp4_to_fp8(p, s)
        qr, sqr = F.fp4_to_fp8_ref(p, s)
        assert bits_equal(q, qr) and bits_equal(sq, sqr)


def test_quant_fp4_rule_and_rounding() -> None:
    """Scale 2**ceil(log2(amax / 6)) per group (floored), values rounded to the nearest e2m1, ties to even codes."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 64, generator=g) * torch.exp2(torch.randint(-20, 20, (4, 1), generator=g).float())
    x[0, :32] = 0.0
    x[1, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, 6.0] + [0.0] * 22)  # ties
    packed, scale = F.quant_fp4_ref(x)
    mags = E2M1[:8].tolist()
    for r in range(4):
        for grp in range(2):
            blk = x[r, grp * 32 : (grp + 1) * 32].double()
            amax = max(float(blk.abs().max()), 6 * 2.0**-126)
            e = math.ceil(math.log2(amax / 6))
            assert int(scale[r, grp]) == e + 127
            for i in range(32):
                y = float(blk[i]) / 2.0**e
                best = min(range(8), key=lambda c: (abs(abs(y) - mags[c]), c % 2))  # nearest, then even code
                code = best | (8 if math.copysign(1.0, y) < 0 else 0)
                col = grp * 32 + i
                byte = int(packed.view(torch.uint8)[r, col // 2])
                assert (byte >> (4 * (col % 2))) & 0xF == code, (r, col, y)


def _official_convert():
    root = os.environ.get("DSV4_UPSTREAM_DIR")
    if not root:
        pytest.skip("DSV4_UPSTREAM_DIR is not set (a copy of DeepSeek-V4's inference/ folder)")
    spec = importlib.util.spec_from_file_location("dsv4_upstream_convert", Path(root) / "convert.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fp4_to_fp8_matches_the_official_converter() -> None:
    """The official ``cast_e2m1fn_to_e4m3fn`` gives the same bytes, except that its table maps nibble 8 (-0) to +0
    where this keeps the sign (both are the value zero)."""
    official = _official_convert()
    g = torch.Generator().manual_seed(11)
    packed = torch.randint(-128, 128, (256, 256), dtype=torch.int8, generator=g)
    scale = _scales(g, 256, 16, 14)
    want_q, want_s = official.cast_e2m1fn_to_e4m3fn(packed, scale.view(torch.float8_e8m0fnu))
    q, s = F.fp4_to_fp8(packed, scale)
    ours = q.view(torch.uint8).clone()
    ours[ours == 0x80] = 0x00
    assert torch.equal(ours, want_q.view(torch.uint8)) and torch.equal(s, want_s.view(torch.uint8))
