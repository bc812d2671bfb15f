//! Compute orders made by playing the pipeline with unit costs (F = 1, B = 2, I = W = 1, free
//! transfers): whenever a rank is free it runs the ready pass its schedule's policy prefers,
//! within the number of micro-batches the policy lets it hold.

use super::{Pass, ScheduleError, ScheduleKind};

/// Per rank, the compute passes `(pass, stage, micro-batch)` in order.
pub(super) type ComputeOrder = Vec<Vec<(Pass, usize, usize)>>;

/// Progress of one stage: passes are taken in micro-batch order, so counters say what is done.
#[derive(Clone, Default)]
struct StageProgress {
    /// Finish time of F, and of B or I, per micro-batch (`u64::MAX` until run).
    forward: Vec<u64>,
    backward: Vec<u64>,
    /// Next micro-batch for F, for B/I and for W.
    next_forward: usize,
    next_backward: usize,
    next_weight: usize,
}

pub(super) fn compute_order(
    kind: ScheduleKind,
    stage_ranks: &[usize],
    ranks: usize,
    microbatches: usize,
) -> Result<ComputeOrder, ScheduleError> {
    if kind == ScheduleKind::Interleaved {
        return Ok(interleaved(ranks, stage_ranks.len() / ranks, microbatches));
    }
    let stages = stage_ranks.len();
    let last = stages - 1;
    let split = kind.splits_backward();
    let mut progress = vec![
        StageProgress {
            forward: vec![u64::MAX; microbatches],
            backward: vec![u64::MAX; microbatches],
            ..Default::default()
        };
        stages
    ];
    let rank_stages: Vec<Vec<usize>> = (0..ranks)
        .map(|r| (0..stages).filter(|&s| stage_ranks[s] == r).collect())
        .collect();
    // How many micro-batches (counted per stage slice) a rank may hold between their forward
    // and their backward (B, or I when split): 1F1B's `p - r`.
    let limit = |rank: usize| -> usize {
        match kind {
            ScheduleKind::Gpipe => usize::MAX,
            ScheduleKind::OneFOneB => ranks - rank,
            // W, not I, frees a micro-batch; the weight limit below bounds memory.
            ScheduleKind::ZbH1 => ranks,
            ScheduleKind::Interleaved => unreachable!("interleaved follows Megatron's order"),
            ScheduleKind::ZbV => 2 * ranks,
        }
    };
    // Split schedules defer W into the bubbles, but a micro-batch's activations stay until its
    // W. ZB-V keeps 1F1B's peak (`p` micro-batches: `2p` half-size slices); ZB-H1 allows a few
    // more than 1F1B's `p`, without which its bubble stays at about two thirds of 1F1B's
    // instead of a third (measured with unit costs, p = 3 to 16).
    let weight_limit = match kind {
        ScheduleKind::ZbV => 2 * ranks,
        _ => ranks + (ranks / 4).max(2),
    };
    // Set when no rank could move: the next pass may exceed its rank's limit rather than stall.
    let mut relax = false;
    let mut order: ComputeOrder = vec![Vec::new(); ranks];
    let mut free_at = vec![0u64; ranks];
    let total: usize = stages * microbatches * if split { 3 } else { 2 };
    let mut done = 0;
    let mut time = 0u64;
    // Every pass takes at least one unit and some rank is always able to run while work is
    // left, unless the policy deadlocks; this bounds the play.
    let horizon = 4 * total as u64 + 16;
    while done < total {
        if time > horizon {
            return Err(ScheduleError::Deadlock(format!(
                "the {} generator stalled with {done} of {total} passes placed",
                kind.name()
            )));
        }
        let mut acted = false;
        for rank in 0..ranks {
            if free_at[rank] > time {
                continue;
            }
            // Micro-batches between their forward and their (input-gradient) backward, and
            // between their forward and their W.
            let held: usize = rank_stages[rank]
                .iter()
                .map(|&s| progress[s].next_forward - progress[s].next_backward)
                .sum();
            let held_until_weight: usize = rank_stages[rank]
                .iter()
                .map(|&s| progress[s].next_forward - progress[s].next_weight)
                .sum();
            let ready = |s: usize, pass: Pass| -> bool {
                let p = &progress[s];
                match pass {
                    Pass::F => {
                        let k = p.next_forward;
                        k < microbatches && (s == 0 || progress[s - 1].forward[k] <= time)
                    }
                    Pass::B | Pass::I => {
                        let k = p.next_backward;
                        k < p.next_forward
                            && p.forward[k] <= time
                            && (s == last || progress[s + 1].backward[k] <= time)
                            && (kind != ScheduleKind::Gpipe || p.next_forward == microbatches)
                    }
                    Pass::W => p.next_weight < p.next_backward && p.backward[p.next_weight] <= time,
                }
            };
            let backward_pass = if split { Pass::I } else { Pass::B };
            let mine = &rank_stages[rank];
            // Backward passes go deepest stage first; forwards by the policy's key.
            let backward = mine
                .iter()
                .rev()
                .copied()
                .find(|&s| ready(s, backward_pass));
            // The deepest ready slice first, which keeps a V moving.
            let forward = mine.iter().rev().copied().find(|&s| ready(s, Pass::F));
            let within_limits = held < limit(rank) && (!split || held_until_weight < weight_limit);
            let forward = forward.filter(|_| relax || within_limits);
            let weight = if split {
                mine.iter().rev().copied().find(|&s| ready(s, Pass::W))
            } else {
                None
            };
            let choice = match kind {
                ScheduleKind::Gpipe => forward
                    .map(|s| (Pass::F, s))
                    .or(backward.map(|s| (Pass::B, s))),
                _ => backward
                    .map(|s| (backward_pass, s))
                    .or(forward.map(|s| (Pass::F, s)))
                    .or(weight.map(|s| (Pass::W, s))),
            };
            let Some((pass, stage)) = choice else {
                continue;
            };
            relax = false;
            acted = true;
            let cost = if pass == Pass::B { 2 } else { 1 };
            let end = time + cost;
            let p = &mut progress[stage];
            let k = match pass {
                Pass::F => {
                    p.next_forward += 1;
                    p.forward[p.next_forward - 1] = end;
                    p.next_forward - 1
                }
                Pass::B | Pass::I => {
                    p.next_backward += 1;
                    p.backward[p.next_backward - 1] = end;
                    p.next_backward - 1
                }
                Pass::W => {
                    p.next_weight += 1;
                    p.next_weight - 1
                }
            };
            order[rank].push((pass, stage, k));
            free_at[rank] = end;
            done += 1;
        }
        if !acted && free_at.iter().all(|&t| t <= time) {
            relax = true;
        }
        time += 1;
    }
    Ok(order)
}

