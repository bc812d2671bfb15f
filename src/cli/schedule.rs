//! `pp schedule --kind K --ranks P --microbatches M [--virtual V] [--json]`: each rank's timeline
//! as a chart and the bubble fraction, played with unit costs (F = I = W = 1, B = 2, free
//! transfers), so users can compare schedules before training with one.

use pp_stages::schedule::{simulate, Action, Costs, Pass};
use pp_stages::{Schedule, ScheduleKind};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// gpipe, 1f1b, interleaved, zbh1 or zbv.
    #[arg(long)]
    kind: ScheduleKind,
    /// Pipeline ranks (workers).
    #[arg(long)]
    ranks: usize,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    microbatches: usize,
    /// Stage slices per rank for interleaved.
    #[arg(long = "virtual", default_value_t = 2)]
    virtual_stages: usize,
    /// Print one JSON object: the schedule, its actions per rank and the simulation.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let schedule = Schedule::new(
        args.kind,
        args.ranks,
        args.microbatches,
        args.virtual_stages,
    )?;
    let run = simulate(&schedule, &Costs::unit())?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "kind": args.kind,
                "ranks": schedule.ranks,
                "microbatches": schedule.microbatches,
                "stage_ranks": schedule.stage_ranks,
                "costs": Costs::unit(),
                "bubble": run.bubble,
                "makespan": run.makespan,
                "rank_bubbles": run.rank_bubbles,
                "peak_activations": run.peak_activations,
                "actions": schedule.actions,
            })
        );
        return Ok(());
    }
    println!(
        "{} with {} ranks, {} micro-batches, {} stages; unit costs F = I = W = 1, B = 2",
        args.kind.name(),
        schedule.ranks,
        schedule.microbatches,
        schedule.stages()
    );
    let slots = run.makespan.ceil() as usize;
    for (rank, passes) in run.timeline.iter().enumerate() {
        let stages = schedule.stages_of(rank);
        let mut row = vec![" .  ".to_string(); slots];
        for &(start, end, action) in passes {
            let Action::Compute {
                pass,
                stage,
                microbatch,
            } = action
            else {
                continue;
            };
            // With several slices per rank, a letter says which: a for its first, b, …
            let slice = match stages.len() {
                1 => String::new(),
                _ => {
                    let index = stages.iter().position(|&s| s == stage).unwrap_or(0);
                    char::from_u32('a' as u32 + index as u32)
                        .filter(char::is_ascii_lowercase)
                        .map_or_else(|| format!(".{index}"), String::from)
                }
            };
            let label = format!("{}{microbatch}{slice}", pass_letter(pass));
            for cell in row.iter_mut().take(end as usize).skip(start as usize) {
                *cell = format!("{label:<4}");
            }
        }
        println!(
            "rank {rank:>2} |{}| bubble {:.1}%, peak {} micro-batches",
            row.join(""),
            100.0 * run.rank_bubbles[rank],
            run.peak_activations[rank]
        );
    }
    println!(
        "bubble {:.1}% of {} rank-steps (makespan {})",
        100.0 * run.bubble,
        slots * schedule.ranks,
        run.makespan
    );
    Ok(())
}

fn pass_letter(pass: Pass) -> char {
    match pass {
        Pass::F => 'F',
        Pass::B => 'B',
        Pass::I => 'I',
        Pass::W => 'W',
    }
}
