//! Training steps on a fixture's reference batch through the stage runtime.

use std::collections::HashMap;

use burn::backend::Autodiff;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use pp::data::MicroBatch;
use pp::device::{Device, DeviceSpec};
use pp::kernels::TrainBackend;
use pp::model::StageModel;
use pp::train::optim::Optimizer;
use pp::train::runtime::{MemorySavers, Precision, StageOutput, StageRunner};
use pp_stages::StageSlice;

use super::pipeline::{fixture_model, ReferenceBatch};

/// What some steps on a fixture's batch gave.
pub struct Run {
    /// The loss before each step.
    pub losses: Vec<f64>,
    /// The parameters after the last step, by Hugging Face name.
    pub params: HashMap<String, Vec<f32>>,
}

/// Collects every float parameter's values by id.
struct Values(HashMap<ParamId, Vec<f32>>);

impl<B: Backend> ModuleVisitor<B> for Values {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let values = param.val().into_data().to_vec::<f32>().unwrap();
        self.0.insert(param.id, values);
    }
}

/// Every parameter of `model` by Hugging Face name.
pub fn param_values<B: Backend>(model: &StageModel<B>) -> HashMap<String, Vec<f32>> {
    let mut values = Values(HashMap::new());
    model.visit(&mut values);
    model
        .named_params()
        .into_iter()
        .map(|(name, id)| (name, values.0[&id].clone()))
        .collect()
}

/// How a test run trains.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// Where it computes.
    pub device: DeviceSpec,
    /// Rows per micro-batch (the fixture batch is one step).
    pub micro_batch: usize,
    /// Memory savers.
    pub savers: MemorySavers,
    /// Global-norm clipping threshold.
    pub max_grad_norm: Option<f64>,
    /// Backward as separate I and W passes (zero-bubble schedules).
    pub split_backward: bool,
    /// Master-weight and compute dtypes.
    pub precision: Precision,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            device: DeviceSpec::Cpu,
            micro_batch: usize::MAX,
            savers: MemorySavers::default(),
            max_grad_norm: None,
            split_backward: false,
            precision: Precision::F32,
        }
    }
}

/// `steps` optimizer steps on the fixture's reference batch as `setup` says.
pub fn train_steps(name: &str, optimizer: &Optimizer, lr: f64, steps: usize, setup: Setup) -> Run {
    let device = Device::resolve(setup.device).unwrap();
    pp::with_backend!(device, |I, dev| {
        train_steps_on::<Autodiff<I>>(name, optimizer, lr, steps, setup, dev)
    })
}

fn train_steps_on<B: TrainBackend>(
    name: &str,
    optimizer: &Optimizer,
    lr: f64,
    steps: usize,
    setup: Setup,
    device: B::Device,
) -> Run {
    let (config, weights) = fixture_model(name);
    let whole = StageSlice::whole(config.num_layers);
    let model: StageModel<B> = StageModel::load(&config, whole, &weights, &device).unwrap();
    let mut runner = StageRunner::new(
        model,
        optimizer.clone(),
        setup.savers,
        setup.precision,
        device,
    );
    if setup.split_backward {
        runner = runner.with_split_backward();
    }
    let reference = ReferenceBatch::load(name, &config);
    let sequences = reference.sequences();
    let refs: Vec<_> = sequences.iter().collect();
    let micro_batches: Vec<MicroBatch> = refs
        .chunks(setup.micro_batch)
        .map(|rows| MicroBatch::new(rows, 0))
        .collect();
    let tokens: usize = micro_batches.iter().map(|m| m.targets.count).sum();
    let scale = 1.0 / tokens as f64;
    let mut losses = Vec::new();
    for _ in 0..steps {
        runner.set_lr(lr);
        let mut sum = 0.0;
        for (i, batch) in micro_batches.iter().enumerate() {
            match runner.forward(i, batch, None) {
                StageOutput::Loss { sum: s, .. } => sum += s,
                StageOutput::Hidden(_) => panic!("a whole model ends with the loss"),
            }
            let last = i + 1 == micro_batches.len();
            if setup.split_backward {
                assert!(runner.backward_input(i, None, scale).is_none());
                runner.backward_weight(i);
            } else {
                assert!(runner.backward(i, None, scale, last).is_none());
            }
        }
        losses.push(sum / tokens as f64);
        let norm = runner.grad_sum_squares().sqrt();
        let clip = match setup.max_grad_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        runner.step(clip);
    }
    Run {
        losses,
        params: param_values(runner.model()),
    }
}

/// Relative L2 distance of `got` from `want`.
pub fn relative_l2(got: &[f32], want: &[f32]) -> f64 {
    let norm =
        |v: &mut dyn Iterator<Item = f32>| v.map(|x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    norm(&mut got.iter().zip(want).map(|(a, b)| a - b)) / norm(&mut want.iter().copied())
}
