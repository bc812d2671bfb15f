//! The building blocks of a Llama/Mistral decoder. Field names are the checkpoint's keys
//! (`self_attn.q_proj.weight`, `mlp.gate_proj.weight`, …), so a module path is a tensor name.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use super::config::ModelConfig;
use super::context::AttentionInputs;
use super::kv_cache::{DecodeStep, KvCache};
use crate::checkpoint::{read_f32, WeightSource};
use crate::error::Result;
use crate::kernels::attention::MASKED_SCORE;
use crate::kernels::Kernels;

/// Makes a parameter from host values.
pub(crate) fn param<B: Backend, const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

/// Loads the tensor `name` with the given shape as a parameter.
pub(crate) fn load_param<B: Backend, const D: usize>(
    source: &dyn WeightSource,
    name: &str,
    shape: [usize; D],
    device: &B::Device,
) -> Result<Param<Tensor<B, D>>> {
    Ok(param(read_f32(source, name, &shape)?, shape, device))
}

/// `t` in `dtype` (a no-op when it already is): how mixed precision moves between bfloat16
/// compute and the float32 kept for weights, norms' statistics, softmax and the loss.
pub fn in_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(dtype)
    }
}

/// A bias-free linear map with the weight in the checkpoint's `[out, in]` layout.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[out_features, in_features]`.
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: Backend> Linear<B> {
    fn load(
        source: &dyn WeightSource,
        prefix: &str,
        out: usize,
        inp: usize,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(Self {
            weight: load_param(source, &format!("{prefix}.weight"), [out, inp], device)?,
        })
    }
}

impl<B: Kernels> Linear<B> {
    /// `[batch, seq, in] -> [batch, seq, out]`, in the dtype of `x`: under mixed precision the
    /// float32 weight is cast to bf16 where it is used, and its gradient flows back in float32.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, seq, inp] = x.dims();
        let [out, _] = self.weight.dims();
        let x = x.reshape([batch * seq, inp]);
        <B as Kernels>::linear(x, self.weight.val()).reshape([batch, seq, out])
    }
}

/// Root-mean-square layer norm with a learned scale.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[hidden]`.
    pub weight: Param<Tensor<B, 1>>,
    #[module(skip)]
    eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub(crate) fn load(
        source: &dyn WeightSource,
        name: &str,
        cfg: &ModelConfig,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(Self {
            weight: load_param(source, &format!("{name}.weight"), [cfg.hidden_size], device)?,
            eps: cfg.rms_norm_eps,
        })
    }
}

impl<B: Kernels> RmsNorm<B> {
    /// `[batch, seq, hidden] -> [batch, seq, hidden]`. The statistics are taken in float32
    /// whatever the compute dtype, as transformers does; the result is in the dtype of `x`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        B::rms_norm(x, self.weight.val(), self.eps)
    }
}

/// Multi-head attention with grouped key/value heads and rotary positions.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[heads * head_dim, hidden]`.
    pub q_proj: Linear<B>,
    /// `[kv_heads * head_dim, hidden]`.
    pub k_proj: Linear<B>,
    /// `[kv_heads * head_dim, hidden]`.
    pub v_proj: Linear<B>,
    /// `[hidden, heads * head_dim]`.
    pub o_proj: Linear<B>,
    #[module(skip)]
    num_heads: usize,
    #[module(skip)]
    num_kv_heads: usize,
    #[module(skip)]
    head_dim: usize,
}

impl<B: Backend> Attention<B> {
    fn load(
        source: &dyn WeightSource,
        prefix: &str,
        cfg: &ModelConfig,
        device: &B::Device,
    ) -> Result<Self> {
        let (h, q, kv) = (
            cfg.hidden_size,
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        Ok(Self {
            q_proj: Linear::load(source, &format!("{prefix}.q_proj"), q, h, device)?,
            k_proj: Linear::load(source, &format!("{prefix}.k_proj"), kv, h, device)?,
            v_proj: Linear::load(source, &format!("{prefix}.v_proj"), kv, h, device)?,
            o_proj: Linear::load(source, &format!("{prefix}.o_proj"), h, q, device)?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        })
    }
}

impl<B: Kernels> Attention<B> {
    /// `[batch, seq, hidden] -> [batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>, inputs: &AttentionInputs<B>) -> Tensor<B, 3> {
        self.forward_keeping(x, inputs).0
    }

    /// [`forward`](Self::forward), also returning the rotated keys and the values
    /// (`[batch, kv_heads, seq, head_dim]`) for a [`KvCache`].
    pub fn forward_keeping(
        &self,
        x: Tensor<B, 3>,
        inputs: &AttentionInputs<B>,
    ) -> (Tensor<B, 3>, Tensor<B, 4>, Tensor<B, 4>) {
        let (q, k, v) = self.project(x, inputs);
        // Tiled: neither the scores nor repeated keys and values are materialised.
        let out = B::flash_attention(q, k.clone(), v.clone(), inputs.spec());
        (self.merge_heads(out), k, v)
    }

