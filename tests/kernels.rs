//! The tiled attention and the fused head loss against the plain compositions they replace:
//! values and every gradient, at shapes whose sequence, head size and token count are not
//! multiples of the tile, with causal, per-document and sliding-window masks and several
//! grouped-query ratios.

mod common;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Distribution, Int, Tensor, TensorData};
use pp::device::{Device, DeviceSpec};
use pp::kernels::{reference, AttentionSpec, DeferredWeightGrads, Kernels, TrainBackend};
use pp::model::loss::{Targets, IGNORE_INDEX};

crate::on_devices! {
    attention_matches_the_composition => attention_cases;
    head_loss_matches_the_composition => head_loss_cases;
    swiglu_matches_the_composition => swiglu_case;
    rms_norm_matches_the_composition => rms_norm_case;
    rotary_matches_the_composition => rotary_case;
    linear_matches_the_composition => linear_case;
    deferred_linear_weight_grads_match => deferred_linear_case;
}

type A<X> = Autodiff<X>;

/// One attention problem.
struct Case {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    dim: usize,
    window: Option<usize>,
    /// Document id of each token of each row.
    documents: Vec<Vec<u32>>,
    tile: usize,
}

fn attention_cases(spec: DeviceSpec) {
    let cases = [
        // Grouped 2:1, two documents packed in the second row, tiles of 4 over 13 rows.
        Case {
            batch: 2,
            heads: 4,
            kv_heads: 2,
            seq: 13,
            dim: 6,
            window: None,
            documents: vec![vec![0; 13], [vec![0; 5], vec![1; 8]].concat()],
            tile: 4,
        },
        // Multi-query (6:1) with Mistral's sliding window, tiles of 3 over 10 rows.
        Case {
            batch: 1,
            heads: 6,
            kv_heads: 1,
            seq: 10,
            dim: 8,
            window: Some(3),
            documents: vec![vec![0; 10]],
            tile: 3,
        },
        // Plain multi-head, window and documents together, one tile larger than the sequence.
        Case {
            batch: 1,
            heads: 2,
            kv_heads: 2,
            seq: 7,
            dim: 5,
            window: Some(4),
            documents: vec![vec![3, 3, 3, 7, 7, 7, 7]],
            tile: 16,
        },
        // A document id that comes back after another's run (the CPU then masks per key).
        Case {
            batch: 1,
            heads: 2,
            kv_heads: 1,
            seq: 7,
            dim: 4,
            window: None,
            documents: vec![vec![0, 0, 1, 1, 0, 0, 2]],
            tile: 2,
        },
    ];
    let device = Device::resolve(spec).unwrap();
    for case in &cases {
        pp::with_backend!(device, |B, dev| check_attention::<B>(case, &dev, spec));
    }
}

/// Whether query `q` may not see key `k` of `row`, from the definitions.
fn blocked(case: &Case, row: usize, q: usize, k: usize) -> bool {
    let docs = &case.documents[row];
    k > q || docs[q] != docs[k] || case.window.is_some_and(|w| q - k >= w)
}

/// The dense mask `[batch, 1, seq, seq]` from the definitions.
fn dense_mask<B: Backend>(case: &Case, device: &B::Device) -> Tensor<B, 4, Bool> {
    let seq = case.seq;
    let mut mask = Vec::new();
    for row in 0..case.batch {
        for q in 0..seq {
            mask.extend((0..seq).map(|k| blocked(case, row, q, k)));
        }
    }
    Tensor::from_data(TensorData::new(mask, [case.batch, 1, seq, seq]), device)
}

