"""Fused Triton patch info mining: one program per low-res token (window), reading the four stage maps directly.

Per window and stage, the program loads the stage's footprint (a few stage pixels around the window), resamples
it to the M*M window pixels on the fly with the separable bilinear weights (one small matrix product), and
accumulates u.h, sum(h) and sum(h^2); then LayerNorm statistics, logits and the softmax over the window; then it
pushes the softmax weights back onto the footprint and writes agg = sum_j (a_j/std_j) h_j. The C_aux-channel map
is never built; one GEMM afterwards applies W_v (see folding.py for the algebra).

On the CPU this runs only under TRITON_INTERPRET=1 (how CI tests it).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .contract import MiningSpec
from .folding import LN_EPS, fold_queries, footprints, output_views, project_values, window_sets

BLOCK_C = 32  # channels per load


@triton.jit
def _resampled(s_ptr, s_off, stride_c, c0, C_s, pix_off, pix_ok, R, IDENT: tl.constexpr, FP: tl.constexpr,
               BC: tl.constexpr, PREC: tl.constexpr):
    """Load footprint channels [c0, c0+BC) -> (FP, BC) and resample to window pixels -> (MMP, BC) float32."""
    cc = c0 + tl.arange(0, BC)
    tile = tl.load(s_ptr + s_off + pix_off[:, None] + cc[None, :] * stride_c,
                   mask=pix_ok[:, None] & (cc < C_s)[None, :], other=0.0).to(tl.float32)
    if IDENT:
        return tile, tile, cc
    # Half inputs are exact in tf32 and so are the bilinear weights (multiples of 1/1024): products are exact.
    return tl.dot(R, tile, input_precision=PREC), tile, cc


@triton.jit
def _footprint(fw_ptr, fs_ptr, row, col, stride_y, stride_x, H_s, F: tl.constexpr, FP: tl.constexpr,
               M: tl.constexpr, MMP: tl.constexpr):
    """Pixel offsets and validity of a window's footprint in one stage, and its resampling matrix R (MMP, FP)."""
    p = tl.arange(0, FP)
    py = p // F
    px = p % F
    ys = tl.load(fs_ptr + row) + py
    xs = tl.load(fs_ptr + col) + px
    ok = (p < F * F) & (ys < H_s) & (xs < H_s)
    j = tl.arange(0, MMP)
    ja = j // M
    jb = j % M
    jok = j < M * M
    m = jok[:, None] & ok[None, :]
    ry = tl.load(fw_ptr + row * (M * F) + ja[:, None] * F + py[None, :], mask=m, other=0.0)
    rx = tl.load(fw_ptr + col * (M * F) + jb[:, None] * F + px[None, :], mask=m, other=0.0)
    return ys * stride_y + xs * stride_x, ok, ry * rx


