//! The stage runtime: forward and backward of one stage's parts (embedding, layers, head), one
//! micro-batch at a time, with gradients accumulated per parameter and the optimizer stepping
//! the stage's own parameters. Single-device training is the stage that owns every part.
//!
//! Each part runs as its own small graph: its input is a fresh leaf, so the backward pass goes
//! part by part from the last to the first, carrying the gradient of each part's input down to
//! the part before. That one mechanism gives the memory savers:
//! - plain: each part's graph is kept from forward to backward, built on parameter leaves of
//!   the micro-batch's own ([`FreshLeaves`]), so a pipeline stage holds one graph per
//!   micro-batch in flight and none of them is recomputed;
//! - `checkpoint_activations`: forward runs without a graph and keeps only each part's input;
//!   backward recomputes the part from it;
//! - `offload_activations`: those inputs wait in host memory;
//! - `optimizer_in_backward`: a part's parameters are stepped as soon as backward has passed
//!   the last part that uses them, and their gradients freed, so at most one part's gradients
//!   exist at a time.

use std::collections::{HashMap, HashSet};

use burn::backend::autodiff::NodeId;
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

use super::data_parallel::{GradientPiece, GradientSender};
use super::optim::{Optimizer, OptimizerState, Stepper};
use super::sharding::{ShardCutter, Sharding};
use crate::checkpoint::OwnedWeights;
use crate::data::MicroBatch;
use crate::dtype::DType;
use crate::kernels::{DeferredWeightGrads, Kernels, LinearWeightGrad, TrainBackend};
use crate::model::layers::in_dtype;
use crate::model::loss::Targets;
use crate::model::names::Part;
use crate::model::{token_tensor, AttentionInputs, StageModel};

/// Held while a backward pass builds and consumes its graphs, and while a step makes new
/// parameter leaves. Burn 0.21 keeps every thread's
/// autodiff graphs in one process-wide server, and each backward pass ends by deleting the
/// graph nodes it judges unusable — including those of a graph another thread is building at
/// that moment. Pipeline ranks that are threads of one process (tests, single-machine runs)
/// therefore take turns; ranks in separate processes never wait on it.
static AUTODIFF: std::sync::Mutex<()> = std::sync::Mutex::new(());

thread_local! {
    /// This thread's turn, while it holds one (see [`while_waiting`]).
    static TURN: std::cell::RefCell<Option<std::sync::MutexGuard<'static, ()>>> =
        const { std::cell::RefCell::new(None) };
}

/// This thread's turn at building graphs, until dropped.
struct Turn;

fn autodiff_turn() -> Turn {
    take_turn();
    Turn
}

fn take_turn() {
    // A panic in another rank's backward poisons nothing this lock protects.
    let guard = AUTODIFF
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    TURN.with(|turn| *turn.borrow_mut() = Some(guard));
}

impl Drop for Turn {
    fn drop(&mut self) {
        TURN.with(|turn| turn.borrow_mut().take());
    }
}

/// Runs `wait`, a collective that blocks on other ranks, without this thread's turn (between
/// parts, where no graph is being built), so that in-process ranks it waits for can take
/// theirs.
pub(crate) fn while_waiting<T>(wait: impl FnOnce() -> T) -> T {
    let held = TURN.with(|turn| turn.borrow_mut().take()).is_some();
    let result = wait();
    if held {
        take_turn();
    }
    result
}

/// Which memory savers are on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemorySavers {
    /// Keep only each part's input; recompute the part in backward.
    pub checkpoint_activations: bool,
    /// Keep those inputs in host memory (implies checkpointing).
    pub offload_activations: bool,
    /// Step each part's parameters during backward and free their gradients at once.
    pub optimizer_in_backward: bool,
}

/// How a stage keeps and computes its numbers (`--dtype`, `--master-weights`, the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    /// The weights between steps: float32, or the training dtype, each update rounded to it.
    pub master: DType,
    /// Matmuls and activations: bfloat16 when training in bf16 on a device that computes in
    /// it, else float32. Norms' statistics, softmax, the loss, gradients of float32 weights
    /// and the optimizer state stay float32 either way.
    pub compute: DType,
}

impl Precision {
    /// Float32 throughout.
    pub const F32: Self = Self {
        master: DType::F32,
        compute: DType::F32,
    };
}

/// Gradients accumulated per parameter name, each viewed as a `[rows, cols]` matrix.
pub type GradStore<B> = HashMap<String, Tensor<B, 2>>;

/// What flows between parts: token ids into the embedding, hidden states elsewhere.
enum Activation<B: Backend> {
    Tokens(Tensor<B, 2, Int>),
    Hidden(Tensor<B, 3>),
}

