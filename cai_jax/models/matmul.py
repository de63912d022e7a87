"""Matrix products at the precision `model.matmul_dtype` names.

"float32" is the plain float32 product. "bfloat16" rounds both operands to
bfloat16 and sums the products in float32, so the result is float32: on a CPU
with AMX (the reference machine) XLA:CPU runs that three to four times as fast
as the float32 product, while a product with a bfloat16 *result* is slower
than float32 (docs/bfloat16-products.md). A TPU does the same
rounding to float32 operands at its default precision. The backward pass
rounds the incoming gradient to bfloat16 too, so its products take the fast
path as well; parameters, activations, norms, softmax and the optimizer stay
float32.

Every product of the model goes through `einsum` or, for Flax's DenseGeneral,
`dot_general`.
"""
from __future__ import annotations

import functools
import string

import jax
import jax.numpy as jnp
from jax import lax

MATMUL_DTYPES = ("float32", "bfloat16")


def check_matmul_dtype(matmul_dtype: str) -> None:
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f"model.matmul_dtype is {matmul_dtype!r}; one of {MATMUL_DTYPES}")


def stored_operand(w, matmul_dtype: str):
    """A weight prepared once for many products: rounded to bfloat16 here when
    the products round their operands anyway, so each product need not (and a
    decode step reads half the bytes); otherwise unchanged."""
    return w.astype(jnp.bfloat16) if matmul_dtype == "bfloat16" else w


def read_operand(w, matmul_dtype: str, compute_dtype):
    """A weight from `stored_operand` as a product takes it: as stored when
    rounded (casting it up would only be undone), else in compute dtype."""
    return w if matmul_dtype == "bfloat16" else w.astype(compute_dtype)


def einsum(spec: str, a, b, matmul_dtype: str = "float32", out_dtype=jnp.float32):
    """`jnp.einsum(spec, a, b)` at `matmul_dtype`, returned as `out_dtype`.

    With "bfloat16", every index of one operand must appear in the other
    operand or in the output (true of every matrix product), so that the
    gradients are einsums too.
    """
    check_matmul_dtype(matmul_dtype)
    if matmul_dtype == "float32":
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)
    return _rounded_einsum(_checked_spec(spec), (jnp.dtype(a.dtype), jnp.dtype(b.dtype)),
                           a, b).astype(out_dtype)


@functools.lru_cache(maxsize=None)
def _checked_spec(spec: str) -> str:
    inputs, arrow, out = spec.replace(" ", "").partition("->")
    parts = inputs.split(",")
    if not arrow or len(parts) != 2 or "." in spec:
        raise ValueError(f"einsum {spec!r}: expected 'a,b->c' with explicit output and no ellipsis")
    a, b = parts
    for name, operand, other in (("first", a, b), ("second", b, a)):
        if len(set(operand)) != len(operand):
            raise ValueError(f"einsum {spec!r}: the {name} operand repeats an index")
        lonely = set(operand) - set(other) - set(out)
        if lonely:
            raise ValueError(f"einsum {spec!r}: index {sorted(lonely)} of the {name} operand is summed "
                             "alone, which a bfloat16 product's gradient cannot express")
    return f"{a},{b}->{out}"


def _bf16(x):
    return x.astype(jnp.bfloat16)


def _product(spec: str, a16, b16):
    return jnp.einsum(spec, a16, b16, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _rounded_einsum(spec, dtypes, a, b):
    return _product(spec, _bf16(a), _bf16(b))


def _rounded_einsum_fwd(spec, dtypes, a, b):
    a16, b16 = _bf16(a), _bf16(b)
    return _product(spec, a16, b16), (a16, b16)


def _rounded_einsum_bwd(spec, dtypes, residuals, grad):
    a16, b16 = residuals
    (a, b), out = spec.split("->")[0].split(","), spec.split("->")[1]
    g16 = _bf16(grad)
    # d(out)/da contracts the gradient with b over b's indices that a lacks, and back.
    grad_a = _product(f"{out},{b}->{a}", g16, b16).astype(dtypes[0])
    grad_b = _product(f"{a},{out}->{b}", a16, g16).astype(dtypes[1])
    return grad_a, grad_b


_rounded_einsum.defvjp(_rounded_einsum_fwd, _rounded_einsum_bwd)


def _spec_of(dimension_numbers, lhs_ndim: int, rhs_ndim: int) -> str:
    """The einsum spec of `lax.dot_general`'s dimension numbers: batch axes,
    then the lhs's free axes, then the rhs's, as dot_general orders its output."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    letters = iter(string.ascii_letters)
    lhs, rhs = [None] * lhs_ndim, [None] * rhs_ndim
    for li, ri in list(zip(lhs_batch, rhs_batch)) + list(zip(lhs_contract, rhs_contract)):
        lhs[li] = rhs[ri] = next(letters)
    for axes in (lhs, rhs):
        for i, letter in enumerate(axes):
            if letter is None:
                axes[i] = next(letters)
    batch = [lhs[i] for i in lhs_batch]
    free_l = [x for i, x in enumerate(lhs) if i not in lhs_batch and i not in lhs_contract]
    free_r = [x for i, x in enumerate(rhs) if i not in rhs_batch and i not in rhs_contract]
    return f"{''.join(lhs)},{''.join(rhs)}->{''.join(batch + free_l + free_r)}"


def _rounded_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                         **unused):
    """`lax.dot_general`'s signature (as Flax calls it), at bfloat16 operands."""
    out = einsum(_spec_of(dimension_numbers, lhs.ndim, rhs.ndim), lhs, rhs, "bfloat16")
    return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def dot_general(matmul_dtype: str):
    """The `dot_general` for Flax's Dense layers at `matmul_dtype`."""
    check_matmul_dtype(matmul_dtype)
    return lax.dot_general if matmul_dtype == "float32" else _rounded_dot_general
