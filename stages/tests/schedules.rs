//! The schedules against the pipeline-bubble arithmetic they are known for, and the validator
//! and simulator against broken schedules.

use pp_stages::schedule::{simulate, validate, Action, Costs, Pass, ScheduleError};
use pp_stages::{Schedule, ScheduleKind};

const KINDS: [ScheduleKind; 5] = [
    ScheduleKind::Gpipe,
    ScheduleKind::OneFOneB,
    ScheduleKind::Interleaved,
    ScheduleKind::ZbH1,
    ScheduleKind::ZbV,
];

/// F = B = W = 1: the costs the bubble formulas assume.
fn equal_costs() -> Costs {
    Costs {
        forward: 1.0,
        backward: 1.0,
        input_grad: 1.0,
        weight_grad: 1.0,
        transfer: 0.0,
    }
}

fn bubble(kind: ScheduleKind, ranks: usize, microbatches: usize, costs: &Costs) -> f64 {
    let schedule = Schedule::new(kind, ranks, microbatches, 2).unwrap();
    simulate(&schedule, costs).unwrap().bubble
}

#[test]
fn every_schedule_is_valid_and_runs_under_any_costs() {
    let uneven = Costs {
        forward: 1.3,
        backward: 2.9,
        input_grad: 1.6,
        weight_grad: 0.7,
        transfer: 0.4,
    };
    for kind in KINDS {
        for ranks in 1..=5 {
            for microbatches in 1..=9 {
                let schedule = match Schedule::new(kind, ranks, microbatches, 2) {
                    Ok(schedule) => schedule,
                    // Megatron's interleaved order needs whole groups of `ranks` micro-batches.
                    Err(ScheduleError::Invalid(message))
                        if kind == ScheduleKind::Interleaved && microbatches % ranks != 0 =>
                    {
                        assert!(message.contains("multiple of the ranks"), "{message}");
                        continue;
                    }
                    Err(e) => panic!("{kind:?} p={ranks} m={microbatches}: {e}"),
                };
                validate(&schedule).unwrap();
                for costs in [Costs::unit(), equal_costs(), uneven] {
                    simulate(&schedule, &costs)
                        .unwrap_or_else(|e| panic!("{kind:?} p={ranks} m={microbatches}: {e}"));
                }
            }
        }
    }
}

#[test]
fn gpipe_and_1f1b_bubbles_follow_the_formula() {
    for ranks in 2..=6 {
        for microbatches in [1, 2, 4, 8, 16] {
            let expected = (ranks - 1) as f64 / (microbatches + ranks - 1) as f64;
            for kind in [ScheduleKind::Gpipe, ScheduleKind::OneFOneB] {
                let got = bubble(kind, ranks, microbatches, &equal_costs());
                assert!(
                    (got - expected).abs() < 1e-9,
                    "{kind:?} p={ranks} m={microbatches}: {got} vs {expected}"
                );
            }
        }
    }
}

#[test]
fn zero_bubble_h1_has_about_a_third_of_1f1bs_bubble() {
    for (ranks, microbatches) in [(4, 8), (4, 16), (6, 12), (8, 24)] {
        let one_f_one_b = bubble(ScheduleKind::OneFOneB, ranks, microbatches, &Costs::unit());
        let zb = bubble(ScheduleKind::ZbH1, ranks, microbatches, &Costs::unit());
        let ratio = zb / one_f_one_b;
        assert!(
            (0.2..=0.45).contains(&ratio),
            "p={ranks} m={microbatches}: ZB-H1 {zb:.3} vs 1F1B {one_f_one_b:.3} (ratio {ratio:.2})"
        );
    }
}

#[test]
fn interleaving_and_the_v_shrink_the_bubble() {
    for (ranks, microbatches) in [(2, 4), (4, 8), (4, 16)] {
        let one_f_one_b = bubble(ScheduleKind::OneFOneB, ranks, microbatches, &equal_costs());
        let interleaved = bubble(
            ScheduleKind::Interleaved,
            ranks,
            microbatches,
            &equal_costs(),
        );
        assert!(
            interleaved < one_f_one_b,
            "p={ranks} m={microbatches}: interleaved {interleaved:.3} vs 1F1B {one_f_one_b:.3}"
        );
        let zbv = bubble(ScheduleKind::ZbV, ranks, microbatches, &Costs::unit());
        let zbh1 = bubble(ScheduleKind::ZbH1, ranks, microbatches, &Costs::unit());
        assert!(
            zbv <= zbh1 + 1e-9,
            "p={ranks} m={microbatches}: ZB-V {zbv:.3} vs ZB-H1 {zbh1:.3}"
        );
    }
}

