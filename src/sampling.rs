//! Choosing the next token from a position's logits, as transformers' `generate` does: the
//! repetition penalty, then temperature, top-k and top-p, then a draw from what is left
//! (greedy when the temperature is 0). Seeded, so that a run can be repeated.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); above 0 divides the logits before the draw.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (1: all).
    pub top_p: f64,
    /// Above 1 makes tokens already in the sequence less likely (transformers' rule: a
    /// positive logit is divided by it, a negative one multiplied).
    pub repetition_penalty: f64,
    /// Seeds the draws.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    /// Checks the values, naming the first that is out of range.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be 0 or more, not {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], not {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty must be above 0, not {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// Draws tokens under one [`Sampling`], keeping its random state between draws.
pub struct Sampler {
    sampling: Sampling,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded with `sampling.seed`.
    pub fn new(sampling: Sampling) -> Self {
        let rng = StdRng::seed_from_u64(sampling.seed);
        Self { sampling, rng }
    }

    /// The next token after `context` (the sequence so far) given its `logits` over the
    /// vocabulary.
    pub fn next(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        let s = &self.sampling;
        let mut scores: Vec<f64> = logits.iter().map(|&l| f64::from(l)).collect();
        if s.repetition_penalty != 1.0 {
            let mut seen = context.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &token in &seen {
                if let Some(score) = scores.get_mut(token as usize) {
                    *score = if *score > 0.0 {
                        *score / s.repetition_penalty
                    } else {
                        *score * s.repetition_penalty
                    };
                }
            }
        }
        if s.temperature == 0.0 {
            return argmax(&scores);
        }
        // The candidates, most likely first (ties by token id, so draws are reproducible).
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        if s.top_k > 0 {
            order.truncate(s.top_k);
        }
        let top = scores[order[0]];
        let mut weights: Vec<f64> = order
            .iter()
            .map(|&t| ((scores[t] - top) / s.temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= total);
        if s.top_p < 1.0 {
            // The smallest prefix whose probability reaches top_p (always at least one).
            let mut sum = 0.0;
            let keep = weights
                .iter()
                .position(|&w| {
                    sum += w;
                    sum >= s.top_p
                })
                .map_or(weights.len(), |i| i + 1);
            order.truncate(keep);
            weights.truncate(keep);
        }
        let total: f64 = weights.iter().sum();
        let mut draw = self.rng.random::<f64>() * total;
        for (&token, &weight) in order.iter().zip(&weights) {
            if draw < weight {
                return token as u32;
            }
            draw -= weight;
        }
        *order.last().expect("at least one candidate") as u32
    }
}

/// The first index of the largest score.
fn argmax(scores: &[f64]) -> u32 {
    let mut best = 0;
    for (i, &score) in scores.iter().enumerate() {
        if score > scores[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f64) -> Sampling {
        Sampling {
            temperature,
            ..Sampling::default()
        }
    }

    #[test]
    fn temperature_zero_is_greedy_and_top_k_one_agrees() {
        let logits = [0.1, 2.5, -1.0, 2.4];
        assert_eq!(Sampler::new(sampling(0.0)).next(&logits, &[]), 1);
        let mut one = Sampler::new(Sampling {
            top_k: 1,
            ..sampling(5.0)
        });
        assert!((0..50).all(|_| one.next(&logits, &[]) == 1));
    }

    #[test]
    fn the_repetition_penalty_follows_transformers_rule() {
        // Token 1 (2.5) seen: 2.5 / 2 = 1.25 falls below token 3 (2.4). Token 0 (-1) seen:
        // -2, further down.
        let logits = [-1.0, 2.5, 0.0, 2.4];
        let penalised = Sampling {
            repetition_penalty: 2.0,
            ..sampling(0.0)
        };
        assert_eq!(Sampler::new(penalised.clone()).next(&logits, &[1, 0, 1]), 3);
        assert_eq!(Sampler::new(sampling(0.0)).next(&logits, &[1]), 1);
    }

    #[test]
    fn draws_follow_the_softmax_and_repeat_with_the_seed() {
        let logits = [0.7f32.ln(), 0.2f32.ln(), 0.1f32.ln()];
        let mut sampler = Sampler::new(sampling(1.0));
        let draws: Vec<u32> = (0..20_000).map(|_| sampler.next(&logits, &[])).collect();
        for (token, p) in [(0, 0.7), (1, 0.2), (2, 0.1)] {
            let share = draws.iter().filter(|&&t| t == token).count() as f64 / 20_000.0;
            assert!((share - p).abs() < 0.015, "token {token}: {share} vs {p}");
        }
        let mut again = Sampler::new(sampling(1.0));
        assert!(draws.iter().all(|&t| again.next(&logits, &[]) == t));
        let mut other = Sampler::new(Sampling {
            seed: 1,
            ..sampling(1.0)
        });
        let different = (0..200)
            .filter(|&i| other.next(&logits, &[]) != draws[i])
            .count();
        assert!(different > 0);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_that_reaches_it() {
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.15f32.ln(), 0.05f32.ln()];
        // 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are never drawn.
        let mut sampler = Sampler::new(Sampling {
            top_p: 0.8,
            ..sampling(1.0)
        });
        let draws: Vec<u32> = (0..5_000).map(|_| sampler.next(&logits, &[])).collect();
        assert!(draws.iter().all(|&t| t < 2));
        let share = draws.iter().filter(|&&t| t == 0).count() as f64 / 5_000.0;
        assert!((share - 0.5 / 0.8).abs() < 0.03, "{share}");
        // A temperature near 0 concentrates on the top token.
        let mut cold = Sampler::new(sampling(0.01));
        assert!((0..100).all(|_| cold.next(&logits, &[]) == 0));
    }

    #[test]
    fn out_of_range_values_are_named() {
        for (bad, name) in [
            (sampling(-1.0), "temperature"),
            (
                Sampling {
                    top_p: 0.0,
                    ..sampling(1.0)
                },
                "top_p",
            ),
            (
                Sampling {
                    repetition_penalty: 0.0,
                    ..sampling(1.0)
                },
                "repetition_penalty",
            ),
        ] {
            assert!(bad.validate().unwrap_err().contains(name));
        }
        assert!(Sampling::default().validate().is_ok());
    }
}