@triton.jit
def _stage_stats(s_ptr, s_off, sc, sy, sx, C_s, H_s, fw_ptr, fs_ptr, row, col, u_row, chan0,
                 logit, s1, s2, F: tl.constexpr, FP: tl.constexpr, IDENT: tl.constexpr, M: tl.constexpr,
                 MMP: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    pix_off, pix_ok, R = _footprint(fw_ptr, fs_ptr, row, col, sy, sx, H_s, F, FP, M, MMP)
    for c0 in range(0, C_s, BC):
        h, _tile, cc = _resampled(s_ptr, s_off, sc, c0, C_s, pix_off, pix_ok, R, IDENT, FP, BC, PREC)
        uu = tl.load(u_row + chan0 + cc, mask=cc < C_s, other=0.0)
        logit += tl.sum(h * uu[None, :], axis=1)
        s1 += tl.sum(h, axis=1)
        s2 += tl.sum(h * h, axis=1)
    return logit, s1, s2


@triton.jit
def _stage_aggregate(s_ptr, s_off, sc, sy, sx, C_s, H_s, fw_ptr, fs_ptr, row, col, agg_row, chan0, w,
                     F: tl.constexpr, FP: tl.constexpr, IDENT: tl.constexpr, M: tl.constexpr, MMP: tl.constexpr,
                     BC: tl.constexpr, PREC: tl.constexpr):
    pix_off, pix_ok, R = _footprint(fw_ptr, fs_ptr, row, col, sy, sx, H_s, F, FP, M, MMP)
    if IDENT:
        omega = w  # window pixel j is footprint pixel j
    else:
        omega = tl.sum(R * w[:, None], axis=0)  # (FP,) weights pushed back onto stage pixels
    for c0 in range(0, C_s, BC):
        cc = c0 + tl.arange(0, BC)
        tile = tl.load(s_ptr + s_off + pix_off[:, None] + cc[None, :] * sc,
                       mask=pix_ok[:, None] & (cc < C_s)[None, :], other=0.0).to(tl.float32)
        tl.store(agg_row + chan0 + cc, tl.sum(tile * omega[:, None], axis=0), mask=cc < C_s)


@triton.jit
def _mine_kernel(
    u_ptr, usum_ptr, agg_ptr, shift_ptr, tok_ptr, b_ptr, row_ptr, col_ptr, C_aux,
    s0, s0b, s0c, s0y, s0x, C0, H0, fw0, fs0,
    s1_, s1b, s1c, s1y, s1x, C1, H1, fw1, fs1,
    s2_, s2b, s2c, s2y, s2x, C2, H2, fw2, fs2,
    s3, s3b, s3c, s3y, s3x, C3, H3, fw3, fs3,
    F0: tl.constexpr, FP0: tl.constexpr, ID0: tl.constexpr,
    F1: tl.constexpr, FP1: tl.constexpr, ID1: tl.constexpr,
    F2: tl.constexpr, FP2: tl.constexpr, ID2: tl.constexpr,
    F3: tl.constexpr, FP3: tl.constexpr, ID3: tl.constexpr,
    M: tl.constexpr, MMP: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr, EPS: tl.constexpr,
):
    pid = tl.program_id(0)
    tok = tl.load(tok_ptr + pid).to(tl.int64)
    b = tl.load(b_ptr + pid).to(tl.int64)
    row = tl.load(row_ptr + pid)
    col = tl.load(col_ptr + pid)
    u_row = u_ptr + tok * C_aux
    j = tl.arange(0, MMP)
    logit = tl.zeros([MMP], dtype=tl.float32)
    acc1 = tl.zeros([MMP], dtype=tl.float32)
    acc2 = tl.zeros([MMP], dtype=tl.float32)
    logit, acc1, acc2 = _stage_stats(s0, b * s0b, s0c, s0y, s0x, C0, H0, fw0, fs0, row, col, u_row, 0,
                                     logit, acc1, acc2, F0, FP0, ID0, M, MMP, BC, PREC)
    logit, acc1, acc2 = _stage_stats(s1_, b * s1b, s1c, s1y, s1x, C1, H1, fw1, fs1, row, col, u_row, C0,
                                     logit, acc1, acc2, F1, FP1, ID1, M, MMP, BC, PREC)
    logit, acc1, acc2 = _stage_stats(s2_, b * s2b, s2c, s2y, s2x, C2, H2, fw2, fs2, row, col, u_row, C0 + C1,
                                     logit, acc1, acc2, F2, FP2, ID2, M, MMP, BC, PREC)
    logit, acc1, acc2 = _stage_stats(s3, b * s3b, s3c, s3y, s3x, C3, H3, fw3, fs3, row, col, u_row, C0 + C1 + C2,
                                     logit, acc1, acc2, F3, FP3, ID3, M, MMP, BC, PREC)
    mean = acc1 / C_aux
    var = tl.maximum(acc2 / C_aux - mean * mean, 0.0)
    rstd = 1.0 / tl.sqrt(var + EPS)
    x = rstd * (logit - mean * tl.load(usum_ptr + tok))
    x = tl.where(j < M * M, x, float("-inf"))
    x = tl.exp(x - tl.max(x, axis=0))
    a = x / tl.sum(x, axis=0)
    w = a * rstd
    tl.store(shift_ptr + tok, tl.sum(w * mean, axis=0))
    agg_row = agg_ptr + tok * C_aux
    _stage_aggregate(s0, b * s0b, s0c, s0y, s0x, C0, H0, fw0, fs0, row, col, agg_row, 0, w,
                     F0, FP0, ID0, M, MMP, BC, PREC)
    _stage_aggregate(s1_, b * s1b, s1c, s1y, s1x, C1, H1, fw1, fs1, row, col, agg_row, C0, w,
                     F1, FP1, ID1, M, MMP, BC, PREC)
    _stage_aggregate(s2_, b * s2b, s2c, s2y, s2x, C2, H2, fw2, fs2, row, col, agg_row, C0 + C1, w,
                     F2, FP2, ID2, M, MMP, BC, PREC)
    _stage_aggregate(s3, b * s3b, s3c, s3y, s3x, C3, H3, fw3, fs3, row, col, agg_row, C0 + C1 + C2, w,
                     F3, FP3, ID3, M, MMP, BC, PREC)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=32)
