//! Greedy decoding equals transformers' `generate` token for token on every fixture
//! (`generate.json`, made by `scripts/make_generate_reference.py`), with all of a fixture's
//! prompts decoded together in one batch.

mod common;

use burn::tensor::DType;
use common::pipeline::fixture_model;
use common::FIXTURES;
use pp::device::{Device, DeviceSpec};
use pp::generate::{Completion, Decoder, GenerationOptions};
use pp::kernels::Kernels;
use pp::model::StageModel;
use pp::sampling::Sampling;
use pp::tokenizer::Tokenizer;
use serde_json::Value;

crate::on_devices! {
    greedy_decoding_equals_transformers_generate => greedy_decoding;
}

fn greedy_decoding(device: DeviceSpec) {
    let target = Device::resolve(device).unwrap();
    pp::with_backend!(target, |B, dev| {
        for name in FIXTURES {
            check_fixture::<B>(name, &dev);
        }
    })
}

fn check_fixture<B: Kernels>(name: &str, device: &B::Device) {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture(name).join("generate.json")).unwrap(),
    )
    .unwrap();
    let (config, weights) = fixture_model(name);
    let model = StageModel::<B>::load_whole(&config, &weights, device).unwrap();
    let tokenizer = Tokenizer::load(&common::fixture(name).join("hf")).unwrap();
    let options = GenerationOptions {
        sampling: Sampling::default(),
        max_new_tokens: reference["new_tokens"].as_u64().unwrap() as usize,
        stop_tokens: Vec::new(),
        stop_strings: Vec::new(),
    };
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect()
    };
    let cases = reference["cases"].as_array().unwrap();
    let mut decoder = Decoder::new(&model, &tokenizer, DType::F32, device.clone());
    for (index, case) in cases.iter().enumerate() {
        let completion = Completion::new(
            ids(&case["prompt"]),
            options.clone(),
            config.max_position_embeddings,
        )
        .unwrap();
        decoder.add(completion, index).unwrap();
    }
    let mut finished = Vec::new();
    while !decoder.is_empty() {
        finished.extend(decoder.retain(|c, _| c.finish().is_none()));
        decoder.step().unwrap();
    }
    assert_eq!(finished.len(), cases.len(), "{name}");
    for (completion, index) in finished {
        assert_eq!(
            completion.new_ids(),
            ids(&cases[index]["greedy"]).as_slice(),
            "{name}: prompt {index}"
        );
    }
}
