"""Triton kernels, one file per op (``encode.py``: the fused encoder forward).

Importing this package imports triton; nothing here touches a GPU at import
time.  With ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels
run on CPU tensors through Triton's interpreter, which is how CI tests them.
"""
