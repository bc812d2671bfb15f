//! The kernels as single nodes of Burn's autodiff graph: the node keeps what the inner
//! backend's forward saved, and its backward step calls the inner backend's backward. Without
//! this, autodiff would record (and keep) every intermediate of the tiled compositions.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{Tensor, TensorPrimitive};

use super::attention::{AttentionSpec, Saved as AttentionSaved};
use super::head_loss::{LossTargets, Saved as HeadLossSaved};
use super::linear::{DeferredWeightGrads, LinearWeightGrad};
use super::Kernels;
use crate::model::layers::in_dtype;

type AutodiffPrimitive<B> = <Autodiff<B> as BackendTypes>::FloatTensorPrimitive;

/// The autodiff primitive of a float tensor (its inner value and graph node).
fn primitive<B: Backend, C: CheckpointStrategy, const D: usize>(
    t: Tensor<Autodiff<B, C>, D>,
) -> AutodiffPrimitive<B> {
    t.into_primitive().tensor()
}

/// A plain tensor of the inner backend from its primitive.
fn inner<B: Backend, const D: usize>(primitive: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

/// Registers `grad` for the parent `node`, when that parent wants a gradient.
fn register<B: Backend, const D: usize>(
    grads: &mut Gradients,
    node: Option<NodeId>,
    grad: Tensor<B, D>,
) {
    if let Some(node) = node {
        grads.register::<B>(node, grad.into_primitive().tensor());
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: Kernels> Backward<B, 3> for AttentionBackward {
    type State = (AttentionSaved<B>, AttentionSpec<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad_output = inner::<B, 4>(grads.consume::<B>(&ops.node));
        let (saved, spec) = ops.state;
        let result = B::flash_attention_backward(saved, grad_output, &spec);
        let [q, k, v] = ops.parents.map(|parent| parent.map(|node| node.id));
        register(grads, q, result.q);
        register(grads, k, result.k);
        register(grads, v, result.v);
    }
}

#[derive(Debug)]
struct HeadLossBackward;

impl<B: Kernels> Backward<B, 2> for HeadLossBackward {
    type State = (HeadLossSaved<B>, LossTargets<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad_loss = inner::<B, 1>(grads.consume::<B>(&ops.node));
        let (saved, targets) = ops.state;
        let result = B::head_loss_backward(saved, grad_loss, &targets);
        let [hidden, weight] = ops.parents.map(|parent| parent.map(|node| node.id));
        register(grads, hidden, result.hidden);
        register(grads, weight, result.weight);
    }
}

/// Records `output` as one graph node over `parents`, whose backward is `step` given the state
/// `save` makes (made only when some parent wants a gradient).
fn record<B, C, S, const N: usize, const D: usize>(
    step: S,
    parents: [&AutodiffPrimitive<B>; N],
    output: Tensor<B, D>,
    save: impl FnOnce() -> S::State,
) -> Tensor<Autodiff<B, C>, D>
where
    B: Backend,
    C: CheckpointStrategy,
    S: Backward<B, N>,
{
    let output = output.into_primitive().tensor();
    let node = match step
        .prepare::<C>(parents.map(|parent| parent.node.clone()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(save(), output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Tensor::from_primitive(TensorPrimitive::Float(node))
}

#[derive(Debug)]
struct LinearBackward;

impl<B: Kernels> Backward<B, 2> for LinearBackward {
    /// The input, the weight in its own dtype (a bf16 copy is made again in backward rather
    /// than kept), and where to defer the weight's gradient, if anywhere.
    type State = (Tensor<B, 2>, Tensor<B, 2>, Option<DeferredWeightGrads<B>>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = inner::<B, 2>(grads.consume::<B>(&ops.node));
        let (x, weight, deferred) = ops.state;
        let [x_node, weight_node] = ops.parents.map(|parent| parent.map(|node| node.id));
        if let Some(node) = weight_node {
            let work = LinearWeightGrad {
                weight: node,
                dtype: weight.dtype(),
                input: x,
                grad: grad.clone(),
            };
            match deferred {
                Some(store) => store.push(work),
                None => register(grads, Some(node), work.compute()),
            }
        }
        if x_node.is_some() {
            let weight = in_dtype(weight, grad.dtype());
            register(grads, x_node, B::linear_backward_input(grad, weight));
        }
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl<B: Kernels> Backward<B, 2> for SwigluBackward {
    type State = (Tensor<B, 3>, Tensor<B, 3>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = inner::<B, 3>(grads.consume::<B>(&ops.node));
        let (gate, up) = ops.state;
        let [grad_gate, grad_up] = B::swiglu_backward(gate, up, grad);
        let [gate, up] = ops.parents.map(|parent| parent.map(|node| node.id));
        register(grads, gate, grad_gate);
        register(grads, up, grad_up);
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: Kernels> Backward<B, 2> for RmsNormBackward {
    type State = (Tensor<B, 3>, Tensor<B, 1>, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = inner::<B, 3>(grads.consume::<B>(&ops.node));
        let (x, weight, eps) = ops.state;
        let (grad_x, grad_weight) = B::rms_norm_backward(x, weight, eps, grad);
        let [x, weight] = ops.parents.map(|parent| parent.map(|node| node.id));
        register(grads, x, grad_x);
        register(grads, weight, grad_weight);
    }
}

#[derive(Debug)]
struct RotaryBackward;

impl<B: Kernels> Backward<B, 1> for RotaryBackward {
    /// The tables (constants).
    type State = (Tensor<B, 4>, Tensor<B, 4>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = inner::<B, 4>(grads.consume::<B>(&ops.node));
        let (cos, sin) = ops.state;
        let [x] = ops.parents.map(|parent| parent.map(|node| node.id));
        register(grads, x, B::rotary(grad, cos, sin.neg()));
    }
}

impl<B: Kernels, C: CheckpointStrategy> Kernels for Autodiff<B, C> {
    fn linear(x: Tensor<Self, 2>, weight: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let (x, weight) = (primitive(x), primitive(weight));
        let (x_in, weight_in) = (
            inner::<B, 2>(x.primitive.clone()),
            inner::<B, 2>(weight.primitive.clone()),
        );
        let output = <B as Kernels>::linear(x_in.clone(), weight_in.clone());
        record(LinearBackward, [&x, &weight], output, || {
            (x_in, weight_in, DeferredWeightGrads::active())
        })
    }

    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let (gate, up) = (primitive(gate), primitive(up));
        let (gate_in, up_in) = (
            inner::<B, 3>(gate.primitive.clone()),
            inner::<B, 3>(up.primitive.clone()),
        );
        let output = B::swiglu(gate_in.clone(), up_in.clone());
        record(SwigluBackward, [&gate, &up], output, || (gate_in, up_in))
    }

    fn rms_norm(x: Tensor<Self, 3>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        let (x, weight) = (primitive(x), primitive(weight));
        let (x_in, weight_in) = (
            inner::<B, 3>(x.primitive.clone()),
            inner::<B, 1>(weight.primitive.clone()),
        );
        let output = B::rms_norm(x_in.clone(), weight_in.clone(), eps);
        record(RmsNormBackward, [&x, &weight], output, || {
            (x_in, weight_in, eps)
        })
    }

    fn rotary(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        let x = primitive(x);
        // The tables are constants: nothing flows back to them.
        let (cos, sin) = (cos.inner(), sin.inner());
        let output = B::rotary(inner(x.primitive.clone()), cos.clone(), sin.clone());
        record(RotaryBackward, [&x], output, || (cos, sin))
    }

    fn flash_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        spec: &AttentionSpec<Self>,
    ) -> Tensor<Self, 4> {
        let (q, k, v) = (primitive(q), primitive(k), primitive(v));
        let spec = spec.to_inner();
        let (q_in, k_in, v_in) = (
            inner::<B, 4>(q.primitive.clone()),
            inner::<B, 4>(k.primitive.clone()),
            inner::<B, 4>(v.primitive.clone()),
        );
        let forward = B::flash_attention_forward(q_in.clone(), k_in.clone(), v_in.clone(), &spec);
        let output = forward.output.clone();
        record(AttentionBackward, [&q, &k, &v], output, || {
            let saved = AttentionSaved {
                q: q_in,
                k: k_in,
                v: v_in,
                forward,
            };
            (saved, spec)
        })
    }

    fn head_loss(
        hidden: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        targets: &LossTargets<Self>,
    ) -> Tensor<Self, 1> {
        let (hidden, weight) = (primitive(hidden), primitive(weight));
        let targets = targets.to_inner();
        let (hidden_in, weight_in) = (
            inner::<B, 2>(hidden.primitive.clone()),
            inner::<B, 2>(weight.primitive.clone()),
        );
        let forward = B::head_loss_forward(hidden_in.clone(), weight_in.clone(), &targets);
        let loss = forward.loss;
        record(HeadLossBackward, [&hidden, &weight], loss, || {
            let saved = HeadLossSaved {
                hidden: hidden_in,
                weight: weight_in,
                log_sum_exp: forward.log_sum_exp,
            };
            (saved, targets)
        })
    }
}
