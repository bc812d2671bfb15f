//! Plays a schedule with given costs: each rank runs its list in order; a compute pass starts
//! when the rank is free and its inputs are there, a send costs the sender nothing and arrives
//! `transfer` later, a receive waits for its message. Reports the makespan, each rank's bubble
//! and the peak number of live activations, or the deadlock that stops it.

use std::collections::HashMap;

use serde::Serialize;

use super::{Action, Pass, Schedule, ScheduleError, Transfer};

/// Time each action takes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Costs {
    /// Forward of one stage slice on one micro-batch.
    pub forward: f64,
    /// Full backward.
    pub backward: f64,
    /// Input-gradient backward.
    pub input_grad: f64,
    /// Weight-gradient backward.
    pub weight_grad: f64,
    /// One transfer between ranks.
    pub transfer: f64,
}

/// What each pass and transfer costs, by stage: [`Costs`] are the same for every stage; a
/// slice of them gives each stage its own (stages on devices of different speeds).
pub trait PassCosts {
    /// Time of `pass` of `stage` on one micro-batch.
    fn compute(&self, pass: Pass, stage: usize) -> f64;
    /// Time for a message that `stage` sends to reach the neighbouring stage's rank.
    fn transfer(&self, stage: usize) -> f64;
}

impl PassCosts for Costs {
    fn compute(&self, pass: Pass, _stage: usize) -> f64 {
        self.of(pass)
    }

    fn transfer(&self, _stage: usize) -> f64 {
        self.transfer
    }
}

impl PassCosts for [Costs] {
    fn compute(&self, pass: Pass, stage: usize) -> f64 {
        self[stage].of(pass)
    }

    fn transfer(&self, stage: usize) -> f64 {
        self[stage].transfer
    }
}

impl Costs {
    /// F = I = W = 1, B = I + W = 2, free transfers.
    pub fn unit() -> Self {
        Self {
            forward: 1.0,
            backward: 2.0,
            input_grad: 1.0,
            weight_grad: 1.0,
            transfer: 0.0,
        }
    }

    fn of(&self, pass: Pass) -> f64 {
        match pass {
            Pass::F => self.forward,
            Pass::B => self.backward,
            Pass::I => self.input_grad,
            Pass::W => self.weight_grad,
        }
    }
}

/// What playing a schedule gave.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Simulation {
    /// When the last rank finishes.
    pub makespan: f64,
    /// Idle time over all ranks divided by `ranks × makespan`.
    pub bubble: f64,
    /// Each rank's idle fraction of the makespan.
    pub rank_bubbles: Vec<f64>,
    /// Each rank's largest number of micro-batch activations held at once (one per stage slice
    /// and micro-batch, from its forward until its backward, or its W when split).
    pub peak_activations: Vec<usize>,
    /// Each rank's compute passes as `(start, end, action)`, for charts.
    pub timeline: Vec<Vec<(f64, f64, Action)>>,
}

/// Plays `schedule` with `costs`.
pub fn simulate(
    schedule: &Schedule,
    costs: &(impl PassCosts + ?Sized),
) -> Result<Simulation, ScheduleError> {
    let ranks = schedule.ranks;
    let mut next = vec![0usize; ranks];
    let mut clock = vec![0.0f64; ranks];
    let mut busy = vec![0.0f64; ranks];
    let mut live = vec![0usize; ranks];
    let mut peak = vec![0usize; ranks];
    let mut timeline = vec![Vec::new(); ranks];
    // Arrival times of messages, and finish times of passes (for dependencies within a rank).
    let mut arrivals: HashMap<(Transfer, usize, usize), f64> = HashMap::new();
    let mut finished: HashMap<(Pass, usize, usize), f64> = HashMap::new();
    let last = schedule.stages() - 1;
    loop {
        let mut progressed = false;
        for rank in 0..ranks {
            while let Some(&action) = schedule.actions[rank].get(next[rank]) {
                match action {
                    Action::Send {
                        transfer,
                        stage,
                        microbatch,
                        ..
                    } => {
                        arrivals.insert(
                            (transfer, stage, microbatch),
                            clock[rank] + costs.transfer(stage),
                        );
                    }
                    Action::Recv {
                        transfer,
                        stage,
                        microbatch,
                        ..
                    } => match arrivals.get(&(transfer, stage, microbatch)) {
                        Some(&at) => clock[rank] = clock[rank].max(at),
                        None => break,
                    },
                    Action::Compute {
                        pass,
                        stage,
                        microbatch,
                    } => {
                        // Inputs produced on this rank (the turn of a V) must be done already.
                        let local = local_input(schedule, rank, pass, stage, microbatch, last);
                        let ready = match local {
                            Some(key) => match finished.get(&key) {
                                Some(&at) => at,
                                None => break,
                            },
                            None => 0.0,
                        };
                        let start = clock[rank].max(ready);
                        let cost = costs.compute(pass, stage);
                        let end = start + cost;
                        timeline[rank].push((start, end, action));
                        clock[rank] = end;
                        busy[rank] += cost;
                        finished.insert((pass, stage, microbatch), end);
                        match pass {
                            Pass::F => {
                                live[rank] += 1;
                                peak[rank] = peak[rank].max(live[rank]);
                            }
                            // The activations are needed until the weight gradients are done.
                            Pass::B | Pass::W => live[rank] -= 1,
                            Pass::I => {}
                        }
                    }
                }
                next[rank] += 1;
                progressed = true;
            }
        }
        if (0..ranks).all(|r| next[r] == schedule.actions[r].len()) {
            break;
        }
        if !progressed {
            let stuck: Vec<String> = (0..ranks)
                .filter_map(|r| {
                    schedule.actions[r]
                        .get(next[r])
                        .map(|a| format!("rank {r} waits at {a}"))
                })
                .collect();
            return Err(ScheduleError::Deadlock(stuck.join("; ")));
        }
    }
    let makespan = clock.iter().copied().fold(0.0, f64::max);
    let rank_bubbles = busy
        .iter()
        .map(|b| {
            if makespan > 0.0 {
                1.0 - b / makespan
            } else {
                0.0
            }
        })
        .collect();
    let total_busy: f64 = busy.iter().sum();
    Ok(Simulation {
        makespan,
        bubble: 1.0 - total_busy / (ranks as f64 * makespan),
        rank_bubbles,
        peak_activations: peak,
        timeline,
    })
}

/// The pass on the same rank whose output `pass` of `stage` consumes, if there is one (a
/// neighbouring stage on the same rank hands over without a transfer).
fn local_input(
    schedule: &Schedule,
    rank: usize,
    pass: Pass,
    stage: usize,
    microbatch: usize,
    last: usize,
) -> Option<(Pass, usize, usize)> {
    let on_rank = |s: usize| schedule.stage_ranks[s] == rank;
    match pass {
        Pass::F => (stage > 0 && on_rank(stage - 1)).then(|| (Pass::F, stage - 1, microbatch)),
        Pass::B | Pass::I => {
            let backward = if schedule.kind.splits_backward() {
                Pass::I
            } else {
                Pass::B
            };
            if stage < last && on_rank(stage + 1) {
                Some((backward, stage + 1, microbatch))
            } else {
                // Its own forward always ran on this rank first.
                Some((Pass::F, stage, microbatch))
            }
        }
        Pass::W => Some((Pass::I, stage, microbatch)),
    }
}
