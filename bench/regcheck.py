"""Register and spill report of the Triton kernels for a Hopper GPU, computed on a machine without one.

    python -m bench.regcheck            # every (stage footprint, warps) the 768 px and HD layouts launch

Compiles with triton for sm_90a and runs the ptxas shipped in the triton wheel with -v: a kernel that spills here
spills on the GPU. Used to size BLOCK_C / NUM_WARPS in kernels/triton_impl.py without spending device time.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import triton_impl as ti

FP32_PTRS = {"u_ptr", "part_ptr", "w_ptr", "agg_ptr", "fw_ptr"}
I32_PTRS = {"tok_ptr", "b_ptr", "row_ptr", "col_ptr", "fs_ptr"}


def registers(fn, constexprs: dict, num_warps: int, map_dtype: str = "*bf16") -> tuple[int, int]:
    """(registers per thread, spill-store bytes) of one specialisation of a kernel."""
    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else "*fp32" if n in FP32_PTRS else "*i32" if n in I32_PTRS
           else map_dtype if n == "s_ptr" else "i32" for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptx = Path("/tmp/mgm_regcheck.ptx")
    ptx.write_text(kernel.asm["ptx"])
    ptxas = Path(triton.__path__[0], "backends/nvidia/bin/ptxas-blackwell")
    out = subprocess.run([str(ptxas), "-v", "-arch=sm_90a", str(ptx), "-o", "/dev/null"],
                         capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else 0


def main() -> None:
    base = dict(M=8, MQ=8, CH=ti.CHUNK, BC=ti.BLOCK_C)
    # (F, FQ, IDENT) of the crops at 768 px and of the HD global view (kernels/folding.py footprints).
    for F, FQ, ident in ((8, 8, True), (6, 8, False), (4, 4, False), (3, 4, False), (16, 16, False), (10, 16, False)):
        nw = ti.NUM_WARPS if FQ * FQ <= 64 else 4 * ti.NUM_WARPS
        c = dict(base, F=F, FQ=FQ, IDENT=ident)
        stats = registers(ti._stats_kernel, dict(c, PREC="tf32"), nw)
        agg = registers(ti._aggregate_kernel, c, nw)
        print(f"F={F:2d} FQ={FQ:2d} ident={ident!s:5} warps={nw}: stats {stats[0]} regs / {stats[1]} B spilled, "
              f"aggregate {agg[0]} regs / {agg[1]} B spilled")


if __name__ == "__main__":
    main()
