//! Fully sharded data parallelism (`--fsdp`): each worker of a stage group keeps only its
//! shard of every parameter, of its gradient and of its optimizer state, so the group holds
//! one copy of the stage's training state instead of one per replica.
//!
//! A parameter is cut as a flat buffer into contiguous shards, one per rank of the group
//! ([`shard_range`]); between uses the module holds the shard (`[1, len]`, or `[len]` for a
//! vector). Just before a part (embedding, layer, head) runs, its parameters are all-gathered
//! and put in place, and right after it they go back to shards, so one part's full weights
//! exist at a time; the next part's are gathered meanwhile on a thread of its own
//! ([`Prefetcher`]). The part a pass ends with stays gathered, because the next pass often
//! starts with it: forward ends with the part backward starts from, and backward with the part
//! the next forward starts from. Installing any other part, or stepping, releases it first, so
//! still only one part is whole at a time. Backward recomputes each part from its kept input
//! (parameters are not held by a graph between passes), and each part's gradients are
//! reduce-scattered as soon as that part's backward is done, leaving this rank the sum of its
//! shard.
//!
//! The optimizer then steps shards: AdamW and SGD are element-wise, so each rank steps its own
//! shard with its own shard of the state, exactly. Adafactor's factored second moment needs
//! whole rows and columns, so each of its parameters is gathered with its gradient for the
//! step (one at a time) and its state, a row and a column vector per matrix, is kept whole.
//!
//! The passes that gather and scatter cannot fail midway without a result to return, so a
//! failed collective is recorded ([`Sharding::take_failure`]), the rest of the pass runs on
//! zeros without further communication, and the pipeline reports the failure after the pass.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use pp_transport::{shard_range, Collectives, TransportError};

use super::optim::{Optimizer, OptimizerState, ParamState};
use super::runtime::{while_waiting, GradStore};
use crate::model::layers::in_dtype;
use crate::model::names::Part;
use crate::model::StageModel;

/// Parameters as the prefetcher returns them: name, this rank's shard (as it was sent) and the
/// whole.
type Gathered = Vec<(String, Vec<f32>, Vec<f32>)>;

/// One stage group's sharding of a runner's parameters.
pub struct Sharding {
    /// Reduce-scatters and the optimizer's gathers, on the compute thread.
    group: Box<dyn Collectives>,
    prefetcher: Prefetcher,
    /// Each parameter's full dimensions.
    shapes: HashMap<String, Vec<usize>>,
    /// Shards parked in host memory while their part's full parameters are in place.
    parked: HashMap<String, Vec<f32>>,
    /// The part whose full parameters were left in place when the last pass ended.
    kept: Option<Part>,
    /// The first collective that failed; none runs after it.
    failure: Mutex<Option<TransportError>>,
}

impl Sharding {
    /// Sharding over a stage group: `group` for the compute thread's collectives, `prefetch`
    /// (the same members, another channel) for the prefetching thread's.
    pub fn new(group: Box<dyn Collectives>, prefetch: Box<dyn Collectives>) -> Self {
        Self {
            group,
            prefetcher: Prefetcher::new(prefetch),
            shapes: HashMap::new(),
            parked: HashMap::new(),
            kept: None,
            failure: Mutex::new(None),
        }
    }

    /// The failure of a collective since the last call, if any.
    pub fn take_failure(&self) -> Option<TransportError> {
        self.failure.lock().expect("failure lock").take()
    }

    fn failed(&self) -> bool {
        self.failure.lock().expect("failure lock").is_some()
    }

    /// The result of a collective, or `fallback` once one has failed (recording the first
    /// failure).
    fn or_record<T>(&self, result: Result<T, TransportError>, fallback: impl FnOnce() -> T) -> T {
        result.unwrap_or_else(|e| {
            self.failure.lock().expect("failure lock").get_or_insert(e);
            fallback()
        })
    }

    /// This rank's position in the group, and the group's size.
    fn position(&self) -> (usize, usize) {
        (self.group.rank(), self.group.size())
    }

    /// This rank's place among the group's shards.
    pub fn shard_of(&self) -> ShardOf {
        let (rank, size) = self.position();
        ShardOf { rank, size }
    }

    /// Replaces every parameter of `model` by this rank's shard, remembering the full shapes.
    pub fn shard_model<B: AutodiffBackend>(
        &mut self,
        model: StageModel<B>,
        names: &HashMap<ParamId, String>,
    ) -> StageModel<B> {
        let mut cutter = ShardCutter::new(self.shard_of());
        let model = model.map(&mut cutter);
        self.take_over(cutter, names);
        model
    }

