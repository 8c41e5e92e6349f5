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
//! A reload rejects a broken file like SIGHUP does: logged, counted in
//! `sluice_config_reloads_total{result="failure"}`, shown on `/admin/state`,
//! and the running config stays. Each new content is tried once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::state::{ReloadTrigger, Shared};

/// How often the file is read.
pub const POLL: Duration = Duration::from_secs(1);
/// A changed file must read the same again after this long before it is
/// loaded, so a write still in progress is not taken for a broken config.
const SETTLE: Duration = Duration::from_millis(200);

/// Watches `shared.config_path` until `stop` turns true; returns at once
/// when the proxy runs without a config file.
pub async fn watch(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let Some(path) = shared.config_path.clone() else {
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => return,
        }
        // Missing or unreadable (mid-swap, or being replaced): look again next time.
        let Ok(content) = tokio::fs::read(&path).await else {
            continue;
        };
        if !shared.config_changed(&content) {
            continue;
        }
        tokio::time::sleep(SETTLE).await;
        match tokio::fs::read(&path).await {
            Ok(again) if again == content => {}
            _ => continue,
        }
        // Parsing, tokenizer loading and pool setup are blocking work.
        let s = Arc::clone(&shared);
        let _ = tokio::task::spawn_blocking(move || s.reload(ReloadTrigger::FileChange)).await;
    }
}
