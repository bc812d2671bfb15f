//! Training checkpoints: `OUT/checkpoints/step-N/` holds the weights as a native checkpoint
//! (loadable by every `pp` command), each stage's optimizer state as
//! `optimizer-NNN.safetensors` (tensor `NAME#k` is state tensor `k` of parameter `NAME`), and
//! `trainer.json` with the step and everything needed to continue exactly. Each is written
//! into a staging directory and renamed into place, so a crash mid-save leaves the previous
//! checkpoints as they were.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use pp_stages::Partition;
use serde::{Deserialize, Serialize};

use super::optim::{Optimizer, OptimizerState, ParamState};
use super::sharding::ShardOf;
use crate::checkpoint::hf_writer::SafetensorsWriter;
use crate::checkpoint::{ModelInfo, OwnedWeights, TensorSink, TensorSpec};
use crate::convert::{write_native_model, Staging};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::TrainBackend;
use crate::model::names::Part;
use crate::model::StageModel;

/// The file that marks a directory as a training checkpoint.
pub const TRAINER_FILE: &str = "trainer.json";

/// Where a run stands: enough to continue it so that it behaves as if never stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// The run's total steps.
    pub total_steps: u64,
    /// Which optimizer wrote the state (`adamw`, `adafactor`, `sgd`).
    pub optimizer: String,
    /// Dtype of the trained weights.
    pub dtype: DType,
    /// Dtype of the master weights, which the checkpoint's weights are stored in (absent in
    /// checkpoints written before it was recorded, whose weights were kept in `dtype`).
    #[serde(default)]
    pub master_weights: Option<DType>,
    /// Rows per step: with the step, it fixes the position in the data.
    pub batch_size: usize,
    /// The data order's seed (`null` without shuffling). The order of each epoch is drawn
    /// from it and the epoch alone, so it is the whole random state of a run.
    pub shuffle_seed: Option<u64>,
    /// Number of training sequences and a checksum of them: a resumed run must see the same
    /// data for its steps to line up.
    pub data_sequences: usize,
    /// xxh3 of the training sequences' tokens and labels.
    pub data_checksum: String,
    /// Best validation loss so far, for early stopping.
    pub best_val_loss: Option<f64>,
    /// Evaluations since the best one.
    pub evals_without_improvement: u32,
    /// Scored tokens trained on so far.
    pub tokens_seen: u64,
}

/// The directory of the checkpoint after `step` under `checkpoints`.
pub fn step_dir(checkpoints: &Path, step: u64) -> PathBuf {
    checkpoints.join(format!("step-{step}"))
}

/// Saved checkpoints under `checkpoints`, oldest first, by step.
pub fn list(checkpoints: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(checkpoints) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let step = path
                .file_name()?
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()?;
            path.join(TRAINER_FILE).is_file().then_some((step, path))
        })
        .collect();
    found.sort();
    found
}

/// Removes all but the newest `keep` checkpoints, never `just_saved` (a run resumed from an
/// older checkpoint saves steps below ones already there).
pub fn prune(checkpoints: &Path, keep: usize, just_saved: &Path) -> Result<()> {
    let found: Vec<(u64, PathBuf)> = list(checkpoints)
        .into_iter()
        .filter(|(_, path)| path != just_saved)
        .collect();
    let remove = (found.len() + 1).saturating_sub(keep.max(1));
    for (_, path) in found.iter().take(remove) {
        match std::fs::remove_dir_all(path) {
            // Another node pruning the same (shared) directory got there first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => other.map_err(|e| Error::io(path, e))?,
        }
    }
    Ok(())
}

