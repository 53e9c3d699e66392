"""Shared test setup: which backends to test, and tolerance checks relative to the reference.

Triton kernels run on CPU tensors through Triton's interpreter, which must be switched on before
triton is first imported, hence the environment variable set here at collection time.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from hypothesis import settings

if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastkd
from fastkd._options import LossOptions

# Property tests (tests/test_properties.py) draw the same examples on every CI run, and a failure
# prints the blob that replays it (@reproduce_failure); elsewhere they explore new examples.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    settings.load_profile("ci")

# The C++ backend is part of the build: without it the suite fails, unless the build was
# skipped on purpose.
NATIVE_REQUIRED = os.environ.get("FASTKD_SKIP_NATIVE", "0") in ("", "0")


def kernel_backends() -> list:
    """Backends under test on this machine, as pytest params (unavailable ones skip, except a
    missing C++ build, which fails)."""
    status = fastkd.backends()
    params = []
    for name in ("cpu", "triton", "cuda"):
        marks = []
        if not status[name].available and not (name == "cpu" and NATIVE_REQUIRED):
            marks.append(pytest.mark.skip(reason=status[name].reason))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def device_for(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


# One ulp of an fp32 number in [1, 2): the unit of the per-operation errors below.
ULP = 2.0**-23


def gpu_row_error(columns: int, temperature: float = 1.0, softcap: float = 0.0) -> float:
    """Bound on what a GPU's approximate exp and division add to a log-sum-exp of a row of
    ``columns`` logits over ``temperature`` (docs/design.md §7), in absolute terms.

    On CUDA, Triton lowers fp32 ``tl.exp(x)`` to ``ex2.approx.f32(x * log2(e))``, the sequence
    of CUDA's ``__expf``: at most 2 + floor(1.173 |x|) ulp (CUDA C++ Programming Guide,
    intrinsic functions; the product's rounding grows with |x|), and ``/`` to
    ``div.full.f32``: at most 2 ulp. ``tl.log`` is libdevice's accurate ``logf``. Triton's
    interpreter, like the CPU kernels, is within an ulp everywhere.

    A row's sum of exponentials adds terms e^(x_j - m) (m the running max) with weights p_j,
    so its relative error, which is the log-sum-exp's absolute error, is at most
    sum_j p_j (2 + 1.173 (m - x_j)) ulp <= (2 + 1.173 H(p)) ulp <= (2 + 1.173 ln V) ulp,
    plus 2 ulp where a division follows. A softcap computes cap * (1 - e) / (1 + e) with
    e = exp(-2 |x| / cap), whose absolute error (2 + 2.35 y) e^(-2y) ulp is at most 2 ulp: the
    capped logit is off by at most 6 cap ulp, which a temperature below 1 magnifies by 1 / T.
    """
    return (4.0 + 1.173 * math.log(max(columns, 1)) + 6.0 * softcap / min(temperature, 1.0)) * ULP


def tolerance(
    backend: str, dtype: torch.dtype, columns: int, *, gpu_math: bool | None = None, **loss_options
) -> dict[str, float]:
    """``atol`` and ``rtol`` for ``assert_close`` of a kernel backend's loss and gradient, given
    the loss options of the call (docs/design.md §7): the tight ones of the interpreter and the
    CPU kernels, plus, for the Triton kernels on a GPU (``gpu_math``, by default whether the
    backend runs them there), what approximate exp and division add.

    With e = ``gpu_row_error``: each log-sum-exp is off by at most e; a probability
    q_j = exp(a_j - lse) by at most e q_j + (2 + 1.173 |ln q_j|) q_j ulp, where
    q |ln q| <= 1/e; a divergence is two log-sum-exps and a ratio of accumulated sums apart,
    within about 4 e, which the KD term scales by T^2 (its gradient by T); the CE is a
    log-sum-exp minus a logit, within 2 e. Twice the larger of those is the margin.
    """
    if dtype == torch.float32:
        tol = {"atol": 1e-5, "rtol": 1e-5}
    else:
        tol = {"atol": 1e-3, "rtol": 1e-2}
    if gpu_math is None:
        gpu_math = backend == "triton" and device_for(backend).type == "cuda"
    if gpu_math:
        temperature = loss_options.get("temperature", LossOptions.temperature)
        caps = (loss_options.get(f"{m}_softcap") or 0.0 for m in ("student", "teacher"))
        e = gpu_row_error(columns, temperature, max(caps))
        tol["atol"] += 8.0 * max(1.0, temperature**2) * e
        tol["rtol"] += 8.0 * e
    return tol


def assert_close(actual, truth, baseline=None, *, atol=1e-6, rtol=1e-5, name="value"):
    """|actual - truth| <= 2 |baseline - truth| + atol + rtol |truth|, elementwise.

    ``truth`` is fp64. ``baseline`` is what plain PyTorch gets at the same input precision
    (the reference backend on the same dtype): a kernel may be as wrong as that, not more.
    On failure, reports the worst element.
    """
    actual = actual.detach().double().cpu()
    truth = truth.detach().double().cpu()
    assert actual.shape == truth.shape, f"{name}: shape {actual.shape} != {truth.shape}"
    same_inf = torch.isinf(truth) & (actual == truth)
    allowed = atol + rtol * truth.abs()
    if baseline is not None:
        allowed = allowed + 2 * (baseline.detach().double().cpu() - truth).abs()
    err = torch.where(same_inf, 0.0, (actual - truth).abs())
    bad = ~(err <= allowed)  # NaN counts as bad
    if bad.any():
        excess = torch.where(bad, err - allowed, 0.0).nan_to_num(nan=float("inf"))
        i = int(excess.reshape(-1).argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), truth.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements out of tolerance; worst at {idx}: "
            f"actual {actual.reshape(-1)[i].item():.9g}, truth {truth.reshape(-1)[i].item():.9g}, "
            f"allowed error {allowed.reshape(-1)[i].item():.3g}"
        )


def tiny_llama(tokenizer, hidden: int = 32, layers: int = 1, *, seed: int | None = None):
    """A small Llama causal LM over ``tokenizer``'s vocabulary (blocks of up to 32 tokens),
    seeded when ``seed`` is given; its ``.config`` serves as a student config file."""
    import transformers

    if seed is not None:
        torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
