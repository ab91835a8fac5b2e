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
import os

import torch
import triton
import triton.language as tl

from .contract import MiningSpec
from .folding import LN_EPS, fold_queries, footprints, output_views, project_values, window_sets

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
IDENT, GRAM, DENSE = 0, 1, 2  # how a stage's footprint becomes window-pixel statistics (see _stage_stats)


@triton.jit
def _footprint(fs_ptr, row, col, stride_y, stride_x, F: tl.constexpr, FQ: tl.constexpr):
    """A window's footprint in one stage, laid out as an FQ x FQ grid (FQ = pow2 >= F) flattened to FQ*FQ:
    pixel offsets and validity."""
    p = tl.arange(0, FQ * FQ)
    py = p // FQ
    px = p % FQ
    offs = (tl.load(fs_ptr + row) + py) * stride_y + (tl.load(fs_ptr + col) + px) * stride_x
    return offs, (py < F) & (px < F)


@triton.jit
def _resampling(fw_ptr, row, col, F: tl.constexpr, FQ: tl.constexpr, M: tl.constexpr, MQ: tl.constexpr):
    """R (MQ*MQ window pixels, FQ*FQ footprint pixels): the Kronecker product of the two separable 1-d weight
    tables, built by broadcasting (no gathers). Built where it is used, so it never lives across a loop."""
    a = tl.arange(0, MQ)
    f = tl.arange(0, FQ)
    m = (a < M)[:, None] & (f < F)[None, :]
    ry = tl.load(fw_ptr + row * (M * F) + a[:, None] * F + f[None, :], mask=m, other=0.0)  # (MQ, FQ)
    rx = tl.load(fw_ptr + col * (M * F) + a[:, None] * F + f[None, :], mask=m, other=0.0)
    return tl.reshape(ry[:, None, :, None] * rx[None, :, None, :], (MQ * MQ, FQ * FQ))


@triton.jit
def _load_tile(s_ptr, s_off, stride_c, c0, C_s, offs, ok, BC: tl.constexpr):
    cc = c0 + tl.arange(0, BC)
    raw = tl.load(s_ptr + s_off + offs[:, None] + cc[None, :] * stride_c, mask=ok[:, None] & (cc < C_s)[None, :],
                  other=0.0)
    return raw, cc


