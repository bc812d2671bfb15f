//! Pipeline training equals single-device training: every schedule, 2 and 3 ranks (threads
//! connected in process), 3 steps with global-norm clipping, float32 — the final weights of every
//! stage match those of one device training the whole model on the same micro-batches within
//! 1e-5 relative L2, on every fixture (the tied one included: its embedding lives in the first
//! and the last stage, whose gradients are summed), and on a synthetic 6-layer Llama, which has
//! layers enough for interleaved and ZB-V with 3 ranks (6 stages).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::pipeline::{fixture_model, ReferenceBatch};
use common::training::{param_values, relative_l2};
use common::FIXTURES;
use pp::checkpoint::{OwnedWeights, WeightSource};
use pp::data::{MicroBatch, Sequence};
use pp::device::CpuAutodiff;
use pp::dtype::DType;
use pp::model::names::Part;
use pp::model::{ModelConfig, StageModel};
use pp::plan::{part_costs, Balance};
use pp::train::data_parallel::{Layout, WorkerLinks};
use pp::train::optim::Optimizer;
use pp::train::pipeline::RankWorker;
use pp::train::runtime::{MemorySavers, Precision, StageOutput, StageRunner};
use pp::train::sharding::{ShardCutter, ShardOf, Sharding};
use pp_stages::{Partition, Schedule, ScheduleKind, StageSlice};
use pp_transport::{Collectives, InProcessHub, RingCollectives, Transport, TransportError};

type B = CpuAutodiff;

const STEPS: u64 = 3;
const LR: f64 = 1e-3;
/// Low enough that every step clips, so the global norm over all stages is exercised.
const MAX_GRAD_NORM: f64 = 0.05;

fn adamw() -> Optimizer {
    Optimizer::AdamW {
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay: 0.01,
    }
}

fn adafactor() -> Optimizer {
    Optimizer::Adafactor {
        eps: (1e-30, 1e-3),
        clip_threshold: 1.0,
        decay_rate: -0.8,
        weight_decay: 0.01,
    }
}

/// The synthetic model's name in these tests.
const SYNTHETIC: &str = "synthetic-6-layers";

/// A model's configuration and weights: a fixture, or the synthetic 6-layer Llama.
fn model(name: &str) -> (ModelConfig, Box<dyn WeightSource>) {
    if name == SYNTHETIC {
        let config = ModelConfig::from_hf_json(
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 32,
                "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
                "intermediate_size": 64, "vocab_size": 96, "max_position_embeddings": 64,
                "tie_word_embeddings": true, "torch_dtype": "float32"}"#,
        )
        .unwrap();
        let weights = OwnedWeights::synthetic(&config, &StageSlice::whole(config.num_layers), 7);
        return (config, Box::new(weights));
    }
    let (config, weights) = fixture_model(name);
    (config, Box::new(weights))
}

/// Every layer of a model, as one stage on the CPU.
fn whole_model(name: &str) -> StageModel<B> {
    let (config, weights) = model(name);
    let slice = StageSlice::whole(config.num_layers);
    StageModel::load(&config, slice, weights.as_ref(), &Default::default()).unwrap()
}

/// `count` one-row micro-batches of different lengths: cut from a fixture's reference rows, or
/// made up for the synthetic model.
fn micro_batches(name: &str, count: usize) -> Vec<MicroBatch> {
    let (config, _) = model(name);
    let rows = if name == SYNTHETIC {
        (0..2)
            .map(|r| {
                let ids: Vec<u32> = (0..24).map(|t| ((t * 7 + r * 13) % 96) as u32).collect();
                Sequence {
                    labels: ids.iter().map(|&i| i64::from(i)).collect(),
                    input_ids: ids,
                    documents: vec![24],
                }
            })
            .collect()
    } else {
        ReferenceBatch::load(name, &config).sequences()
    };
    (0..count)
        .map(|i| {
            let row = &rows[i % rows.len()];
            let len = row.input_ids.len() - i / rows.len();
            let sequence = Sequence {
                input_ids: row.input_ids[..len].to_vec(),
                labels: row.labels[..len].to_vec(),
                documents: vec![len],
            };
            MicroBatch::new(&[&sequence], 0)
        })
        .collect()
}

fn scored(batches: &[MicroBatch]) -> usize {
    batches.iter().map(|b| b.targets.count).sum()
}

