"""The fused Triton kernel: one read of a group's activations for the moments, extremes, non-finite
counts, float-bit histogram and per-token sums (the per-position statistic's input).

Grid ``(row blocks, channel blocks, sites)``: a program owns ``ROWS`` tokens x ``BLOCK_D`` channels
of one site and walks them in tiles of ``SUB`` tokens. Per tile, per channel: the float64 sum of
the kept finite values gives the tile mean; the powers of the deviations from its float32 rounding
are formed and summed in float32 over the ``SUB`` tokens (the same two-pass scheme as the eager
moments), shifted to the mean in float64 and merged into the program's float64 running sums with
Pébay's formulas. Per token, the same over the ``BLOCK_D`` channels (count, float64 sum, M2). The
histogram is privatised per program: buckets of a dense window of exponents go through
``tl.histogram`` (a block-level histogram in shared memory, added to the global counts once per
program), the rest (rare outliers, excluded tokens, non-finite values) through global atomics.

Nothing here synchronises with the host; the partial results are merged by
:mod:`probe.capture.kernels._combine` into the statistics' states.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._layout import Partials, Plan

__all__ = ["partials"]


@triton.jit
def _pebay(na, ma, m2a, m3a, m4a, nb, mb, m2b, m3b, m4b):
    # Pébay (2008) eqs. 3.1-3.2, as probe.stats._base.merge_moments, on float64 vectors
    n = na + nb
    safe = tl.maximum(n, 1.0)
    delta = mb - ma
    dn = delta / safe
    dn2 = dn * dn
    nab = na * nb
    mean = ma + nb * dn
    m2 = m2a + m2b + delta * dn * nab
    m3 = m3a + m3b + dn2 * delta * nab * (na - nb) + 3.0 * dn * (na * m2b - nb * m2a)
    m4 = (m4a + m4b + dn2 * dn2 * nab * (na * na - nab + nb * nb) * safe
          + 6.0 * dn2 * (na * na * m2b + nb * nb * m2a) + 4.0 * dn * (na * m3b - nb * m3a))
    return n, mean, m2, m3, m4


@triton.jit
def _unit(amax):
    # the power of two 2**k that brings the largest |deviation| into [1, 2), within k in
    # [-126, 126] (a subnormal one lands in [2**-23, 1)), as a float32 factor ``up`` (exact: only
    # the exponent moves) and its float64 inverse ``down``, which unscales the sums of powers: the
    # float32 powers of the scaled deviations neither underflow nor overflow (the eager path's
    # scaling, probe.stats._base.scaled_central_sums)
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 255
    k = tl.minimum(tl.maximum(127 - e, -126), 126)
    up = ((k + 127) << 23).to(tl.float32, bitcast=True)
    down = ((1023 - k).to(tl.int64) << 52).to(tl.float64, bitcast=True)
    return up, down


# sizes equal to 1 (a one-token decode step) must not become compile-time constants
@triton.jit(do_not_specialize=["n_tokens", "d_model", "n_rblocks", "n_cblocks"])
def _fused(x_ptr, keep_ptr, mom_ptr, ext_ptr, large_ptr, tok_ptr, rowmax_ptr, best_ptr, where_ptr,
           bad_ptr, hist_ptr, lossy_ptr,
           n_tokens, d_model, stride_g, stride_n, stride_d, n_rblocks, n_cblocks, hist_stride,
           E0: tl.constexpr, NEXP: tl.constexpr, M: tl.constexpr, SIZE: tl.constexpr, SHIFT: tl.constexpr,
           LOW: tl.constexpr, LARGE: tl.constexpr,
           ROWS: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr, BF16: tl.constexpr):
    rb = tl.program_id(0)
    cb = tl.program_id(1)
    g = tl.program_id(2)
    DENSE: tl.constexpr = 2 * NEXP << M
    cols = cb * BLOCK_D + tl.arange(0, BLOCK_D)
    col_in = cols < d_model
    x_base = x_ptr + g.to(tl.int64) * stride_g
    hist_base = hist_ptr + g.to(tl.int64) * hist_stride

    # per-channel running sums of this program's rows (float64), extremes, |x| >= LARGE counts
    cn = tl.zeros([BLOCK_D], tl.float64)
    cmean = tl.zeros([BLOCK_D], tl.float64)
    cm2 = tl.zeros([BLOCK_D], tl.float64)
    cm3 = tl.zeros([BLOCK_D], tl.float64)
    cm4 = tl.zeros([BLOCK_D], tl.float64)
    clo = tl.full([BLOCK_D], float("inf"), tl.float32)
    chi = tl.full([BLOCK_D], float("-inf"), tl.float32)
    clarge = tl.zeros([BLOCK_D], tl.int32)
    dense = tl.zeros([DENSE], tl.int32)
    best = -1.0
    none = n_tokens.to(tl.int64) * d_model  # past every flat index: "none yet"
    best_at = none
    n_nan = 0
    n_pos = 0
    n_neg = 0
    n_out = 0  # in-range elements of excluded tokens: the histogram's spare bucket
    lossy = 0
    for s in range(0, ROWS, SUB):
        rows = rb * ROWS + s + tl.arange(0, SUB)
        row_in = rows < n_tokens
        inb = row_in[:, None] & col_in[None, :]
        ptrs = x_base + rows.to(tl.int64)[:, None] * stride_n + cols[None, :].to(tl.int64) * stride_d
        if BF16:  # widened by its bits (exact for subnormals too): bf16 is float32's top half
            x = (tl.load(ptrs, mask=inb, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        else:
            x = tl.load(ptrs, mask=inb, other=0.0).to(tl.float32)
        keep = tl.load(keep_ptr + rows, mask=row_in, other=0) != 0
        kept = inb & keep[:, None]
        finite = tl.abs(x) < float("inf")  # False for NaN and +-inf
        w = kept & finite
        wf = w.to(tl.float32)
        xs = tl.where(w, x, 0.0)
        mag = tl.abs(xs)

        # --- per channel: tile mean from a float64 sum, float32 powers about its float32 rounding
        tn = tl.sum(wf, axis=0).to(tl.float64)
        tmean = tl.sum(xs.to(tl.float64), axis=0) / tl.maximum(tn, 1.0)
        center = tmean.to(tl.float32)
        d = tl.where(w, x - center[None, :], 0.0)
        up, down = _unit(tl.max(tl.abs(d), axis=0))
        d = d * up[None, :]
        d2 = d * d
        s2 = tl.sum(d2, axis=0).to(tl.float64) * down * down
        s3 = tl.sum(d2 * d, axis=0).to(tl.float64) * down * down * down
        s4 = tl.sum(d2 * d2, axis=0).to(tl.float64) * (down * down) * (down * down)
        delta = tmean - center.to(tl.float64)
        t2 = s2 - tn * delta * delta
        t3 = s3 - 3.0 * delta * s2 + 2.0 * tn * delta * delta * delta
        t4 = s4 - 4.0 * delta * s3 + 6.0 * delta * delta * s2 - 3.0 * tn * delta * delta * delta * delta
        cn, cmean, cm2, cm3, cm4 = _pebay(cn, cmean, cm2, cm3, cm4, tn, tmean, t2, t3, t4)
        clo = tl.minimum(clo, tl.min(tl.where(w, x, float("inf")), axis=0))
        chi = tl.maximum(chi, tl.max(tl.where(w, x, float("-inf")), axis=0))
        clarge += tl.sum((w & (mag >= LARGE)).to(tl.int32), axis=0)

        # --- per token over this program's channels (every in-range token: the position
        # statistic masks by validity itself); finite values only, whether kept or not
        fin = inb & finite
        xf = tl.where(fin, x, 0.0)
        rn = tl.sum(fin.to(tl.float32), axis=1).to(tl.float64)
        rmean = tl.sum(xf.to(tl.float64), axis=1) / tl.maximum(rn, 1.0)
        rcenter = rmean.to(tl.float32)
        rd = tl.where(fin, x - rcenter[:, None], 0.0)
        rup, rdown = _unit(tl.max(tl.abs(rd), axis=1))
        rd = rd * rup[:, None]
        rdelta = rmean - rcenter.to(tl.float64)
        rm2 = tl.sum(rd * rd, axis=1).to(tl.float64) * rdown * rdown - rn * rdelta * rdelta
        rmax = tl.max(tl.where(fin, tl.abs(x), float("-inf")), axis=1)
        tok = tok_ptr + ((g * n_cblocks + cb) * 3).to(tl.int64) * n_tokens + rows
        tl.store(tok, rn, mask=row_in)
        tl.store(tok + n_tokens, rmean, mask=row_in)
        tl.store(tok + 2 * n_tokens, rm2, mask=row_in)
        tl.store(rowmax_ptr + (g * n_cblocks + cb).to(tl.int64) * n_tokens + rows, rmax, mask=row_in)

        # --- the largest kept |x| and its first flat index (row-major) in this program
        tile_best = tl.max(tl.where(w, mag, -1.0))
        flat = rows.to(tl.int64)[:, None] * d_model + cols[None, :]
        tile_at = tl.min(tl.where(w & (mag == tile_best), flat, none))
        best_at = tl.where(tile_best > best, tile_at,
                           tl.where(tile_best == best, tl.minimum(best_at, tile_at), best_at))
        best = tl.maximum(best, tile_best)

        # --- non-finite kept values
        n_nan += tl.sum((kept & (x != x)).to(tl.int32))
        n_pos += tl.sum((kept & (x == float("inf"))).to(tl.int32))
        n_neg += tl.sum((kept & (x == float("-inf"))).to(tl.int32))

        # --- histogram: float32 bits >> SHIFT; the dense window privately, the rest atomically
        bits = x.to(tl.int32, bitcast=True)
        lossy = tl.maximum(lossy, tl.max((inb & ((bits & LOW) != 0)).to(tl.int32)))
        index = (bits >> SHIFT) & (SIZE - 1)
        expo = (index >> M) & 255
        inside = (expo >= E0) & (expo < E0 + NEXP)
        local = (index >> (8 + M)) * (NEXP << M) + ((expo - E0) << M) + (index & ((1 << M) - 1))
        in_dense = kept & inside
        dense += tl.histogram(tl.reshape(tl.where(in_dense, local, 0), [SUB * BLOCK_D]), DENSE,
                              mask=tl.reshape(in_dense, [SUB * BLOCK_D]))
        rare = kept & (inside == 0)
        tl.atomic_add(hist_base + index, tl.full([SUB, BLOCK_D], 1, tl.int64), mask=rare, sem="relaxed")
        n_out += tl.sum((inb & (keep[:, None] == 0)).to(tl.int32))

    # per-channel partials of this row block: [G, RB, 5 | 2, D]
    part = (g * n_rblocks + rb).to(tl.int64)
    mom = mom_ptr + part * 5 * d_model + cols
    tl.store(mom, cn, mask=col_in)
    tl.store(mom + d_model, cmean, mask=col_in)
    tl.store(mom + 2 * d_model, cm2, mask=col_in)
    tl.store(mom + 3 * d_model, cm3, mask=col_in)
    tl.store(mom + 4 * d_model, cm4, mask=col_in)
    tl.store(ext_ptr + part * 2 * d_model + cols, clo, mask=col_in)
    tl.store(ext_ptr + part * 2 * d_model + d_model + cols, chi, mask=col_in)
    tl.store(large_ptr + part * d_model + cols, clarge, mask=col_in)
    block = (g * n_rblocks + rb) * n_cblocks + cb
    tl.store(best_ptr + block, best)
    tl.store(where_ptr + block, best_at)
    tl.atomic_add(bad_ptr + g * 3, tl.cast(n_nan, tl.int64), sem="relaxed")
    tl.atomic_add(bad_ptr + g * 3 + 1, tl.cast(n_pos, tl.int64), sem="relaxed")
    tl.atomic_add(bad_ptr + g * 3 + 2, tl.cast(n_neg, tl.int64), sem="relaxed")
    tl.atomic_add(hist_base + SIZE, tl.cast(n_out, tl.int64), sem="relaxed")
    tl.atomic_max(lossy_ptr + g, lossy, sem="relaxed")
    # the dense window back to global bucket indices: sign, exponent E0 + e, mantissa bits
    k = tl.arange(0, DENSE)
    sign = k // (NEXP << M)
    rest = k % (NEXP << M)
    glob = (sign << (8 + M)) + ((E0 + (rest >> M)) << M) + (rest & ((1 << M) - 1))
    tl.atomic_add(hist_base + glob, dense.to(tl.int64), mask=dense > 0, sem="relaxed")


def partials(x: Tensor, keep: Tensor, plan: Plan) -> Partials:
    """Launch the fused kernel over ``x[G, n, D]`` (any float dtype and strides) with the token
    mask ``keep[n]``; returns the per-block partial results (see :class:`Partials`)."""
    g, n, d = x.shape
    rb, cb = plan.row_blocks(n), plan.channel_blocks(d)
    out = Partials.empty(g, n, d, rb, cb, plan.mantissa_bits, x.device)
    keep8 = keep.to(torch.uint8) if keep.dtype == torch.bool else keep
    bf16 = x.dtype == torch.bfloat16
    buckets = plan.buckets  # the kernel's SIZE (spare bucket at SIZE), SHIFT and LOW
    _fused[(rb, cb, g)](
        x.view(torch.int16) if bf16 else x, keep8, out.mom, out.ext, out.large, out.tok, out.rowmax, out.best, out.best_at,
        out.bad, out.hist, out.lossy,
        n, d, x.stride(0), x.stride(1), x.stride(2), rb, cb, out.hist.stride(0),
        E0=plan.e0, NEXP=plan.nexp, M=plan.mantissa_bits, SIZE=buckets.count, SHIFT=buckets.shift,
        LOW=buckets.low, LARGE=plan.large,
        ROWS=plan.rows, SUB=plan.sub, BLOCK_D=plan.block_d, BF16=bf16,
    )
    return out