    /// Takes over a model that `cutter` cut to this rank's shards as it loaded.
    pub fn take_over(&mut self, cutter: ShardCutter, names: &HashMap<ParamId, String>) {
        assert_eq!(
            cutter.of,
            self.shard_of(),
            "the model was cut for another place in the group"
        );
        self.shapes = cutter
            .shapes
            .into_iter()
            .map(|(id, dims)| (names[&id].clone(), dims))
            .collect();
    }

    /// Cuts full optimizer state (read from a checkpoint) to this rank's shards, where the
    /// optimizer steps shards.
    pub fn shard_state<B: Backend>(
        &self,
        optimizer: &Optimizer,
        state: OptimizerState<B>,
    ) -> OptimizerState<B> {
        if !steps_shards(optimizer) {
            return state;
        }
        let of = self.shard_of();
        state
            .into_iter()
            .map(|(name, param)| {
                let param = param.map(|p| ParamState {
                    step: p.step,
                    tensors: p.tensors.into_iter().map(|t| cut_shard(t, of)).collect(),
                });
                (name, param)
            })
            .collect()
    }

    /// Starts a pass whose first part is `first`: asks for its parameters, unless the last
    /// pass left them in place.
    pub fn begin<B: AutodiffBackend>(
        &self,
        model: &StageModel<B>,
        first: Part,
        names: &HashMap<ParamId, String>,
    ) {
        if self.kept != Some(first) {
            self.prefetch(model, first, names);
        }
    }

    /// Asks the prefetcher for `part`'s parameters, whole.
    fn prefetch<B: AutodiffBackend>(
        &self,
        model: &StageModel<B>,
        part: Part,
        names: &HashMap<ParamId, String>,
    ) {
        let mut shards = ShardValues {
            names,
            parked: &self.parked,
            shards: Vec::new(),
        };
        model.visit_part(part, &mut shards);
        let job = if self.failed() {
            Vec::new()
        } else {
            shards
                .shards
                .into_iter()
                .map(|(name, values)| {
                    let len = self.shapes[&name].iter().product();
                    (name, values, len)
                })
                .collect()
        };
        self.prefetcher.request(job);
    }

    /// Puts `part`'s full parameters in place in `model` (its shards parked until
    /// [`release`](Self::release)), first asking for those of `next`, the part that follows
    /// in this pass. They are either still in place from the last pass, or the first asked
    /// for of those prefetched; zeros after a failure.
    pub fn install<B: AutodiffBackend>(
        &mut self,
        model: &mut StageModel<B>,
        part: Part,
        next: Option<Part>,
        names: &HashMap<ParamId, String>,
    ) {
        let in_place = self.kept == Some(part);
        if in_place {
            self.kept = None;
        } else {
            self.settle(model, names);
        }
        if let Some(next) = next {
            self.prefetch(model, next, names);
        }
        if in_place {
            return;
        }
        let gathered = while_waiting(|| self.prefetcher.take());
        let mut shards = HashMap::new();
        let mut full = HashMap::new();
        for (name, shard, whole) in self.or_record(gathered, Vec::new) {
            shards.insert(name.clone(), shard);
            full.insert(name, whole);
        }
        let mut mapper = Install {
            names,
            full,
            shards,
            shapes: &self.shapes,
            parked: &mut self.parked,
        };
        model.map_part(part, &mut mapper);
    }

    /// Leaves `part`, the last of a pass, in place for the next pass, instead of
    /// [`release`](Self::release)-ing it.
    pub fn keep(&mut self, part: Part) {
        assert!(self.kept.is_none(), "one part is kept at a time");
        self.kept = Some(part);
    }

    /// Releases the part the last pass left in place, if any (before the shards change).
    pub fn settle<B: AutodiffBackend>(
        &mut self,
        model: &mut StageModel<B>,
        names: &HashMap<ParamId, String>,
    ) {
        if let Some(part) = self.kept.take() {
            self.release(model, part, names);
        }
    }

    /// Puts `part`'s shards back in place of its full parameters.
    pub fn release<B: AutodiffBackend>(
        &mut self,
        model: &mut StageModel<B>,
        part: Part,
        names: &HashMap<ParamId, String>,
    ) {
        let mut mapper = Release {
            names,
            parked: &mut self.parked,
        };
        model.map_part(part, &mut mapper);
    }

    /// Sums each of `grads` (full gradients of one part, by name) over the group and adds
    /// this rank's shard of the sum to `store`, in name order (the same on every rank).
    pub fn reduce_scatter<B: Backend>(&self, grads: GradStore<B>, store: &mut GradStore<B>) {
        let mut grads: Vec<_> = grads.into_iter().collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        let (rank, size) = self.position();
        for (name, grad) in grads {
            let device = grad.device();
            let values = host(grad);
            let own = shard_range(values.len(), size, rank).len();
            let shard = if self.failed() {
                vec![0.0; own]
            } else {
                let shard = while_waiting(|| self.group.reduce_scatter(&values));
                self.or_record(shard, || vec![0.0; own])
            };
            let len = shard.len();
            let shard = Tensor::from_data(TensorData::new(shard, [1, len]), &device);
            let total = match store.remove(&name) {
                Some(earlier) => earlier + shard,
                None => shard,
            };
            store.insert(name, total);
        }
    }

