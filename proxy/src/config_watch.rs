//! Reloads the config when its file changes, without a signal.
//!
//! The file's content is read once a second and compared with what the last
//! (re)load read, rather than watching inotify events or mtimes: reading
//! through the path follows whatever it points at now, so editors that write
//! a new file and rename it over the old one, and Kubernetes ConfigMap
//! volumes that swap a `..data` symlink, are seen like in-place writes (an
//! inotify watch on the old inode misses both); comparing bytes ignores a
//! bare `touch` and catches two edits within one mtime tick. Reading a
//! config file a second costs next to nothing.
//!
//! Pools' tokenizer files are watched too, by their metadata (size, mtime,
//! device and inode, through the path): they are megabytes, too big to read
//! every second, and a replaced file has a new inode or mtime.
//!
//! A reload rejects a broken file like SIGHUP does: logged, counted in
//! `sluice_config_reloads_total{result="failure"}`, shown on `/admin/state`,
//! and the running config stays. Each new content is tried once.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::state::{ReloadTrigger, Shared};

/// How often the file is read.
pub const POLL: Duration = Duration::from_secs(1);
/// A changed file must read the same again after this long before it is
/// loaded, so a write still in progress is not taken for a broken config.
const SETTLE: Duration = Duration::from_millis(200);

/// What a file's metadata says of its content; `None` for a file that cannot
/// be read (a reload then fails and names it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    dev: u64,
    ino: u64,
}

/// The stamp of the file `path` points at now.
pub fn stamp(path: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        len: m.len(),
        modified: m.modified().ok(),
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// Stamps of `files`, in order.
pub fn stamps(files: &[PathBuf]) -> Vec<Option<FileStamp>> {
    files.iter().map(|f| stamp(f)).collect()
}

/// Watches `shared.config_path` (and the running pools' tokenizer files)
/// until `stop` turns true; returns at once when the proxy runs without a
/// config file.
pub async fn watch(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let Some(path) = shared.config_path.clone() else {
        return;
    };
    // Tokenizer stamps a reload was last tried for, so a broken file is tried once.
    let mut tried: Option<Vec<Option<FileStamp>>> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => return,
        }
        if config_file_changed(&shared, &path).await
            || tokenizers_changed(&shared, &mut tried).await
        {
            // Parsing, tokenizer loading and pool setup are blocking work.
            let s = Arc::clone(&shared);
            let _ = tokio::task::spawn_blocking(move || s.reload(ReloadTrigger::FileChange)).await;
        }
    }
}

/// The config file holds new content, the same across [`SETTLE`].
async fn config_file_changed(shared: &Shared, path: &Path) -> bool {
    // Missing or unreadable (mid-swap, or being replaced): look again next time.
    let Ok(content) = tokio::fs::read(path).await else {
        return false;
    };
    if !shared.config_changed(&content) {
        return false;
    }
    tokio::time::sleep(SETTLE).await;
    matches!(tokio::fs::read(path).await, Ok(again) if again == content)
}

/// A running tokenizer file was replaced or rewritten since its generation
/// loaded it (and not already tried), the same across [`SETTLE`].
async fn tokenizers_changed(shared: &Shared, tried: &mut Option<Vec<Option<FileStamp>>>) -> bool {
    let g = shared.current();
    if g.tokenizer_files.is_empty() {
        return false;
    }
    let now = stamps(&g.tokenizer_files);
    if now == g.tokenizer_stamps || tried.as_ref() == Some(&now) {
        return false;
    }
    tokio::time::sleep(SETTLE).await;
    if stamps(&g.tokenizer_files) != now {
        return false;
    }
    *tried = Some(now);
    true
}
