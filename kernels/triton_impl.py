"""Triton patch info mining: short programs over (window, channel chunk), so thousands of them keep a GPU busy.

Per stage of the high-res tower:
1. `_stats_kernel`, one program per (window, chunk of the stage's channels): loads that chunk of the window's
   footprint (the few stage pixels its bilinear resampling touches), resamples it to the M*M window pixels on the
   fly (h = R P, one small tensor-core product; stage 0 of the crops needs none) and writes the chunk's partial
   u.h, sum(h) and sum(h^2) for every window pixel.
2. A few torch ops on (T, M*M) tensors sum the partials: LayerNorm statistics, logits, softmax, w = a/std, shift.
3. `_aggregate_kernel`, one program per (window, chunk): pushes w back onto the footprint (omega = R^T w) and writes
   agg[c] = omega . P for its channels.
The C_aux-channel map is never built; one GEMM afterwards applies W_v (see folding.py for the algebra). Partials
go to their own slots (no atomics), so results are deterministic.

On the CPU this runs only under TRITON_INTERPRET=1 (how CI tests it).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .contract import LN_EPS, MiningSpec
from .folding import fold_queries, footprints, output_views, project_values, window_sets

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Launch defaults: the fastest variant measured on an H200 (bench/results/kernels_gpu.json, "variants").
CHUNK = 128  # channels per program
BLOCK_C = 16  # channels per load inside a program
NUM_WARPS = 2  # x4 for footprints of more than 64 pixels (their resampling matrix needs the registers)


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
def _window(tok_ptr, b_ptr, row_ptr, col_ptr):
    w = tl.program_id(0)
    return (tl.load(tok_ptr + w).to(tl.int64), tl.load(b_ptr + w).to(tl.int64), tl.load(row_ptr + w),
            tl.load(col_ptr + w))


@triton.jit
def _stats_kernel(s_ptr, s_b, s_c, s_y, s_x, C_s, fw_ptr, fs_ptr, tok_ptr, b_ptr, row_ptr, col_ptr,
                  u_ptr, C_aux, chan0, part_ptr, n_chunks, chunk0,
                  F: tl.constexpr, FQ: tl.constexpr, IDENT: tl.constexpr, M: tl.constexpr, MQ: tl.constexpr,
                  CH: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    tok, b, row, col = _window(tok_ptr, b_ptr, row_ptr, col_ptr)
    k = tl.program_id(1)
    offs, ok = _footprint(fs_ptr, row, col, s_y, s_x, F, FQ)
    if not IDENT:
        R = _resampling(fw_ptr, row, col, F, FQ, M, MQ)
    acc_d = tl.zeros([MQ * MQ, BC], dtype=tl.float32)
    acc_t = tl.zeros([MQ * MQ, BC], dtype=tl.float32)
    acc_q = tl.zeros([MQ * MQ, BC], dtype=tl.float32)
    for c0 in tl.range(k * CH, k * CH + CH, BC):
        cc = c0 + tl.arange(0, BC)
        cm = cc < C_s
        tile = tl.load(s_ptr + b * s_b + offs[:, None] + cc[None, :] * s_c, mask=ok[:, None] & cm[None, :],
                       other=0.0).to(tl.float32)
        if IDENT:
            h = tile  # footprint pixel p is window pixel p
        else:
            # Half maps and the bilinear weights (multiples of 1/1024) are exact in tf32: exact products.
            h = tl.dot(R, tile, input_precision=PREC)
        uu = tl.load(u_ptr + tok * C_aux + chan0 + cc, mask=cm, other=0.0)
        acc_d += h * uu[None, :]
        acc_t += h
        acc_q += h * h
    j = tl.arange(0, MQ * MQ)
    out = part_ptr + ((tok * n_chunks + chunk0 + k) * 3) * (MQ * MQ) + j
    tl.store(out, tl.sum(acc_d, axis=1))
    tl.store(out + MQ * MQ, tl.sum(acc_t, axis=1))
    tl.store(out + 2 * MQ * MQ, tl.sum(acc_q, axis=1))


@triton.jit
def _aggregate_kernel(s_ptr, s_b, s_c, s_y, s_x, C_s, fw_ptr, fs_ptr, tok_ptr, b_ptr, row_ptr, col_ptr,
                      w_ptr, agg_ptr, C_aux, chan0,
                      F: tl.constexpr, FQ: tl.constexpr, IDENT: tl.constexpr, M: tl.constexpr, MQ: tl.constexpr,
                      CH: tl.constexpr, BC: tl.constexpr):
    tok, b, row, col = _window(tok_ptr, b_ptr, row_ptr, col_ptr)
    k = tl.program_id(1)
    offs, ok = _footprint(fs_ptr, row, col, s_y, s_x, F, FQ)
    w = tl.load(w_ptr + tok * (MQ * MQ) + tl.arange(0, MQ * MQ))
    if IDENT:
        omega = w
    else:
        omega = tl.sum(_resampling(fw_ptr, row, col, F, FQ, M, MQ) * w[:, None], axis=0)  # R^T w
    for c0 in tl.range(k * CH, k * CH + CH, BC):
        cc = c0 + tl.arange(0, BC)
        cm = cc < C_s
        tile = tl.load(s_ptr + b * s_b + offs[:, None] + cc[None, :] * s_c, mask=ok[:, None] & cm[None, :],
                       other=0.0).to(tl.float32)
        tl.store(agg_ptr + tok * C_aux + chan0 + cc, tl.sum(tile * omega[:, None], axis=0), mask=cm)


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=32)
def _device_tables(spec: MiningSpec, global_view: bool, device: torch.device) -> list[tuple]:
    """Per stage: footprint weights (float32) and starts (int32) on the device, and (F, FQ, IDENT). The footprint
    grid side FQ is a power of two >= 4 (tl.dot needs >= 16 footprint pixels); for stage 0 of the crops it equals
    the window grid side so that footprint pixel p is window pixel p."""
    M = spec.window
    return [(fp.weights.to(device=device, dtype=torch.float32).contiguous(),
             fp.start.to(device=device, dtype=torch.int32),
             (fp.size, _pow2(M if fp.identity else fp.size, 4), fp.identity))
            for fp in footprints(spec, global_view)]


@functools.lru_cache(maxsize=32)
def _device_windows(spec: MiningSpec, device: torch.device) -> list[tuple[bool, list[torch.Tensor]]]:
    return [(ws.global_view, [t.to(torch.int32).contiguous() for t in (ws.token, ws.batch, ws.row, ws.col)])
            for ws in window_sets(spec, device)]


def launch_kernels(spec: MiningSpec, hr_stages: list[torch.Tensor], u: torch.Tensor, usum: torch.Tensor,
                   agg: torch.Tensor, shift: torch.Tensor, *, chunk: int = CHUNK, block_c: int = BLOCK_C,
                   num_warps: int = NUM_WARPS) -> None:
    """Fill agg (T, C_aux) and shift (T,) for every window."""
    dev, M = u.device, spec.window
    MQ = _pow2(M, 4)
    prec = "tf32x3" if spec.dtype == torch.float32 else "tf32"  # tf32x3: fp32-accurate for fp32 maps
    n_chunks = [-(-c // chunk) for c in spec.stage_channels]
    first_chunk = [sum(n_chunks[:s]) for s in range(4)]
    chan0 = [sum(spec.stage_channels[:s]) for s in range(4)]
    part = torch.empty(u.shape[0], sum(n_chunks), 3, MQ * MQ, dtype=torch.float32, device=dev)
    launches = []
    for global_view, idx in _device_windows(spec, dev):
        for s, (st, (fw, fs, (F, FQ, ident))) in enumerate(zip(hr_stages, _device_tables(spec, global_view, dev))):
            args = (st, st.stride(0), st.stride(1), st.stride(2), st.stride(3), st.shape[1], fw, fs, *idx)
            consts = dict(F=F, FQ=FQ, IDENT=ident, M=M, MQ=MQ, CH=chunk, BC=block_c,
                          num_warps=num_warps if FQ * FQ <= 64 else 4 * num_warps)  # big R: more registers
            grid = (idx[0].shape[0], n_chunks[s])
            _stats_kernel[grid](*args, u, spec.aux_channels, chan0[s], part, sum(n_chunks), first_chunk[s],
                                PREC=prec, **consts)
            launches.append((grid, args, chan0[s], consts))
    dot, sm, sq = part.sum(1).unbind(1)  # (T, MQ*MQ) each
    mean = sm / spec.aux_channels
    rstd = torch.rsqrt((sq / spec.aux_channels - mean * mean).clamp_min(0) + LN_EPS)
    logits = (rstd * (dot - mean * usum[:, None])).nan_to_num()  # nan_to_num as the official code does
    j = torch.arange(MQ * MQ, device=dev)
    logits = logits.masked_fill(((j // MQ >= M) | (j % MQ >= M))[None], float("-inf"))  # padding pixels
    w = (logits.softmax(-1) * rstd).contiguous()
    shift.copy_((w * mean).sum(-1))
    for grid, args, c0, consts in launches:
        _aggregate_kernel[grid](*args, w, agg, spec.aux_channels, c0, **consts)


def mine_triton(lr_feats: torch.Tensor, hr_stages: list[torch.Tensor], weights: dict[str, torch.Tensor],
                spec: MiningSpec) -> torch.Tensor:
    if spec.dtype == torch.float64:
        raise ValueError("lr_feats: dtype float64 is not supported by impl='triton' (use 'torch' or 'reference')")
    if not lr_feats.is_cuda and not INTERPRET:
        raise ValueError("lr_feats: impl='triton' needs CUDA tensors (on the CPU only under TRITON_INTERPRET=1)")
    dev = lr_feats.device
    x = output_views(lr_feats, spec).reshape(-1, spec.channels).float()
    # Half inputs: the two projections run as half GEMMs on the tensor cores, like the official fp16 path.
    gemm = spec.dtype if spec.dtype != torch.float32 and lr_feats.is_cuda else None
    u, usum = fold_queries(x, weights, spec, gemm)
    T = x.shape[0]
    agg = torch.empty(T, spec.aux_channels, dtype=torch.float32, device=dev)
    shift = torch.empty(T, dtype=torch.float32, device=dev)
    launch_kernels(spec, hr_stages, u, usum, agg, shift)
    out = x + project_values(agg, shift, weights, gemm)
    return out.to(spec.dtype).reshape(spec.batch, spec.views * spec.tokens, spec.channels)