/// Writes the checkpoint of a whole model held by one runner: weights in `dtype` with
/// `partition`, the optimizer state split by the stages of the partition, and `state`.
pub fn save<B: TrainBackend>(
    dir: &Path,
    model: &StageModel<B>,
    optimizer_state: &OptimizerState<B::InnerBackend>,
    info: &ModelInfo,
    partition: &Partition,
    dtype: DType,
    state: &TrainerState,
) -> Result<()> {
    let staging = Staging::create(dir, true)?;
    write_native_model(&weights_of(model, dtype), info, partition, staging.path())?;
    for stage in 0..partition.len() {
        write_stage_optimizer_state(
            staging.path(),
            stage,
            optimizer_state,
            partition,
            info.config.tie_word_embeddings,
        )?;
    }
    crate::checkpoint::write_json(&staging.path().join(TRAINER_FILE), state)?;
    staging.commit()
}

/// Writes stage `stage`'s optimizer file into `dir`. Each stage's file holds the state of the
/// parameters that stage holds (a tied embedding split across stages is in both), so a
/// pipeline worker writes and reads only its own.
pub fn write_stage_optimizer_state<B: Backend>(
    dir: &Path,
    stage: usize,
    state: &OptimizerState<B>,
    partition: &Partition,
    tied: bool,
) -> Result<()> {
    let held = |name: &str| Part::stages_holding(name, partition, tied).contains(&stage);
    write_optimizer_state(&dir.join(optimizer_file(stage)), state, held)
}

/// Writes this rank's shard of stage `stage`'s optimizer state into `dir` (FSDP with an
/// element-wise rule): `shard` is (this rank's index, the number of shards). Reading puts the
/// shards of a stage back together ([`read_optimizer_state`]), so any layout can resume.
pub fn write_optimizer_shard<B: Backend>(
    dir: &Path,
    stage: usize,
    shard: (usize, usize),
    state: &OptimizerState<B>,
) -> Result<PathBuf> {
    let path = dir.join(format!(
        "{}{:03}-of-{:03}.safetensors",
        shard_prefix(stage),
        shard.0,
        shard.1
    ));
    write_optimizer_state(&path, state, |_| true)?;
    Ok(path)
}

/// Whether the checkpoint file `name` holds optimizer state of stage `stage`: its file, or
/// one of its shards.
pub(crate) fn holds_optimizer_state(name: &str, stage: usize) -> bool {
    name == optimizer_file(stage)
        || (name.starts_with(&shard_prefix(stage)) && name.ends_with(".safetensors"))
}

/// What the names of stage `stage`'s optimizer shard files begin with.
fn shard_prefix(stage: usize) -> String {
    format!("optimizer-{stage:03}.shard-")
}

/// Stage `stage`'s optimizer shard files in `dir`, in shard order, if it has any; all of them
/// must be there.
fn shard_files(dir: &Path, stage: usize) -> Result<Vec<PathBuf>> {
    let prefix = shard_prefix(stage);
    let mut found: Vec<(usize, usize, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let Some(rest) = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".safetensors"))
        else {
            continue;
        };
        let parsed = rest
            .split_once("-of-")
            .and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?)));
        let Some((index, count)) = parsed else {
            return Err(Error::Checkpoint {
                path: path.clone(),
                message: "not a shard file name (optimizer-SSS.shard-III-of-NNN.safetensors)"
                    .into(),
            });
        };
        found.push((index, count, path));
    }
    found.sort();
    let count = found.first().map_or(0, |f| f.1);
    if found
        .iter()
        .enumerate()
        .any(|(i, f)| f.0 != i || f.1 != count)
        || found.len() != count
    {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            message: format!(
                "the optimizer state of stage {stage} is in shards, but not every one of them \
                 is there ({} files)",
                found.len()
            ),
        });
    }
    Ok(found.into_iter().map(|f| f.2).collect())
}

/// One optimizer state tensor in host memory: its shape and values.
type HostTensor = ([usize; 2], Vec<f32>);

/// Optimizer state read into host memory: each parameter's state tensors.
type HostState = HashMap<String, Vec<HostTensor>>;