/// The linear maps' weight gradients an I pass left to its W pass, by parameter name.
type PendingWeight<B> = Vec<(String, LinearWeightGrad<B>)>;

/// What a part produces: hidden states, or the summed loss of the micro-batch (head).
enum PartOutput<B: Backend> {
    Hidden(Tensor<B, 3>),
    Loss(Tensor<B, 1>),
}

/// What a part keeps between its forward and backward.
enum Saved<B: TrainBackend> {
    /// The part's graph: its input leaf (none for token ids) and its output.
    Graph {
        input: Option<Tensor<B, 3>>,
        output: PartOutput<B>,
    },
    /// The part's input, on the device, to recompute from.
    Input(Activation<B::InnerBackend>),
    /// A hidden-state input in host memory.
    Host(TensorData),
}

impl<B: TrainBackend> Saved<B> {
    /// The part's input, back on the device: for the entries that keep inputs, not graphs.
    fn into_input(self, device: &B::Device) -> Activation<B::InnerBackend> {
        match self {
            Saved::Input(activation) => activation,
            Saved::Host(data) => Activation::Hidden(Tensor::from_data(data, device)),
            Saved::Graph { .. } => unreachable!("a kept graph is not recomputed"),
        }
    }
}

/// One micro-batch in flight: what its parts need again in backward.
struct InFlight<B: TrainBackend> {
    attention: AttentionInputs<B::InnerBackend>,
    targets: Targets,
    saved: Vec<Saved<B>>,
    /// The parameters its kept graphs were built on: leaves of its own (see [`FreshLeaves`]).
    leaves: Option<StageModel<B>>,
    /// Under split backward, where its graphs leave their linear maps' weight gradients.
    deferred: Option<DeferredWeightGrads<B::InnerBackend>>,
}

/// What the stage's forward pass produced.
pub enum StageOutput<B: Backend> {
    /// Hidden states for the next stage.
    Hidden(Tensor<B, 3>),
    /// The micro-batch's summed loss and its number of scored tokens (last stage).
    Loss {
        /// Summed cross-entropy (nats).
        sum: f64,
        /// Scored tokens.
        tokens: usize,
    },
}

/// Runs one stage's parts and owns its optimizer state.
pub struct StageRunner<B: TrainBackend> {
    model: StageModel<B>,
    /// The same parameters without autodiff, for forward passes that build no graph; rebuilt
    /// after each step.
    inner: Option<StageModel<B::InnerBackend>>,
    parts: Vec<Part>,
    names: HashMap<ParamId, String>,
    /// For each part, the parameters whose last contribution in backward comes from it.
    completes: HashMap<usize, HashSet<String>>,
    savers: MemorySavers,
    optimizer: Optimizer,
    state: OptimizerState<B::InnerBackend>,
    grads: GradStore<B::InnerBackend>,
    /// Sum of squared gradients already stepped in backward (optimizer-in-backward).
    stepped_sum_squares: f64,
    /// Learning rate for steps taken inside backward.
    lr: f64,
    /// Master-weight and compute dtypes.
    precision: Precision,
    in_flight: HashMap<usize, InFlight<B>>,
    /// Zero-bubble schedules: backward runs as an input-gradient pass (I) and, later, a
    /// weight-gradient pass (W).
    split_backward: bool,
    /// Per micro-batch, the weight gradients its I pass left to its W pass.
    pending_weight: HashMap<usize, PendingWeight<B::InnerBackend>>,
    /// Data parallelism: where finished gradients go to be summed over the replicas.
    gradient_sender: Option<GradientSender>,
    /// Fully sharded data parallelism: the parameters, gradients and state are this rank's
    /// shards, and each part's parameters are gathered while it runs.
    sharding: Option<Sharding>,
    /// The model was cut to shards as it loaded, waiting for its [`Sharding`].
    loaded_shards: Option<ShardCutter>,
    /// The stage this runner is (named in the gradients it sends).
    stage: usize,
    device: B::Device,
}

/// Where a part's backward starts.
enum Upstream<B: Backend> {
    /// The gradient of its output.
    Gradient(Tensor<B, 3>),
    /// Its loss, scaled.
    Loss(f64),
}

impl<B: Backend> Upstream<B> {
    /// The gradient that came down from the part above, or, for the head, the loss scale.
    fn new(grad: Option<Tensor<B, 3>>, loss_scale: f64) -> Self {
        match grad {
            Some(g) => Upstream::Gradient(g),
            None => Upstream::Loss(loss_scale),
        }
    }
}