def _device_tables(spec: MiningSpec, global_view: bool, device: torch.device) -> list[tuple]:
    """Per stage: footprint weights (float32), starts (int32) on the device, and the kernel's constexprs."""
    M = spec.window
    return [(fp.weights.to(device=device, dtype=torch.float32).contiguous(), fp.start.to(device=device, dtype=torch.int32),
             (fp.size, _pow2(M * M if fp.identity else fp.size**2), fp.identity))
            for fp in footprints(spec, global_view)]


@functools.lru_cache(maxsize=32)
def _device_windows(spec: MiningSpec, device: torch.device) -> list[tuple[bool, list[torch.Tensor]]]:
    return [(ws.global_view, [t.to(torch.int32).contiguous() for t in (ws.token, ws.batch, ws.row, ws.col)])
            for ws in window_sets(spec, device)]


def launch_kernels(spec: MiningSpec, hr_stages: list[torch.Tensor], u: torch.Tensor, usum: torch.Tensor,
                   agg: torch.Tensor, shift: torch.Tensor, *, block_c: int = BLOCK_C, num_warps: int = 4) -> None:
    """Fill agg (T, C_aux) and shift (T,) for every window: one launch per view kind (crops, global)."""
    dev = u.device
    prec = "ieee" if spec.dtype == torch.float32 else "tf32"
    M = spec.window
    for global_view, idx in _device_windows(spec, dev):
        stage_args, const_args = [], []
        for st, (fw, fs, consts) in zip(hr_stages, _device_tables(spec, global_view, dev)):
            stage_args += [st, st.stride(0), st.stride(1), st.stride(2), st.stride(3), st.shape[1], st.shape[2], fw, fs]
            const_args += list(consts)
        _mine_kernel[(idx[0].shape[0],)](
            u, usum, agg, shift, *idx, spec.aux_channels, *stage_args, *const_args,
            M=M, MMP=_pow2(M * M), BC=block_c, PREC=prec, EPS=LN_EPS, num_warps=num_warps,
        )


def mine_triton(lr_feats: torch.Tensor, hr_stages: list[torch.Tensor], weights: dict[str, torch.Tensor],
                spec: MiningSpec, *, out_agg: torch.Tensor | None = None, out_shift: torch.Tensor | None = None,
                block_c: int = BLOCK_C, num_warps: int = 4) -> torch.Tensor:
    """out_agg/out_shift: optional preallocated (T, C_aux) / (T,) float32 buffers (tests poison them)."""
    if spec.dtype == torch.float64:
        raise ValueError("lr_feats: dtype float64 is not supported by impl='triton' (use 'torch' or 'reference')")
    dev = lr_feats.device
    x = output_views(lr_feats, spec).reshape(-1, spec.channels).float()
    u, usum = fold_queries(x, weights, spec)
    T = x.shape[0]
    agg = out_agg if out_agg is not None else torch.empty(T, spec.aux_channels, dtype=torch.float32, device=dev)
    shift = out_shift if out_shift is not None else torch.empty(T, dtype=torch.float32, device=dev)
    launch_kernels(spec, hr_stages, u, usum, agg, shift, block_c=block_c, num_warps=num_warps)
    out = x + project_values(agg, shift, weights)
    return out.to(spec.dtype).reshape(spec.batch, spec.views * spec.tokens, spec.channels)
