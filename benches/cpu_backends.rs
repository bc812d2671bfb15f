//! Which CPU backend trains faster: forward + backward of a small Llama on Burn's `flex` and
//! `ndarray` backends, same shapes, same thread count.
//!
//! Run: `cargo bench --bench cpu_backends --features flex`

use std::time::Instant;

use burn::backend::{Autodiff, Flex, NdArray};
use pp::checkpoint::OwnedWeights;
use pp::kernels::TrainBackend;
use pp::model::loss::Targets;
use pp::model::{token_tensor, AttentionInputs, ModelConfig, StageModel, TokenLayout};
use pp_stages::StageSlice;

const CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 4096,
    "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512}"#;
const BATCH: usize = 4;
const SEQ: usize = 256;
const STEPS: usize = 5;

fn time_backend<B: TrainBackend>(name: &str, cfg: &ModelConfig) {
    let device = Default::default();
    let weights = OwnedWeights::synthetic(cfg, &StageSlice::whole(cfg.num_layers), 0);
    let model =
        StageModel::<B>::load(cfg, StageSlice::whole(cfg.num_layers), &weights, &device).unwrap();
    let ids: Vec<u32> = (0..BATCH * SEQ)
        .map(|i| (i * 7919 % cfg.vocab_size) as u32)
        .collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    let targets = Targets::from_labels(&labels, BATCH, SEQ);
    let inputs = AttentionInputs::new(cfg, &TokenLayout::contiguous(BATCH, SEQ), &device);
    let device_targets = targets.to_device(cfg.vocab_size, &device);
    let step = || {
        let ids = token_tensor(&ids, BATCH, SEQ, &device);
        let loss = model.loss_sum(ids, &inputs, &device_targets) / targets.count as f64;
        let grads = loss.backward();
        drop(grads);
    };
    step(); // warm-up
    let start = Instant::now();
    for _ in 0..STEPS {
        step();
    }
    let seconds = start.elapsed().as_secs_f64() / STEPS as f64;
    let tokens = (BATCH * SEQ) as f64;
    println!(
        "{name:<8} {:>8.1} ms/step  {:>8.0} tokens/s",
        seconds * 1e3,
        tokens / seconds
    );
}

fn main() {
    let cfg = ModelConfig::from_hf_json(CONFIG).unwrap();
    println!(
        "forward+backward, Llama {} params, batch {BATCH} x {SEQ} tokens, {STEPS} steps",
        cfg.num_params()
    );
    time_backend::<Autodiff<Flex>>("flex", &cfg);
    time_backend::<Autodiff<NdArray>>("ndarray", &cfg);
}
