//! `pp convert`: Hugging Face → native (partitioned into stages), native → native
//! (re-partitioned or re-typed) and native → Hugging Face. Tensors stream from the source's
//! memory maps to the output in bounded chunks, so memory stays flat whatever the model size;
//! the output appears only once it is complete and has passed the self-check.

mod staging;
mod verify;

pub use staging::Staging;
pub use verify::{verify, VerifyReport};

use std::path::Path;

use indicatif::ProgressBar;
use pp_stages::Partition;
use serde_json::{json, Value};

use crate::checkpoint::hf_writer::{self, SafetensorsWriter};
use crate::checkpoint::native::{
    Manifest, StageEntry, StageFileWriter, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE,
};
use crate::checkpoint::{
    self, checksum, Format, ModelFiles, ModelInfo, TensorSink, TensorSpec, WeightSource,
};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::names::{Part, EMBED};
use crate::plan::{part_costs, Balance};

/// Files besides the weights that travel with a model: tokenizer, chat template, generation
/// defaults. Those present in the source are copied.
pub const COMPANION_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// Generation defaults (end-of-sequence tokens among them) that travel with a checkpoint.
pub const GENERATION_CONFIG: &str = "generation_config.json";

/// Elements streamed per chunk: 4M elements is 8–16 MiB, large enough for full-speed I/O.
const CHUNK_ELEMENTS: usize = 1 << 22;
/// Streamed source pages are released from the resident set in batches of this many bytes (and
/// at the end of each tensor): each release costs a system call and a TLB flush, so releasing
/// every chunk made conversion measurably slower (`docs/performance.md`), while this bounds the
/// resident source pages to 128 MiB.
const RELEASE_BYTES: usize = 128 << 20;

/// How to divide a native output into stages.
#[derive(Debug, Clone, PartialEq)]
pub enum Stages {
    /// A native source keeps its partition; a Hugging Face source becomes one stage.
    Keep,
    /// Stages starting at these layers (`--split`).
    Split(Vec<usize>),
    /// This many stages, balanced by the given measure.
    Balanced(usize, Balance),
}

/// The format to write.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// `pp`'s native format.
    Native(Stages),
    /// A Hugging Face directory with shards of at most this many bytes.
    HuggingFace {
        /// Largest shard size in bytes.
        max_shard_bytes: u64,
    },
}

/// What to convert to and how.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Output format.
    pub target: Target,
    /// Storage dtype of the output; `None` keeps each tensor's dtype (a byte-exact copy).
    pub dtype: Option<DType>,
    /// Replace an existing output directory.
    pub force: bool,
    /// Run the self-check on this device before committing the output.
    pub verify: Option<Device>,
}

/// What a conversion did.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// The partition written (native output only).
    pub partition: Option<Partition>,
    /// Tensor bytes written (a tied embedding held by two stages counts twice).
    pub bytes_written: u64,
    /// The self-check's result, unless it was skipped.
    pub verify: Option<VerifyReport>,
}

