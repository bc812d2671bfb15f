//! Rotary position embedding as one operation: `x · cos + rotate_half(x) · sin`, where
//! `rotate_half` maps a head's halves `(x₁, x₂)` to `(−x₂, x₁)`. The composition runs as a
//! narrow, a negation, a concatenation and three element-wise passes, each a kernel and a
//! temporary on a GPU; CubeCL backends run it as one kernel (`kernels::cube`).
//!
//! Backward is the same rotation by the opposite angle, `grad · cos + rotate_half(grad) ·
//! (−sin)`: that holds because the tables repeat over the two halves of a head
//! (`cat(freqs, freqs)` in transformers), which every RoPE variant keeps.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Rotates `x` `[batch, heads, seq, head_dim]` by the tables `cos`, `sin`
/// `[batch, 1, seq, head_dim]` (shared by every head).
pub fn forward<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    let [batch, heads, seq, dim] = x.dims();
    let half = dim / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let expand = |t: Tensor<B, 4>| t.expand([batch, heads, seq, dim]);
    x * expand(cos) + rotated * expand(sin)
}