    /// How many parameter values this rank's shards hold (not counting a part gathered
    /// whole for a pass).
    pub fn shard_elements(&self) -> usize {
        let (rank, size) = self.position();
        self.shapes
            .values()
            .map(|dims| shard_range(dims.iter().product(), size, rank).len())
            .sum()
    }

    /// Whether parameter `name` is a matrix.
    pub fn is_matrix(&self, name: &str) -> bool {
        self.shapes[name].len() >= 2
    }

    /// The whole of parameter (or gradient) `name` from this rank's `[1, len]` shard, as a
    /// `[rows, cols]` matrix (zeros after a failure).
    pub fn gather_matrix<B: Backend>(&self, name: &str, shard: Tensor<B, 2>) -> Tensor<B, 2> {
        let dims = &self.shapes[name];
        let len = dims.iter().product();
        let device = shard.device();
        let whole = if self.failed() {
            vec![0.0; len]
        } else {
            let whole = while_waiting(|| self.group.all_gather(&host(shard), len));
            self.or_record(whole, || vec![0.0; len])
        };
        let cols = *dims.last().expect("a parameter has dimensions");
        Tensor::from_data(TensorData::new(whole, [len / cols.max(1), cols]), &device)
    }

    /// This rank's `[1, len]` shard of a whole `[rows, cols]` matrix, in a buffer of its own.
    pub fn own_shard<B: Backend>(&self, whole: Tensor<B, 2>) -> Tensor<B, 2> {
        cut_shard(whole, self.shard_of())
    }

    /// Gathers every parameter of `model` whole, one at a time, handing each to `each` with its
    /// name and dimensions (for checkpoints); every rank of the group must call it together.
    pub fn gather_each<B: AutodiffBackend>(
        &self,
        model: &StageModel<B>,
        names: &HashMap<ParamId, String>,
        mut each: impl FnMut(String, Vec<usize>, Vec<f32>),
    ) -> Result<(), TransportError> {
        let mut shards = ShardValues {
            names,
            parked: &self.parked,
            shards: Vec::new(),
        };
        model.visit(&mut shards);
        for (name, values) in shards.shards {
            let dims = self.shapes[&name].clone();
            let whole = self.group.all_gather(&values, dims.iter().product())?;
            each(name, dims, whole);
        }
        Ok(())
    }
}

/// Whether `optimizer` steps each rank's shard alone: its rule is element-wise.
pub fn steps_shards(optimizer: &Optimizer) -> bool {
    !matches!(optimizer, Optimizer::Adafactor { .. })
}

/// A tensor's values on the host, in float32.
fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    in_dtype(t, burn::tensor::DType::F32)
        .into_data()
        .to_vec::<f32>()
        .expect("float32 values")
}

/// Shard `rank` of `size` of `whole`, as a tensor of `D` dimensions `[1, …, 1, len]` in a
/// buffer of its own (made from host values, so nothing keeps the whole one alive).
fn cut_shard<B: Backend, const D: usize, const W: usize>(
    whole: Tensor<B, W>,
    of: ShardOf,
) -> Tensor<B, D> {
    let device = whole.device();
    let (values, _) = of.cut(&host(whole));
    let len = values.len();
    Tensor::from_data(TensorData::new(values, shard_dims::<D>(len)), &device)
}

/// Dimensions of a shard of `len` values for a `D`-dimensional parameter: `[1, …, 1, len]`.
fn shard_dims<const D: usize>(len: usize) -> [usize; D] {
    let mut dims = [1; D];
    dims[D - 1] = len;
    dims
}

/// A rank's place among the shards of its stage group: `rank` of `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardOf {
    /// The rank's position in the group.
    pub rank: usize,
    /// The group's size.
    pub size: usize,
}

impl ShardOf {
    /// The shard of `values` (a parameter or state tensor, flattened), as a `[1, len]` shape.
    pub fn cut(&self, values: &[f32]) -> (Vec<f32>, [usize; 2]) {
        let range = shard_range(values.len(), self.size, self.rank);
        let len = range.len();
        (values[range].to_vec(), [1, len])
    }
}

/// Replaces each parameter it maps by one rank's shard of it, remembering its full
/// dimensions.
pub struct ShardCutter {
    of: ShardOf,
    shapes: HashMap<ParamId, Vec<usize>>,
}

impl ShardCutter {
    /// A cutter for place `of`.
    pub fn new(of: ShardOf) -> Self {
        Self {
            of,
            shapes: HashMap::new(),
        }
    }