/// Converts the model in `source_dir` into `out_dir`. `progress` counts tensor bytes written.
pub fn convert(
    source_dir: &Path,
    out_dir: &Path,
    options: &ConvertOptions,
    progress: &ProgressBar,
) -> Result<ConvertReport> {
    let source = checkpoint::open(source_dir)?;
    if same_directory(source_dir, out_dir) {
        return Err(Error::io(
            out_dir,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the output directory is the source; choose another",
            ),
        ));
    }
    let staging = Staging::create(out_dir, options.force)?;
    let tensors = ordered_tensors(source.weights.as_ref(), options.dtype)?;
    let (partition, bytes_written) = match &options.target {
        Target::Native(stages) => {
            let partition = choose_partition(&source, stages, options.dtype)?;
            let layouts =
                stage_layouts(&tensors, &partition, source.info.config.tie_word_embeddings);
            let bytes = layouts.iter().flatten().map(TensorSpec::bytes).sum();
            progress.set_length(bytes);
            write_native(
                source.weights.as_ref(),
                &source.info,
                layouts,
                &partition,
                options.dtype,
                staging.path(),
                &Streaming {
                    progress,
                    interruptible: true,
                },
            )?;
            (Some(partition), bytes)
        }
        Target::HuggingFace { max_shard_bytes } => {
            let bytes = tensors.iter().map(TensorSpec::bytes).sum();
            progress.set_length(bytes);
            write_hf(
                &source,
                tensors,
                *max_shard_bytes,
                options.dtype,
                staging.path(),
                progress,
            )?;
            (None, bytes)
        }
    };
    progress.finish_and_clear();
    let verify = match &options.verify {
        Some(device) => {
            let converted = checkpoint::open(staging.path())?;
            Some(crate::with_backend!(device, |B, dev| verify::<B>(
                &source,
                &converted,
                options.dtype,
                &dev
            ))?)
        }
        None => None,
    };
    staging.commit()?;
    Ok(ConvertReport {
        partition,
        bytes_written,
        verify,
    })
}

