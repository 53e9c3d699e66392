"""The loss options, declared once, and the kernels' argument set (docs/design.md §2, §9): every
public loss shows every option, and every backend reads every KernelArgs field as the reference
does, so an order drift between the schema and an implementation fails here."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
import torch
from conftest import assert_close, device_for, kernel_backends, tolerance

import fastkd
from fastkd._options import DIVERGENCE_CODES, KernelArgs, LossOptions
from fastkd.backends import get_backend

FIELDS = dataclasses.fields(LossOptions)
FUNCTIONS = [fastkd.kd_loss, fastkd.fused_linear_kd_loss]
MODULES = [fastkd.KDLoss, fastkd.FusedLinearKDLoss]


@pytest.mark.parametrize("api", FUNCTIONS + MODULES, ids=lambda api: api.__name__)
def test_every_option_in_the_signature_and_docs(api):
    params = inspect.signature(api).parameters
    doc = inspect.getdoc(api if api in FUNCTIONS else api.__init__)
    for f in FIELDS:
        assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY, f.name
        assert params[f.name].default == f.default, f.name
        assert f"{f.name}: {f.metadata['doc'][:30]}" in " ".join(doc.split()), f.name


def test_module_settings_are_the_functions_less_per_call_tensors():
    assert list(inspect.signature(fastkd.KDLoss).parameters) == [
        *(f.name for f in FIELDS),
        "inplace_grad",
        "backend",
    ]
    assert list(inspect.signature(fastkd.FusedLinearKDLoss).parameters)[len(FIELDS) :] == [
        "teacher_mixture",
        "chunk_size",
        "memory_budget",
        "shift_labels",
        "backend",
    ]


def test_unknown_option_is_a_type_error():
    s = torch.zeros(2, 4)
    with pytest.raises(TypeError, match="temprature"):
        fastkd.kd_loss(s, s, alpha=0.0, temprature=2.0)
    with pytest.raises(TypeError, match="temprature"):
        fastkd.KDLoss(temprature=2.0)
    with pytest.raises(TypeError, match="token_weights"):
        fastkd.KDLoss(token_weights=None)  # per call, not a setting


def test_return_parts_overloads():
    returns = [
        typing.get_type_hints(f)["return"]
        for f in typing.get_overloads(fastkd.fused_linear_kd_loss)
    ]
    assert returns == [torch.Tensor, fastkd.KDLossParts]


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, {"kd_weight": 0.5, "ce_weight": 0.5, "divergence": DIVERGENCE_CODES["kl"]}),
        ({"alpha": 1}, {"kd_weight": 0.0, "ce_weight": 1.0}),
        ({"kd_weight": 2.0}, {"kd_weight": 2.0, "ce_weight": 0.0}),
        ({"divergence": "jsd", "beta": 0.0}, {"divergence": DIVERGENCE_CODES["kl"], "mix": 0.0}),
        ({"divergence": "jsd", "beta": 1.0}, {"divergence": DIVERGENCE_CODES["reverse_kl"]}),
        ({"divergence": "jsd", "beta": 0.3}, {"divergence": DIVERGENCE_CODES["jsd"], "mix": 0.3}),
        ({"divergence": "skew_reverse_kl", "skew": 0}, {"divergence": 1, "mix": 0.0}),
        ({"divergence": "skew_kl"}, {"divergence": DIVERGENCE_CODES["skew_kl"], "mix": 0.1}),
        ({"divergence": "tvd", "beta": 0.3}, {"mix": 0.0}),
        ({"student_softcap": 5}, {"student_softcap": 5.0, "teacher_softcap": 0.0}),
        ({"teacher_logit_scale": 2}, {"teacher_scale": 2.0, "student_scale": 1.0}),
    ],
)
def test_kernel_args_are_canonical(options, expected):
    args = LossOptions(**options).kernel_args(10, 10)
    assert {k: getattr(args, k) for k in expected} == expected
    assert all(type(v) is type(d) for v, d in zip(args, BASE))  # int and float as the schema


def test_kernel_args_vocabulary():
    assert LossOptions(vocab="truncate").kernel_args(10, 7).kd_vocab == 7
    assert LossOptions(vocab="pad").kernel_args(10, 7).kd_vocab == 10
    with pytest.raises(ValueError, match="vocab='truncate'"):
        LossOptions().kernel_args(10, 7)
    with pytest.raises(ValueError, match="teacher 12 > student 10"):
        LossOptions(vocab="pad").kernel_args(10, 12)


# --- the argument set, field by field, on every kernel backend --------------------------------

V, VT = 300, 280
BASE = KernelArgs(
    divergence=DIVERGENCE_CODES["jsd"],
    temperature=2.0,
    kd_weight=0.6,
    ce_weight=0.4,
    mix=0.3,
    ignore_index=-100,
    kd_vocab=V,  # the teacher's last V - VT columns count as -inf
    student_scale=0.8,
    student_softcap=6.0,
    teacher_scale=1.3,
    teacher_softcap=9.0,
)
CHANGES = {
    "divergence": {"divergence": DIVERGENCE_CODES["skew_kl"]},
    "temperature": {"temperature": 3.0},
    "kd_weight": {"kd_weight": 0.9},
    "ce_weight": {"ce_weight": 0.1},
    "mix": {"mix": 0.7},
    "ignore_index": {"ignore_index": 7},  # the label of row 0
    "kd_vocab": {"kd_vocab": 250},
    "student_scale": {"student_scale": 0.5},
    "student_softcap": {"student_softcap": 3.0},
    "teacher_scale": {"teacher_scale": 0.7},
    "teacher_softcap": {"teacher_softcap": 4.0},
    "swap weights": {"kd_weight": BASE.ce_weight, "ce_weight": BASE.kd_weight},
    "swap scales": {"student_scale": BASE.teacher_scale, "teacher_scale": BASE.student_scale},
    "swap softcaps": {
        "student_softcap": BASE.teacher_softcap,
        "teacher_softcap": BASE.student_softcap,
    },
}


def test_changes_cover_every_field():
    assert {k for change in CHANGES.values() for k in change} == set(KernelArgs._fields)


def _inputs(device):
    g = torch.Generator().manual_seed(24)
    student = torch.randn(6, V, generator=g) * 4
    teacher = torch.randn(6, VT, generator=g) * 4
    labels = torch.randint(8, V, (6,), generator=g)
    labels[0] = 7
    weights = torch.rand(6, generator=g) + 0.5
    grad_loss = torch.randn(6, generator=g)
    return [t.to(device) for t in (student, teacher, labels, weights, grad_loss)]


def _run(backend, args, student, teacher, labels, weights, grad_loss):
    """loss [N] and gradient of one backend's fwd/bwd."""
    loss, stats = backend.fwd(student, teacher, labels, weights, args)
    grad = torch.empty_like(student)
    backend.bwd(student, teacher, labels, weights, stats, grad_loss.to(loss.dtype), args, grad)
    return loss, grad


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_every_field_moves_the_result_as_the_reference(backend, change):
    kernel, reference = get_backend(backend), get_backend("reference")
    kernel.load()
    tensors = _inputs(device_for(backend))
    cpu64 = [t.cpu().double() if t.is_floating_point() else t.cpu() for t in tensors]
    args = BASE._replace(**change)
    base_loss, base_grad = _run(kernel, BASE, *tensors)
    loss, grad = _run(kernel, args, *tensors)
    truth_loss, truth_grad = _run(reference, args, *cpu64)
    assert not torch.equal(loss, base_loss) and not torch.equal(grad, base_grad)
    tol = tolerance(
        backend,
        torch.float32,
        V,
        temperature=args.temperature,
        student_softcap=args.student_softcap,
        teacher_softcap=args.teacher_softcap,
    )
    assert_close(loss, truth_loss, name="loss", **tol)
    assert_close(grad, truth_grad, name="grad", **tol)