/// Single-device training: the reference. `all_in_flight` runs every micro-batch's forward
/// before any backward (GPipe's order on one stage), else each backward follows its forward.
fn single_device(
    name: &str,
    optimizer: &Optimizer,
    batches: &[MicroBatch],
    all_in_flight: bool,
) -> (Vec<f64>, HashMap<String, Vec<f32>>) {
    let (config, weights) = model(name);
    let device = Default::default();
    let whole = StageSlice::whole(config.num_layers);
    let whole_model: StageModel<B> =
        StageModel::load(&config, whole, weights.as_ref(), &device).unwrap();
    let mut runner = StageRunner::new(
        whole_model,
        optimizer.clone(),
        MemorySavers::default(),
        Precision::F32,
        device,
    );
    let tokens = scored(batches);
    let mut losses = Vec::new();
    for _ in 0..STEPS {
        runner.set_lr(LR);
        let mut sum = 0.0;
        for (i, batch) in batches.iter().enumerate() {
            if let StageOutput::Loss { sum: s, .. } = runner.forward(i, batch, None) {
                sum += s;
            }
            if !all_in_flight {
                runner.backward(i, None, 1.0 / tokens as f64, false);
            }
        }
        if all_in_flight {
            for i in 0..batches.len() {
                runner.backward(i, None, 1.0 / tokens as f64, false);
            }
        }
        losses.push(sum / tokens as f64);
        let norm = runner.grad_sum_squares().sqrt();
        runner.step(if norm > MAX_GRAD_NORM {
            MAX_GRAD_NORM / (norm + 1e-6)
        } else {
            1.0
        });
    }
    (losses, param_values(runner.model()))
}