    /// One new token per row (`[rows, 1, hidden]`) against layer `layer` of `cache`, which it
    /// joins.
    pub fn decode(
        &self,
        x: Tensor<B, 3>,
        inputs: &AttentionInputs<B>,
        cache: &mut KvCache<B>,
        layer: usize,
        step: &DecodeStep<B>,
    ) -> Tensor<B, 3> {
        let (q, k, v) = self.project(x, inputs);
        let cached = cache.append(layer, step, k, v);
        let [rows, heads, _, dim] = q.dims();
        let kv_heads = self.num_kv_heads;
        let slots = cached.keys().dims()[2];
        // A key/value head's query heads as rows of one matmul, so keys are never repeated.
        let q = q.reshape([rows, kv_heads, heads / kv_heads, dim]);
        let scores = B::batched_matmul(q, cached.keys().swap_dims(2, 3)) * (dim as f64).powf(-0.5);
        // Softmax in float32, as transformers' eager attention takes it.
        let blocked = step
            .blocked()
            .clone()
            .expand([rows, kv_heads, heads / kv_heads, slots]);
        let weights = burn::tensor::activation::softmax(
            in_dtype(scores, DType::F32).mask_fill(blocked, MASKED_SCORE),
            3,
        );
        let out = B::batched_matmul(in_dtype(weights, cached.values().dtype()), cached.values());
        self.merge_heads(out.reshape([rows, heads, 1, dim]))
    }

    /// Queries, keys and values `[batch, heads or kv_heads, seq, head_dim]`, queries and keys
    /// rotated to their positions.
    fn project(
        &self,
        x: Tensor<B, 3>,
        inputs: &AttentionInputs<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [batch, seq, _] = x.dims();
        let dim = self.head_dim;
        // [batch, seq, heads * dim] -> [batch, heads, seq, dim]
        let split_heads =
            |t: Tensor<B, 3>, n: usize| t.reshape([batch, seq, n, dim]).swap_dims(1, 2);
        let q = inputs.rotate(split_heads(self.q_proj.forward(x.clone()), self.num_heads));
        let k = inputs.rotate(split_heads(
            self.k_proj.forward(x.clone()),
            self.num_kv_heads,
        ));
        let v = split_heads(self.v_proj.forward(x), self.num_kv_heads);
        (q, k, v)
    }

    /// `[batch, heads, seq, head_dim]` attention output through `o_proj` to `[batch, seq, hidden]`.
    fn merge_heads(&self, out: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, heads, seq, dim] = out.dims();
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([batch, seq, heads * dim]))
    }
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[intermediate, hidden]`.
    pub gate_proj: Linear<B>,
    /// `[intermediate, hidden]`.
    pub up_proj: Linear<B>,
    /// `[hidden, intermediate]`.
    pub down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    fn load(
        source: &dyn WeightSource,
        prefix: &str,
        cfg: &ModelConfig,
        device: &B::Device,
    ) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::load(source, &format!("{prefix}.gate_proj"), i, h, device)?,
            up_proj: Linear::load(source, &format!("{prefix}.up_proj"), i, h, device)?,
            down_proj: Linear::load(source, &format!("{prefix}.down_proj"), h, i, device)?,
        })
    }
}

impl<B: Kernels> Mlp<B> {
    /// `[batch, seq, hidden] -> [batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gated = B::swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        self.down_proj.forward(gated)
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Attention block.
    pub self_attn: Attention<B>,
    /// Feed-forward block.
    pub mlp: Mlp<B>,
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// Loads layer `index` (model numbering) from `source`.
    pub fn load(
        source: &dyn WeightSource,
        index: usize,
        cfg: &ModelConfig,
        device: &B::Device,
    ) -> Result<Self> {
        let prefix = format!("model.layers.{index}");
        Ok(Self {
            self_attn: Attention::load(source, &format!("{prefix}.self_attn"), cfg, device)?,
            mlp: Mlp::load(source, &format!("{prefix}.mlp"), cfg, device)?,
            input_layernorm: RmsNorm::load(
                source,
                &format!("{prefix}.input_layernorm"),
                cfg,
                device,
            )?,
            post_attention_layernorm: RmsNorm::load(
                source,
                &format!("{prefix}.post_attention_layernorm"),
                cfg,
                device,
            )?,
        })
    }
}

impl<B: Kernels> DecoderLayer<B> {
    /// `[batch, seq, hidden] -> [batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>, inputs: &AttentionInputs<B>) -> Tensor<B, 3> {
        self.around_attention(x, |attention, x| attention.forward(x, inputs))
    }

    /// [`forward`](Self::forward), also returning the layer's keys and values for a cache.
    pub fn forward_keeping(
        &self,
        x: Tensor<B, 3>,
        inputs: &AttentionInputs<B>,
    ) -> (Tensor<B, 3>, (Tensor<B, 4>, Tensor<B, 4>)) {
        let mut kept = None;
        let out = self.around_attention(x, |attention, x| {
            let (out, k, v) = attention.forward_keeping(x, inputs);
            kept = Some((k, v));
            out
        });
        (out, kept.expect("the attention ran"))
    }

    /// One new token per row against the layer's part of `cache` (see [`Attention::decode`]).
    pub fn decode(
        &self,
        x: Tensor<B, 3>,
        inputs: &AttentionInputs<B>,
        cache: &mut KvCache<B>,
        layer: usize,
        step: &DecodeStep<B>,
    ) -> Tensor<B, 3> {
        self.around_attention(x, |attention, x| {
            attention.decode(x, inputs, cache, layer, step)
        })
    }

    /// The pre-norm residual block around `attend`, then the MLP's.
    fn around_attention(
        &self,
        x: Tensor<B, 3>,
        attend: impl FnOnce(&Attention<B>, Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let h = x.clone() + attend(&self.self_attn, self.input_layernorm.forward(x));
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}