fn check_attention<B: Kernels>(case: &Case, device: &B::Device, spec: DeviceSpec) {
    let Case {
        batch,
        heads,
        kv_heads,
        seq,
        dim,
        ..
    } = *case;
    let uniform = Distribution::Uniform(-1.0, 1.0);
    let q = Tensor::<B, 4>::random([batch, heads, seq, dim], uniform, device);
    let k = Tensor::<B, 4>::random([batch, kv_heads, seq, dim], uniform, device);
    let v = Tensor::<B, 4>::random([batch, kv_heads, seq, dim], uniform, device);
    let upstream = Tensor::<B, 4>::random([batch, heads, seq, dim], uniform, device);
    let documents: Vec<i64> = case.documents.concat().into_iter().map(i64::from).collect();
    let documents =
        Tensor::<B, 2, Int>::from_data(TensorData::new(documents, [batch, seq]), device);
    let scale = (dim as f64).powf(-0.5);
    let attention = AttentionSpec::new(documents, case.window, scale, heads)
        .with_tile(case.tile)
        .to_autodiff::<A<B>>();

    // Output and the gradients of q, k, v under an arbitrary upstream gradient.
    let run = |fused: bool| {
        let leaf = |t: &Tensor<B, 4>| Tensor::<A<B>, 4>::from_inner(t.clone()).require_grad();
        let (ql, kl, vl) = (leaf(&q), leaf(&k), leaf(&v));
        let out = if fused {
            A::<B>::flash_attention(ql.clone(), kl.clone(), vl.clone(), &attention)
        } else {
            let mask = dense_mask::<A<B>>(case, device);
            reference::attention(ql.clone(), kl.clone(), vl.clone(), mask, scale)
        };
        let grads = (out.clone() * Tensor::from_inner(upstream.clone()))
            .sum()
            .backward();
        [
            out.inner(),
            ql.grad(&grads).unwrap(),
            kl.grad(&grads).unwrap(),
            vl.grad(&grads).unwrap(),
        ]
    };
    let (fused, reference) = (run(true), run(false));
    for (what, (got, want)) in ["output", "dq", "dk", "dv"]
        .iter()
        .zip(fused.iter().zip(&reference))
    {
        assert_close(
            got.clone(),
            want.clone(),
            common::tolerance(spec),
            &format!("{what}, {}x{} heads, tile {}", heads, kv_heads, case.tile),
        );
    }
}

fn head_loss_cases(spec: DeviceSpec) {
    let device = Device::resolve(spec).unwrap();
    // (rows, seq, dim, vocab, chunk): chunks that leave a tail, and one chunk for everything.
    for shape in [(2, 7, 8, 19, 4), (1, 5, 3, 11, 64)] {
        pp::with_backend!(device, |B, dev| check_head_loss::<B>(shape, &dev, spec));
    }
}

fn check_head_loss<B: Kernels>(
    (rows, seq, dim, vocab, chunk): (usize, usize, usize, usize, usize),
    device: &B::Device,
    spec: DeviceSpec,
) {
    let uniform = Distribution::Uniform(-1.0, 1.0);
    let hidden = Tensor::<B, 3>::random([rows, seq, dim], uniform, device);
    let weight = Tensor::<B, 2>::random([vocab, dim], uniform, device);
    // Every third label ignored, the rest spread over the vocabulary.
    let labels: Vec<i64> = (0..rows * seq)
        .map(|i| {
            if i % 3 == 1 {
                IGNORE_INDEX
            } else {
                (i * 7 % vocab) as i64
            }
        })
        .collect();
    let targets = Targets::from_labels(&labels, rows, seq);
    let device_targets = targets
        .to_device::<B>(vocab, device)
        .with_chunk(chunk)
        .to_autodiff::<A<B>>();
    // A scale other than 1 checks that the upstream gradient reaches both gradients.
    let scale = 0.37;

    let run = |fused: bool| {
        let h = Tensor::<A<B>, 3>::from_inner(hidden.clone()).require_grad();
        let w = Tensor::<A<B>, 2>::from_inner(weight.clone()).require_grad();
        let flat = h.clone().reshape([rows * seq, dim]);
        let loss = if fused {
            A::<B>::head_loss(flat, w.clone(), &device_targets)
        } else {
            reference::head_loss(flat, w.clone(), &targets, rows, seq)
        };
        let grads = (loss.clone() * scale).backward();
        (
            loss.inner(),
            h.grad(&grads).unwrap(),
            w.grad(&grads).unwrap(),
        )
    };
    let (fused, reference) = (run(true), run(false));
    let tolerance = common::tolerance(spec);
    let label = format!("{rows}x{seq} tokens, vocab {vocab}, chunk {chunk}");
    assert_close(fused.0, reference.0, tolerance, &format!("loss, {label}"));
    assert_close(
        fused.1,
        reference.1,
        tolerance,
        &format!("d hidden, {label}"),
    );
    assert_close(
        fused.2,
        reference.2,
        tolerance,
        &format!("d weight, {label}"),
    );
}

fn swiglu_case(spec: DeviceSpec) {
    let device = Device::resolve(spec).unwrap();
    pp::with_backend!(device, |B, dev| check_swiglu::<B>(&dev, spec));
}

