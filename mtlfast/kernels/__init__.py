"""Hand-written kernels. ``kernels.triton`` holds the Triton ones (GPU, or CPU tensors under
``TRITON_INTERPRET=1``); import it only when Triton is installed (``mtlfast._ext.has_triton``)."""
