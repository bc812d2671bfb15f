use pp_stages::ScheduleKind;

use super::*;
use crate::dtype::DType;
use crate::train::optim::Optimizer;
use crate::train::runtime::MemorySavers;

/// A 12-layer model whose layers are 64 wide.
fn config() -> ModelConfig {
    ModelConfig::from_hf_json(
        r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
            "num_hidden_layers": 12, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 64,
            "torch_dtype": "float32"}"#,
    )
    .unwrap()
}

fn one_f_one_b(ranks: usize) -> (Schedule, TrainingSetup) {
    let schedule = Schedule::new(ScheduleKind::OneFOneB, ranks, 2 * ranks, 1).unwrap();
    let setup = TrainingSetup {
        dtype: DType::F32,
        seq_len: 64,
        micro_batch_size: 1,
        optimizer: Optimizer::AdamW {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        },
        savers: MemorySavers::default(),
        in_flight: in_flight(&schedule).unwrap(),
    };
    (schedule, setup)
}

/// A worker on `device` whose layer takes `layer` seconds forward (twice that backward), with
/// a head as costly as one layer.
fn worker(device: &str, layer: f64, memory: Option<u64>) -> Worker {
    Worker {
        label: format!("node 0 (test at 127.0.0.1), {device}"),
        memory,
        measured: Measured {
            device: device.into(),
            speed: StageSpeed {
                layer_forward: layer,
                layer_backward: 2.0 * layer,
                head_forward: layer,
                head_backward: 2.0 * layer,
            },
        },
        node: 0,
        link: None,
    }
}

fn layer_counts(placement: &Placement) -> Vec<usize> {
    placement
        .partition
        .stages()
        .iter()
        .map(|s| s.layers.len())
        .collect()
}

#[test]
fn a_faster_device_gets_more_layers_and_the_step_time_follows() {
    let (schedule, setup) = one_f_one_b(2);
    // The first worker is three times as fast; the second also carries the head (one layer's
    // worth): 3 × (12 - n) + 3 = n at n = 9.75, so 10 and 2 (the slowest stage: 10 units).
    let workers = [worker("fast", 1.0, None), worker("slow", 3.0, None)];
    let placement =
        plan_layers(&config(), &schedule, &setup, &workers, None, WireDType::F32).unwrap();
    assert_eq!(placement.basis, Basis::Measured);
    assert_eq!(layer_counts(&placement), vec![10, 2]);
    // Per micro-batch, the first stage takes 30 s (10 layers × 3), the second 27 s; over four
    // micro-batches the step takes at least the first stage's 120 s.
    let step = placement.step;
    assert!((120.0..=120.0 + 27.0 + 1e-9).contains(&step), "{step}");
    assert!((placement.ranks[0].busy - 120.0).abs() < 1e-9);
    assert!((placement.ranks[1].busy - 108.0).abs() < 1e-9);
    assert!(placement.bubble > 0.0 && placement.bubble < 0.5);
}

#[test]
fn a_device_short_of_memory_takes_fewer_layers_or_is_named() {
    let cfg = config();
    let (schedule, setup) = one_f_one_b(2);
    let layers = |n: usize| StageSlice {
        embedding: true,
        layers: 0..n,
        head: false,
    };
    // The fast worker can hold the embedding and 6 layers but not 7: it takes 6, not 10.
    let room = (stage_plan(&cfg, &layers(6), setup.in_flight[0], &setup)
        .memory
        .total
        + stage_plan(&cfg, &layers(7), setup.in_flight[0], &setup)
            .memory
            .total)
        / 2;
    let workers = [worker("fast", 1.0, Some(room)), worker("slow", 3.0, None)];
    let placement = plan_layers(&cfg, &schedule, &setup, &workers, None, WireDType::F32).unwrap();
    assert_eq!(layer_counts(&placement), vec![6, 6]);
    // Neither can hold half the model: the error names the one that is short, and by how much.
    let workers = [
        worker("fast", 1.0, Some(room / 2)),
        worker("slow", 3.0, Some(room / 2)),
    ];
    let error = plan_layers(&cfg, &schedule, &setup, &workers, None, WireDType::F32)
        .unwrap_err()
        .to_string();
    assert!(error.contains("does not fit: rank"), "{error}");
    assert!(error.contains("short"), "{error}");
    assert!(
        error.contains("node 0 (test at 127.0.0.1), fast") || error.contains("slow"),
        "{error}"
    );
}