impl<B: TrainBackend> StageRunner<B> {
    /// A runner for `model`, with fresh optimizer state.
    pub fn new(
        model: StageModel<B>,
        optimizer: Optimizer,
        savers: MemorySavers,
        precision: Precision,
        device: B::Device,
    ) -> Self {
        let parts = model.parts();
        let names: HashMap<ParamId, String> = model
            .named_params()
            .into_iter()
            .map(|(name, id)| (id, name))
            .collect();
        // Backward visits parts last to first, so a parameter is complete at the first part
        // (in forward order) that uses it: the tied embedding at the embedding, not the head.
        let mut completes: HashMap<usize, HashSet<String>> = HashMap::new();
        let mut seen = HashSet::new();
        for (index, &part) in parts.iter().enumerate() {
            let mut ids = IdCollector(Vec::new());
            model.visit_part(part, &mut ids);
            for id in ids.0 {
                let name = names[&id].clone();
                if seen.insert(name.clone()) {
                    completes.entry(index).or_default().insert(name);
                }
            }
        }
        Self {
            model,
            inner: None,
            parts,
            names,
            completes,
            savers,
            optimizer,
            state: OptimizerState::new(),
            grads: GradStore::new(),
            stepped_sum_squares: 0.0,
            lr: 0.0,
            precision,
            in_flight: HashMap::new(),
            split_backward: false,
            pending_weight: HashMap::new(),
            gradient_sender: None,
            sharding: None,
            loaded_shards: None,
            stage: 0,
            device,
        }
    }

    /// Keeps only this rank's shard of every parameter, gradient and optimizer state entry
    /// (FSDP). Parameters are not held by a graph between forward and backward: each part is
    /// recomputed in backward from its kept input, as under activation checkpointing.
    pub fn with_sharding(mut self, mut sharding: Sharding) -> Self {
        match self.loaded_shards.take() {
            Some(cutter) => sharding.take_over(cutter, &self.names),
            None => {
                self.model = sharding.shard_model(self.model, &self.names);
                self.state = sharding.shard_state(&self.optimizer, std::mem::take(&mut self.state));
            }
        }
        self.savers.checkpoint_activations = true;
        self.inner = None;
        self.sharding = Some(sharding);
        self
    }

    /// A runner whose model (and any optimizer state) `cutter` cut to one rank's shards as
    /// they loaded: [`with_sharding`](Self::with_sharding) takes them over as they are.
    pub fn with_loaded_shards(mut self, cutter: ShardCutter) -> Self {
        self.loaded_shards = Some(cutter);
        self
    }

    /// Whether this runner holds shards (FSDP).
    pub fn is_sharded(&self) -> bool {
        self.sharding.is_some()
    }

    /// A collective of the sharded runner that failed since the last call.
    pub fn take_sharding_failure(&self) -> Option<pp_transport::TransportError> {
        self.sharding.as_ref().and_then(Sharding::take_failure)
    }

    /// The stage's weights, whole, by name, in `dtype` (for checkpoints). A sharded runner
    /// gathers them, one parameter at a time: every rank of its group must call this together,
    /// and those that do not `keep` them drop each as it comes.
    pub fn weights(
        &self,
        dtype: DType,
        keep: bool,
    ) -> Result<OwnedWeights, pp_transport::TransportError> {
        let mut weights = OwnedWeights::default();
        match &self.sharding {
            None if keep => weights = super::checkpoint::weights_of(&self.model, dtype),
            None => {}
            Some(sharding) => {
                sharding.gather_each(&self.model, &self.names, |name, dims, values| {
                    if keep {
                        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                        let mut bytes = Vec::with_capacity(values.len() * dtype.size());
                        DType::F32.cast(&raw, dtype, &mut bytes);
                        weights.insert(&name, dtype, dims, bytes);
                    }
                })?
            }
        }
        Ok(weights)
    }

    /// Bytes of the parameters, accumulated gradients and optimizer state this runner holds
    /// now (all float32); under FSDP, of its shards, not of a part gathered for a pass.
    pub fn training_memory(&self) -> TrainingMemory {
        let params = match &self.sharding {
            Some(sharding) => sharding.shard_elements(),
            None => {
                let mut count = ElementCount(0);
                self.model.visit(&mut count);
                count.0
            }
        };
        let count = |t: &Tensor<B::InnerBackend, 2>| t.dims().iter().product::<usize>();
        let grads: usize = self.grads.values().map(count).sum();
        let state: usize = self
            .state
            .values()
            .flatten()
            .flat_map(|p| p.tensors.iter().map(count))
            .sum();
        TrainingMemory {
            params: 4 * params,
            grads: 4 * grads,
            optimizer: 4 * state,
        }
    }