# --- the term weights -------------------------------------------------------------------------


def test_term_weights_are_plain_multipliers():
    """kd_weight and ce_weight are not bounded by 1 (alpha is): doubling both doubles the
    loss; both 0, given explicitly, is a loss of 0."""
    g = torch.Generator().manual_seed(25)
    s, t = torch.randn(5, 30, generator=g), torch.randn(5, 30, generator=g)
    y = torch.randint(0, 30, (5,), generator=g)

    def loss(**weights):
        return fastkd.kd_loss(s, t, y, reduction="none", backend="reference", **weights)

    assert torch.allclose(
        loss(kd_weight=2.0, ce_weight=1.0), 2 * loss(kd_weight=1.0, ce_weight=0.5)
    )
    assert torch.equal(loss(kd_weight=0.0, ce_weight=0.0), torch.zeros(5))


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"kd_weight": -1.0}, ValueError, "kd_weight must be >= 0"),
        ({"ce_weight": -0.5, "kd_weight": 1.0}, ValueError, "ce_weight must be >= 0"),
        ({"ce_weight": float("nan")}, ValueError, "ce_weight must be finite"),
        ({"kd_weight": float("inf")}, ValueError, "kd_weight must be finite"),
        ({"ce_weight": True}, TypeError, "ce_weight must be a real number"),
        ({"kd_weight": "1"}, TypeError, "kd_weight must be a real number"),
        ({"alpha": 1.01}, ValueError, r"alpha \(the CE weight\) must be in \[0, 1\]"),
        ({"alpha": float("nan")}, ValueError, "alpha must be finite"),
        ({"ce_weight": 0.0}, ValueError, "ce_weight=0 without kd_weight makes the loss 0"),
        ({"kd_weight": 0}, ValueError, "kd_weight=0 without ce_weight makes the loss 0"),
        # Options become float32 in the kernels: 1.6e-103 would be 0 there, and 0 * inf NaN.
        ({"kd_weight": 1.6e-103, "ce_weight": 0.5}, ValueError, "kd_weight must be 0 or of"),
        ({"skew": 1.5e-285, "divergence": "skew_kl"}, ValueError, "skew must be 0 or of"),
        ({"temperature": 1e-40}, ValueError, r"1/T must be a finite float32"),
    ],
)
def test_term_weight_checks(options, error, match):
    with pytest.raises(error, match=match):
        LossOptions(**options)
