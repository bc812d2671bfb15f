//! Decoding with the key/value cache computes what transformers computes: every reference row
//! is fed through a prompt pass and then one token at a time, several rows of different lengths
//! in one batch that they join and leave, and each step's logits are compared with
//! transformers' logits at that position (Mistral's 24 tokens wrap its rolling window of 8).

mod common;

use burn::tensor::DType;
use common::pipeline::fixture_model;
use common::{max_abs_diff, Expected, FIXTURES};
use pp::device::{Device, DeviceSpec};
use pp::kernels::Kernels;
use pp::model::{KvCache, StageModel};

crate::on_devices! {
    cached_decoding_matches_transformers_logits => cached_decoding;
}

fn cached_decoding(device: DeviceSpec) {
    let target = Device::resolve(device).unwrap();
    let tolerance = 1e-4 * common::tolerance(device) / 1e-5;
    pp::with_backend!(target, |B, dev| {
        for name in FIXTURES {
            check_fixture::<B>(name, &dev, tolerance as f32);
        }
    })
}

fn check_fixture<B: Kernels>(name: &str, device: &B::Device, tolerance: f32) {
    let (config, weights) = fixture_model(name);
    let model = StageModel::<B>::load_whole(&config, &weights, device).unwrap();
    let expected = Expected::load(name);
    let ids = expected.i64("input_ids");
    let logits = expected.f32("logits");
    let (batch, seq, vocab) = (ids.shape[0], ids.shape[1], logits.shape[2]);
    let token = |row: usize, pos: usize| ids.values[row * seq + pos] as u32;
    let reference = |row: usize, pos: usize| {
        let at = (row * seq + pos) * vocab;
        &logits.values[at..at + vocab]
    };
    // Row r's prompt is its first 3 + 2r tokens; a second copy of row 0 starts late and leaves
    // early, so rows join a running batch and leave it.
    let prompt_len = |r: usize| 3 + 2 * r;
    let mut cache: Option<KvCache<B>> = None;
    // (row, next position to feed, position it leaves at)
    let mut running: Vec<(usize, usize, usize)> = Vec::new();
    let mut compared = 0;
    for step in 0..seq {
        let joining = (0..batch)
            .filter(|&r| step == r)
            .map(|r| (r, seq))
            .chain((step == 5).then_some((0, prompt_len(0) + 6)));
        for (row, end) in joining {
            let len = prompt_len(row);
            let prompt: Vec<u32> = (0..len).map(|p| token(row, p)).collect();
            let (last, one) = model.prefill(&prompt, DType::F32, device);
            let last: Vec<f32> = last.into_data().to_vec().unwrap();
            let err = max_abs_diff(&last, reference(row, len - 1));
            assert!(
                err < tolerance,
                "{name}: prompt of row {row}: logits off by {err}"
            );
            compared += 1;
            match &mut cache {
                Some(c) => c.join(one),
                None => cache = Some(one),
            }
            running.push((row, len, end));
        }
        let keep: Vec<usize> = (0..running.len())
            .filter(|&i| running[i].1 < running[i].2)
            .collect();
        running = keep.iter().map(|&i| running[i]).collect();
        cache = cache.and_then(|c| c.retain(&keep));
        let Some(c) = cache.as_mut() else { continue };
        let tokens: Vec<u32> = running.iter().map(|&(r, p, _)| token(r, p)).collect();
        let out = model.decode(&tokens, c, DType::F32, device);
        let out: Vec<f32> = out.into_data().to_vec().unwrap();
        for (i, (row, pos, _)) in running.iter_mut().enumerate() {
            let err = max_abs_diff(&out[i * vocab..(i + 1) * vocab], reference(*row, *pos));
            assert!(
                err < tolerance,
                "{name}: row {row} position {pos}: logits off by {err}"
            );
            compared += 1;
            *pos += 1;
        }
    }
    assert!(
        compared > batch * (seq - prompt_len(batch - 1)),
        "{name}: {compared} compared"
    );
}
