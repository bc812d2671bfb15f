//! Files over the rendezvous, so that nodes need no shared filesystem: node 0 shares named
//! files (its model, data, the checkpoint to resume), the others list and fetch what they lack,
//! and workers on other nodes upload their checkpoint files into node 0's output directory.
//! Every file travels with its xxh3-64 checksum and is checked on arrival; it appears under its
//! name only once complete and checked.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use xxhash_rust::xxh3::Xxh3;

use super::{read_frame, write_frame, RendezvousError, ToHost};

/// Bytes read or written at a time.
const CHUNK: usize = 1 << 20;
/// The most a link probe sends.
const MAX_PROBE: u64 = 1 << 28;

/// A file as it is shared: its name (a relative path), size and checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Relative path, `/`-separated.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// xxh3-64 of the contents.
    pub checksum: u64,
}

/// What node 0 offers: files to fetch, by name, and where uploads go.
#[derive(Debug, Clone, Default)]
pub struct SharedFiles {
    /// Each shared file's description and where it lies.
    pub files: BTreeMap<String, (FileInfo, PathBuf)>,
    /// Uploaded files are stored under this directory (none: uploads are refused).
    pub upload_root: Option<PathBuf>,
}

impl SharedFiles {
    /// Shares `path` as `info.name`.
    pub fn add(&mut self, info: FileInfo, path: PathBuf) {
        self.files.insert(info.name.clone(), (info, path));
    }
}

/// One request on a file session's stream.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FileRequest {
    /// Every shared file.
    List,
    /// One shared file's contents.
    Fetch(String),
    /// The contents follow; store them under the name.
    Upload(FileInfo),
    /// A file under the upload directory (what ranks of node 0 wrote there).
    FetchUploaded(String),
    /// This many bytes of nothing, to time the link.
    Probe(u64),
}

/// The host's answer.
#[derive(Debug, Serialize, Deserialize)]
enum FileReply {
    List(Vec<FileInfo>),
    /// The contents follow.
    Sending(FileInfo),
    Stored,
    Refused(String),
}

/// The xxh3-64 checksum of a file's contents.
pub fn checksum_of(path: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Xxh3::new();
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            return Ok(hasher.digest());
        }
        hasher.update(&buffer[..read]);
    }
}

/// Whether `name` is a plain relative path (no `..`, no root), so that it stays under the
/// directory it is joined to.
fn is_relative_name(name: &str) -> bool {
    !name.is_empty()
        && Path::new(name)
            .components()
            .all(|component| matches!(component, Component::Normal(_)))
}

/// A connection to node 0's files.
pub struct FileClient {
    runtime: Runtime,
    address: SocketAddr,
    connection: Connection,
    _endpoint: Endpoint,
}

impl FileClient {
    /// Connects to the rendezvous at `address`, waiting until `timeout` for it to listen;
    /// `waiting` hears a line every few seconds meanwhile.
    pub fn connect(
        address: SocketAddr,
        token: &str,
        timeout: Duration,
        waiting: &mut dyn FnMut(&str),
    ) -> Result<Self, RendezvousError> {
        let (runtime, endpoint) = super::dialler(address)?;
        let connection = runtime.block_on(super::member::dial_host(
            &endpoint,
            address,
            token,
            Instant::now() + timeout,
            waiting,
        ))?;
        Ok(Self {
            runtime,
            address,
            connection,
            _endpoint: endpoint,
        })
    }

    fn link(&self, message: String) -> RendezvousError {
        RendezvousError::Link {
            address: self.address,
            message,
        }
    }

    /// Opens a stream and sends `request`.
    async fn ask(&self, request: FileRequest) -> Result<(SendStream, RecvStream), String> {
        let (mut send, recv) = self.connection.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(&mut send, &ToHost::File(request)).await?;
        Ok((send, recv))
    }

    /// Every file node 0 shares.
    pub fn list(&self) -> Result<Vec<FileInfo>, RendezvousError> {
        self.runtime
            .block_on(async {
                let (_send, mut recv) = self.ask(FileRequest::List).await?;
                match read_frame::<FileReply>(&mut recv).await? {
                    FileReply::List(files) => Ok(files),
                    FileReply::Refused(reason) => Err(reason),
                    other => Err(format!("unexpected answer {other:?}")),
                }
            })
            .map_err(|message| self.link(message))
    }

    /// Fetches the shared file `info.name` into `destination`, checking it against `info`
    /// (what [`FileClient::list`] said). The file appears at `destination` only when complete
    /// and checked.
    pub fn fetch(&self, info: &FileInfo, destination: &Path) -> Result<(), RendezvousError> {
        self.runtime
            .block_on(async {
                let (_send, mut recv) = self.ask(FileRequest::Fetch(info.name.clone())).await?;
                match read_frame::<FileReply>(&mut recv).await? {
                    FileReply::Sending(sent) if &sent == info => {}
                    FileReply::Sending(sent) => {
                        return Err(format!(
                            "`{}` changed on node 0 ({} bytes, checksum {:016x}; it was {} bytes, \
                             {:016x})",
                            info.name, sent.size, sent.checksum, info.size, info.checksum
                        ))
                    }
                    FileReply::Refused(reason) => return Err(reason),
                    other => return Err(format!("unexpected answer {other:?}")),
                }
                receive_into(&mut recv, info, destination).await
            })
            .map_err(|message| self.link(message))
    }