/// The state of one stage whose optimizer state was written in shards (`files`, in order):
/// each tensor's shards laid end to end, in the shape `optimizer` keeps for the parameter.
fn read_sharded_stage_state(
    files: &[PathBuf],
    optimizer: &Optimizer,
    shapes: &HashMap<String, [usize; 2]>,
) -> Result<HostState> {
    // Each state tensor's values, by parameter, its shards appended in order.
    let mut values: HashMap<String, Vec<Vec<f32>>> = HashMap::new();
    for path in files {
        for (name, tensors) in read_stage_state(path, shapes)? {
            let entry = values.entry(name).or_default();
            entry.resize(tensors.len().max(entry.len()), Vec::new());
            for (k, (_, shard)) in tensors.into_iter().enumerate() {
                entry[k].extend(shard);
            }
        }
    }
    values
        .into_iter()
        .map(|(name, tensors)| {
            let [rows, cols] = shapes[&name];
            let expected = optimizer.state_shapes(rows, cols);
            let fits = expected.len() == tensors.len()
                && expected
                    .iter()
                    .zip(&tensors)
                    .all(|(shape, v)| shape[0] * shape[1] == v.len());
            if !fits {
                return Err(Error::Checkpoint {
                    path: files[0].clone(),
                    message: format!(
                        "the shards of `{name}`'s optimizer state do not make up {expected:?}"
                    ),
                });
            }
            Ok((name, expected.into_iter().zip(tensors).collect()))
        })
        .collect()
}

/// Reads `trainer.json` of the checkpoint in `dir`.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(TRAINER_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path,
        message: format!("not a valid trainer state: {e}"),
    })
}

/// Reads, from every stage's optimizer file of the checkpoint in `dir` (taken `step` steps),
/// the state of the parameters in `shapes` (each `[rows, cols]`), which need not be cut into
/// stages as the checkpoint was. Every such parameter must have exactly the state tensors
/// `optimizer` keeps for it. With `shard` (FSDP, for an optimizer that steps shards), each
/// tensor is cut to that rank's `[1, len]` shard before it goes to `device`, so the whole
/// state is never on the device.
pub fn read_optimizer_state<B: Backend>(
    dir: &Path,
    stages: usize,
    step: u64,
    optimizer: &Optimizer,
    shapes: &HashMap<String, [usize; 2]>,
    shard: Option<ShardOf>,
    device: &B::Device,
) -> Result<OptimizerState<B>> {
    let mut state = HostState::new();
    for stage in 0..stages {
        // A tied embedding's state is in two stage files, identical: the first read is kept.
        let path = dir.join(optimizer_file(stage));
        // A node without a shared filesystem receives only its own stages' files; a
        // parameter whose state is in none of those it has is named below. FSDP writes a
        // stage's state in shards.
        let stage_state = if path.exists() {
            read_stage_state(&path, shapes)?
        } else {
            let files = shard_files(dir, stage)?;
            if files.is_empty() {
                continue;
            }
            read_sharded_stage_state(&files, optimizer, shapes)?
        };
        for (name, tensors) in stage_state {
            state.entry(name).or_insert(tensors);
        }
    }
    for (name, &[rows, cols]) in shapes {
        let expected = optimizer.state_shapes(rows, cols);
        let found: Vec<[usize; 2]> = state
            .get(name)
            .map(|tensors| tensors.iter().map(|(shape, _)| *shape).collect())
            .unwrap_or_default();
        if found != expected {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                message: format!(
                    "the optimizer state of `{name}` is {found:?}, but {} keeps {expected:?}: the \
                     checkpoint is incomplete or from another optimizer",
                    optimizer.name()
                ),
            });
        }
    }
    let on_device = |(shape, values): HostTensor| {
        let (values, shape) = match shard {
            Some(of) => of.cut(&values),
            None => (values, shape),
        };
        Tensor::from_data(TensorData::new(values, shape), device)
    };
    Ok(state
        .into_iter()
        .map(|(name, tensors)| {
            let tensors = tensors.into_iter().map(on_device).collect();
            (name, Some(ParamState { step, tensors }))
        })
        .collect())
}

