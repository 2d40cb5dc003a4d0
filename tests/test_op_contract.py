"""One op contract (speed_kernels/op_schema.py): every op declared once, the C++ header generated
from it, every backend's overload of an op with the declared schema, fake kernels and autograd
formulas that pass opcheck, and no second op namespace anywhere in the sources."""
from pathlib import Path

import pytest
import torch

from speed_kernels import op_schema
from speed_kernels.flow import FlowMatchingLoss
from speed_kernels.op_schema import SCHEMAS

from required import missing

ROOT = Path(__file__).resolve().parents[1]
UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _overload(name: str, overload: str):
    if overload == "default":
        from speed_kernels import _ext

        if _ext._C is None:
            missing("the compiled extension", _ext._IMPORT_ERROR)
    else:
        try:
            from speed_kernels.ops import flow_loss, flow_noise, triton_backend  # noqa: F401  (define .triton)
        except ImportError as exc:
            missing("triton", str(exc))
    return getattr(getattr(torch.ops.speed_kernels, name), overload)


def test_generated_header_is_current():
    header = (ROOT / "csrc" / "op_schemas.h").read_text()
    assert header == op_schema.c_header(), "csrc/op_schemas.h is stale: run `python -m speed_kernels.op_schema > csrc/op_schemas.h`"


@pytest.mark.parametrize("overload", ["default", "triton"])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_overload_has_the_declared_schema(name, overload):
    op = _overload(name, overload)
    declared = torch._C.parse_schema(f"speed_kernels::{name}{SCHEMAS[name]}")
    got = op._schema
    assert [(a.name, str(a.type), a.alias_info is not None and a.alias_info.is_write) for a in got.arguments] == [
        (a.name, str(a.type), a.alias_info is not None and a.alias_info.is_write) for a in declared.arguments
    ]
    assert [str(r.type) for r in got.returns] == [str(r.type) for r in declared.returns]


def test_no_second_op_namespace_in_the_sources():
    """Kernels register as overloads of the declared ops, never as ops of their own."""
    for path in (ROOT / "speed_kernels").rglob("*.py"):
        text = path.read_text()
        assert "custom_op(" not in text, f"{path.name} declares an op of its own (use op_schema.define_overload)"
        assert "speed_triton" not in text and "speed_flow_triton" not in text, path.name
    for path in list((ROOT / "csrc").glob("*.cpp")) + list((ROOT / "csrc").glob("*.cu")):
        text = path.read_text()
        if "TORCH_LIBRARY(" not in text:
            continue
        block = text[text.index("TORCH_LIBRARY("):]
        block = block[: block.index("}")]
        assert "\"" not in block, f"{path.name} spells a schema itself (use the SK_SCHEMA_* macros): {block}"


def _diffusion_case():
    from speed_kernels import DiffusionLoss, NoiseSchedule

    lf = DiffusionLoss(NoiseSchedule.linear(), "speed", learn_sigma=True, backend="torch", seed=3)
    tab = lf.tables("cpu")
    x0 = torch.randn(3, 2, 4, 4)
    pred = torch.randn(3, 4, 4, 4)
    t = torch.randint(0, 1000, (3,))
    return tab, x0, pred, t, lf.k0, lf.k1, torch.tensor([5])


@pytest.mark.parametrize("overload", ["default", "triton"])
def test_opcheck_diffusion_ops(overload):
    tab, x0, pred, t, k0, k1, call = _diffusion_case()
    noise = _overload("noise", overload)
    torch.library.opcheck(noise, (x0, None, tab, k0, k1, call.clone(), True, 400), test_utils=UTILS)
    torch.library.opcheck(noise, (x0, t, tab, k0, k1, call.clone(), False, 0), test_utils=UTILS)
    loss = _overload("loss", overload)
    for reduce_mean in (True, False):
        torch.library.opcheck(loss, (pred.clone().requires_grad_(), x0, t, tab, k0, k1, call, 1, True, reduce_mean,
                                     reduce_mean), test_utils=UTILS)
    torch.library.opcheck(_overload("loss_backward", overload),
                          (torch.rand(3), pred, x0, t, tab, k0, k1, call, 1, True), test_utils=UTILS)