    /// The full shape of every parameter cut, by name, as a matrix (`[1, n]` for a vector).
    pub fn full_shapes(&self, names: &HashMap<ParamId, String>) -> HashMap<String, [usize; 2]> {
        self.shapes
            .iter()
            .map(|(id, dims)| {
                let cols = *dims.last().expect("a parameter has dimensions");
                let rows = dims.iter().product::<usize>() / cols.max(1);
                (names[id].clone(), [rows, cols])
            })
            .collect()
    }
}

impl<B: AutodiffBackend> ModuleMapper<B> for ShardCutter {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        self.shapes.insert(id, tensor.dims().to_vec());
        let shard = cut_shard(tensor.inner(), self.of);
        Param::from_mapped_value(id, Tensor::from_inner(shard).require_grad(), mapper)
    }
}

/// Each parameter's shard values, by name, in module order: parked while its part is in
/// place, else the parameter itself.
struct ShardValues<'a> {
    names: &'a HashMap<ParamId, String>,
    parked: &'a HashMap<String, Vec<f32>>,
    shards: Vec<(String, Vec<f32>)>,
}

impl<B: Backend> ModuleVisitor<B> for ShardValues<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let name = &self.names[&param.id];
        let shard = match self.parked.get(name) {
            Some(parked) => parked.clone(),
            None => host(param.val()),
        };
        self.shards.push((name.clone(), shard));
    }
}

/// Puts gathered parameters in place, parking the shards.
struct Install<'a> {
    names: &'a HashMap<ParamId, String>,
    full: HashMap<String, Vec<f32>>,
    /// The shards the gather started from: parked without reading them off the device again.
    shards: HashMap<String, Vec<f32>>,
    shapes: &'a HashMap<String, Vec<usize>>,
    parked: &'a mut HashMap<String, Vec<f32>>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Install<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, shard, mapper) = param.consume();
        let name = &self.names[&id];
        let device = shard.device();
        // Only after a failed gather is a shard missing here.
        let values = self
            .shards
            .remove(name)
            .unwrap_or_else(|| host(shard.inner()));
        self.parked.insert(name.clone(), values);
        let dims: [usize; D] = self.shapes[name]
            .clone()
            .try_into()
            .expect("the parameter keeps its rank");
        // Missing only after a failed gather: the pass runs on zeros and the step fails.
        let whole = self
            .full
            .remove(name)
            .unwrap_or_else(|| vec![0.0; dims.iter().product()]);
        let whole = Tensor::from_data(TensorData::new(whole, dims), &device);
        Param::from_mapped_value(id, Tensor::from_inner(whole).require_grad(), mapper)
    }
}

/// Puts the parked shards back.
struct Release<'a> {
    names: &'a HashMap<ParamId, String>,
    parked: &'a mut HashMap<String, Vec<f32>>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Release<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, whole, mapper) = param.consume();
        let device = whole.device();
        drop(whole);
        let shard = self
            .parked
            .remove(&self.names[&id])
            .expect("an installed part has its shards parked");
        let len = shard.len();
        let shard = Tensor::from_data(TensorData::new(shard, shard_dims::<D>(len)), &device);
        Param::from_mapped_value(id, Tensor::from_inner(shard).require_grad(), mapper)
    }
}

/// Gathers parts' parameters on a thread of its own, in the order asked, so the next part's
/// weights cross the network while this one computes.
struct Prefetcher {
    jobs: Sender<Vec<(String, Vec<f32>, usize)>>,
    results: Receiver<Result<Gathered, TransportError>>,
    thread: Option<JoinHandle<()>>,
}

impl Prefetcher {
    fn new(group: Box<dyn Collectives>) -> Self {
        let (jobs, incoming) = mpsc::channel::<Vec<(String, Vec<f32>, usize)>>();
        let (done, results) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("parameter prefetch".into())
            .spawn(move || {
                while let Ok(job) = incoming.recv() {
                    let gathered = job
                        .into_iter()
                        .map(|(name, shard, len)| {
                            let whole = group.all_gather(&shard, len)?;
                            Ok((name, shard, whole))
                        })
                        .collect();
                    if done.send(gathered).is_err() {
                        return;
                    }
                }
            })
            .expect("spawning the prefetch thread");
        Self {
            jobs,
            results,
            thread: Some(thread),
        }
    }

    fn request(&self, job: Vec<(String, Vec<f32>, usize)>) {
        self.jobs
            .send(job)
            .expect("the prefetch thread runs while its prefetcher lives");
    }

    fn take(&self) -> Result<Gathered, TransportError> {
        self.results
            .recv()
            .expect("the prefetch thread runs while its prefetcher lives")
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        let (jobs, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.jobs, jobs));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
