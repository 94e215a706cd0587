//! Local mode's driver: watches the manifest folder and feeds the hub.
//!
//! File events are debounced (a save often arrives as several events, and an editor may write
//! a temporary file and rename it), then the folder is rescanned as a whole: that handles
//! renames and deletions without tracking them one by one, and is cheap because unchanged
//! files are not parsed again. A periodic rescan backs up the watcher on filesystems where
//! inotify misses changes (network mounts, some container volumes).

use crate::serve::hub::Hub;
use crate::source::dir::DirSource;
use notify::{RecursiveMode, Watcher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Quiet time after the last file event before the folder is read again.
pub const DEBOUNCE: Duration = Duration::from_millis(40);
/// Rescan period when no event arrives.
pub const RESCAN_EVERY: Duration = Duration::from_secs(5);

/// Loads the folder once, then keeps following it. Errors in files never stop the loop.
pub async fn run(dir: PathBuf, hub: Arc<Hub>) -> anyhow::Result<()> {
    let mut source = DirSource::new(&dir);
    // The first scan must succeed: a controller pointed at a folder that does not exist
    // should say so at once rather than serve an empty table.
    source
        .rescan()
        .map_err(|e| anyhow::anyhow!("cannot read --config-dir {}: {e}", dir.display()))?;
    hub.update(&source.snapshot(), source.reports());

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // Only wake-ups matter; what changed is found by rescanning.
        let _ = tx.send(ev.is_ok());
    })?;
    watcher.watch(&dir, RecursiveMode::Recursive)?;

    loop {
        tokio::select! {
            ev = rx.recv() => {
                if ev.is_none() {
                    anyhow::bail!("file watcher stopped");
                }
                // Debounce: wait until events stop arriving for a moment.
                while let Ok(Some(_)) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
            }
            _ = tokio::time::sleep(RESCAN_EVERY) => {}
        }
        match source.rescan() {
            Ok(true) => {
                hub.update(&source.snapshot(), source.reports());
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot read config dir; keeping the last good configuration");
            }
        }
    }
}