    /// Times receiving `bytes` from node 0 (at most 256 MiB): the link's rate in bytes per
    /// second.
    pub fn measure_link(&self, bytes: u64) -> Result<f64, RendezvousError> {
        self.runtime
            .block_on(async {
                let started = Instant::now();
                let (_send, mut recv) = self.ask(FileRequest::Probe(bytes)).await?;
                let size = match read_frame::<FileReply>(&mut recv).await? {
                    FileReply::Sending(info) => info.size,
                    FileReply::Refused(reason) => return Err(reason),
                    other => return Err(format!("unexpected answer {other:?}")),
                };
                let mut buffer = vec![0u8; CHUNK];
                let mut left = size;
                while left > 0 {
                    let want = CHUNK.min(left as usize);
                    recv.read_exact(&mut buffer[..want])
                        .await
                        .map_err(|e| format!("the link probe was cut off: {e}"))?;
                    left -= want as u64;
                }
                Ok(size as f64 / started.elapsed().as_secs_f64().max(1e-9))
            })
            .map_err(|message| self.link(message))
    }

    /// Fetches `name` from under node 0's upload directory into `destination`, checked
    /// against the checksum node 0 computes as it sends it.
    pub fn fetch_uploaded(&self, name: &str, destination: &Path) -> Result<(), RendezvousError> {
        self.runtime
            .block_on(async {
                let (_send, mut recv) = self.ask(FileRequest::FetchUploaded(name.into())).await?;
                let info = match read_frame::<FileReply>(&mut recv).await? {
                    FileReply::Sending(info) => info,
                    FileReply::Refused(reason) => return Err(reason),
                    other => return Err(format!("unexpected answer {other:?}")),
                };
                receive_into(&mut recv, &info, destination).await
            })
            .map_err(|message| self.link(message))
    }

    /// Uploads `source` to node 0, where it is stored as `name` under its upload directory.
    pub fn upload(&self, source: &Path, name: &str) -> Result<(), RendezvousError> {
        let failed = |e: std::io::Error| self.link(format!("{}: {e}", source.display()));
        let size = std::fs::metadata(source).map_err(failed)?.len();
        let info = FileInfo {
            name: name.to_string(),
            size,
            checksum: checksum_of(source).map_err(failed)?,
        };
        self.runtime
            .block_on(async {
                let (mut send, mut recv) = self.ask(FileRequest::Upload(info)).await?;
                // A refusal may cut the sending short: the host's reason comes first.
                let sent = send_contents(&mut send, source, size).await;
                match (read_frame::<FileReply>(&mut recv).await, sent) {
                    (Ok(FileReply::Refused(reason)), _) => Err(reason),
                    (_, Err(error)) => Err(error),
                    (Ok(FileReply::Stored), Ok(())) => Ok(()),
                    (Ok(other), Ok(())) => Err(format!("unexpected answer {other:?}")),
                    (Err(error), Ok(())) => Err(error),
                }
            })
            .map_err(|message| self.link(message))
    }
}

impl Drop for FileClient {
    fn drop(&mut self) {
        self.connection.close(VarInt::from_u32(0), b"done");
    }
}

/// The host's side of a file session: answers `first`, then every later stream of the
/// connection, until it closes.
pub(crate) async fn serve(
    connection: Connection,
    first: (SendStream, RecvStream, FileRequest),
    shared: impl Fn() -> SharedFiles + Send + Sync + 'static,
) {
    let shared = std::sync::Arc::new(shared);
    let answer_one = |(mut send, mut recv, request): (SendStream, RecvStream, FileRequest)| {
        let shared = shared.clone();
        async move {
            if let Err(reason) = answer(&mut send, &mut recv, request, &shared()).await {
                let _ = write_frame(&mut send, &FileReply::Refused(reason)).await;
            }
            let _ = send.finish();
            let _ = send.stopped().await;
        }
    };
    tokio::spawn(answer_one(first));
    while let Ok((send, mut recv)) = connection.accept_bi().await {
        let request = match read_frame::<ToHost>(&mut recv).await {
            Ok(ToHost::File(request)) => request,
            _ => return,
        };
        tokio::spawn(answer_one((send, recv, request)));
    }
}