/// The state tensors of one stage's file for parameters in `shapes`, in order; others (held by
/// stages this run does not hold) are skipped.
fn read_stage_state(path: &Path, shapes: &HashMap<String, [usize; 2]>) -> Result<HostState> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a valid optimizer state file: {e}")))?;
    // Each parameter's tensors with their index in the parameter's state.
    let mut tensors: HashMap<String, Vec<(usize, HostTensor)>> = HashMap::new();
    for (key, view) in file.tensors() {
        let (name, index) = key
            .rsplit_once('#')
            .and_then(|(n, k)| Some((n.to_string(), k.parse::<usize>().ok()?)))
            .ok_or_else(|| bad(format!("unexpected tensor `{key}`")))?;
        if !shapes.contains_key(&name) {
            continue;
        }
        let shape = view.shape();
        if shape.len() != 2 || view.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!(
                "state `{key}` is {:?} {shape:?}, not a float32 matrix",
                view.dtype()
            )));
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        tensors
            .entry(name)
            .or_default()
            .push((index, ([shape[0], shape[1]], values)));
    }
    Ok(tensors
        .into_iter()
        .map(|(name, mut list)| {
            list.sort_by_key(|(index, _)| *index);
            (name, list.into_iter().map(|(_, tensor)| tensor).collect())
        })
        .collect())
}

/// The name of stage `stage`'s optimizer file.
pub(crate) fn optimizer_file(stage: usize) -> String {
    format!("optimizer-{stage:03}.safetensors")
}

/// Writes the state of the parameters `held` names.
fn write_optimizer_state<B: Backend>(
    path: &Path,
    state: &OptimizerState<B>,
    held: impl Fn(&str) -> bool,
) -> Result<()> {
    let mut entries: Vec<(String, Vec<f32>, Vec<usize>)> = Vec::new();
    let mut names: Vec<&String> = state.keys().filter(|name| held(name)).collect();
    names.sort();
    for name in names {
        let Some(param) = &state[name] else { continue };
        for (k, tensor) in param.tensors.iter().enumerate() {
            let shape = tensor.dims().to_vec();
            let values = tensor.to_data().to_vec::<f32>().expect("float32 state");
            entries.push((format!("{name}#{k}"), values, shape));
        }
    }
    let specs = entries
        .iter()
        .map(|(name, _, shape)| TensorSpec {
            name: name.clone(),
            dtype: DType::F32,
            shape: shape.clone(),
        })
        .collect();
    let mut writer = SafetensorsWriter::create(path, specs)?;
    for (name, values, _) in &entries {
        writer.begin(name)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        writer.write(&bytes)?;
        writer.end()?;
    }
    writer.finish()
}

/// The model's parameters by Hugging Face name, stored in `dtype`.
pub(crate) fn weights_of<B: Backend>(model: &StageModel<B>, dtype: DType) -> OwnedWeights {
    let names: HashMap<_, _> = model
        .named_params()
        .into_iter()
        .map(|(name, id)| (id, name))
        .collect();
    let mut collector = WeightCollector {
        names,
        dtype,
        weights: OwnedWeights::default(),
    };
    model.visit(&mut collector);
    collector.weights
}

struct WeightCollector {
    names: HashMap<burn::module::ParamId, String>,
    dtype: DType,
    weights: OwnedWeights,
}

impl<B: Backend> ModuleVisitor<B> for WeightCollector {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        let shape = tensor.dims().to_vec();
        let values = tensor.into_data().to_vec::<f32>().expect("float32 weights");
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut bytes = Vec::with_capacity(values.len() * self.dtype.size());
        DType::F32.cast(&raw, self.dtype, &mut bytes);
        self.weights
            .insert(&self.names[&param.id], self.dtype, shape, bytes);
    }
}