/// Megatron-LM's interleaved 1F1B: forwards in groups of `ranks` micro-batches through each of
/// the rank's `v` slices in turn (backwards the same, slices in reverse); rank `r` warms up with
/// `2 (p - r - 1) + (v - 1) p` forwards, then alternates one forward and one backward, then
/// drains. Slice `c` of rank `r` is stage `c·p + r`.
fn interleaved(ranks: usize, virtual_stages: usize, microbatches: usize) -> ComputeOrder {
    let total = virtual_stages * microbatches;
    (0..ranks)
        .map(|rank| {
            let pass_at = |i: usize, reverse: bool| {
                let group = i / (ranks * virtual_stages);
                let within = i % (ranks * virtual_stages);
                let chunk = within / ranks;
                let chunk = if reverse {
                    virtual_stages - 1 - chunk
                } else {
                    chunk
                };
                let microbatch = group * ranks + within % ranks;
                (chunk * ranks + rank, microbatch)
            };
            // The groups above assume full groups; a last partial group keeps the same order
            // over the micro-batches that exist.
            let ordered = |reverse: bool| -> Vec<(usize, usize)> {
                (0..total.div_ceil(ranks * virtual_stages) * ranks * virtual_stages)
                    .map(|i| pass_at(i, reverse))
                    .filter(|&(_, k)| k < microbatches)
                    .collect()
            };
            let (forwards, backwards) = (ordered(false), ordered(true));
            let warmup = ((ranks - rank - 1) * 2 + (virtual_stages - 1) * ranks).min(total);
            let mut order = Vec::with_capacity(2 * total);
            let f = |(s, k): (usize, usize)| (Pass::F, s, k);
            let b = |(s, k): (usize, usize)| (Pass::B, s, k);
            order.extend(forwards[..warmup].iter().copied().map(f));
            for i in 0..total - warmup {
                order.push(f(forwards[warmup + i]));
                order.push(b(backwards[i]));
            }
            order.extend(backwards[total - warmup..].iter().copied().map(b));
            order
        })
        .collect()
}