#[test]
fn one_f_one_b_holds_at_most_p_micro_batches() {
    for ranks in 1..=6 {
        let schedule = Schedule::new(ScheduleKind::OneFOneB, ranks, 12, 1).unwrap();
        let run = simulate(&schedule, &Costs::unit()).unwrap();
        assert_eq!(run.peak_activations[0], ranks, "p={ranks}");
        for (rank, &peak) in run.peak_activations.iter().enumerate() {
            assert!(peak <= ranks - rank, "rank {rank} holds {peak}");
        }
        // Zero-bubble schedules keep activations until W: ZB-V within 1F1B's peak (2p half-size
        // slices), ZB-H1 within a few micro-batches more.
        let zbv = Schedule::new(ScheduleKind::ZbV, ranks, 12, 1).unwrap();
        let zbv = simulate(&zbv, &Costs::unit()).unwrap();
        assert!(
            zbv.peak_activations.iter().all(|&p| p <= 2 * ranks),
            "{zbv:?}"
        );
        let zbh1 = Schedule::new(ScheduleKind::ZbH1, ranks, 12, 1).unwrap();
        let zbh1 = simulate(&zbh1, &Costs::unit()).unwrap();
        let bound = ranks + (ranks / 4).max(2);
        assert!(
            zbh1.peak_activations.iter().all(|&p| p <= bound),
            "{zbh1:?}"
        );
        let gpipe = Schedule::new(ScheduleKind::Gpipe, ranks, 12, 1).unwrap();
        assert_eq!(
            simulate(&gpipe, &Costs::unit()).unwrap().peak_activations[0],
            12
        );
    }
}

#[test]
fn the_validator_names_what_is_broken() {
    let good = Schedule::new(ScheduleKind::OneFOneB, 3, 4, 1).unwrap();
    let mut missing = good.clone();
    let at = missing.actions[1]
        .iter()
        .position(|a| matches!(a, Action::Compute { pass: Pass::B, .. }))
        .unwrap();
    missing.actions[1].remove(at);
    let err = validate(&missing).unwrap_err().to_string();
    assert!(err.contains("missing"), "{err}");

    let mut wrong_rank = good.clone();
    let action = wrong_rank.actions[0].remove(0);
    wrong_rank.actions[2].insert(0, action);
    assert!(validate(&wrong_rank).is_err());

    let mut unsent = good.clone();
    unsent.actions[0].retain(|a| !matches!(a, Action::Send { .. }));
    let err = validate(&unsent).unwrap_err().to_string();
    assert!(err.contains("sent and received exactly once"), "{err}");
}

#[test]
fn the_simulator_reports_a_deadlock() {
    let mut schedule = Schedule::new(ScheduleKind::OneFOneB, 2, 2, 1).unwrap();
    // Rank 1 waits for micro-batch 1's activation before rank 0 sends micro-batch 0's...
    schedule.actions[0].reverse();
    // ...and rank 0 now starts by waiting for a gradient that needs its own forward first.
    let err = simulate(&schedule, &Costs::unit()).unwrap_err();
    assert!(matches!(err, ScheduleError::Deadlock(_)), "{err}");
    assert!(err.to_string().contains("rank 0 waits"), "{err}");
}

#[test]
fn per_stage_costs_put_the_slow_stage_on_the_critical_path() {
    let unit = Costs::unit();
    let schedule = Schedule::new(ScheduleKind::OneFOneB, 2, 8, 1).unwrap();
    // The same costs given per stage play the same schedule.
    let uniform = simulate(&schedule, &unit).unwrap();
    let per_stage = simulate(&schedule, [unit, unit].as_slice()).unwrap();
    assert_eq!(uniform.makespan, per_stage.makespan);
    // A stage three times slower sets the pace: its 8 forwards and backwards back to back.
    let slow = Costs {
        forward: 3.0,
        backward: 6.0,
        input_grad: 3.0,
        weight_grad: 3.0,
        transfer: 0.0,
    };
    let run = simulate(&schedule, [unit, slow].as_slice()).unwrap();
    assert!(run.makespan >= 8.0 * 9.0, "{}", run.makespan);
    assert!(run.makespan < 8.0 * 9.0 + 3.0 + 1.0, "{}", run.makespan);
    // The fast rank idles most of the time.
    assert!(run.rank_bubbles[0] > 0.6, "{:?}", run.rank_bubbles);
}