    /// Under FSDP, puts `part`'s gathered parameters in place, first asking for `next`'s.
    fn install(&mut self, part: Part, next: Option<Part>) {
        if let Some(sharding) = &mut self.sharding {
            sharding.install(&mut self.model, part, next, &self.names);
            self.inner = None;
        }
    }

    /// Under FSDP, starts a pass that begins with `first` (gathering its parameters, unless
    /// the last pass left them in place).
    fn begin_pass(&self, first: Part) {
        if let Some(sharding) = &self.sharding {
            sharding.begin(&self.model, first, &self.names);
        }
    }

    /// Under FSDP, done with `part` in this pass: puts its shards back, or, when it is the
    /// pass's `last` part, leaves it in place for the next pass (which likely starts with it).
    fn release(&mut self, part: Part, last: bool) {
        if let Some(sharding) = &mut self.sharding {
            if last {
                sharding.keep(part);
            } else {
                sharding.release(&mut self.model, part, &self.names);
                self.inner = None;
            }
        }
    }

    /// Under FSDP, releases the part the last pass left in place (before the shards change).
    fn settle(&mut self) {
        if let Some(sharding) = &mut self.sharding {
            sharding.settle(&mut self.model, &self.names);
            self.inner = None;
        }
    }

    /// Sends each gradient, once the step's last backward pass is done with it, to `sender`
    /// to be summed over the replicas of `stage` (data parallelism); the sums come back
    /// through [`receive_gradient`](Self::receive_gradient).
    pub fn with_gradient_sender(mut self, stage: usize, sender: GradientSender) -> Self {
        self.stage = stage;
        self.gradient_sender = Some(sender);
        self
    }

    /// Makes backward run as separate input-gradient and weight-gradient passes
    /// ([`backward_input`](Self::backward_input), [`backward_weight`](Self::backward_weight)),
    /// as zero-bubble schedules need. The I pass is the ordinary backward with the linear maps'
    /// weight gradients held back ([`DeferredWeightGrads`]); the W pass computes just those.
    pub fn with_split_backward(mut self) -> Self {
        self.split_backward = true;
        self
    }

    /// The model with its current weights.
    pub fn model(&self) -> &StageModel<B> {
        &self.model
    }

    /// The optimizer state, by parameter name.
    pub fn optimizer_state(&self) -> &OptimizerState<B::InnerBackend> {
        &self.state
    }

    /// Replaces the optimizer state (resuming).
    pub fn set_optimizer_state(&mut self, state: OptimizerState<B::InnerBackend>) {
        self.state = state;
    }

    /// The learning rate of the next step (used during backward with optimizer-in-backward).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// The rotary tables and mask of `batch`, in the compute dtype.
    fn attention_inputs(&self, batch: &MicroBatch) -> AttentionInputs<B::InnerBackend> {
        AttentionInputs::new(self.model.config(), &batch.layout, &self.device)
            .computing_in(self.precision.compute.burn())
    }

    fn inner_model(&mut self) -> &StageModel<B::InnerBackend> {
        self.inner.get_or_insert_with(|| self.model.valid())
    }

    /// Runs the stage forward on micro-batch `id`: from `batch`'s tokens on the first stage,
    /// else from `input`, the previous stage's hidden states.
    pub fn forward(
        &mut self,
        id: usize,
        batch: &MicroBatch,
        input: Option<Tensor<B::InnerBackend, 3>>,
    ) -> StageOutput<B::InnerBackend> {
        let _turn = autodiff_turn();
        let [rows, seq] = [batch.layout.batch, batch.layout.seq];
        let attention = self.attention_inputs(batch);
        let mut x = Some(match input {
            Some(hidden) => Activation::Hidden(hidden),
            None => Activation::Tokens(token_tensor(&batch.input_ids, rows, seq, &self.device)),
        });
        let recompute = self.savers.checkpoint_activations || self.savers.offload_activations;
        let mut saved = Vec::with_capacity(self.parts.len());
        let mut loss = None;
        let leaves = (!recompute).then(|| self.model.clone().map(&mut FreshLeaves));
        let deferred = self.split_backward.then(DeferredWeightGrads::default);
        let parts = self.parts.clone();
        self.begin_pass(parts[0]);
        for (index, &part) in parts.iter().enumerate() {
            let input = x.take().expect("each part feeds the next");
            let out = if recompute {
                let next = parts.get(index + 1).copied();
                self.install(part, next);
                let out = run_part(self.inner_model(), part, &input, &attention, &batch.targets);
                self.release(part, next.is_none());
                saved.push(match input {
                    Activation::Hidden(h) if self.savers.offload_activations => {
                        Saved::Host(h.into_data())
                    }
                    other => Saved::Input(other),
                });
                out
            } else {
                let leaf = lift(&input);
                let _capture = deferred.as_ref().map(DeferredWeightGrads::capture);
                let out = run_part(
                    leaves.as_ref().expect("kept graphs have their leaves"),
                    part,
                    &leaf,
                    &attention.to_autodiff(),
                    &batch.targets,
                );
                let value = detach(&out);
                saved.push(Saved::Graph {
                    input: match leaf {
                        Activation::Hidden(h) => Some(h),
                        Activation::Tokens(_) => None,
                    },
                    output: out,
                });
                value
            };
            match out {
                PartOutput::Hidden(h) => x = Some(Activation::Hidden(h)),
                PartOutput::Loss(sum) => loss = Some(sum),
            }
        }
        self.in_flight.insert(
            id,
            InFlight {
                attention,
                targets: batch.targets.clone(),
                saved,
                leaves,
                deferred,
            },
        );
        match (loss, x) {
            (Some(sum), _) => StageOutput::Loss {
                sum: f64::from(sum.into_scalar().elem::<f32>()),
                tokens: batch.targets.count,
            },
            (None, Some(Activation::Hidden(h))) => StageOutput::Hidden(h),
            _ => unreachable!("a stage ends with hidden states or the loss"),
        }
    }

