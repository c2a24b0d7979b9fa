"""The ``triton`` backend (kernels in ``kernels/``). Placeholder until the Triton issue lands."""
from .backends import _record_load_error

_record_load_error("triton", "not implemented yet")