@triton.jit
def _stage_stats(s_ptr, s_off, sc, sy, sx, C_s, fw_ptr, fs_ptr, row, col, u_row, chan0, dot, sm, sq,
                 F: tl.constexpr, FQ: tl.constexpr, MODE: tl.constexpr, M: tl.constexpr, MQ: tl.constexpr,
                 BC: tl.constexpr, NATIVE_DOT: tl.constexpr, PREC: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Adds this stage's share of u.h, sum(h), sum(h^2) to dot, sm, sq: (MQ*MQ,) each, one per window pixel.
    IDENT: window pixels are footprint pixels. GRAM: accumulate u.P, sum(P) and the Gram matrix P P^T on the
    footprint (tensor cores), then resample the scalars: sum(h^2) = diag(R G R^T). DENSE (large footprints):
    resample each channel block to window pixels (h = R P) and accumulate directly."""
    offs, ok = _footprint(fs_ptr, row, col, sy, sx, F, FQ)
    FP: tl.constexpr = FQ * FQ
    if MODE == 2:
        R = _resampling(fw_ptr, row, col, F, FQ, M, MQ)
        acc_d = tl.zeros([MQ * MQ, BC], dtype=tl.float32)
        acc_t = tl.zeros([MQ * MQ, BC], dtype=tl.float32)
        acc_q = tl.zeros([MQ * MQ, BC], dtype=tl.float32)
    else:
        acc_d = tl.zeros([FP, BC], dtype=tl.float32)
        acc_t = tl.zeros([FP, BC], dtype=tl.float32)
        acc_q = tl.zeros([FP, BC], dtype=tl.float32)
    gram = tl.zeros([FP, FP], dtype=tl.float32)
    for c0 in tl.range(0, C_s, BC, num_stages=NUM_STAGES):
        raw, cc = _load_tile(s_ptr, s_off, sc, c0, C_s, offs, ok, BC)
        tile = raw.to(tl.float32)
        uu = tl.load(u_row + chan0 + cc, mask=cc < C_s, other=0.0)[None, :]
        if MODE == 2:
            # Half inputs and the bilinear weights (multiples of 1/1024) are exact in tf32: exact products.
            h = tl.dot(R, tile, input_precision=PREC)
            acc_d += h * uu
            acc_t += h
            acc_q += h * h
        else:
            acc_d += tile * uu
            acc_t += tile
            if MODE == 0:
                acc_q += tile * tile
            elif NATIVE_DOT:
                gram = tl.dot(raw, tl.trans(raw), gram)  # half x half -> fp32: exact products
            else:
                gram = tl.dot(tile, tl.trans(tile), gram, input_precision=PREC)
    d = tl.sum(acc_d, axis=1)
    t = tl.sum(acc_t, axis=1)
    if MODE == 1:
        R = _resampling(fw_ptr, row, col, F, FQ, M, MQ)
        sq += tl.sum(tl.dot(R, gram, input_precision=PREC) * R, axis=1)
        dot += tl.sum(R * d[None, :], axis=1)
        sm += tl.sum(R * t[None, :], axis=1)
    else:
        sq += tl.sum(acc_q, axis=1)
        dot += d
        sm += t
    return dot, sm, sq


@triton.jit
def _stage_aggregate(s_ptr, s_off, sc, sy, sx, C_s, fw_ptr, fs_ptr, row, col, agg_row, chan0, w,
                     F: tl.constexpr, FQ: tl.constexpr, MODE: tl.constexpr, M: tl.constexpr, MQ: tl.constexpr,
                     BC: tl.constexpr, NUM_STAGES: tl.constexpr):
    """agg[chan0 + c] = sum_j w_j h_j[c], computed on the footprint: omega = R^T w, agg = omega . P."""
    offs, ok = _footprint(fs_ptr, row, col, sy, sx, F, FQ)
    if MODE == 0:
        omega = w
    else:
        omega = tl.sum(_resampling(fw_ptr, row, col, F, FQ, M, MQ) * w[:, None], axis=0)
    for c0 in tl.range(0, C_s, BC, num_stages=NUM_STAGES):
        raw, cc = _load_tile(s_ptr, s_off, sc, c0, C_s, offs, ok, BC)
        tl.store(agg_row + chan0 + cc, tl.sum(raw.to(tl.float32) * omega[:, None], axis=0), mask=cc < C_s)


@triton.jit
def _mine_kernel(
    u_ptr, usum_ptr, agg_ptr, shift_ptr, tok_ptr, b_ptr, row_ptr, col_ptr, C_aux,
    s0, s0b, s0c, s0y, s0x, C0, fw0, fs0,
    s1, s1b, s1c, s1y, s1x, C1, fw1, fs1,
    s2, s2b, s2c, s2y, s2x, C2, fw2, fs2,
    s3, s3b, s3c, s3y, s3x, C3, fw3, fs3,
    F0: tl.constexpr, FQ0: tl.constexpr, MD0: tl.constexpr,
    F1: tl.constexpr, FQ1: tl.constexpr, MD1: tl.constexpr,
    F2: tl.constexpr, FQ2: tl.constexpr, MD2: tl.constexpr,
    F3: tl.constexpr, FQ3: tl.constexpr, MD3: tl.constexpr,
    M: tl.constexpr, MQ: tl.constexpr, BC: tl.constexpr, NATIVE_DOT: tl.constexpr, PREC: tl.constexpr,
    EPS: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    tok = tl.load(tok_ptr + pid).to(tl.int64)
    b = tl.load(b_ptr + pid).to(tl.int64)
    row = tl.load(row_ptr + pid)
    col = tl.load(col_ptr + pid)
    u_row = u_ptr + tok * C_aux
    dot = tl.zeros([MQ * MQ], dtype=tl.float32)
    sm = tl.zeros([MQ * MQ], dtype=tl.float32)
    sq = tl.zeros([MQ * MQ], dtype=tl.float32)
    dot, sm, sq = _stage_stats(s0, b * s0b, s0c, s0y, s0x, C0, fw0, fs0, row, col, u_row, 0, dot, sm, sq,
                              F0, FQ0, MD0, M, MQ, BC, NATIVE_DOT, PREC, NUM_STAGES)
    dot, sm, sq = _stage_stats(s1, b * s1b, s1c, s1y, s1x, C1, fw1, fs1, row, col, u_row, C0, dot, sm, sq,
                              F1, FQ1, MD1, M, MQ, BC, NATIVE_DOT, PREC, NUM_STAGES)
    dot, sm, sq = _stage_stats(s2, b * s2b, s2c, s2y, s2x, C2, fw2, fs2, row, col, u_row, C0 + C1, dot, sm, sq,
                              F2, FQ2, MD2, M, MQ, BC, NATIVE_DOT, PREC, NUM_STAGES)
    dot, sm, sq = _stage_stats(s3, b * s3b, s3c, s3y, s3x, C3, fw3, fs3, row, col, u_row, C0 + C1 + C2,
                               dot, sm, sq,
                              F3, FQ3, MD3, M, MQ, BC, NATIVE_DOT, PREC, NUM_STAGES)
    # LayerNorm statistics over the C_aux channels of each window pixel, then the softmax over the window.
    mean = sm / C_aux
    var = tl.maximum(sq / C_aux - mean * mean, 0.0)
    rstd = 1.0 / tl.sqrt(var + EPS)
    x = rstd * (dot - mean * tl.load(usum_ptr + tok))
    j = tl.arange(0, MQ * MQ)
    x = tl.where(((j // MQ) < M) & ((j % MQ) < M), x, float("-inf"))
    x = tl.exp(x - tl.max(x, axis=0))
    w = x / tl.sum(x, axis=0) * rstd
    tl.store(shift_ptr + tok, tl.sum(w * mean, axis=0))
    agg_row = agg_ptr + tok * C_aux
    _stage_aggregate(s0, b * s0b, s0c, s0y, s0x, C0, fw0, fs0, row, col, agg_row, 0, w,
                     F0, FQ0, MD0, M, MQ, BC, NUM_STAGES)
    _stage_aggregate(s1, b * s1b, s1c, s1y, s1x, C1, fw1, fs1, row, col, agg_row, C0, w,
                     F1, FQ1, MD1, M, MQ, BC, NUM_STAGES)
    _stage_aggregate(s2, b * s2b, s2c, s2y, s2x, C2, fw2, fs2, row, col, agg_row, C0 + C1, w,
                     F2, FQ2, MD2, M, MQ, BC, NUM_STAGES)
    _stage_aggregate(s3, b * s3b, s3c, s3y, s3x, C3, fw3, fs3, row, col, agg_row, C0 + C1 + C2, w,
                     F3, FQ3, MD3, M, MQ, BC, NUM_STAGES)


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(n))


def _layout(size: int, identity: bool, M: int) -> tuple[int, int]:
    """(FQ, MODE) for a footprint of side `size`: FQ*FQ must be >= 16 for tl.dot; big footprints go DENSE
    because their Gram matrix would not fit in registers."""
    fq = _pow2(size, 4)
    if identity:
        return _pow2(M, 4), IDENT
    return fq, GRAM if fq * fq <= 64 else DENSE


@functools.lru_cache(maxsize=32)
def _device_tables(spec: MiningSpec, global_view: bool, device: torch.device) -> list[tuple]:
    """Per stage: footprint weights (float32), starts (int32) on the device, and the kernel's constexprs."""
    M = spec.window
    return [(fp.weights.to(device=device, dtype=torch.float32).contiguous(), fp.start.to(device=device, dtype=torch.int32),
             (fp.size, *_layout(fp.size, fp.identity, M)))
            for fp in footprints(spec, global_view)]


@functools.lru_cache(maxsize=32)
def _device_windows(spec: MiningSpec, device: torch.device) -> list[tuple[bool, list[torch.Tensor]]]:
    return [(ws.global_view, [t.to(torch.int32).contiguous() for t in (ws.token, ws.batch, ws.row, ws.col)])
            for ws in window_sets(spec, device)]


def launch_kernels(spec: MiningSpec, hr_stages: list[torch.Tensor], u: torch.Tensor, usum: torch.Tensor,
                   agg: torch.Tensor, shift: torch.Tensor, *, block_c: int | None = None, num_warps: int = 8,
                   num_stages: int = 2) -> None:
    """Fill agg (T, C_aux) and shift (T,) for every window: one launch per view kind (crops, global).
    block_c defaults to 32 channels per load, 16 where a stage is DENSE (its resampling matrix stays in
    registers): sizes that compile without register spills on Hopper at 8 warps."""
    dev = u.device
    M = spec.window
    # Half maps feed the Gram products to the tensor cores as they are (exact products, fp32 sums) -- except bf16
    # under the CPU interpreter, whose bf16 tl.dot is wrong. fp32 maps use 3-pass tf32 (fp32-accurate) dots.
    native_dot = spec.dtype == torch.float16 or (spec.dtype == torch.bfloat16 and not INTERPRET)
    prec = "tf32x3" if spec.dtype == torch.float32 else "tf32"
    for global_view, idx in _device_windows(spec, dev):
        stage_args, const_args = [], []
        tables = _device_tables(spec, global_view, dev)
        for st, (fw, fs, consts) in zip(hr_stages, tables):
            stage_args += [st, st.stride(0), st.stride(1), st.stride(2), st.stride(3), st.shape[1], fw, fs]
            const_args += list(consts)
        bc = block_c or (16 if any(t[2][2] == DENSE for t in tables) else 32)
        _mine_kernel[(idx[0].shape[0],)](
            u, usum, agg, shift, *idx, spec.aux_channels, *stage_args, *const_args,
            M=M, MQ=_pow2(M, 4), BC=bc, NATIVE_DOT=native_dot, PREC=prec, EPS=LN_EPS,
            NUM_STAGES=num_stages, num_warps=num_warps,
        )


def mine_triton(lr_feats: torch.Tensor, hr_stages: list[torch.Tensor], weights: dict[str, torch.Tensor],
                spec: MiningSpec, *, out_agg: torch.Tensor | None = None, out_shift: torch.Tensor | None = None,
                block_c: int | None = None, num_warps: int = 8) -> torch.Tensor:
    """out_agg/out_shift: optional preallocated (T, C_aux) / (T,) float32 buffers (tests poison them)."""
    if spec.dtype == torch.float64:
        raise ValueError("lr_feats: dtype float64 is not supported by impl='triton' (use 'torch' or 'reference')")
    dev = lr_feats.device
    x = output_views(lr_feats, spec).reshape(-1, spec.channels).float()
    # Half inputs: the two projections run as half GEMMs on the tensor cores, like the official fp16 path.
    gemm = spec.dtype if spec.dtype != torch.float32 and lr_feats.is_cuda else None
    u, usum = fold_queries(x, weights, spec, gemm)
    T = x.shape[0]
    agg = out_agg if out_agg is not None else torch.empty(T, spec.aux_channels, dtype=torch.float32, device=dev)
    shift = out_shift if out_shift is not None else torch.empty(T, dtype=torch.float32, device=dev)
    launch_kernels(spec, hr_stages, u, usum, agg, shift, block_c=block_c, num_warps=num_warps)
    out = x + project_values(agg, shift, weights, gemm)
    return out.to(spec.dtype).reshape(spec.batch, spec.views * spec.tokens, spec.channels)
