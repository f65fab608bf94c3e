"""The operator's backend check on machines without a GPU. (Bad arguments of every public
entry point are in tests/test_bad_inputs.py; meta tensors in tests/test_meta_device.py.)"""

import pytest
import torch

import bspf_ext


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without a GPU")
def test_cuda_tensor_gives_a_clear_error_without_gpu():
    if bspf_ext.has_cuda_build():
        pytest.skip("the CUDA module is built; CUDA tensors cannot be made without a GPU")
    # A CUDA tensor cannot be created here; the backend check is what a CUDA tensor reaches.
    from bspf_ext.ops import backends as _backends

    with pytest.raises(RuntimeError, match="built without CUDA"):
        _backends.require_cuda()
