//! Numerical parity with Hugging Face transformers on the reference fixtures: logits, loss and
//! every parameter gradient, computed on the CPU backend through Burn autodiff.

mod common;

use common::pipeline::run_pipeline;
use common::{max_abs, max_abs_diff, Expected, FIXTURES};
use pp::checkpoint::SafetensorsWeights;
use pp::device::DeviceSpec;
use pp::model::{token_tensor, AttentionInputs, ModelConfig, StageModel, TokenLayout};
use pp_stages::StageSlice;

crate::on_devices! {
    logits_loss_and_gradients_match_transformers => logits_loss_and_gradients;
}

/// Logits within 1e-4 absolute (10× that on wgpu), the loss within the device's tolerance,
/// every gradient and the global norm within 1e-4 of their scale (10× on wgpu).
fn logits_loss_and_gradients(device: DeviceSpec) {
    let slack = common::tolerance(device) / 1e-5;
    for name in FIXTURES {
        let expected = Expected::load(name);
        let whole = [StageSlice::whole(common::config(name).num_layers)];
        let run = run_pipeline(name, &whole, device);

        let logits_err = max_abs_diff(&run.logits, &expected.f32("logits").values);
        assert!(
            f64::from(logits_err) < 1e-4 * slack,
            "{name}: logits differ by {logits_err}"
        );

        let loss = expected.f32("loss").values[0];
        assert!(
            f64::from((run.loss - loss).abs()) < common::tolerance(device),
            "{name}: loss {} vs {loss}",
            run.loss
        );

        let expected_grads: Vec<String> = expected
            .names()
            .into_iter()
            .filter_map(|n| n.strip_prefix("grad.").map(String::from))
            .collect();
        let mut ours: Vec<&str> = run.grads.iter().map(|(n, _)| n.as_str()).collect();
        let mut theirs: Vec<&str> = expected_grads.iter().map(String::as_str).collect();
        ours.sort();
        theirs.sort();
        assert_eq!(ours, theirs, "{name}: parameter sets differ");

        for (param, grad) in &run.grads {
            let reference = expected.f32(&format!("grad.{param}")).values;
            let err = max_abs_diff(grad, &reference);
            let scale = max_abs(&reference);
            assert!(
                f64::from(err) <= 1e-4 * slack * f64::from(scale),
                "{name}: grad of {param} off by {err} (scale {scale})"
            );
        }
        let norm = run
            .grads
            .iter()
            .flat_map(|(_, g)| g.iter())
            .map(|&g| f64::from(g) * f64::from(g))
            .sum::<f64>()
            .sqrt();
        let reference_norm = f64::from(expected.f32("grad_norm").values[0]);
        assert!(
            (norm - reference_norm).abs() <= 1e-4 * slack * reference_norm,
            "{name}: grad norm {norm} vs {reference_norm}"
        );
    }
}

/// Rewrites `src`'s float32 weights into `dst` as float16 (`as_f16`) or as float32 values
/// rounded through float16 (`!as_f16`).
fn write_rounded_weights(src: &std::path::Path, dst: &std::path::Path, as_f16: bool) {
    use safetensors::tensor::{Dtype, TensorView};
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let converted: Vec<(String, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| half::f16::from_f32(f32::from_le_bytes(b.try_into().unwrap())));
            let data: Vec<u8> = if as_f16 {
                values.flat_map(|h| h.to_le_bytes()).collect()
            } else {
                values.flat_map(|h| h.to_f32().to_le_bytes()).collect()
            };
            (name, view.shape().to_vec(), data)
        })
        .collect();
    let dtype = if as_f16 { Dtype::F16 } else { Dtype::F32 };
    let views: Vec<(String, TensorView<'_>)> = converted
        .iter()
        .map(|(name, shape, data)| {
            (
                name.clone(),
                TensorView::new(dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    std::fs::create_dir_all(dst).unwrap();
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
}

#[test]
fn float16_storage_is_upcast_exactly() {
    let src = common::fixture("llama3-tiny").join("hf");
    let tmp = tempfile::tempdir().unwrap();
    let (half_dir, rounded_dir) = (tmp.path().join("f16"), tmp.path().join("rounded"));
    write_rounded_weights(&src, &half_dir, true);
    write_rounded_weights(&src, &rounded_dir, false);
    let logits = |dir: &std::path::Path| {
        let config = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
        let weights = SafetensorsWeights::open(dir).unwrap();
        let device = Default::default();
        let model = StageModel::<pp::device::Cpu>::load(
            &config,
            StageSlice::whole(config.num_layers),
            &weights,
            &device,
        )
        .unwrap();
        let ids: Vec<u32> = (0..12).map(|i| i * 31 % 384).collect();
        let inputs = AttentionInputs::new(&config, &TokenLayout::contiguous(2, 6), &device);
        model
            .forward(token_tensor(&ids, 2, 6, &device), &inputs)
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    };
    assert_eq!(logits(&half_dir), logits(&rounded_dir));
}