fn check_swiglu<B: Kernels>(device: &B::Device, spec: DeviceSpec) {
    // 3 x 7 x 11 elements: no multiple of a cube.
    let shape = [3, 7, 11];
    let uniform = Distribution::Uniform(-4.0, 4.0);
    let gate = Tensor::<B, 3>::random(shape, uniform, device);
    let up = Tensor::<B, 3>::random(shape, uniform, device);
    let upstream = Tensor::<B, 3>::random(shape, uniform, device);
    let run = |fused: bool| {
        let g = Tensor::<A<B>, 3>::from_inner(gate.clone()).require_grad();
        let u = Tensor::<A<B>, 3>::from_inner(up.clone()).require_grad();
        let out = if fused {
            A::<B>::swiglu(g.clone(), u.clone())
        } else {
            burn::tensor::activation::silu(g.clone()) * u.clone()
        };
        let grads = (out.clone() * Tensor::from_inner(upstream.clone()))
            .sum()
            .backward();
        [
            out.inner(),
            g.grad(&grads).unwrap(),
            u.grad(&grads).unwrap(),
        ]
    };
    assert_all_close(run(true), run(false), &["output", "d gate", "d up"], spec);
}

fn rms_norm_case(spec: DeviceSpec) {
    let device = Device::resolve(spec).unwrap();
    pp::with_backend!(device, |B, dev| check_rms_norm::<B>(&dev, spec));
}

/// Rows of 300 (more than a cube's units, and no multiple of them) and of 5 (fewer); 300 rows
/// of 300 span two CPU tasks, whose weight gradients are summed.
fn check_rms_norm<B: Kernels>(device: &B::Device, spec: DeviceSpec) {
    for shape in [[2, 3, 300], [2, 3, 5], [3, 100, 300]] {
        let hidden = shape[2];
        let x = Tensor::<B, 3>::random(shape, Distribution::Uniform(-3.0, 3.0), device);
        let weight = Tensor::<B, 1>::random([hidden], Distribution::Uniform(0.5, 1.5), device);
        let upstream = Tensor::<B, 3>::random(shape, Distribution::Uniform(-1.0, 1.0), device);
        let eps = 1e-5;
        let run = |fused: bool| {
            let x = Tensor::<A<B>, 3>::from_inner(x.clone()).require_grad();
            let w = Tensor::<A<B>, 1>::from_inner(weight.clone()).require_grad();
            let out = if fused {
                A::<B>::rms_norm(x.clone(), w.clone(), eps)
            } else {
                pp::kernels::norm::forward(x.clone(), w.clone(), eps)
            };
            let grads = (out.clone() * Tensor::from_inner(upstream.clone()))
                .sum()
                .backward();
            let grad_weight = w.grad(&grads).unwrap().unsqueeze::<3>();
            [out.inner(), x.grad(&grads).unwrap(), grad_weight]
        };
        assert_all_close(run(true), run(false), &["output", "d x", "d weight"], spec);
    }
}

fn rotary_case(spec: DeviceSpec) {
    let device = Device::resolve(spec).unwrap();
    pp::with_backend!(device, |B, dev| check_rotary::<B>(&dev, spec));
}

/// Three heads of size 10 over 7 positions and 2 rows, tables whose halves repeat (as RoPE's
/// do) and differ per row; then 1,100 positions, whose rows span several CPU tasks.
fn check_rotary<B: Kernels>(device: &B::Device, spec: DeviceSpec) {
    for shape in [[2, 3, 7, 10], [2, 3, 1100, 12]] {
        check_rotary_shape::<B>(shape, device, spec);
    }
}

fn check_rotary_shape<B: Kernels>(shape: [usize; 4], device: &B::Device, spec: DeviceSpec) {
    let [batch, heads, seq, dim] = shape;
    let angles = Tensor::<B, 4>::random(
        [batch, 1, seq, dim / 2],
        Distribution::Uniform(-3.0, 3.0),
        device,
    );
    let angles = Tensor::cat(vec![angles.clone(), angles], 3);
    let (cos, sin) = (angles.clone().cos(), angles.sin());
    let x = Tensor::<B, 4>::random(
        [batch, heads, seq, dim],
        Distribution::Uniform(-2.0, 2.0),
        device,
    );
    let upstream = Tensor::<B, 4>::random(x.dims(), Distribution::Uniform(-1.0, 1.0), device);
    let run = |fused: bool| {
        let x = Tensor::<A<B>, 4>::from_inner(x.clone()).require_grad();
        let (cos, sin) = (
            Tensor::from_inner(cos.clone()),
            Tensor::from_inner(sin.clone()),
        );
        let out = if fused {
            A::<B>::rotary(x.clone(), cos, sin)
        } else {
            pp::kernels::rotary::forward(x.clone(), cos, sin)
        };
        let grads = (out.clone() * Tensor::from_inner(upstream.clone()))
            .sum()
            .backward();
        [out.inner(), x.grad(&grads).unwrap()]
    };
    assert_all_close(run(true), run(false), &["output", "d x"], spec);
}

