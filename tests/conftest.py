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