@pytest.mark.parametrize("overload", ["default", "triton"])
def test_opcheck_flow_ops(overload):
    lf = FlowMatchingLoss("logit_normal", backend="torch", seed=4)
    tab = lf.tables("cpu")
    x0 = torch.randn(3, 5)
    call = torch.tensor([2])
    noise = _overload("flow_noise", overload)
    torch.library.opcheck(noise, (x0, None, tab, lf.k0, lf.k1, call.clone()), test_utils=UTILS)
    torch.library.opcheck(noise, (x0, torch.rand(3), tab, lf.k0, lf.k1, call.clone()), test_utils=UTILS)
    pred = torch.randn(3, 5, requires_grad=True)
    loss = _overload("flow_loss", overload)
    for target, inv_sigma2 in ((0, False), (1, True), (2, False)):
        torch.library.opcheck(loss, (pred, x0, torch.rand(3) * 0.9 + 0.05, tab, lf.k0, lf.k1, call, target,
                                     inv_sigma2, True), test_utils=UTILS)


@pytest.mark.parametrize("overload", ["default", "triton"])
def test_both_overloads_agree_with_the_reference(overload):
    """The same inputs through an overload and through the plain-PyTorch reference: same t, x_t,
    loss and gradient (the bits across backends are tested per backend elsewhere)."""
    from speed_kernels import reference

    tab, x0, pred, _, k0, k1, call = _diffusion_case()
    x_t, t = _overload("noise", overload)(x0, None, tab, k0, k1, c := call.clone(), True, 400)
    x_r, t_r = reference.noise(x0, None, tab, k0, k1, c_r := call.clone(), True, 400)
    assert torch.equal(t, t_r) and c.item() == c_r.item() == 6
    torch.testing.assert_close(x_t, x_r)
    p = pred.clone().requires_grad_()
    loss, terms, _ = _overload("loss", overload)(p, x0, t, tab, k0, k1, c, 1, True, True, True)
    loss.backward()
    p_r = pred.clone().requires_grad_()
    loss_r, terms_r = reference.loss(p_r, x0, t, tab, k0, k1, c_r, 1, True, True)
    loss_r.backward()
    torch.testing.assert_close(loss, loss_r)
    torch.testing.assert_close(terms, terms_r)
    torch.testing.assert_close(p.grad, p_r.grad)


def test_with_grad_needs_reduce_mean_on_every_overload():
    tab, x0, pred, t, k0, k1, call = _diffusion_case()
    for overload in ("default", "triton"):
        try:
            op = _overload("loss", overload)
        except pytest.skip.Exception:
            continue
        with pytest.raises((RuntimeError, ValueError), match="with_grad needs reduce_mean"):
            op(pred, x0, t, tab, k0, k1, call, 1, True, False, True)


def test_backends_take_the_named_arguments():
    """Every CPU backend's noise()/loss() takes DiffusionArgs; the loss object builds it once."""
    from speed_kernels import DiffusionLoss, NoiseSchedule
    from speed_kernels.backends import select

    lf = DiffusionLoss(NoiseSchedule.linear(), "uniform", backend="torch", seed=1)
    x0 = torch.randn(2, 3, 4, 4)
    lf.noise(x0)
    a = lf.op_args("cpu")
    assert isinstance(a, op_schema.DiffusionArgs) and a is lf.op_args("cpu")
    assert a.tables is lf.tables("cpu") and a.call is lf._counter("cpu")
    for name in ("torch", "torch-fast", "cpp"):
        try:
            b = select(name, torch.device("cpu"))
        except (ImportError, ValueError) as exc:
            if name == "cpp":
                missing("the compiled extension", str(exc))
            raise
        x_t, t = b.noise(x0, None, a)
        loss, terms = b.loss(torch.randn(2, 3, 4, 4), x0, t, a, True)
        assert x_t.shape == x0.shape and loss.shape == () and terms.shape == (2, 2)