fn same_directory(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Every tensor of the source, embedding first, then layer by layer, then the head, with the
/// dtype it will be written in.
fn ordered_tensors(source: &dyn WeightSource, cast: Option<DType>) -> Result<Vec<TensorSpec>> {
    let mut specs = source
        .names()
        .into_iter()
        .map(|name| {
            let view = source.tensor(&name)?;
            Ok(TensorSpec {
                dtype: cast.unwrap_or(view.dtype),
                shape: view.shape.to_vec(),
                name,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    sort_by_part(&mut specs);
    Ok(specs)
}

/// Embedding first, then layer by layer, then the head; by name within a part.
fn sort_by_part(specs: &mut [TensorSpec]) {
    let rank = |name: &str| match Part::of(name) {
        Part::Embedding => (0, 0),
        Part::Layer(i) => (1, i),
        Part::Head => (2, 0),
    };
    specs.sort_by(|a, b| rank(&a.name).cmp(&rank(&b.name)).then(a.name.cmp(&b.name)));
}

fn choose_partition(
    source: &ModelFiles,
    stages: &Stages,
    cast: Option<DType>,
) -> Result<Partition> {
    let cfg = &source.info.config;
    let bad = |message: String| Error::Config {
        path: source.info.dir.clone(),
        message,
    };
    match stages {
        Stages::Keep => match &source.info.format {
            Format::Native(native) => Ok(native.partition().clone()),
            Format::HuggingFace => {
                Partition::from_split(&[], cfg.num_layers).map_err(|e| bad(e.to_string()))
            }
        },
        Stages::Split(split) => {
            Partition::from_split(split, cfg.num_layers).map_err(|e| bad(format!("--split: {e}")))
        }
        Stages::Balanced(count, balance) => {
            let seq_len = cfg.max_position_embeddings.min(4096);
            let costs = part_costs(cfg, *balance, cast.unwrap_or(cfg.dtype), seq_len);
            Partition::balanced(&costs, *count).map_err(|e| bad(format!("--stages: {e}")))
        }
    }
}

/// The stage files' tensors: each stage's share of `tensors`, in order.
fn stage_layouts(
    tensors: &[TensorSpec],
    partition: &Partition,
    tied: bool,
) -> Vec<Vec<TensorSpec>> {
    let mut layouts = vec![Vec::new(); partition.len()];
    for spec in tensors {
        for stage in Part::stages_holding(&spec.name, partition, tied) {
            layouts[stage].push(spec.clone());
        }
    }
    layouts
}

/// Writes `weights` (every tensor of the model described by `info`) as a native checkpoint
/// with `partition` into `out`, an empty directory; used for trained weights.
pub fn write_native_model(
    weights: &dyn WeightSource,
    info: &ModelInfo,
    partition: &Partition,
    out: &Path,
) -> Result<()> {
    let all: Vec<usize> = (0..partition.len()).collect();
    let stages = write_native_stages(weights, info, partition, &all, out)?;
    write_native_manifest(info, stages, None, out)
}

/// Writes the files of `stages` of a native checkpoint with `partition` into `out`, from
/// `weights`, which must hold those stages' tensors; returns their manifest entries. A
/// pipeline worker writes its own stages this way; [`write_native_manifest`] completes the
/// checkpoint.
pub fn write_native_stages(
    weights: &dyn WeightSource,
    info: &ModelInfo,
    partition: &Partition,
    stages: &[usize],
    out: &Path,
) -> Result<Vec<StageEntry>> {
    let tied = info.config.tie_word_embeddings;
    let names = weights.names();
    let mut specs = Vec::new();
    for name in names {
        if Part::stages_holding(&name, partition, tied)
            .iter()
            .any(|s| stages.contains(s))
        {
            let view = weights.tensor(&name)?;
            specs.push(TensorSpec {
                dtype: view.dtype,
                shape: view.shape.to_vec(),
                name,
            });
        }
    }
    sort_by_part(&mut specs);
    let layouts = stage_layouts(&specs, partition, tied);
    // A checkpoint being saved because of Ctrl-C must finish.
    let streaming = Streaming {
        progress: &ProgressBar::hidden(),
        interruptible: false,
    };
    stages
        .iter()
        .map(|&index| write_stage(weights, partition, index, &layouts[index], out, &streaming))
        .collect()
}

/// Copies the companion files and writes `manifest.json` for stage files already in `out`.
/// `cast` is the dtype the tensors were converted to, if any.
pub fn write_native_manifest(
    info: &ModelInfo,
    stages: Vec<StageEntry>,
    cast: Option<DType>,
    out: &Path,
) -> Result<()> {
    let files = copy_companion_files(info, out)?;
    let dtype = cast.unwrap_or_else(|| {
        stages[0]
            .tensors
            .iter()
            .find(|t| t.name == EMBED)
            .map_or(info.config.dtype, |t| t.dtype)
    });
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        dtype,
        tied_embeddings: info.config.tie_word_embeddings,
        checksum: checksum::ALGORITHM.into(),
        config: with_dtype(&info.hf_config, dtype),
        files,
        stages,
    };
    // The manifest goes last: a directory without one is not a checkpoint.
    checkpoint::write_json(&out.join(MANIFEST_FILE), &manifest)
}

fn write_stage(
    weights: &dyn WeightSource,
    partition: &Partition,
    index: usize,
    layout: &[TensorSpec],
    out: &Path,
    streaming: &Streaming<'_>,
) -> Result<StageEntry> {
    let slice = partition.stages()[index].clone();
    let mut writer = StageFileWriter::create(out, index, slice, layout.to_vec())?;
    for spec in layout {
        stream_tensor(weights, spec, &mut writer, streaming)?;
    }
    writer.finish()
}

/// How tensors are streamed: what shows progress, and whether Ctrl-C stops the copy.
struct Streaming<'a> {
    progress: &'a ProgressBar,
    interruptible: bool,
}

fn write_native(
    weights: &dyn WeightSource,
    info: &ModelInfo,
    layouts: Vec<Vec<TensorSpec>>,
    partition: &Partition,
    cast: Option<DType>,
    out: &Path,
    streaming: &Streaming<'_>,
) -> Result<()> {
    let stages = layouts
        .iter()
        .enumerate()
        .map(|(index, layout)| write_stage(weights, partition, index, layout, out, streaming))
        .collect::<Result<Vec<_>>>()?;
    write_native_manifest(info, stages, cast, out)
}

fn write_hf(
    source: &ModelFiles,
    tensors: Vec<TensorSpec>,
    max_shard_bytes: u64,
    cast: Option<DType>,
    out: &Path,
    progress: &ProgressBar,
) -> Result<()> {
    let shards = hf_writer::plan_shards(tensors, max_shard_bytes);
    let streaming = Streaming {
        progress,
        interruptible: true,
    };
    for (file, layout) in &shards {
        let mut writer = SafetensorsWriter::create(&out.join(file), layout.clone())?;
        for spec in layout {
            stream_tensor(source.weights.as_ref(), spec, &mut writer, &streaming)?;
        }
        writer.finish()?;
    }
    hf_writer::write_index(out, &shards)?;
    let config = match cast {
        Some(dtype) => with_dtype(&source.info.hf_config, dtype),
        None => source.info.hf_config.clone(),
    };
    checkpoint::write_json(&out.join(checkpoint::HF_CONFIG_FILE), &config)?;
    let files = copy_companion_files(&source.info, out)?;
    if !files.iter().any(|f| f == GENERATION_CONFIG) {
        checkpoint::write_json(
            &out.join(GENERATION_CONFIG),
            &generation_config(&source.info.hf_config),
        )?;
    }
    Ok(())
}

/// Copies one tensor from `source` into `sink` chunk by chunk, casting on the way, checking the
/// source's checksum where it has one and releasing the source pages once written. An uncast
/// tensor's output checksum is its source checksum, so a sink that computes one checks it too.
fn stream_tensor(
    source: &dyn WeightSource,
    spec: &TensorSpec,
    sink: &mut dyn TensorSink,
    streaming: &Streaming<'_>,
) -> Result<()> {
    let Streaming {
        progress,
        interruptible,
    } = *streaming;
    let view = source.tensor(&spec.name)?;
    let cast = view.dtype != spec.dtype;
    let reuse_sink_checksum = !cast && sink.computes_checksums();
    let mut source_checksum = source
        .expected_checksum(&spec.name)
        .filter(|_| !reuse_sink_checksum)
        .map(|_| checksum::Checksum::default());
    let chunk_bytes = CHUNK_ELEMENTS * view.dtype.size();
    let mut buffer = Vec::new();
    let mut released = 0;
    sink.begin(&spec.name)?;
    for (i, chunk) in view.bytes.chunks(chunk_bytes).enumerate() {
        if interruptible {
            crate::interrupt::check()?;
        }
        if let Some(sum) = source_checksum.as_mut() {
            sum.update(chunk);
        }
        if !cast {
            sink.write(chunk)?;
        } else {
            buffer.clear();
            view.dtype.cast(chunk, spec.dtype, &mut buffer);
            sink.write(&buffer)?;
        }
        let end = i * chunk_bytes + chunk.len();
        if end - released >= RELEASE_BYTES || end == view.bytes.len() {
            source.release(&spec.name, released..end);
            released = end;
        }
        progress.inc((chunk.len() / view.dtype.size() * spec.dtype.size()) as u64);
    }
    let written = sink.end()?;
    let source_sum = if reuse_sink_checksum {
        written
    } else {
        source_checksum.map(|sum| sum.hex())
    };
    match source_sum {
        Some(sum) => checksum::verify(source, &spec.name, &sum),
        None => Ok(()),
    }
}

/// Copies the companion files the source has into `out`; returns their names.
fn copy_companion_files(info: &ModelInfo, out: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    for name in COMPANION_FILES {
        let from = info.dir.join(name);
        if from.is_file() {
            let to = out.join(name);
            std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
            copied.push(name.to_string());
        }
    }
    Ok(copied)
}

/// `config` with its dtype field (`torch_dtype` in transformers 4, `dtype` in 5) set to `dtype`.
fn with_dtype(config: &Value, dtype: DType) -> Value {
    let mut config = config.clone();
    if let Some(fields) = config.as_object_mut() {
        let key = if fields.contains_key("dtype") && !fields.contains_key("torch_dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        fields.insert(key.into(), dtype.torch_name().into());
    }
    config
}

/// The generation defaults transformers derives from a model config when none were saved.
fn generation_config(config: &Value) -> Value {
    let mut generation = json!({"_from_model_config": true});
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(value) = config.get(key).filter(|v| !v.is_null()) {
            generation[key] = value.clone();
        }
    }
    generation
}