fn linear_case(spec: DeviceSpec) {
    let device = Device::resolve(spec).unwrap();
    pp::with_backend!(device, |B, dev| check_linear::<B>(&dev, spec));
}

/// `x · weightᵀ`, `d x` and `d weight` against Burn's matmul, at sizes no multiple of a
/// kernel's block, with `x` both contiguous and a transposed view (strided operands).
fn check_linear<B: Kernels>(device: &B::Device, spec: DeviceSpec) {
    let [tokens, inp, out] = [37, 19, 23];
    let uniform = Distribution::Uniform(-2.0, 2.0);
    let weight = Tensor::<B, 2>::random([out, inp], uniform, device);
    let upstream = Tensor::<B, 2>::random([tokens, out], uniform, device);
    for x in [
        Tensor::<B, 2>::random([tokens, inp], uniform, device),
        Tensor::<B, 2>::random([inp, tokens], uniform, device).transpose(),
    ] {
        let run = |fused: bool| {
            let x = Tensor::<A<B>, 2>::from_inner(x.clone()).require_grad();
            let w = Tensor::<A<B>, 2>::from_inner(weight.clone()).require_grad();
            let y = if fused {
                A::<B>::linear(x.clone(), w.clone())
            } else {
                x.clone().matmul(w.clone().transpose())
            };
            let grads = (y.clone() * Tensor::from_inner(upstream.clone()))
                .sum()
                .backward();
            [y.inner(), x.grad(&grads).unwrap(), w.grad(&grads).unwrap()]
        };
        let what = ["output", "d x", "d weight"];
        assert_all_close(run(true), run(false), &what, spec);
    }
}

fn deferred_linear_case(spec: DeviceSpec) {
    let device = Device::resolve(spec).unwrap();
    pp::with_backend!(device, |B, dev| check_deferred_linear::<B>(&dev, spec));
}

/// Two linear maps in a row recorded under a capture: backward gives the input's gradient and
/// no weight gradients; the deferred ones, computed afterwards, equal an ordinary backward's.
fn check_deferred_linear<B: Kernels>(device: &B::Device, spec: DeviceSpec) {
    let uniform = Distribution::Uniform(-1.0, 1.0);
    let x = Tensor::<B, 2>::random([9, 6], uniform, device);
    let weights = [[5, 6], [4, 5]].map(|shape| Tensor::<B, 2>::random(shape, uniform, device));
    let run = |deferred: Option<&DeferredWeightGrads<B>>| {
        let x = Tensor::<A<B>, 2>::from_inner(x.clone()).require_grad();
        let w = weights
            .clone()
            .map(|w| Tensor::<A<B>, 2>::from_inner(w).require_grad());
        let y = {
            let _capture = deferred.map(DeferredWeightGrads::capture);
            A::<B>::linear(A::<B>::linear(x.clone(), w[0].clone()), w[1].clone())
        };
        let grads = y.sum().backward();
        let mut weight_grads = w.clone().map(|w| w.grad(&grads));
        if let Some(deferred) = deferred {
            assert!(
                weight_grads.iter().all(Option::is_none),
                "a weight gradient was not deferred"
            );
            for work in deferred.take() {
                let index = w.iter().position(|w| A::<B>::node_id(w) == work.weight);
                weight_grads[index.expect("deferred for a weight of the graph")] =
                    Some(work.compute());
            }
        }
        let [first, second] = weight_grads.map(|g| g.expect("every weight has its gradient"));
        [x.grad(&grads).unwrap(), first, second].map(|t| t.flatten::<1>(0, 1))
    };
    let deferred = DeferredWeightGrads::default();
    let what = ["d x", "d first weight", "d second weight"];
    assert_all_close(run(Some(&deferred)), run(None), &what, spec);
}

/// Each of `got` against the same of `want`, named by `what`.
fn assert_all_close<B: Backend, const D: usize, const N: usize>(
    got: [Tensor<B, D>; N],
    want: [Tensor<B, D>; N],
    what: &[&str; N],
    spec: DeviceSpec,
) {
    for ((got, want), what) in got.into_iter().zip(want).zip(what) {
        assert_close(got, want, common::tolerance(spec), what);
    }
}