    /// Backward of micro-batch `id`. The last stage starts from its loss scaled by
    /// `loss_scale` (one over the step's scored tokens, for a token-weighted mean); other stages
    /// from `grad_output`, the gradient of their output. Returns the gradient of the stage's
    /// input (none on the first stage). `last` says this is the step's last micro-batch, after
    /// which optimizer-in-backward steps each part as backward leaves it.
    pub fn backward(
        &mut self,
        id: usize,
        grad_output: Option<Tensor<B::InnerBackend, 3>>,
        loss_scale: f64,
        last: bool,
    ) -> Option<Tensor<B::InnerBackend, 3>> {
        let _turn = autodiff_turn();
        self.backward_parts(id, grad_output, loss_scale, last)
    }

    /// The input-gradient pass (I) of micro-batch `id`: [`backward`](Self::backward) with the
    /// linear maps' weight gradients held back for [`backward_weight`](Self::backward_weight).
    /// The other weights' gradients (norm scales, embedding, head) are accumulated here.
    pub fn backward_input(
        &mut self,
        id: usize,
        grad_output: Option<Tensor<B::InnerBackend, 3>>,
        loss_scale: f64,
    ) -> Option<Tensor<B::InnerBackend, 3>> {
        let _turn = autodiff_turn();
        self.backward_parts(id, grad_output, loss_scale, false)
    }

    /// The weight-gradient pass (W) of micro-batch `id`, after its I pass: the linear maps'
    /// weight gradients, one matmul each, added to the stage's accumulated gradients (under
    /// FSDP, reduce-scattered over the group first, keeping this rank's shard).
    pub fn backward_weight(&mut self, id: usize) {
        let pending = self
            .pending_weight
            .remove(&id)
            .expect("the W pass follows the micro-batch's I pass");
        let mut grads = GradStore::new();
        for (name, work) in pending {
            accumulate(&mut grads, &name, as_matrix(work.compute()));
        }
        self.add_gradients(grads);
    }

    /// Adds the gradients of one part's backward (or of a W pass) to the stage's accumulated
    /// ones; under FSDP each is summed over the group first, keeping this rank's shard.
    fn add_gradients(&mut self, grads: GradStore<B::InnerBackend>) {
        match &self.sharding {
            Some(sharding) => sharding.reduce_scatter(grads, &mut self.grads),
            None => {
                for (name, grad) in grads {
                    accumulate(&mut self.grads, &name, grad);
                }
            }
        }
    }

