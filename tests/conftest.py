import os

import torch

# The Triton kernels run under the interpreter where there is no GPU; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
