import os
import tempfile

import torch

# The Triton kernels run under the interpreter where there is no GPU; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests pin each kernel family to its default config: on a GPU, tuning every tiny shape made the native suite take
# over six minutes. Tuning itself is tested with forced spaces (test_autotune.py) and, on the GPU, by the
# cold-cache section of tools/cold_cache.py. The tuning cache of a test run never touches the user's.
os.environ.setdefault("MOEKIT_TRITON_AUTOTUNE", "0")
os.environ.setdefault("MOEKIT_CACHE_DIR", tempfile.mkdtemp(prefix="moekit-test-cache-"))


def _bitsandbytes_reference_kernels_on_cpu() -> None:
    """bitsandbytes is the tests' oracle for NF4 (its blocks of 64 run over the weight's flattened storage). Its
    native CPU kernels (0.50, loaded on some machines, e.g. AVX-512 ones) mis-index the scales of a tensor whose
    rows are not whole blocks: ``dequantize_4bit`` of a [4, 48, 32] weight differs from the same call on its
    flattened shape, and ``Linear4bit``'s inference path (where the CPU has AVX-512 bf16) repacks its weight for a
    kernel that refuses such shapes. Where that is so, the CPU takes bitsandbytes' own reference (PyTorch)
    implementations for the run, so every test compares against bitsandbytes' format itself."""
    try:
        import bitsandbytes.functional as bnb
        import bitsandbytes.nn.modules as bnb_modules
        from bitsandbytes.backends.default import ops as reference
    except ImportError:
        return
    weight = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    shaped = bnb.dequantize_4bit(packed, state)
    state.shape = torch.Size([weight.numel()])
    if torch.equal(shaped.reshape(-1), bnb.dequantize_4bit(packed, state)):
        return

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        A = A if A.dtype == torch.uint8 else A.view(torch.uint8)
        code = reference._get_4bit_code(quant_type, A.device)
        return reference._dequantize_4bit_compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)

    def gemv_4bit(A, B, shapeB, absmax, code, blocksize):
        quant_type = "fp4" if code[1] > 0 else "nf4"
        return torch.nn.functional.linear(A, dequantize_4bit(B, absmax, blocksize, quant_type, shapeB, A.dtype))

    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu")(dequantize_4bit)
    torch.library.register_kernel("bitsandbytes::gemv_4bit", "cpu")(gemv_4bit)
    bnb_modules.has_avx512bf16 = lambda: False  # Linear4bit keeps bitsandbytes' packing on the CPU


_bitsandbytes_reference_kernels_on_cpu()
