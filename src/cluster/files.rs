//! Nodes without a shared filesystem. Node 0 shares its model, data and the checkpoint a
//! group resumes from through the rendezvous (`pp_transport::rendezvous::SharedFiles`); every
//! other node compares node 0's list (sizes and xxh3 checksums) with its own copies and fetches
//! only what it lacks or holds differently, into a cache that later runs reuse. Of the weights
//! it fetches only the stage files its workers load, when the checkpoint is cut as the plan
//! needs. Workers on other nodes upload their share of each checkpoint to node 0
//! (`train::worker`), so node 0's output is complete on its own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pp_transport::rendezvous::{checksum_of, FileClient, FileInfo, SharedFiles};
use serde::{Deserialize, Serialize};

use pp_stages::Partition;

use crate::checkpoint::native::stage_file_name;
use crate::checkpoint::Format;
use crate::error::{Error, Result};
use crate::train::checkpoint::holds_optimizer_state;
use crate::train::{TrainOptions, Validation};

/// Where node 0's files are named in its list.
const MODEL: &str = "model";
const DATA: &str = "data";
const VALIDATION: &str = "validation";
const CHECKPOINT: &str = "checkpoint";

/// The copies of node 0's files this node trains with, where they are not the paths its own
/// command line gives; passed to its workers (and probes) as hidden flags.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeCopies {
    /// The model directory.
    pub model: Option<PathBuf>,
    /// The training data.
    pub data: Option<PathBuf>,
    /// The validation data.
    pub validation: Option<PathBuf>,
    /// The checkpoint to resume from.
    pub resume: Option<PathBuf>,
}

impl NodeCopies {
    /// The flags that point a worker at these copies.
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let mut add = |flag: &str, path: &Option<PathBuf>| {
            if let Some(path) = path {
                args.push(format!("--{flag}={}", path.display()));
            }
        };
        add("node-model", &self.model);
        add("node-data", &self.data);
        add("node-val-data", &self.validation);
        add("node-resume", &self.resume);
        args
    }

    /// `train` with these copies in place of its paths.
    pub fn apply(&self, mut train: TrainOptions) -> TrainOptions {
        if let Some(model) = &self.model {
            train.model_dir = model.clone();
        }
        if let Some(data) = &self.data {
            train.data = data.clone();
        }
        if let Some(validation) = &self.validation {
            train.validation = Validation::File(validation.clone());
        }
        if let Some(resume) = &self.resume {
            train.resume = Some(crate::train::Resume::Path(resume.clone()));
        }
        train
    }
}

/// Where fetched files are kept: `--cache-dir`, else `$PP_CACHE_DIR`, `$XDG_CACHE_HOME/pp` or
/// `~/.cache/pp`.
pub fn default_cache_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("PP_CACHE_DIR") {
        return dir.into();
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("pp");
    }
    match var("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/pp"),
        None => std::env::temp_dir().join("pp-cache"),
    }
}

/// Whether a model file holds weights (fetched only where a worker loads them) rather than the
/// description every node needs at once (config, manifest, tokenizer).
pub fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".bin")
}

/// What node 0 shares: every file of its model directory, its data, and the checkpoint the
/// group resumes from (`resume`); uploads go to its output directory.
pub fn shared_by_node0(
    train: &TrainOptions,
    resume: Option<&Path>,
    cache: &Path,
) -> Result<SharedFiles> {
    let mut digests = Digests::load(cache);
    let mut shared = SharedFiles {
        upload_root: Some(train.out_dir.clone()),
        ..SharedFiles::default()
    };
    let mut add_dir = |prefix: &str, dir: &Path, shared: &mut SharedFiles| -> Result<()> {
        for path in files_in(dir)? {
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            let info = digests.describe(&path, &format!("{prefix}/{file}"))?;
            shared.add(info, path);
        }
        Ok(())
    };
    add_dir(MODEL, &train.model_dir, &mut shared)?;
    if let Some(dir) = resume {
        // Named as node 0 names it (`step-N`), so that a node sharing its filesystem finds it.
        let canonical = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        let step = canonical
            .file_name()
            .map_or("checkpoint".into(), |name| name.to_string_lossy());
        add_dir(&format!("{CHECKPOINT}/{step}"), dir, &mut shared)?;
    }
    let mut add_file = |prefix: &str, path: &Path| -> Result<()> {
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        let info = digests.describe(path, &format!("{prefix}/{file}"))?;
        shared.add(info, path.to_path_buf());
        Ok(())
    };
    add_file(DATA, &train.data)?;
    if let Validation::File(path) = &train.validation {
        add_file(VALIDATION, path)?;
    }
    digests.save();
    Ok(shared)
}