/// Largest difference within `tolerance` relative to the reference's scale (at least 1).
fn assert_close<B: Backend, const D: usize>(
    got: Tensor<B, D>,
    want: Tensor<B, D>,
    tolerance: f64,
    what: &str,
) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let got: Vec<f32> = got.into_data().convert::<f32>().to_vec().unwrap();
    let want: Vec<f32> = want.into_data().convert::<f32>().to_vec().unwrap();
    let scale = want.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        f64::from(worst / scale) <= tolerance,
        "{what}: differs by {worst} (scale {scale})"
    );
}

/// The optimizers' kernels on the GPU backend against their compositions, over two steps
/// (the bias corrections and decays change) of a tensor whose size is no multiple of a cube.
#[cfg(feature = "wgpu")]
#[test]
fn fused_optimizers_match_the_compositions() {
    let device = Device::resolve(DeviceSpec::Wgpu(0)).unwrap();
    pp::with_backend!(device, |B, dev| check_optimizers::<B>(&dev));
}

/// The CPU's one-pass AdamW (and the compositions the CPU keeps for the others) likewise.
#[test]
fn cpu_optimizers_match_the_compositions() {
    check_optimizers::<pp::device::Cpu>(&Default::default());
}

fn check_optimizers<B: Kernels>(device: &B::Device) {
    use pp::kernels::optimizer::{adafactor_composed, adamw_composed, sgd_composed};
    use pp::kernels::{AdafactorStep, AdamWStep, SecondMoment, SgdStep};

    let uniform = Distribution::Uniform(-1.0, 1.0);
    // 107,300 elements: no multiple of a cube, and more than one CPU chunk.
    let shape = [370, 290];
    let grad = Tensor::<B, 2>::random(shape, uniform, device);
    let param = Tensor::<B, 2>::random(shape, uniform, device);
    let small = |scale: f64| Tensor::<B, 2>::random(shape, uniform, device) * scale;

    // AdamW: parameter and both moments.
    let start = [param.clone(), small(0.1), small(0.01).abs()];
    let (mut fused, mut composed) = (start.clone(), start);
    for step in 1..=2 {
        let hyper = AdamWStep {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
            step,
        };
        let [p, m, v] = fused;
        fused = B::adamw_step(p, grad.clone(), m, v, &hyper);
        let [p, m, v] = composed;
        composed = adamw_composed(p, grad.clone(), m, v, &hyper);
    }
    for (what, (got, want)) in ["adamw param", "adamw m", "adamw v"]
        .iter()
        .zip(fused.into_iter().zip(composed))
    {
        assert_close(got, want, 1e-6, what);
    }

    // Adafactor (factored) with clipping active: parameter and both statistics.
    let moment = SecondMoment::<B>::zeros(shape[0], shape[1], true, device);
    let (mut fused, mut composed) = ((param.clone(), moment.clone()), (param.clone(), moment));
    for step in 1..=2 {
        let hyper = AdafactorStep {
            lr: 1e-2,
            eps: 1e-30,
            clip_threshold: 0.5,
            decay_rate: -0.8,
            weight_decay: 0.01,
            step,
        };
        fused = B::adafactor_step(fused.0, grad.clone() * step as f64, fused.1, &hyper);
        composed = adafactor_composed(composed.0, grad.clone() * step as f64, composed.1, &hyper);
    }
    assert_close(fused.0, composed.0, 1e-6, "adafactor param");
    match (fused.1, composed.1) {
        (
            SecondMoment::Factored { rows, cols },
            SecondMoment::Factored {
                rows: want_rows,
                cols: want_cols,
            },
        ) => {
            assert_close(rows, want_rows, 1e-6, "adafactor rows");
            assert_close(cols, want_cols, 1e-6, "adafactor cols");
        }
        _ => panic!("the moment should stay factored"),
    }

    // SGD with momentum and weight decay: parameter and buffer.
    let hyper = SgdStep {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.01,
    };
    let (mut fused, mut composed) = ((param.clone(), None), (param, None));
    for _ in 1..=2 {
        fused = B::sgd_step(fused.0, grad.clone(), fused.1, &hyper);
        composed = sgd_composed(composed.0, grad.clone(), composed.1, &hyper);
    }
    assert_close(fused.0, composed.0, 1e-6, "sgd param");
    assert_close(fused.1.unwrap(), composed.1.unwrap(), 1e-6, "sgd buffer");
}
