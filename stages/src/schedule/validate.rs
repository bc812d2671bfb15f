//! The rules every schedule keeps: each stage on one rank, every pass of every micro-batch
//! exactly once, a micro-batch's F before its B or I and I before W on its rank, and every
//! receive matched by a send between the right ranks.

use std::collections::HashMap;

use super::{Action, Pass, Schedule, ScheduleError, Transfer};

/// Checks `schedule` against the rules; the error names the first broken one.
pub fn validate(schedule: &Schedule) -> Result<(), ScheduleError> {
    let broken = |message: String| Err(ScheduleError::Broken(message));
    if schedule.actions.len() != schedule.ranks {
        return broken(format!(
            "{} action lists for {} ranks",
            schedule.actions.len(),
            schedule.ranks
        ));
    }
    if let Some(s) = (0..schedule.stages()).find(|&s| schedule.stage_ranks[s] >= schedule.ranks) {
        return broken(format!("stage {s} is on a rank that does not exist"));
    }
    let split = schedule.kind.splits_backward();
    let mut position: HashMap<(Pass, usize, usize), usize> = HashMap::new();
    let mut messages: HashMap<(Transfer, usize, usize), (usize, usize, i32)> = HashMap::new();
    for (rank, actions) in schedule.actions.iter().enumerate() {
        for (index, action) in actions.iter().enumerate() {
            match *action {
                Action::Compute {
                    pass,
                    stage,
                    microbatch,
                } => {
                    if stage >= schedule.stages() || microbatch >= schedule.microbatches {
                        return broken(format!("rank {rank}: {action} is out of range"));
                    }
                    if schedule.stage_ranks[stage] != rank {
                        return broken(format!(
                            "rank {rank} runs {action}, but stage {stage} is on rank {}",
                            schedule.stage_ranks[stage]
                        ));
                    }
                    let wrong_kind = match pass {
                        Pass::F => false,
                        Pass::B => split,
                        Pass::I | Pass::W => !split,
                    };
                    if wrong_kind {
                        return broken(format!(
                            "rank {rank}: {action} in a schedule that {} backward",
                            if split { "splits" } else { "does not split" }
                        ));
                    }
                    if position.insert((pass, stage, microbatch), index).is_some() {
                        return broken(format!("rank {rank} runs {action} twice"));
                    }
                }
                Action::Send {
                    transfer,
                    stage,
                    microbatch,
                    to,
                } => {
                    if schedule.stage_ranks.get(stage) != Some(&to) {
                        return broken(format!("rank {rank}: {action} goes to the wrong rank"));
                    }
                    let entry = messages
                        .entry((transfer, stage, microbatch))
                        .or_insert((rank, to, 0));
                    entry.2 += 1;
                }
                Action::Recv {
                    transfer,
                    stage,
                    microbatch,
                    from,
                } => {
                    if schedule.stage_ranks.get(stage) != Some(&rank) {
                        return broken(format!("rank {rank}: {action} is for another rank"));
                    }
                    let entry = messages
                        .entry((transfer, stage, microbatch))
                        .or_insert((from, rank, 0));
                    if entry.0 != from {
                        return broken(format!("rank {rank}: {action} from the wrong rank"));
                    }
                    entry.2 -= 1;
                }
            }
        }
    }
    if let Some(((transfer, stage, microbatch), _)) = messages.iter().find(|(_, v)| v.2 != 0) {
        return broken(format!(
            "the {transfer:?} of micro-batch {microbatch} for stage {stage} is not sent and \
             received exactly once"
        ));
    }
    let passes: &[Pass] = if split {
        &[Pass::F, Pass::I, Pass::W]
    } else {
        &[Pass::F, Pass::B]
    };
    for stage in 0..schedule.stages() {
        for microbatch in 0..schedule.microbatches {
            let at = |pass| position.get(&(pass, stage, microbatch)).copied();
            for &pass in passes {
                if at(pass).is_none() {
                    return broken(format!(
                        "{pass:?} of micro-batch {microbatch} on stage {stage} is missing"
                    ));
                }
            }
            let backward = if split { Pass::I } else { Pass::B };
            if at(Pass::F) > at(backward) {
                return broken(format!(
                    "micro-batch {microbatch}'s backward on stage {stage} comes before its forward"
                ));
            }
            if split && at(Pass::I) > at(Pass::W) {
                return broken(format!(
                    "micro-batch {microbatch}'s W on stage {stage} comes before its I"
                ));
            }
        }
    }
    Ok(())
}