/// The regular, visible files directly in `dir`, by name.
fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.is_file()
                && !path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// A node other than node 0, receiving node 0's files.
pub struct Receiver {
    client: FileClient,
    address: SocketAddr,
    listed: Vec<FileInfo>,
    cache: PathBuf,
    digests: Digests,
}

impl Receiver {
    /// Connects to node 0 through the rendezvous at `address` (waiting up to `timeout` for it
    /// to listen) and reads what it shares.
    pub fn connect(
        address: SocketAddr,
        token: &str,
        timeout: Duration,
        cache: &Path,
    ) -> Result<Self> {
        let mut last = Instant::now();
        let client = FileClient::connect(address, token, timeout, &mut |line| {
            if last.elapsed() >= Duration::from_secs(5) {
                eprintln!("rendezvous: {line}");
                last = Instant::now();
            }
        })
        .map_err(|e| Error::Cluster(e.to_string()))?;
        let listed = client
            .list()
            .map_err(|e| Error::Cluster(format!("node 0's files: {e}")))?;
        Ok(Self {
            client,
            address,
            listed,
            cache: cache.to_path_buf(),
            digests: Digests::load(cache),
        })
    }

    /// The link to node 0's rate, in bytes per second: the time to receive 16 MiB.
    pub fn measure_link(&self) -> Result<f64> {
        self.client
            .measure_link(16 << 20)
            .map_err(|e| Error::Cluster(format!("measuring the link to node 0: {e}")))
    }

    /// Node 0's files under `prefix`, by their names below it.
    fn under(&self, prefix: &str) -> Vec<(String, FileInfo)> {
        self.listed
            .iter()
            .filter_map(|info| {
                let rest = info.name.strip_prefix(prefix)?.strip_prefix('/')?;
                Some((rest.to_string(), info.clone()))
            })
            .collect()
    }

    /// The model directory to train with: `local` when it holds exactly node 0's files, else
    /// a directory in the cache named by node 0's files, holding their description now (the
    /// weights follow with [`Receiver::model_weights`]).
    pub fn model(&mut self, local: &Path) -> Result<Option<PathBuf>> {
        let files = self.under(MODEL);
        if files.is_empty() {
            return Err(Error::Cluster(format!(
                "node 0 (at {}) shares no model",
                self.address
            )));
        }
        if self.all_match(&files, |name| local.join(name))? {
            return Ok(None);
        }
        let dir = self.cache.join("models").join(cache_key(&files));
        let description: Vec<_> = files
            .into_iter()
            .filter(|(name, _)| !is_weight_file(name))
            .collect();
        eprintln!(
            "{} is not node 0's model: receiving it into {}",
            local.display(),
            dir.display()
        );
        self.obtain(&description, |name| local.join(name), &dir)?;
        Ok(Some(dir))
    }

    /// Fetches into `dir` (a [`Receiver::model`] directory) the weight files `share` loads.
    pub fn model_weights(&mut self, local: &Path, dir: &Path, share: &Share) -> Result<()> {
        let loads = share.loads(dir);
        let files: Vec<_> = self
            .under(MODEL)
            .into_iter()
            .filter(|(name, _)| is_weight_file(name) && loads(name))
            .collect();
        self.obtain(&files, |name| local.join(name), dir)
    }