#[test]
fn a_fixed_split_is_kept_and_checked_against_memory() {
    let cfg = config();
    let (schedule, setup) = one_f_one_b(2);
    let fixed = Partition::from_split(&[4], 12).unwrap();
    let workers = [worker("same", 1.0, None), worker("same", 1.0, Some(1))];
    let error = plan_layers(
        &cfg,
        &schedule,
        &setup,
        &workers,
        Some((fixed.clone(), Basis::Alike)),
        WireDType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("rank 1 (node 0 (test at 127.0.0.1), same)"),
        "{error}"
    );
    let workers = [worker("same", 1.0, None), worker("same", 1.0, None)];
    let placement = plan_layers(
        &cfg,
        &schedule,
        &setup,
        &workers,
        Some((fixed.clone(), Basis::Alike)),
        WireDType::F32,
    )
    .unwrap();
    assert_eq!(placement.partition, fixed);
}

#[test]
fn transfers_between_nodes_lengthen_the_expected_step_at_the_slower_link() {
    let (schedule, setup) = one_f_one_b(2);
    let cfg = config();
    let here = worker("cpu", 1.0, None);
    let alone = plan_layers(
        &cfg,
        &schedule,
        &setup,
        &[here.clone(), here.clone()],
        None,
        WireDType::F32,
    )
    .unwrap();
    // The same device on another node behind a link that moves one micro-batch's activations
    // (64 tokens of 64 float32 values: 16 KiB) in 2 s; node 0's own link is not measured.
    let there = Worker {
        node: 1,
        link: Some(16384.0 / 2.0),
        ..here.clone()
    };
    let apart = plan_layers(
        &cfg,
        &schedule,
        &setup,
        &[here, there],
        None,
        WireDType::F32,
    )
    .unwrap();
    assert_eq!(layer_counts(&apart), layer_counts(&alone));
    // At least one activation and one gradient cross on the critical path: 4 s more.
    assert!(
        apart.step >= alone.step + 4.0 - 1e-9,
        "{} vs {}",
        apart.step,
        alone.step
    );
    // In bf16 they take half as long.
    let narrow = plan_layers(
        &cfg,
        &schedule,
        &setup,
        &[
            worker("cpu", 1.0, None),
            Worker {
                node: 1,
                link: Some(8192.0),
                ..worker("cpu", 1.0, None)
            },
        ],
        None,
        WireDType::Bf16,
    )
    .unwrap();
    assert!(
        narrow.step < apart.step,
        "{} vs {}",
        narrow.step,
        apart.step
    );
}

#[test]
fn replicas_are_planned_for_their_slowest_worker_at_each_rank() {
    // Two replicas of a two-rank pipeline: replica 1's first worker is the slowest and has the
    // least memory; the second rank's link is slowest on replica 0.
    let mut workers = vec![
        worker("fast", 1.0, Some(8 << 30)),
        worker("fast", 1.0, None),
        worker("slow", 3.0, Some(4 << 30)),
        worker("fast", 1.0, Some(16 << 30)),
    ];
    workers[1].link = Some(1e6);
    workers[3].link = Some(1e8);
    let weakest = weakest_replica(&workers, 2);
    assert_eq!(weakest.len(), 2);
    assert_eq!(weakest[0].measured.device, "slow");
    assert_eq!(weakest[0].memory, Some(4 << 30));
    assert_eq!(
        weakest[1].memory,
        Some(16 << 30),
        "unknown memory does not limit"
    );
    assert_eq!(weakest[1].link, Some(1e6));
    // The plan then gives the slow first rank fewer layers than a plan for replica 0 would.
    let (schedule, setup) = one_f_one_b(2);
    let plan = |workers: &[Worker]| {
        layer_counts(
            &plan_layers(&config(), &schedule, &setup, workers, None, WireDType::F32).unwrap(),
        )
    };
    let first = plan(&workers[..2]);
    let sized = plan(&weakest);
    assert!(sized[0] < first[0], "{sized:?} vs {first:?}");
    // One replica is planned on its own workers.
    let alone = weakest_replica(&workers[..2], 2);
    assert_eq!(alone[0].measured.device, "fast");
    assert_eq!(alone[0].memory, Some(8 << 30));
}