async fn answer(
    send: &mut SendStream,
    recv: &mut RecvStream,
    request: FileRequest,
    shared: &SharedFiles,
) -> Result<(), String> {
    match request {
        FileRequest::List => {
            let list = shared
                .files
                .values()
                .map(|(info, _)| info.clone())
                .collect();
            write_frame(send, &FileReply::List(list)).await
        }
        FileRequest::Fetch(name) => {
            let (info, path) = shared
                .files
                .get(&name)
                .ok_or_else(|| format!("node 0 does not share `{name}`"))?;
            write_frame(send, &FileReply::Sending(info.clone())).await?;
            send_contents(send, path, info.size).await
        }
        FileRequest::Upload(info) => {
            let path = shared.uploaded(&info.name)?;
            receive_into(recv, &info, &path).await?;
            write_frame(send, &FileReply::Stored).await
        }
        FileRequest::Probe(size) => {
            let size = size.min(MAX_PROBE);
            let info = FileInfo {
                name: "probe".into(),
                size,
                checksum: 0,
            };
            write_frame(send, &FileReply::Sending(info)).await?;
            let zeros = vec![0u8; CHUNK];
            let mut left = size;
            while left > 0 {
                let want = CHUNK.min(left as usize);
                send.write_all(&zeros[..want])
                    .await
                    .map_err(|e| e.to_string())?;
                left -= want as u64;
            }
            Ok(())
        }
        FileRequest::FetchUploaded(name) => {
            let path = shared.uploaded(&name)?;
            let info = tokio::task::spawn_blocking(move || {
                let size = std::fs::metadata(&path)?.len();
                let checksum = checksum_of(&path)?;
                Ok::<_, std::io::Error>((
                    FileInfo {
                        name,
                        size,
                        checksum,
                    },
                    path,
                ))
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("node 0 cannot read it: {e}"))?;
            let (info, path) = info;
            write_frame(send, &FileReply::Sending(info.clone())).await?;
            send_contents(send, &path, info.size).await
        }
    }
}

impl SharedFiles {
    /// Where `name` lies under the upload directory.
    fn uploaded(&self, name: &str) -> Result<PathBuf, String> {
        let root = self
            .upload_root
            .as_ref()
            .ok_or_else(|| "node 0 takes no uploads now".to_string())?;
        if !is_relative_name(name) {
            return Err(format!("`{name}` is not a relative path"));
        }
        Ok(root.join(name))
    }
}

/// Streams `size` bytes of the file at `path`.
async fn send_contents(send: &mut SendStream, path: &Path, size: u64) -> Result<(), String> {
    let failed = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut file = tokio::fs::File::open(path).await.map_err(failed)?;
    let mut buffer = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        let want = CHUNK.min(left as usize);
        file.read_exact(&mut buffer[..want]).await.map_err(failed)?;
        send.write_all(&buffer[..want])
            .await
            .map_err(|e| e.to_string())?;
        left -= want as u64;
    }
    Ok(())
}

/// Reads `info.size` bytes into a temporary file beside `destination`, checks them against
/// `info.checksum` and renames the file into place.
async fn receive_into(
    recv: &mut RecvStream,
    info: &FileInfo,
    destination: &Path,
) -> Result<(), String> {
    let failed = |path: &Path, e: std::io::Error| format!("{}: {e}", path.display());
    if let Some(parent) = destination.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| failed(parent, e))?;
    }
    // Hidden, and unique to this transfer: one host may receive the same name twice at once.
    let partial = {
        static TRANSFERS: AtomicU64 = AtomicU64::new(0);
        let file = destination
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let count = TRANSFERS.fetch_add(1, Ordering::Relaxed);
        destination.with_file_name(format!(".{file}.partial-{}-{count}", std::process::id()))
    };
    let outcome = async {
        let mut file = tokio::fs::File::create(&partial)
            .await
            .map_err(|e| failed(&partial, e))?;
        let mut hasher = Xxh3::new();
        let mut buffer = vec![0u8; CHUNK];
        let mut left = info.size;
        while left > 0 {
            let want = CHUNK.min(left as usize);
            recv.read_exact(&mut buffer[..want])
                .await
                .map_err(|e| format!("`{}` was cut off: {e}", info.name))?;
            hasher.update(&buffer[..want]);
            file.write_all(&buffer[..want])
                .await
                .map_err(|e| failed(&partial, e))?;
            left -= want as u64;
        }
        file.sync_all().await.map_err(|e| failed(&partial, e))?;
        let checksum = hasher.digest();
        if checksum != info.checksum {
            return Err(format!(
                "`{}` arrived with checksum {checksum:016x}, not {:016x}",
                info.name, info.checksum
            ));
        }
        tokio::fs::rename(&partial, destination)
            .await
            .map_err(|e| failed(destination, e))
    }
    .await;
    if outcome.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_names_are_accepted_for_uploads() {
        assert!(is_relative_name(
            "checkpoints/.step-2.pp-pipeline-ab/stage-001.pps"
        ));
        assert!(is_relative_name("final/manifest.json"));
        assert!(!is_relative_name("../etc/passwd"));
        assert!(!is_relative_name("checkpoints/../../x"));
        assert!(!is_relative_name("/etc/passwd"));
        assert!(!is_relative_name("./x"));
        assert!(!is_relative_name(""));
    }
}