    /// The training and validation data: `None` where this node's own file is node 0's.
    pub fn data(&mut self, train: &TrainOptions) -> Result<(Option<PathBuf>, Option<PathBuf>)> {
        let mut one = |prefix: &str, local: Option<&Path>| -> Result<Option<PathBuf>> {
            let files = self.under(prefix);
            let [(name, info)] = files.as_slice() else {
                return Ok(None);
            };
            if let Some(local) = local {
                if self.matches(local, info)? {
                    return Ok(None);
                }
            }
            let dir = self
                .cache
                .join("data")
                .join(format!("{:016x}", info.checksum));
            let local = local.map(Path::to_path_buf);
            self.obtain(&files, |_| local.clone().unwrap_or_default(), &dir)?;
            Ok(Some(dir.join(name)))
        };
        let data = one(DATA, Some(&train.data))?;
        let local_validation = match &train.validation {
            Validation::File(path) => Some(path.as_path()),
            _ => None,
        };
        let validation = one(VALIDATION, local_validation)?;
        Ok((data, validation))
    }

    /// The checkpoint node 0 resumes from, if it shares one: its description, then the weight
    /// and optimizer files `share` loads. In the cache, where `list` does not see it as this
    /// node's own; files this node holds under `checkpoints/STEP` (a shared filesystem) are
    /// linked, not received.
    pub fn checkpoint(&mut self, checkpoints: &Path, share: &Share) -> Result<Option<PathBuf>> {
        let files = self.under(CHECKPOINT);
        let Some(step) = files
            .first()
            .and_then(|(name, _)| name.split_once('/'))
            .map(|(step, _)| step.to_string())
        else {
            return Ok(None);
        };
        if step.is_empty() || step.starts_with('.') {
            return Err(Error::Cluster(format!(
                "node 0 shares a checkpoint named `{step}`"
            )));
        }
        let dir = self
            .cache
            .join("checkpoints")
            .join(cache_key(&files))
            .join(&step);
        let own = checkpoints.join(&step);
        let (weights, description): (Vec<_>, Vec<_>) = files
            .into_iter()
            .filter_map(|(name, info)| {
                let name = name.strip_prefix(&format!("{step}/"))?.to_string();
                Some((name, info))
            })
            .partition(|(name, _)| is_weight_file(name));
        // The description first: it says how the checkpoint is cut.
        self.obtain(&description, |name| own.join(name), &dir)?;
        let loads = share.loads(&dir);
        let weights: Vec<_> = weights
            .into_iter()
            .filter(|(name, _)| loads(name))
            .collect();
        self.obtain(&weights, |name| own.join(name), &dir)?;
        Ok(Some(dir))
    }

    /// Whether every file of `files` is at `local(name)` with node 0's contents.
    fn all_match(
        &mut self,
        files: &[(String, FileInfo)],
        local: impl Fn(&str) -> PathBuf,
    ) -> Result<bool> {
        for (name, info) in files {
            if !self.matches(&local(name), info)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether `path` holds `info`'s contents (size, then checksum).
    fn matches(&mut self, path: &Path, info: &FileInfo) -> Result<bool> {
        let same_size = std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == info.size);
        Ok(same_size && self.digests.describe(path, &info.name)?.checksum == info.checksum)
    }

    /// Makes `dir/NAME` hold each file of `files`: kept if it already does, linked to this
    /// node's own copy at `local(NAME)` where that matches, else fetched from node 0.
    fn obtain(
        &mut self,
        files: &[(String, FileInfo)],
        local: impl Fn(&str) -> PathBuf,
        dir: &Path,
    ) -> Result<()> {
        for (name, info) in files {
            let target = dir.join(name);
            if self.matches(&target, info)? {
                continue;
            }
            let own = local(name);
            if own != target && self.matches(&own, info)? {
                link(&own, &target)?;
                continue;
            }
            if info.size >= 1 << 26 {
                eprintln!(
                    "receiving {} ({}) from node 0",
                    info.name,
                    crate::plan::human_bytes(info.size)
                );
            }
            let started = Instant::now();
            self.client
                .fetch(info, &target)
                .map_err(|e| Error::Cluster(format!("receiving {}: {e}", info.name)))?;
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "received {} from node 0 ({}, {:.0} MB/s), checksum verified",
                info.name,
                crate::plan::human_bytes(info.size),
                info.size as f64 / seconds.max(1e-6) / 1e6
            );
            self.digests.record(&target, info)?;
        }
        self.digests.save();
        Ok(())
    }
}

