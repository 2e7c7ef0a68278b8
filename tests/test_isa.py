"""Every instruction-set build of the C++ kernel (generic, AVX2, AVX-512) that this
CPU can run gives the reference's results; the generic one always runs."""

import pytest
import torch

import lsce
from lsce import _C
from _util import assert_close_to_truth, loss_and_grad, make_options, make_problem, truth

ISAS = [isa for isa in ("generic", "avx2", "avx512") if _C.set_isa(isa)]
_C.set_isa("auto")


@pytest.fixture(params=ISAS)
def isa(request):
    assert _C.set_isa(request.param)
    assert _C.active_isa() == request.param
    yield request.param
    _C.set_isa("auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(33, 300), (2, 40000), (5, 17)], ids=str)
@pytest.mark.parametrize("options", [(), ("weight", "z_loss", "softcap", "prior")], ids="+".join)
def test_each_isa_matches_reference(isa, dtype, shape, options):
    logits, target = make_problem(shape, dtype, ignore_frac=0.2)
    opts = make_options(shape[1], options)
    up = torch.randn(shape[0], dtype=torch.float32)
    loss, grad = loss_and_grad(lsce.cross_entropy, logits, target, up, reduction="none", label_smoothing=0.1, **opts)
    t_loss, t_grad = truth(logits, target, up.double(), reduction="none", label_smoothing=0.1, **opts)
    assert_close_to_truth(loss, t_loss, dtype, what=f"{isa} loss")
    assert_close_to_truth(grad, t_grad, dtype, what=f"{isa} grad")


def test_unknown_isa_is_refused():
    assert not _C.set_isa("sse9")
    assert _C.active_isa() in ("generic", "avx2", "avx512")
