//! Atomic output directories: everything is written into a hidden directory beside the target
//! and renamed into place only when complete, so a failure or a crash never leaves a
//! half-written checkpoint where a finished one is expected.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A directory being filled; dropped without [`commit`](Self::commit), it is removed.
pub struct Staging {
    target: PathBuf,
    temp: PathBuf,
    committed: bool,
}

impl Staging {
    /// Prepares to write `target`. An existing `target` is refused unless `replace` is set.
    pub fn create(target: &Path, replace: bool) -> Result<Self> {
        if target.exists() && !replace {
            return Err(Error::io(
                target,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "already exists (pass --force to replace it)",
                ),
            ));
        }
        let name = target
            .file_name()
            .ok_or_else(|| {
                Error::io(
                    target,
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a directory name"),
                )
            })?
            .to_string_lossy();
        let parent = parent_of(target);
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let prefix = format!(".{name}.pp-partial-");
        remove_abandoned(&parent, &prefix);
        let temp = parent.join(format!("{prefix}{}", std::process::id()));
        if temp.exists() {
            std::fs::remove_dir_all(&temp).map_err(|e| Error::io(&temp, e))?;
        }
        std::fs::create_dir(&temp).map_err(|e| Error::io(&temp, e))?;
        Ok(Self {
            target: target.to_path_buf(),
            temp,
            committed: false,
        })
    }

    /// The directory to write into.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// Moves the finished directory into place, replacing an existing target.
    pub fn commit(mut self) -> Result<()> {
        let parent = parent_of(&self.target);
        if self.target.exists() {
            // Rename the old copy aside first: the target is never absent and half-written.
            let name = self
                .target
                .file_name()
                .unwrap_or_default()
                .to_string_lossy();
            let old = parent.join(format!(".{name}.pp-old-{}", std::process::id()));
            std::fs::rename(&self.target, &old).map_err(|e| Error::io(&self.target, e))?;
            std::fs::rename(&self.temp, &self.target).map_err(|e| Error::io(&self.target, e))?;
            if old.is_dir() {
                std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
            } else {
                std::fs::remove_file(&old).map_err(|e| Error::io(&old, e))?;
            }
        } else {
            std::fs::rename(&self.temp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        }
        self.committed = true;
        sync_dir(&parent)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.temp);
        }
    }
}

/// Removes partial outputs left by conversions that were killed outright (no chance to clean
/// up): directories named `prefix` + the PID of a process that no longer runs.
fn remove_abandoned(parent: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let alive = Path::new("/proc").join(pid).exists() || !Path::new("/proc/self").exists();
        if pid.parse::<u32>().is_ok() && !alive {
            tracing::info!(
                "removing {}, left by an interrupted run",
                entry.path().display()
            );
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Makes a rename durable: the directory entry itself is synced.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_moves_into_place_and_drop_cleans_up() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        let staging = Staging::create(&target, false).unwrap();
        std::fs::write(staging.path().join("a"), b"1").unwrap();
        staging.commit().unwrap();
        assert_eq!(std::fs::read(target.join("a")).unwrap(), b"1");

        // Refused without replace; with it, the old contents are gone afterwards.
        assert!(Staging::create(&target, false).is_err());
        let staging = Staging::create(&target, true).unwrap();
        std::fs::write(staging.path().join("b"), b"2").unwrap();
        staging.commit().unwrap();
        assert!(!target.join("a").exists() && target.join("b").exists());

        // A partial output of a process that no longer runs is cleared by the next run.
        let dead = root.path().join(".out.pp-partial-4000000000");
        std::fs::create_dir(&dead).unwrap();
        Staging::create(&target, true).unwrap();
        assert!(!dead.exists());

        // Abandoned: nothing is left beside the target.
        let staging = Staging::create(&root.path().join("other"), false).unwrap();
        std::fs::write(staging.path().join("c"), b"3").unwrap();
        drop(staging);
        let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only `out` remains");
    }
}