/// The stages a node's workers run, of the plan's partition.
pub struct Share<'a> {
    /// How the plan cuts the model.
    pub partition: &'a Partition,
    /// The stages this node runs.
    pub stages: &'a [usize],
}

impl Share<'_> {
    /// Which weight files of the model or checkpoint in `dir` the workers load: of a native
    /// checkpoint cut as the plan cuts the model, only their stages' weights and optimizer
    /// state; otherwise all.
    fn loads(&self, dir: &Path) -> impl Fn(&str) -> bool + '_ {
        let cut_as_planned = crate::checkpoint::describe(dir).is_ok_and(|info| {
            matches!(&info.format, Format::Native(native) if native.partition() == self.partition)
        });
        move |name: &str| {
            !cut_as_planned
                || self.stages.iter().any(|&stage| {
                    name == stage_file_name(stage) || holds_optimizer_state(name, stage)
                })
        }
    }
}

/// A cache directory's name for node 0's `files`: their names and checksums, hashed.
fn cache_key(files: &[(String, FileInfo)]) -> String {
    let key: String = files
        .iter()
        .map(|(name, info)| format!("{name}:{:016x};", info.checksum))
        .collect();
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(key.as_bytes()))
}

/// Points `target` at `own` (a symbolic link to its absolute path), replacing what is there
/// in one rename (nodes of one machine may share the cache).
fn link(own: &Path, target: &Path) -> Result<()> {
    let own = own.canonicalize().map_err(|e| Error::io(own, e))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let file = target.file_name().unwrap_or_default().to_string_lossy();
    let temporary = target.with_file_name(format!(".{file}.link-{}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    std::os::unix::fs::symlink(&own, &temporary).map_err(|e| Error::io(target, e))?;
    std::fs::rename(&temporary, target).map_err(|e| Error::io(target, e))
}

/// A file's checksum as last computed, valid while its size and modification time stay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Digest {
    size: u64,
    modified_ns: u128,
    checksum: u64,
}

/// Checksums of local files, kept in the cache (`checksums.json`) so that a model is read in
/// full once, not on every start.
struct Digests {
    path: PathBuf,
    known: BTreeMap<String, Digest>,
    changed: bool,
}

impl Digests {
    fn load(cache: &Path) -> Self {
        let path = cache.join("checksums.json");
        let known = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        Self {
            path,
            known,
            changed: false,
        }
    }

    /// The cache's key for `path` and what its size and modification time are now.
    fn stat(path: &Path) -> Result<(String, u64, u128)> {
        let metadata = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let modified_ns = metadata
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let key = path
            .canonicalize()
            .map_err(|e| Error::io(path, e))?
            .to_string_lossy()
            .into_owned();
        Ok((key, metadata.len(), modified_ns))
    }

    /// Records that `path`, just received and checked, holds `info`'s contents.
    fn record(&mut self, path: &Path, info: &FileInfo) -> Result<()> {
        let (key, size, modified_ns) = Self::stat(path)?;
        self.known.insert(
            key,
            Digest {
                size,
                modified_ns,
                checksum: info.checksum,
            },
        );
        self.changed = true;
        Ok(())
    }

    /// `path` described as `name`: its size and checksum (computed when not known).
    fn describe(&mut self, path: &Path, name: &str) -> Result<FileInfo> {
        let (key, size, modified_ns) = Self::stat(path)?;
        let checksum = match self.known.get(&key) {
            Some(d) if d.size == size && d.modified_ns == modified_ns => d.checksum,
            _ => {
                if size >= 1 << 28 {
                    eprintln!(
                        "checksumming {} ({}), once: the result is cached",
                        path.display(),
                        crate::plan::human_bytes(size)
                    );
                }
                let checksum = checksum_of(path).map_err(|e| Error::io(path, e))?;
                self.known.insert(
                    key,
                    Digest {
                        size,
                        modified_ns,
                        checksum,
                    },
                );
                self.changed = true;
                checksum
            }
        };
        Ok(FileInfo {
            name: name.to_string(),
            size,
            checksum,
        })
    }

    /// Writes the cache back (best effort: a lost write costs a checksum later, nothing else).
    fn save(&mut self) {
        if !self.changed {
            return;
        }
        let Some(parent) = self.path.parent() else {
            return;
        };
        // Files since deleted (an old run's checkpoints) are forgotten.
        self.known.retain(|path, _| Path::new(path).exists());
        let text = serde_json::to_string(&self.known).expect("digests serialize");
        let partial = parent.join(format!(".checksums.json.{}", std::process::id()));
        let written = std::fs::create_dir_all(parent)
            .and_then(|()| std::fs::write(&partial, text))
            .and_then(|()| std::fs::rename(&partial, &self.path));
        if written.is_ok() {
            self.changed = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pp_transport::rendezvous::RendezvousHost;

    use super::*;

    fn write(dir: &Path, name: &str, contents: &[u8]) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), contents).unwrap();
    }

    #[test]
    fn a_node_links_what_matches_fetches_what_differs_and_repairs_its_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let (theirs, ours) = (tmp.path().join("node0"), tmp.path().join("node1"));
        let weights: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
        write(&theirs, "config.json", b"{\"same\": 1}");
        write(&theirs, "tokenizer.json", b"node 0's tokenizer");
        write(&theirs, "model.safetensors", &weights);
        // Node 1 has the same config, another tokenizer and no weights.
        write(&ours, "config.json", b"{\"same\": 1}");
        write(&ours, "tokenizer.json", b"an older tokenizer");

        let mut digests = Digests::load(&tmp.path().join("cache0"));
        let mut shared = SharedFiles::default();
        for path in files_in(&theirs).unwrap() {
            let name = format!("model/{}", path.file_name().unwrap().to_string_lossy());
            shared.add(digests.describe(&path, &name).unwrap(), path);
        }
        let address = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let _host =
            RendezvousHost::start(address, "secret", 2, Duration::from_secs(30), shared).unwrap();
        let cache = tmp.path().join("cache1");
        let mut receiver =
            Receiver::connect(address, "secret", Duration::from_secs(10), &cache).unwrap();

        let dir = receiver.model(&ours).unwrap().expect("not node 0's model");
        assert!(dir.starts_with(cache.join("models")));
        let config = dir.join("config.json");
        assert!(config.symlink_metadata().unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&config).unwrap(), b"{\"same\": 1}");
        let tokenizer = dir.join("tokenizer.json");
        assert_eq!(std::fs::read(&tokenizer).unwrap(), b"node 0's tokenizer");
        // The weights only when asked for.
        assert!(!dir.join("model.safetensors").exists());
        // A Hugging Face model is not cut in stages: a node loads all of it.
        let partition = Partition::from_split(&[1], 2).unwrap();
        let share = Share {
            partition: &partition,
            stages: &[1],
        };
        receiver.model_weights(&ours, &dir, &share).unwrap();
        assert_eq!(
            std::fs::read(dir.join("model.safetensors")).unwrap(),
            weights
        );

        // A damaged cached file is fetched again.
        std::fs::write(&tokenizer, b"damaged tokenizer!").unwrap();
        assert_eq!(receiver.model(&ours).unwrap(), Some(dir.clone()));
        assert_eq!(std::fs::read(&tokenizer).unwrap(), b"node 0's tokenizer");

        // A node whose copy is node 0's uses its own directory.
        assert_eq!(receiver.model(&theirs).unwrap(), None);
    }
}
