//! `pp serve MODEL_DIR`: an OpenAI-compatible server (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`, `/health`) over a native or Hugging Face checkpoint, or a
//! training run's output directory.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use pp::dtype::DType;
use pp::kernels::Kernels;
use pp::model::StageModel;
use pp::serve::engine::EngineSettings;
use pp::serve::ServeSettings;
use pp::tokenizer::Tokenizer;
use pp::tool_calls::ToolCallFormat;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model directory (Hugging Face or pp native), or a `pp train` output directory (its
    /// `final`, or with --latest its newest checkpoint).
    model: PathBuf,
    /// Serve a training output's newest checkpoint (while training goes on) rather than its
    /// `final`.
    #[arg(long)]
    latest: bool,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Most sequences decoded together; more requests wait for a place.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Longest sequence, prompt and answer together [default: the model's context, at most
    /// 4096].
    #[arg(long)]
    max_len: Option<usize>,
    /// Requests must send `Authorization: Bearer KEY` [default: $PP_API_KEY; none: open].
    #[arg(long)]
    api_key: Option<String>,
    /// The model's name in the API [default: the directory's name].
    #[arg(long)]
    model_name: Option<String>,
    /// Compute in this dtype: f32, or bf16/f16 on devices that compute in it.
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// How the model writes tool calls (read back into `tool_calls` when a request has
    /// `tools`).
    #[arg(long, value_enum, default_value_t = ToolCallFormat::Auto)]
    tool_call_format: ToolCallFormat,
    #[command(flatten)]
    device: super::DeviceFlag,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    let model_dir = model_dir(&args.model, args.latest)?;
    let device = args.device.resolve()?;
    if args.dtype != DType::F32 {
        let native = pp::with_backend!(device, |B, dev| {
            <B as burn::tensor::backend::Backend>::supports_dtype(&dev, args.dtype.burn())
        });
        if !native {
            bail!(
                "--dtype {}: {device} does not compute in it; use --dtype f32",
                args.dtype
            );
        }
    }
    pp::with_backend!(device, |B, dev| serve_on::<B>(
        &args, &model_dir, &device, dev
    ))
}

/// The checkpoint to serve: `dir` itself, or a training output's `final` or newest checkpoint.
fn model_dir(dir: &Path, latest: bool) -> anyhow::Result<PathBuf> {
    let checkpoints = dir.join("checkpoints");
    if latest {
        return match pp::train::checkpoint::list(&checkpoints).pop() {
            Some((_, newest)) => Ok(newest),
            None => bail!("--latest: {} holds no checkpoint", checkpoints.display()),
        };
    }
    let is_model = dir.join("config.json").is_file()
        || dir.join(pp::checkpoint::native::MANIFEST_FILE).is_file();
    let last = dir.join("final");
    Ok(if !is_model && last.is_dir() {
        last
    } else {
        dir.to_path_buf()
    })
}

fn serve_on<B: Kernels>(
    args: &Args,
    model_dir: &Path,
    target: &pp::device::Device,
    device: B::Device,
) -> anyhow::Result<()> {
    let files = pp::checkpoint::open(model_dir)?;
    let cfg = &files.info.config;
    let tokenizer = Tokenizer::load(model_dir)?;
    let context = cfg.max_position_embeddings;
    let max_len = args.max_len.unwrap_or(context.min(4096));
    if max_len < 2 || max_len > context {
        bail!("--max-len must be between 2 and the model's context of {context}, not {max_len}");
    }
    let model = StageModel::<B>::load_whole(cfg, files.weights.as_ref(), &device)?
        .with_weights_in(args.dtype.burn());
    super::announce(target);
    let model_name = match &args.model_name {
        Some(name) => name.clone(),
        None => default_name(&args.model)?,
    };
    eprintln!(
        "model {model_name} from {}: batches of up to {}, sequences of up to {max_len} tokens",
        model_dir.display(),
        args.max_batch
    );
    let settings = ServeSettings {
        address: SocketAddr::new(args.host, args.port),
        api_key: args
            .api_key
            .clone()
            .or_else(|| std::env::var("PP_API_KEY").ok())
            .filter(|key| !key.is_empty()),
        model_name,
        max_len,
        tool_call_format: args.tool_call_format,
        stop_tokens: pp::generate::stop_tokens(model_dir, cfg, &tokenizer)?,
    };
    let engine = EngineSettings {
        max_batch: args.max_batch,
        max_len,
        compute: args.dtype.burn(),
    };
    Ok(pp::serve::serve(
        model, tokenizer, settings, engine, device,
    )?)
}

/// The directory's name, as clients will ask for it.
fn default_name(dir: &Path) -> anyhow::Result<String> {
    let absolute = std::fs::canonicalize(dir).with_context(|| dir.display().to_string())?;
    Ok(absolute
        .file_name()
        .map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned()))
}
