import os

# Triton reads TRITON_INTERPRET when it is imported: set it before any test module imports triton,
# so Triton kernels run on CPU tensors through the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
