//! Training throughput on the CPU: full fine-tuning steps (forward, backward, AdamW) of a small
//! Llama with random weights on random tokens, through the same stage runtime `pp train` uses.
//! `scripts/bench_train_torch.py` runs the same configuration with PyTorch + transformers.
//!
//! `cargo bench --bench train -- [--hidden 256 --layers 4 --heads 8 --kv-heads 4
//!  --intermediate 688 --vocab 2048 --batch 4 --seq 256 --steps 20 --warmup 3]
//!  [--checkpoint-activations]`
//!
//! Prints one JSON line like the PyTorch script's.

use std::time::Instant;

use pp::checkpoint::OwnedWeights;
use pp::data::{MicroBatch, Sequence};
use pp::device::CpuAutodiff;
use pp::model::{ModelConfig, StageModel};
use pp::train::optim::Optimizer;
use pp::train::runtime::{MemorySavers, Precision, StageRunner};
use pp_stages::StageSlice;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().expect("a number"))
    };
    let (hidden, layers, heads) = (
        value("--hidden", 256),
        value("--layers", 4),
        value("--heads", 8),
    );
    let (kv_heads, intermediate, vocab) = (
        value("--kv-heads", 4),
        value("--intermediate", 688),
        value("--vocab", 2048),
    );
    let (batch, seq, steps, warmup) = (
        value("--batch", 4),
        value("--seq", 256),
        value("--steps", 20),
        value("--warmup", 3),
    );
    let checkpointing = args.iter().any(|a| a == "--checkpoint-activations");
    let config = ModelConfig::from_hf_json(&format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "hidden_size": {hidden},
            "num_hidden_layers": {layers}, "num_attention_heads": {heads},
            "num_key_value_heads": {kv_heads}, "intermediate_size": {intermediate},
            "vocab_size": {vocab}, "max_position_embeddings": {seq}, "torch_dtype": "float32"}}"#
    ))
    .expect("a valid config");
    let weights = OwnedWeights::synthetic(&config, &StageSlice::whole(layers), 0);
    let device = Default::default();
    let whole = StageSlice::whole(layers);
    let model: StageModel<CpuAutodiff> =
        StageModel::load(&config, whole, &weights, &device).expect("synthetic weights load");
    let optimizer = Optimizer::AdamW {
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let savers = MemorySavers {
        checkpoint_activations: checkpointing,
        ..Default::default()
    };
    let mut runner = StageRunner::new(model, optimizer, savers, Precision::F32, device);
    runner.set_lr(1e-4);

    // Random tokens, labels = inputs, as the PyTorch script trains.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % vocab as u64) as u32
    };
    let sequences: Vec<Sequence> = (0..batch)
        .map(|_| {
            let ids: Vec<u32> = (0..seq).map(|_| next()).collect();
            Sequence {
                labels: ids.iter().map(|&i| i64::from(i)).collect(),
                input_ids: ids,
                documents: vec![seq],
            }
        })
        .collect();
    let rows: Vec<&Sequence> = sequences.iter().collect();
    let micro_batch = MicroBatch::new(&rows, 0);
    let scored = micro_batch.targets.count as f64;

    let mut times = Vec::with_capacity(steps);
    for step in 0..warmup + steps {
        let started = Instant::now();
        runner.forward(0, &micro_batch, None);
        runner.backward(0, None, 1.0 / scored, true);
        runner.step(1.0);
        if step >= warmup {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "framework": "pp",
            "backend": "burn-ndarray",
            "params": config.num_params(),
            "batch": batch,
            "seq": seq,
            "checkpoint_activations": checkpointing,
            "step_ms_median": median * 1e3,
            "tokens_per_s": (batch * seq) as f64 / median,
        })
    );
}
