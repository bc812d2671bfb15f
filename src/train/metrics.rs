//! Training metrics, written as they come: one JSON object per line in `metrics.jsonl`, and
//! TensorBoard event files (`tensorboard/events.out.tfevents.*`) that TensorBoard reads.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Where a run's metrics go.
pub struct MetricsLog {
    jsonl: File,
    jsonl_path: PathBuf,
    events: EventWriter,
}

impl MetricsLog {
    /// Appends to `dir/metrics.jsonl` (a resumed run continues it) and starts a new event file
    /// in `dir/tensorboard`.
    pub fn open(dir: &Path) -> Result<Self> {
        let jsonl_path = dir.join("metrics.jsonl");
        let jsonl = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&jsonl_path)
            .map_err(|e| Error::io(&jsonl_path, e))?;
        Ok(Self {
            jsonl,
            jsonl_path,
            events: EventWriter::create(&dir.join("tensorboard"))?,
        })
    }

    /// Records `values` (TensorBoard tags such as `train/loss`) at `step`.
    pub fn record(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let mut row = Map::new();
        row.insert("step".into(), step.into());
        for &(tag, value) in values {
            row.insert(tag.replace('/', "_"), json_number(value));
        }
        let mut line = Value::Object(row).to_string();
        line.push('\n');
        self.jsonl
            .write_all(line.as_bytes())
            .map_err(|e| Error::io(&self.jsonl_path, e))?;
        self.events.scalars(step, values)
    }
}

/// Non-finite values (a diverged loss) are written as null: JSON has no NaN.
fn json_number(value: f64) -> Value {
    serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
}

/// TensorBoard's `Event` protocol buffer, the fields scalars need.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

/// An event file: TFRecord framing (length, masked CRC-32C of the length, data, masked CRC-32C
/// of the data) around serialized `Event`s, flushed after each write so TensorBoard sees
/// progress live.
struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let path = dir.join(format!(
            "events.out.tfevents.{}.pp.{}",
            now.as_secs(),
            std::process::id()
        ));
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut writer = Self {
            out: BufWriter::new(file),
            path,
        };
        writer.write(&Event {
            wall_time: now.as_secs_f64(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        Ok(writer)
    }

    fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let wall_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let value = values
            .iter()
            .map(|&(tag, value)| SummaryValue {
                tag: tag.to_string(),
                simple_value: Some(value as f32),
            })
            .collect();
        self.write(&Event {
            wall_time,
            step: step as i64,
            file_version: None,
            summary: Some(Summary { value }),
        })
    }

    fn write(&mut self, event: &Event) -> Result<()> {
        let data = prost::Message::encode_to_vec(event);
        let length = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&length);
        record.extend_from_slice(&masked_crc(&length).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&masked_crc(&data).to_le_bytes());
        let io = |e| Error::io(&self.path, e);
        self.out.write_all(&record).map_err(io)?;
        self.out.flush().map_err(io)
    }
}

/// TFRecord's masked CRC-32C.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// Reads the scalars of an event file back: `(step, tag, value)`, checking every CRC. For tests
/// and tools that inspect a run.
pub fn read_scalars(path: &Path) -> Result<Vec<(i64, String, f32)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let corrupt = |what: &str| Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!("not a valid event file: {what}"),
    };
    let mut scalars = Vec::new();
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        if rest.len() < 12 {
            return Err(corrupt("truncated record header"));
        }
        let (length, tail) = rest.split_at(8);
        let len = u64::from_le_bytes(length.try_into().expect("8 bytes")) as usize;
        let crc = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes"));
        if crc != masked_crc(length) || tail.len() < 4 + len + 4 {
            return Err(corrupt("bad record length"));
        }
        let data = &tail[4..4 + len];
        let crc = u32::from_le_bytes(tail[4 + len..8 + len].try_into().expect("4 bytes"));
        if crc != masked_crc(data) {
            return Err(corrupt("bad record checksum"));
        }
        let event: Event = prost::Message::decode(data).map_err(|_| corrupt("bad event"))?;
        for value in event.summary.map(|s| s.value).unwrap_or_default() {
            if let Some(v) = value.simple_value {
                scalars.push((event.step, value.tag, v));
            }
        }
        rest = &tail[8 + len..];
    }
    Ok(scalars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_follows_tfrecord() {
        // CRC-32C's check value for "123456789" is 0xE3069283; TFRecord masks it as
        // ((crc >> 15) | (crc << 17)) + 0xa282ead8.
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
    }

    #[test]
    fn scalars_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path()).unwrap();
        log.record(3, &[("train/loss", 2.5), ("train/lr", 1e-3)])
            .unwrap();
        log.record(4, &[("train/loss", f64::NAN)]).unwrap();
        let events = std::fs::read_dir(dir.path().join("tensorboard"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let scalars = read_scalars(&events).unwrap();
        assert_eq!(scalars[0], (3, "train/loss".to_string(), 2.5));
        assert_eq!(scalars[1], (3, "train/lr".to_string(), 1e-3));
        assert!(scalars[2].2.is_nan());
        let jsonl = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!(
            jsonl,
            "{\"step\":3,\"train_loss\":2.5,\"train_lr\":0.001}\n{\"step\":4,\"train_loss\":null}\n"
        );
    }
}