/// The same training as `layout.replicas` pipelines of `layout.stages` threads under `kind`,
/// each replica training on its share of `batches`.
fn pipelined(
    name: &str,
    kind: ScheduleKind,
    layout: Layout,
    optimizer: &Optimizer,
    batches: &[MicroBatch],
) -> (Vec<f64>, Vec<HashMap<String, Vec<f32>>>) {
    let (config, weights) = model(name);
    let per_replica = batches.len() / layout.replicas;
    let schedule = Schedule::new(kind, layout.stages, per_replica, 2).unwrap();
    let costs = part_costs(&config, Balance::Layers, DType::F32, 32);
    let partition = Partition::balanced(&costs, schedule.stages()).unwrap();
    let device = Default::default();
    let transports = InProcessHub::connect(layout.world_size());
    let tokens = scored(batches);
    let mut workers: Vec<RankWorker<B>> = transports
        .into_iter()
        .enumerate()
        .map(|(rank, transport)| {
            let runners: BTreeMap<usize, StageRunner<B>> = schedule
                .stages_of(layout.pipeline_rank(rank))
                .into_iter()
                .map(|stage| {
                    let slice = partition.stages()[stage].clone();
                    let stage_model =
                        StageModel::load(&config, slice, weights.as_ref(), &device).unwrap();
                    let runner = StageRunner::new(
                        stage_model,
                        optimizer.clone(),
                        MemorySavers::default(),
                        Precision::F32,
                        device,
                    );
                    let runner = if kind.splits_backward() {
                        runner.with_split_backward()
                    } else {
                        runner
                    };
                    (stage, runner)
                })
                .collect();
            RankWorker::new(
                schedule.clone(),
                runners,
                config.tie_word_embeddings,
                WorkerLinks::new(Arc::new(transport), Duration::from_secs(30)),
                layout,
                device,
            )
            .unwrap()
        })
        .collect();
    let results: Vec<RankResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .iter_mut()
            .map(|worker| {
                let replica = layout.replica(worker.rank());
                let mine = &batches[replica * per_replica..(replica + 1) * per_replica];
                scope.spawn(move || {
                    let losses = (0..STEPS)
                        .map(|step| {
                            let report = worker
                                .step(step, mine, tokens, LR, Some(MAX_GRAD_NORM))
                                .unwrap();
                            report.loss_sum / tokens as f64
                        })
                        .collect();
                    // Sharded runners gather their weights together, so each in its thread.
                    let params = worker.runners().values().map(whole_weights).collect();
                    (losses, params)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        results.iter().all(|(l, _)| *l == results[0].0),
        "every rank reports the same losses"
    );
    let losses = results[0].0.clone();
    (losses, results.into_iter().flat_map(|(_, p)| p).collect())
}

/// One rank's losses, and its runners' weights by name.
type RankResult = (Vec<f64>, Vec<HashMap<String, Vec<f32>>>);

/// A runner's weights by name, whole (gathered from the group's shards under FSDP).
fn whole_weights(runner: &StageRunner<B>) -> HashMap<String, Vec<f32>> {
    let weights = runner.weights(DType::F32, true).unwrap();
    weights
        .names()
        .into_iter()
        .map(|name| {
            let shape = weights.tensor(&name).unwrap().shape.to_vec();
            let values = pp::checkpoint::read_f32(&weights, &name, &shape).unwrap();
            (name, values)
        })
        .collect()
}

fn check(kind: ScheduleKind, ranks: usize) {
    check_layout(kind, Layout::pipeline(ranks), &adamw());
}

/// `layout.replicas` pipelines of `layout.stages` ranks, each with two micro-batches per rank,
/// train what one device trains on all of their micro-batches.
fn check_layout(kind: ScheduleKind, layout: Layout, optimizer: &Optimizer) {
    let ranks = layout.stages;
    let mut checked = Vec::new();
    for name in FIXTURES.into_iter().chain([SYNTHETIC]) {
        let (config, _) = model(name);
        let stages = Schedule::new(kind, ranks, 2 * ranks, 2).unwrap().stages();
        if stages > config.num_layers {
            continue; // a stage per layer at most
        }
        checked.push(name);
        let batches = micro_batches(name, 2 * ranks * layout.replicas);
        let (want_losses, want) = single_device(name, optimizer, &batches, false);
        let (losses, stage_params) = pipelined(name, kind, layout, optimizer, &batches);
        let what = format!("{name} {kind:?} with {layout:?}, {optimizer:?}");
        assert_losses(&losses, &want_losses, &what);
        let mut seen = 0;
        for params in &stage_params {
            for (param, values) in params {
                let relative = relative_l2(values, &want[param]);
                assert!(relative <= 1e-5, "{what}: {param} off by {relative:e}");
                seen += 1;
            }
        }
        // Every parameter was checked (a tied embedding split across stages, twice).
        assert!(
            seen >= want.len(),
            "{what}: {seen} of {} parameters",
            want.len()
        );
    }
    // The synthetic model has layers for every schedule; the fixtures for most.
    assert!(
        checked.contains(&SYNTHETIC),
        "{kind:?} with {layout:?}: {checked:?}"
    );
}

/// Data parallelism: replicas of the whole model (DDP) and of a 2-stage pipeline, their
/// gradients summed by ring all-reduce while backward runs, train what one device trains on
/// all their rows, with AdamW and with Adafactor; under zero-bubble the weight gradients are
/// summed after their W passes.
#[test]
fn data_parallel_equals_single_device() {
    for optimizer in [adamw(), adafactor()] {
        for layout in [Layout::replicated(1, 2), Layout::replicated(2, 2)] {
            check_layout(ScheduleKind::OneFOneB, layout, &optimizer);
        }
    }
    let three_replicas = Layout::replicated(2, 3);
    check_layout(ScheduleKind::ZbH1, three_replicas, &adamw());
    check_layout(ScheduleKind::Interleaved, three_replicas, &adamw());
}

/// FSDP: each replica holds a shard of every parameter, gradient and optimizer state, gathers
/// each part's weights while it runs and reduce-scatters its gradients; alone and with two
/// stages, under 1F1B, interleaved and zero-bubble schedules, AdamW (shards stepped alone) and
/// Adafactor (each parameter gathered for its step), it trains what one device trains.
#[test]
fn fully_sharded_data_parallel_equals_single_device() {
    for optimizer in [adamw(), adafactor()] {
        for layout in [Layout::replicated(1, 2), Layout::replicated(2, 2)] {
            check_layout(ScheduleKind::OneFOneB, layout.sharded(), &optimizer);
        }
    }
    check_layout(
        ScheduleKind::Interleaved,
        Layout::replicated(2, 3).sharded(),
        &adamw(),
    );
    // Zero-bubble's W passes reduce-scatter the weight gradients they compute.
    check_layout(
        ScheduleKind::ZbH1,
        Layout::replicated(2, 2).sharded(),
        &adamw(),
    );
    check_layout(
        ScheduleKind::ZbV,
        Layout::replicated(2, 2).sharded(),
        &adafactor(),
    );
}

/// Counts the values a group's all-gathers bring in.
struct CountingGathers {
    ring: RingCollectives,
    gathered: Arc<AtomicUsize>,
}

impl Collectives for CountingGathers {
    fn rank(&self) -> usize {
        self.ring.rank()
    }
    fn size(&self) -> usize {
        self.ring.size()
    }
    fn all_reduce(&self, values: &mut [f32]) -> Result<(), TransportError> {
        self.ring.all_reduce(values)
    }
    fn reduce_scatter(&self, values: &[f32]) -> Result<Vec<f32>, TransportError> {
        self.ring.reduce_scatter(values)
    }
    fn all_gather(&self, shard: &[f32], len: usize) -> Result<Vec<f32>, TransportError> {
        self.gathered.fetch_add(len, Ordering::SeqCst);
        self.ring.all_gather(shard, len)
    }
    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<(), TransportError> {
        self.ring.broadcast(values, root)
    }
}

/// Under FSDP a pass that starts with the part the last pass ended with does not gather it
/// again: backward starts from the head forward ended with, the next forward from the
/// embedding backward ended with. A step changes the shards, so the first forward after it
/// gathers every part.
#[test]
fn fsdp_passes_reuse_the_part_the_last_pass_ended_with() {
    let name = "llama3-tiny";
    let device = Default::default();
    let whole = whole_model(name);
    let part_values = |wanted: Part| -> usize {
        param_values(&whole)
            .iter()
            .filter(|(name, _)| Part::of(name) == wanted)
            .map(|(_, values)| values.len())
            .sum()
    };
    let (embedding, head) = (part_values(Part::Embedding), part_values(Part::Head));
    let all: usize = param_values(&whole).values().map(Vec::len).sum();
    let ring = |channel| {
        let transport = InProcessHub::connect(1).pop().unwrap();
        RingCollectives::new(Arc::new(transport), Duration::from_secs(10)).on_channel(channel)
    };
    let gathered = Arc::new(AtomicUsize::new(0));
    let prefetch = CountingGathers {
        ring: ring(1),
        gathered: gathered.clone(),
    };
    let sharding = Sharding::new(Box::new(ring(0)), Box::new(prefetch));
    let mut runner = StageRunner::new(
        whole.clone(),
        adamw(),
        MemorySavers::default(),
        Precision::F32,
        device,
    )
    .with_sharding(sharding);
    runner.set_lr(LR);
    let gathered_by = |run: &mut dyn FnMut()| {
        let before = gathered.load(Ordering::SeqCst);
        run();
        gathered.load(Ordering::SeqCst) - before
    };
    let batches = micro_batches(name, 3);
    for step in 0..2 {
        for (i, batch) in batches.iter().enumerate() {
            let forward = gathered_by(&mut || drop(runner.forward(i, batch, None)));
            let backward = gathered_by(&mut || drop(runner.backward(i, None, 1.0, false)));
            let first = i == 0;
            let want_forward = if first { all } else { all - embedding };
            assert_eq!(forward, want_forward, "step {step}, forward {i}");
            assert_eq!(backward, all - head, "step {step}, backward {i}");
        }
        runner.step(1.0);
    }
}

/// FSDP workers load their stage part by part, cutting each to their shard at once: the
/// shards are the whole model's values in `shard_range` order, and the full shapes are kept.
#[test]
fn fsdp_ranks_load_only_their_shards() {
    for name in [SYNTHETIC, "llama3-tiny"] {
        let (config, weights) = model(name);
        let device = Default::default();
        let slice = StageSlice::whole(config.num_layers);
        let whole: StageModel<B> =
            StageModel::load(&config, slice.clone(), weights.as_ref(), &device).unwrap();
        let whole_values = param_values(&whole);
        for size in [2, 3] {
            for rank in 0..size {
                let mut cutter = ShardCutter::new(ShardOf { rank, size });
                let sharded: StageModel<B> = StageModel::load_mapped(
                    &config,
                    slice.clone(),
                    weights.as_ref(),
                    &device,
                    &mut cutter,
                )
                .unwrap();
                let names: HashMap<_, _> = sharded
                    .named_params()
                    .into_iter()
                    .map(|(name, id)| (id, name))
                    .collect();
                let full = cutter.full_shapes(&names);
                assert_eq!(full.len(), whole_values.len(), "{name}");
                for (param, values) in param_values(&sharded) {
                    let all = &whole_values[&param];
                    let [rows, cols] = full[&param];
                    assert_eq!(rows * cols, all.len(), "{name} {param}: full shape");
                    let range = pp_transport::shard_range(all.len(), size, rank);
                    assert_eq!(values, all[range], "{name} {param}: shard {rank} of {size}");
                }
            }
        }
    }
}

/// Under FSDP with N replicas, each holds about 1/N of the parameters, gradients and AdamW
/// state that one device holds (each tensor's shards differ by at most one value).
#[test]
fn fsdp_holds_a_replicas_share_of_the_training_state() {
    let name = SYNTHETIC;
    for replicas in [2usize, 3] {
        let batches = micro_batches(name, 2 * replicas);
        let device = Default::default();
        let whole = whole_model(name);
        let tied = whole.config().tie_word_embeddings;
        let mut single = StageRunner::new(
            whole,
            adamw(),
            MemorySavers::default(),
            Precision::F32,
            device,
        );
        single.set_lr(LR);
        for (i, batch) in batches.iter().enumerate() {
            single.forward(i, batch, None);
            single.backward(i, None, 1.0, false);
        }
        single.step(1.0);
        // After a step the optimizer state exists; gradients as large as the parameters.
        let one = single.training_memory();
        let one_device = 2 * one.params + one.optimizer;
        let layout = Layout::replicated(1, replicas).sharded();
        let schedule = Schedule::new(ScheduleKind::OneFOneB, 1, 2, 1).unwrap();
        let tokens = scored(&batches);
        let state: Vec<usize> = std::thread::scope(|scope| {
            let handles: Vec<_> = InProcessHub::connect(replicas)
                .into_iter()
                .map(|transport| {
                    let batches = &batches;
                    let schedule = schedule.clone();
                    scope.spawn(move || {
                        let runner = StageRunner::new(
                            whole_model(name),
                            adamw(),
                            MemorySavers::default(),
                            Precision::F32,
                            device,
                        );
                        let rank = transport.rank();
                        let mut worker = RankWorker::<B>::new(
                            schedule,
                            BTreeMap::from([(0, runner)]),
                            tied,
                            WorkerLinks::new(Arc::new(transport), Duration::from_secs(30)),
                            layout,
                            device,
                        )
                        .unwrap();
                        let mine = &batches[2 * rank..2 * rank + 2];
                        // The second step: the optimizer state exists by then.
                        worker.step(0, mine, tokens, LR, None).unwrap();
                        let report = worker.step(1, mine, tokens, LR, None).unwrap();
                        report.state_bytes[rank]
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let tensors = single.model().named_params().len();
        for (rank, &bytes) in state.iter().enumerate() {
            let share = one_device as f64 / replicas as f64;
            // At most one value more per tensor for each of the four: weight, gradient, m, v.
            let slack = (4 * 4 * tensors) as f64;
            assert!(
                (bytes as f64 - share).abs() <= slack,
                "{replicas} replicas: rank {rank} holds {bytes} bytes, 1/{replicas} of one \
                 device's {one_device} is {share}"
            );
        }
        println!(
            "FSDP over {replicas}: one device {one_device} bytes, each rank {state:?} ({:.3} of it)",
            state[0] as f64 / one_device as f64
        );
    }
}

#[test]
fn gpipe_equals_single_device() {
    check(ScheduleKind::Gpipe, 3);
    check(ScheduleKind::Gpipe, 2);
}

#[test]
fn one_f_one_b_equals_single_device() {
    check(ScheduleKind::OneFOneB, 2);
    check(ScheduleKind::OneFOneB, 3);
}

#[test]
fn interleaved_equals_single_device() {
    check(ScheduleKind::Interleaved, 2);
    check(ScheduleKind::Interleaved, 3);
}

#[test]
fn zero_bubble_h1_equals_single_device() {
    check(ScheduleKind::ZbH1, 2);
    check(ScheduleKind::ZbH1, 3);
}

#[test]
fn zero_bubble_v_equals_single_device() {
    check(ScheduleKind::ZbV, 2);
    check(ScheduleKind::ZbV, 3);
}

fn assert_losses(got: &[f64], want: &[f64], what: &str) {
    for (step, (got, want)) in got.iter().zip(want).enumerate() {
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "{what}: loss at step {step}: {got} vs {want}"
        );
    }
}

/// Eight micro-batches' graphs alive at once on one stage (GPipe's order: every forward, then
/// every backward) train the same weights as one micro-batch at a time. Burn 0.21 merges
/// graphs that share a parameter leaf into one, and the cleanup after one backward could drop
/// steps of another micro-batch's graph, depending on hash-set order (its head part's input
/// lost its gradient in most runs at four or more micro-batches); each micro-batch now builds
/// its graphs on leaves of its own.
#[test]
fn micro_batches_in_flight_together_train_the_same_weights() {
    for name in FIXTURES {
        let batches = micro_batches(name, 8);
        let (want_losses, want) = single_device(name, &adamw(), &batches, false);
        let (losses, got) = single_device(name, &adamw(), &batches, true);
        assert_losses(&losses, &want_losses, name);
        for (param, values) in &got {
            let relative = relative_l2(values, &want[param]);
            assert!(relative <= 1e-5, "{name}: {param} off by {relative:e}");
        }
    }
}
