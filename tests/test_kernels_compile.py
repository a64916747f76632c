"""Every Triton kernel compiles for the GPUs users run, with the block configuration the launchers ship.

The interpreter (how the other tests run the kernels without a GPU) executes kernels as numpy and checks neither
typing rules of the real compiler nor shared-memory limits; a launch on the GPU would. So each kernel variant the
launchers can produce is compiled ahead of time for sm_80 (A100), sm_89 (L40, RTX 4090) and sm_90 (H100, H200) with
Triton's own compiler and ptxas, no GPU needed, and its shared memory is checked against the architecture's per-block
limit. The compilation runs in a child process: under TRITON_INTERPRET=1 (set for this test session) @triton.jit
gives interpreted functions, which cannot be compiled."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

# Largest dynamic shared memory of one block, bytes (CUDA programming guide, compute capabilities table).
SHARED_MEMORY_LIMIT = {80: 166912, 89: 101376, 90: 232448}
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _compile(kernel, arg_types, constexprs, arch, num_warps, num_stages=None):
    """Shared memory in bytes of kernel compiled for sm_<arch>; arg_types: pointer element types and non-int32
    scalars by argument name (every other runtime argument is an int32). Pointers and integers are declared divisible
    by 16, as Triton specialises them at launches with such sizes: vectorised loads and the deepest software
    pipeline, so the most shared memory a launch can ask for."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    untyped = [n for n in names if n.endswith("_ptr") and n not in arg_types]
    assert not untyped, f"no element type given for {untyped}"
    signature = {name: "constexpr" if name in constexprs else arg_types.get(name, "i32") for name in names}
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in names
               if signature[n].startswith("*") or signature[n] == "i32"}
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs=aligned)
    options = dict(num_warps=num_warps) | ({} if num_stages is None else dict(num_stages=num_stages))
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).metadata.shared


def fused_rft_variants():
    """(name, kernel, arg types, constexprs, launch options) for each kernel of kernels/fused_rft.py in each input
    dtype, with every optional input on (bias, entropy, soft-capping: switching one off only removes code), and each matmul the
    launcher runs (grad_h into fp32; grad_W stored, or accumulated for fp32 weights)."""
    from fastrft.kernels import fused_rft

    cuda = torch.device("cuda")
    for dtype, name in DTYPES.items():
        dot = fused_rft._dot_flags(SimpleNamespace(dtype=dtype, device=cuda))
        block_m, block_v, block_k, num_warps, num_stages = fused_rft._block_config(dtype)
        blocks = dict(BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k)
        launch = dict(num_warps=num_warps, num_stages=num_stages)
        types = {"hidden_ptr": f"*{name}", "weight_ptr": f"*{name}", "bias_ptr": f"*{name}", "targets_ptr": "*i64",
                 "rows_ptr": "*i64", "dlogits_ptr": f"*{name}", "scale": "fp32", "cap": "fp32"}
        types |= {p: "*fp32" for p in ("max_ptr", "rest_ptr", "dsum_ptr", "target_logit_ptr", "lse_ptr",
                                        "spread_ptr", "one_minus_pt_ptr", "dlogp_ptr", "dentropy_ptr")}
        yield (f"fwd {name}", fused_rft._fused_rft_fwd_kernel, types, dict(HAS_BIAS=True, SOFTCAP=True) | dot | blocks,
               launch)
        yield (f"bwd {name}", fused_rft._fused_rft_bwd_kernel, types,
               dict(HAS_BIAS=True, HAS_ENTROPY=True, SOFTCAP=True) | dot | blocks, launch)

        block_m, block_n, block_k, group_m, num_warps, num_stages = fused_rft._matmul_config(dtype)
        blocks = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m)
        launch = dict(num_warps=num_warps, num_stages=num_stages)
        # grad_h += dL/dz @ W into fp32; grad_W = (dL/dz)^T @ hidden[rows], fp32 ones accumulated in place.
        for what, transposed, c_type in (("grad_h", False, "fp32"), ("grad_W", True, name)):
            types = {"a_ptr": f"*{name}", "b_ptr": f"*{name}", "b_rows_ptr": "*i64", "c_ptr": f"*{c_type}"}
            flags = dict(A_TRANSPOSED=transposed, GATHER_B=transposed, ACCUMULATE=c_type == "fp32")
            yield f"matmul {what} {name}", fused_rft._slab_matmul_kernel, types, flags | dot | blocks, launch


def diff_weights_variants():
    from fastrft.kernels import diff_weights

    types = {"changed_ptr": "*u8", "lengths_ptr": "*i64", "counts_ptr": "*i32", "scale_ptr": "*fp32",
             "weights_ptr": "*fp32", "last_ptr": "*i64", "changed_weight": "fp32", "kept_weight": "fp32"}
    launch = dict(num_warps=diff_weights._NUM_WARPS)
    for context in (0, 2):
        flags = dict(CONTEXT=context, HAS_CONTEXT=context > 0, BLOCK=diff_weights._BLOCK)
        yield f"count context={context}", diff_weights._count_weighted_kernel, types, flags, launch
        yield (f"weights context={context}", diff_weights._diff_weights_kernel, types, flags | dict(HAS_SCALE=True),
               launch)


def compile_all():
    """{variant: {arch: shared memory bytes}} for every kernel variant and architecture."""
    results = {}
    for name, kernel, types, constexprs, launch in (*fused_rft_variants(), *diff_weights_variants()):
        results[name] = {arch: _compile(kernel, types, constexprs, arch, **launch) for arch in SHARED_MEMORY_LIMIT}
    return results


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run the kernels for real")
def test_every_kernel_compiles_for_the_gpus_within_their_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"   # the behaviour every Triton release so far defaults to
    child = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    assert len(results) == 3 * 4 + 4, results   # fwd, bwd, 2 matmuls per dtype; 4 diff-weights variants
    for name, shared in results.items():
        for arch, limit in SHARED_MEMORY_LIMIT.items():
            assert 0 <= shared[str(arch)] <= limit, f"{name} needs {shared[str(arch)]} B of shared memory on sm_{arch}"


if __name__ == "__main__":
    print(json.dumps(compile_all()))
