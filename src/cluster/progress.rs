//! Node 0's view of how training goes, for `pp ctl status`: the latest record of the metrics
//! rank 0 writes, in words.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pp_transport::rendezvous::RendezvousHost;

/// Tells the rendezvous (for `pp ctl status`) how training goes, from the metrics rank 0
/// writes on node 0, every second until `done`.
pub(super) fn report(host: &RendezvousHost, metrics: PathBuf, done: &AtomicBool) {
    while !done.load(Ordering::Relaxed) {
        if let Some(progress) = last_line(&metrics).and_then(|line| progress_of(&line)) {
            host.set_progress(progress);
        }
        for _ in 0..10 {
            if done.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The last complete line of a file that grows.
fn last_line(path: &Path) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let length = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(length.saturating_sub(8192)))
        .ok()?;
    let mut tail = String::new();
    file.read_to_string(&mut tail).ok()?;
    tail.lines()
        .rev()
        .find(|line| line.starts_with('{') && line.ends_with('}'))
        .map(str::to_string)
}

/// A metrics record in words: step, loss, throughput and the pipeline's bubble.
fn progress_of(line: &str) -> Option<String> {
    let record: serde_json::Value = serde_json::from_str(line).ok()?;
    let number = |key: &str| record.get(key).and_then(serde_json::Value::as_f64);
    let mut text = format!("step {}", number("step")?);
    if let Some(loss) = number("train_loss") {
        text += &format!(", loss {loss:.4}");
    }
    if let Some(speed) = number("train_tokens_per_s") {
        text += &format!(", {speed:.0} tokens/s");
    }
    if let (Some(bubble), Some(simulated)) = (
        number("pipeline_bubble"),
        number("pipeline_bubble_simulated"),
    ) {
        text += &format!(", bubble {bubble:.2} (the schedule alone: {simulated:.2})");
    }
    let busy: Vec<String> = (0..)
        .map_while(|rank| number(&format!("pipeline_rank{rank}_busy_s")))
        .map(|seconds| format!("{seconds:.3}"))
        .collect();
    if !busy.is_empty() {
        text += &format!(", compute per rank {} s", busy.join(" / "));
    }
    // Links in the order the metrics name them: `pipeline_link{from}to{to}_mb_per_s`.
    let mut links: Vec<(usize, usize, f64)> = record
        .as_object()?
        .iter()
        .filter_map(|(key, value)| {
            let pair = key
                .strip_prefix("pipeline_link")?
                .strip_suffix("_mb_per_s")?;
            let (from, to) = pair.split_once("to")?;
            Some((from.parse().ok()?, to.parse().ok()?, value.as_f64()?))
        })
        .collect();
    links.sort_by_key(|&(from, to, _)| (from, to));
    if !links.is_empty() {
        let links: Vec<String> = links
            .iter()
            .map(|(from, to, rate)| format!("{from}→{to} {rate:.1}"))
            .collect();
        text += &format!(", links {} MB/s", links.join(" / "));
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_complete_record_is_told_in_words() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(
            &path,
            "{\"step\":1,\"train_loss\":6.0}\n{\"pipeline_bubble\":0.4,\"pipeline_bubble_simulated\":0.33,\
             \"step\":2,\"train_loss\":5.5705,\"train_tokens_per_s\":7536.2,\
             \"pipeline_rank0_busy_s\":0.0123,\"pipeline_rank1_busy_s\":0.0201,\
             \"pipeline_link1to0_mb\":2.1,\"pipeline_link1to0_mb_per_s\":96.04,\
             \"pipeline_link0to1_mb\":2.1,\"pipeline_link0to1_mb_per_s\":112.5}\n{\"step\":3,\"tr",
        )
        .unwrap();
        let line = last_line(&path).unwrap();
        assert_eq!(
            progress_of(&line).unwrap(),
            "step 2, loss 5.5705, 7536 tokens/s, bubble 0.40 (the schedule alone: 0.33), compute per \
             rank 0.012 / 0.020 s, links 0→1 112.5 / 1→0 96.0 MB/s"
        );
        assert_eq!(progress_of("{\"val_loss\":1.0}"), None);
    }
}