    /// Backward through the parts of micro-batch `id`, last to first; under split backward,
    /// leaves the deferred weight gradients in `pending_weight`.
    fn backward_parts(
        &mut self,
        id: usize,
        grad_output: Option<Tensor<B::InnerBackend, 3>>,
        loss_scale: f64,
        last: bool,
    ) -> Option<Tensor<B::InnerBackend, 3>> {
        let InFlight {
            attention,
            targets,
            mut saved,
            leaves,
            deferred,
        } = self
            .in_flight
            .remove(&id)
            .expect("backward follows the micro-batch's forward");
        let mut grad = grad_output;
        // The parameter names of the deferred work's weight nodes, read while each part's
        // weights are in place (under FSDP they are gone after the part's backward).
        let mut weight_names = HashMap::new();
        let last_part = self.parts.len() - 1;
        self.begin_pass(self.parts[last_part]);
        for index in (0..self.parts.len()).rev() {
            let part = self.parts[index];
            let (input, output) = match saved.pop().expect("one saved entry per part") {
                Saved::Graph { input, output } => (input, output),
                kept => {
                    let activation = kept.into_input(&self.device);
                    let _capture = deferred.as_ref().map(DeferredWeightGrads::capture);
                    self.install(part, index.checked_sub(1).map(|i| self.parts[i]));
                    self.recompute(part, activation, &attention, &targets)
                }
            };
            let upstream = Upstream::new(grad.take(), loss_scale);
            let mut grads = seed(output, &upstream);
            grad = input.and_then(|leaf| leaf.grad(&grads));
            let mut part_grads = GradStore::new();
            let mut collector = GradCollector {
                names: &self.names,
                grads: &mut grads,
                store: &mut part_grads,
            };
            let params = leaves.as_ref().unwrap_or(&self.model);
            params.visit_part(part, &mut collector);
            if deferred.is_some() {
                let mut nodes = NodeNames {
                    names: &self.names,
                    by_node: HashMap::new(),
                };
                params.visit_part(part, &mut nodes);
                weight_names.extend(nodes.by_node);
            }
            self.release(part, index == 0);
            // Under FSDP summed over the group at once, only this rank's shard kept.
            self.add_gradients(part_grads);
            if let Some(complete) = self.completes.get(&index).filter(|_| last).cloned() {
                if self.savers.optimizer_in_backward {
                    self.stepped_sum_squares += sum_squares(&self.grads, Some(&complete));
                    self.apply(part, Some(&complete), 1.0);
                } else {
                    self.send_gradients(Some(&complete));
                }
            }
        }
        if let Some(deferred) = deferred {
            let pending = deferred
                .take()
                .into_iter()
                .map(|work| (weight_names[&work.weight].clone(), work))
                .collect();
            self.pending_weight.insert(id, pending);
        }
        grad
    }

    fn recompute(
        &self,
        part: Part,
        input: Activation<B::InnerBackend>,
        attention: &AttentionInputs<B::InnerBackend>,
        targets: &Targets,
    ) -> (Option<Tensor<B, 3>>, PartOutput<B>) {
        let leaf = lift(&input);
        let output = run_part(&self.model, part, &leaf, &attention.to_autodiff(), targets);
        let input = match leaf {
            Activation::Hidden(h) => Some(h),
            Activation::Tokens(_) => None,
        };
        (input, output)
    }

    /// Under data parallelism, hands the gradients in `only` (all when `None`) to the
    /// reducer, in name order (every replica sends the same sequence), leaving none here until
    /// their sums come back.
    fn send_gradients(&mut self, only: Option<&HashSet<String>>) {
        let Some(sender) = &self.gradient_sender else {
            return;
        };
        let mut names: Vec<String> = self
            .grads
            .keys()
            .filter(|name| only.is_none_or(|set| set.contains(*name)))
            .cloned()
            .collect();
        names.sort();
        for name in names {
            let grad = self.grads.remove(&name).expect("listed from the store");
            let shape = grad.dims();
            sender.send(self.stage, name, shape, move || {
                in_dtype(grad, burn::tensor::DType::F32)
                    .into_data()
                    .to_vec::<f32>()
                    .expect("float32 gradients")
            });
        }
    }

    /// Sends what backward has not sent yet (the weight gradients of split backward's W
    /// passes): after the step's last pass.
    pub fn send_remaining_gradients(&mut self) {
        self.send_gradients(None);
    }

    /// Takes back a gradient summed over the replicas.
    pub fn receive_gradient(&mut self, piece: GradientPiece) {
        let grad = Tensor::from_data(TensorData::new(piece.values, piece.shape), &self.device);
        self.grads.insert(piece.name, grad);
    }

    /// Sum of the squares of the stage's accumulated gradients (for the global norm; with
    /// optimizer-in-backward, of the gradients it stepped).
    pub fn grad_sum_squares(&self) -> f64 {
        self.grad_sum_squares_excluding(None)
    }

    /// [`grad_sum_squares`](Self::grad_sum_squares) without the parameter `skip` (a tied
    /// embedding another stage already counts).
    pub fn grad_sum_squares_excluding(&self, skip: Option<&str>) -> f64 {
        let counted: HashSet<String> = self
            .grads
            .keys()
            .filter(|name| Some(name.as_str()) != skip)
            .cloned()
            .collect();
        self.stepped_sum_squares + sum_squares(&self.grads, Some(&counted))
    }

