"""The two engines, each ``run(call, plan, x, routing_weights) -> [T, H]`` over an ``ExpertsCall``:

  reference.py  pure PyTorch, every device; the oracle for the kernels
  triton.py     the fused Triton kernels of ``moekit.kernels`` (CUDA, or the CPU under TRITON_INTERPRET=1)

``moekit.backend.select_engine`` is the one place that chooses between them.
"""
