//! The bias-free linear map `x · weightᵀ` as one operation. Its backward is two matmuls that
//! need not run together: the input's gradient `grad · weight`, which the stage below waits
//! for, and the weight's `gradᵀ · x`, which nothing waits for until the optimizer step.
//! Zero-bubble schedules run the first in their input-gradient pass (I) and hold the second
//! back for their weight-gradient pass (W) with [`DeferredWeightGrads`]: W then costs those
//! matmuls alone, with no second forward.

use std::any::Any;
use std::cell::RefCell;
use std::sync::{Arc, Mutex, PoisonError};

use burn::backend::autodiff::NodeId;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use super::Kernels;
use crate::model::layers::in_dtype;

/// `x` `[tokens, in]` times the transposed `weight` `[out, in]`.
pub fn forward<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>) -> Tensor<B, 2> {
    x.matmul(weight.transpose())
}

/// The gradient of `x` for `grad` `[tokens, out]` of the output.
pub fn backward_input<B: Backend>(grad: Tensor<B, 2>, weight: Tensor<B, 2>) -> Tensor<B, 2> {
    grad.matmul(weight)
}

/// The gradient of the weight `[out, in]` for `grad` of the output.
pub fn backward_weight<B: Backend>(x: Tensor<B, 2>, grad: Tensor<B, 2>) -> Tensor<B, 2> {
    grad.transpose().matmul(x)
}

/// One linear map's weight gradient as the operands it is computed from: the map's input and
/// the gradient of its output, with the weight's graph node and dtype.
#[derive(Debug, Clone)]
pub struct LinearWeightGrad<B: Backend> {
    /// The graph node of the weight (the parameter leaf).
    pub weight: NodeId,
    /// The weight's dtype (float32 master weights under bf16 compute).
    pub dtype: DType,
    /// The map's input `[tokens, in]`, in the compute dtype.
    pub input: Tensor<B, 2>,
    /// The gradient of its output `[tokens, out]`.
    pub grad: Tensor<B, 2>,
}

impl<B: Kernels> LinearWeightGrad<B> {
    /// The weight's gradient `[out, in]`, in the weight's dtype.
    pub fn compute(self) -> Tensor<B, 2> {
        in_dtype(B::linear_backward_weight(self.input, self.grad), self.dtype)
    }
}

/// Where the backward passes of graphs recorded under [`capture`](Self::capture) leave their
/// linear maps' weight gradients instead of computing them. Other weights (norm scales, the
/// embedding, the head) still get theirs in that backward pass: they are cheap next to the
/// linear maps', or, for the head, would need the logits again.
#[derive(Debug, Clone)]
pub struct DeferredWeightGrads<B: Backend>(Arc<Mutex<Vec<LinearWeightGrad<B>>>>);

impl<B: Backend> Default for DeferredWeightGrads<B> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

thread_local! {
    /// The [`DeferredWeightGrads`] that linear maps recorded on this thread report to.
    static CAPTURING: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// While alive, linear maps recorded on this thread defer their weight gradients.
pub struct Capture {
    previous: Option<Box<dyn Any>>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        CAPTURING.with(|slot| *slot.borrow_mut() = self.previous.take());
    }
}

impl<B: Backend> DeferredWeightGrads<B> {
    /// Linear maps recorded on this thread while the returned guard lives (the graph's build,
    /// not its backward) defer their weight gradients to `self`.
    pub fn capture(&self) -> Capture {
        let previous = CAPTURING.with(|slot| slot.borrow_mut().replace(Box::new(self.clone())));
        Capture { previous }
    }

    /// The store graphs recorded now report to, if a capture of this backend is active.
    pub(crate) fn active() -> Option<Self> {
        CAPTURING.with(|slot| {
            slot.borrow()
                .as_ref()
                .and_then(|any| any.downcast_ref::<Self>())
                .cloned()
        })
    }

    pub(crate) fn push(&self, deferred: LinearWeightGrad<B>) {
        self.entries().push(deferred);
    }

    /// Everything deferred so far, leaving the store empty.
    pub fn take(&self) -> Vec<LinearWeightGrad<B>> {
        std::mem::take(&mut *self.entries())
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<LinearWeightGrad<B>>> {
        // Entries are pushed whole; a panic elsewhere leaves none half-written.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