    /// The accumulated gradient of parameter `name`, as a `[rows, cols]` matrix.
    pub fn grad(&self, name: &str) -> Option<Tensor<B::InnerBackend, 2>> {
        self.grads.get(name).cloned()
    }

    /// Replaces the accumulated gradient of parameter `name` (a tied embedding's, summed with
    /// the other stage's).
    pub fn set_grad(&mut self, name: &str, grad: Tensor<B::InnerBackend, 2>) {
        self.grads.insert(name.to_string(), grad);
    }

    /// Steps every parameter with an accumulated gradient, scaled by `grad_scale` (clipping),
    /// and clears the gradients. With optimizer-in-backward the parameters were stepped during
    /// backward and this only resets the count.
    pub fn step(&mut self, grad_scale: f64) {
        // New parameter tensors are new autodiff leaves.
        let _turn = autodiff_turn();
        for part in self.parts.clone() {
            self.apply(part, None, grad_scale);
        }
        self.grads.clear();
        self.stepped_sum_squares = 0.0;
    }

    fn apply(&mut self, part: Part, only: Option<&HashSet<String>>, grad_scale: f64) {
        self.settle();
        let mut stepper = Stepper {
            optimizer: &self.optimizer,
            lr: self.lr,
            grad_scale,
            grads: &mut self.grads,
            names: &self.names,
            only,
            state: &mut self.state,
            weight_dtype: self.precision.master,
            sharding: self.sharding.as_ref(),
        };
        self.model.map_part(part, &mut stepper);
        self.inner = None;
    }

    /// The stage's forward pass on `batch` without building a graph or keeping anything
    /// (validation): from the tokens on the first stage, else from `input`.
    pub fn evaluate(
        &mut self,
        batch: &MicroBatch,
        input: Option<Tensor<B::InnerBackend, 3>>,
    ) -> StageOutput<B::InnerBackend> {
        // Installing gathered weights makes parameter leaves (see `AUTODIFF`).
        let _turn = self.sharding.is_some().then(autodiff_turn);
        let [rows, seq] = [batch.layout.batch, batch.layout.seq];
        let attention = self.attention_inputs(batch);
        let mut x = match input {
            Some(hidden) => Activation::Hidden(hidden),
            None => Activation::Tokens(token_tensor(&batch.input_ids, rows, seq, &self.device)),
        };
        let parts = self.parts.clone();
        self.begin_pass(parts[0]);
        for (index, &part) in parts.iter().enumerate() {
            let next = parts.get(index + 1).copied();
            self.install(part, next);
            let out = run_part(self.inner_model(), part, &x, &attention, &batch.targets);
            self.release(part, next.is_none());
            match out {
                PartOutput::Hidden(h) => x = Activation::Hidden(h),
                PartOutput::Loss(sum) => {
                    return StageOutput::Loss {
                        sum: f64::from(sum.into_scalar().elem::<f32>()),
                        tokens: batch.targets.count,
                    }
                }
            }
        }
        match x {
            Activation::Hidden(h) => StageOutput::Hidden(h),
            Activation::Tokens(_) => unreachable!("a stage runs at least one part"),
        }
    }
}

/// Runs one part of `model` on `input`.
fn run_part<BB: Kernels>(
    model: &StageModel<BB>,
    part: Part,
    input: &Activation<BB>,
    attention: &AttentionInputs<BB>,
    targets: &Targets,
) -> PartOutput<BB> {
    let hidden = |input: &Activation<BB>| match input {
        Activation::Hidden(h) => h.clone(),
        Activation::Tokens(_) => unreachable!("only the embedding takes token ids"),
    };
    match part {
        Part::Embedding => match input {
            Activation::Tokens(ids) => PartOutput::Hidden(model.embed(ids.clone(), attention)),
            Activation::Hidden(_) => unreachable!("the embedding takes token ids"),
        },
        Part::Layer(i) => {
            let layer = &model.layers[i - model.slice().layers.start];
            // A previous stage's output arrives in float32 from the wire.
            PartOutput::Hidden(layer.forward(attention.compute(hidden(input)), attention))
        }
        Part::Head => {
            let hidden = hidden(input);
            let targets = targets.to_device(model.config().vocab_size, &hidden.device());
            PartOutput::Loss(model.head_loss(hidden, attention, &targets))
        }
    }
}

/// The input of a part as a leaf of a new graph on the autodiff backend.
fn lift<B: TrainBackend>(input: &Activation<B::InnerBackend>) -> Activation<B> {
    match input {
        Activation::Tokens(ids) => Activation::Tokens(Tensor::from_inner(ids.clone())),
        Activation::Hidden(h) => Activation::Hidden(Tensor::from_inner(h.clone()).require_grad()),
    }
}

