//! RMSNorm as one operation. Autodiff of the composition keeps the float32 copy of the input,
//! its square, the mean, the root and its reciprocal, and the normalised input; this keeps
//! only the input and the weight, and backward recomputes the row statistics.
//!
//! The statistics are taken in float32 whatever the compute dtype, as transformers does; the
//! result is in the dtype of `x`.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// `x` in `dtype` (a no-op when it already is).
fn cast<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() == dtype {
        x
    } else {
        x.cast(dtype)
    }
}

/// Each row's `1 / √(mean(x²) + ε)` `[batch, seq, 1]` of a float32 `x`.
fn inverse_rms<B: Backend>(x: &Tensor<B, 3>, eps: f64) -> Tensor<B, 3> {
    (x.clone().square().mean_dim(2) + eps).sqrt().recip()
}

/// `x / rms(x) · weight` over the last dimension of `x` `[batch, seq, hidden]`; `weight` is
/// `[hidden]`.
pub fn forward<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    let dtype = x.dtype();
    let x = cast(x, DType::F32);
    let normalised = x.clone() * inverse_rms(&x, eps);
    cast(normalised, dtype) * cast(weight, dtype).unsqueeze::<3>()
}

/// Gradients `(d x, d weight)` for `grad` of the output: with `r = 1 / rms(x)` and
/// `x̂ = x · r`, `d weight = Σ grad · x̂` over tokens and
/// `d x = r · (grad · weight − x̂ · mean(grad · weight · x̂))`. Computed in float32 and
/// returned in the dtypes of `x` and `weight`.
pub fn backward<B: Backend>(
    x: Tensor<B, 3>,
    weight: Tensor<B, 1>,
    eps: f64,
    grad: Tensor<B, 3>,
) -> (Tensor<B, 3>, Tensor<B, 1>) {
    let (x_dtype, weight_dtype) = (x.dtype(), weight.dtype());
    let [batch, seq, hidden] = x.dims();
    let x = cast(x, DType::F32);
    let grad = cast(grad, DType::F32);
    let inverse = inverse_rms(&x, eps);
    let normalised = x * inverse.clone();
    let grad_weight = (grad.clone() * normalised.clone())
        .reshape([batch * seq, hidden])
        .sum_dim(0)
        .reshape([hidden]);
    let grad_normalised = grad * cast(weight, DType::F32).unsqueeze::<3>();
    let projection = (grad_normalised.clone() * normalised.clone()).mean_dim(2);
    let grad_x = (grad_normalised - normalised * projection) * inverse;
    (cast(grad_x, x_dtype), cast(grad_weight, weight_dtype))
}