/// A part's output as a plain value for the next part.
fn detach<B: TrainBackend>(output: &PartOutput<B>) -> PartOutput<B::InnerBackend> {
    match output {
        PartOutput::Hidden(h) => PartOutput::Hidden(h.clone().inner()),
        PartOutput::Loss(l) => PartOutput::Loss(l.clone().inner()),
    }
}

/// Backpropagates from a part's output: its scaled loss, or its output times the gradient that
/// came from above.
fn seed<B: TrainBackend>(
    output: PartOutput<B>,
    upstream: &Upstream<B::InnerBackend>,
) -> B::Gradients {
    match (output, upstream) {
        (PartOutput::Loss(loss), Upstream::Loss(scale)) => (loss * *scale).backward(),
        (PartOutput::Hidden(out), Upstream::Gradient(g)) => {
            // The gradient may come from the wire in float32 while the output is bf16.
            let g = in_dtype(Tensor::from_inner(g.clone()), out.dtype());
            (out * g).sum().backward()
        }
        _ => unreachable!("the head starts from its loss, every other part from a gradient"),
    }
}

/// Sum of squares of the gradients in `store` (only those named in `only`, if given).
fn sum_squares<B: Backend>(store: &GradStore<B>, only: Option<&HashSet<String>>) -> f64 {
    store
        .iter()
        .filter(|(name, _)| only.is_none_or(|set| set.contains(*name)))
        .map(|(_, g)| f64::from(g.clone().square().sum().into_scalar().elem::<f32>()))
        .sum()
}

/// Views a tensor as `[rows, cols]`, its last dimension as columns (a vector is one row).
pub(crate) fn as_matrix<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, 2> {
    let dims = t.dims();
    let cols = dims[D - 1];
    let rows = dims.iter().product::<usize>() / cols.max(1);
    t.reshape([rows, cols])
}

/// Moves each parameter's gradient out of a backward pass into the store, adding it to what
/// earlier micro-batches (or the other use of a tied weight) left there.
struct GradCollector<'a, B: TrainBackend> {
    names: &'a HashMap<ParamId, String>,
    grads: &'a mut B::Gradients,
    store: &'a mut GradStore<B::InnerBackend>,
}

impl<B: TrainBackend> ModuleVisitor<B> for GradCollector<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(grad) = param.val().grad_remove(self.grads) else {
            return;
        };
        accumulate(self.store, &self.names[&param.id], as_matrix(grad));
    }
}

/// Adds `grad` to what earlier micro-batches (or the other use of a tied weight) left for
/// parameter `name`.
fn accumulate<B: Backend>(store: &mut GradStore<B>, name: &str, grad: Tensor<B, 2>) {
    let total = match store.remove(name) {
        Some(earlier) => earlier + grad,
        None => grad,
    };
    store.insert(name.to_string(), total);
}

/// Maps each parameter's graph node to its name: where a deferred weight gradient belongs.
struct NodeNames<'a> {
    names: &'a HashMap<ParamId, String>,
    by_node: HashMap<NodeId, String>,
}

impl<B: TrainBackend> ModuleVisitor<B> for NodeNames<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let node = B::node_id(&param.val());
        self.by_node.insert(node, self.names[&param.id].clone());
    }
}

/// Gives every parameter a new autodiff leaf over the same values (the ids stay). Burn 0.21
/// merges graphs that share a leaf into one, and a backward pass's cleanup of that merged
/// graph can drop steps another micro-batch's graph still needs (it depends on hash-set order:
/// see `tests/pipeline.rs`); graphs built on leaves of their own never merge.
struct FreshLeaves;

impl<B: AutodiffBackend> ModuleMapper<B> for FreshLeaves {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let leaf = Tensor::from_inner(tensor.inner()).require_grad();
        Param::from_mapped_value(id, leaf, mapper)
    }
}

/// Bytes of a runner's training state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrainingMemory {
    /// Parameters (under FSDP, this rank's shards).
    pub params: usize,
    /// Accumulated gradients.
    pub grads: usize,
    /// Optimizer state.
    pub optimizer: usize,
}

impl TrainingMemory {
    /// All of it.
    pub fn total(&self) -> usize {
        self.params + self.grads + self.optimizer
    }
}

/// Counts parameter elements.
struct ElementCount(usize);

impl<B: Backend> ModuleVisitor<B> for ElementCount {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0 += param.shape().num_elements();
    }
}

/// Collects parameter ids.
struct IdCollector(Vec<ParamId>);

impl<B: Backend> ModuleVisitor<B> for IdCollector {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.push(param.id);
    }
}
