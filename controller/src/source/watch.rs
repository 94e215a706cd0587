//! Local mode's driver: watches the manifest folder and feeds the hub.
//!
//! File events are debounced: a save often arrives as several events, and an editor may write
//! a temporary file and rename it, so the driver waits for [`DEBOUNCE`] of quiet, but never
//! longer than [`MAX_DELAY`] after the first event: under steady churn (a file written every
//! few milliseconds) changes are still published at least that often instead of waiting for
//! a quiet moment that never comes.
//!
//! Only events that can change a file's content count (create, write, rename, remove):
//! opening or reading a file (the driver's own reads among them) is ignored, so the driver
//! never wakes itself up. The files an event names are read again one by one; an event about
//! a folder, or one the watcher could not describe (queue overflow), rescans the whole
//! folder, as does a periodic rescan that backs up the watcher on filesystems where inotify
//! misses changes (network mounts, some container volumes). A rescan only reads files whose
//! size, mtime or inode changed.

use crate::serve::hub::Hub;
use crate::source::dir::DirSource;
use notify::{EventKind, RecursiveMode, Watcher};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Quiet time after the last file event before the changed files are read.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(30);
/// The longest a change waits for quiet: the bound on added latency under churn.
pub(crate) const MAX_DELAY: Duration = Duration::from_millis(60);
/// Rescan period when no event arrives.
pub(crate) const RESCAN_EVERY: Duration = Duration::from_secs(5);

/// What the watcher asks the driver to do.
#[derive(Debug)]
enum Wake {
    /// Read these paths again.
    Paths(Vec<PathBuf>),
    /// Rescan the whole folder.
    Rescan,
}

/// Which of a notify event's paths need reading, if any.
fn wake_of(event: notify::Result<notify::Event>) -> Option<Wake> {
    let Ok(event) = event else {
        return Some(Wake::Rescan);
    };
    if event.need_rescan() {
        return Some(Wake::Rescan);
    }
    match event.kind {
        // Opens, reads and closes without writing: nothing changed.
        EventKind::Access(_) => None,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => {
            Some(Wake::Paths(event.paths))
        }
        EventKind::Any | EventKind::Other => Some(Wake::Rescan),
    }
}

/// A batch of wake-ups gathered during one debounce.
#[derive(Default)]
struct Batch {
    paths: BTreeSet<PathBuf>,
    rescan: bool,
}

impl Batch {
    fn add(&mut self, wake: Wake) {
        match wake {
            Wake::Paths(paths) => self.paths.extend(paths),
            Wake::Rescan => self.rescan = true,
        }
    }
}

/// Loads the folder once, then keeps following it. Errors in files never stop the loop.
pub async fn run(dir: PathBuf, hub: Arc<Hub>) -> anyhow::Result<()> {
    let mut source = DirSource::new(&dir);
    // The first scan must succeed: a controller pointed at a folder that does not exist
    // should say so at once rather than serve an empty table.
    source
        .rescan()
        .map_err(|e| anyhow::anyhow!("cannot read --config-dir {}: {e}", dir.display()))?;
    hub.update(source.snapshot(), source.reports());

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Some(wake) = wake_of(ev) {
            let _ = tx.send(wake);
        }
    })?;
    watcher.watch(&dir, RecursiveMode::Recursive)?;

    loop {
        let mut batch = Batch::default();
        // `seen`: when the change was first seen, where its push latency starts.
        let seen = tokio::select! {
            wake = rx.recv() => {
                let Some(wake) = wake else {
                    anyhow::bail!("file watcher stopped");
                };
                let seen = std::time::Instant::now();
                batch.add(wake);
                let deadline = Instant::now() + MAX_DELAY;
                loop {
                    let quiet = (Instant::now() + DEBOUNCE).min(deadline);
                    match tokio::time::timeout_at(quiet, rx.recv()).await {
                        Ok(Some(wake)) => batch.add(wake),
                        Ok(None) => anyhow::bail!("file watcher stopped"),
                        Err(_) => break,
                    }
                }
                seen
            }
            _ = tokio::time::sleep(RESCAN_EVERY) => {
                batch.rescan = true;
                std::time::Instant::now()
            }
        };
        // A path that is (or was) a folder, rather than a manifest, means files may have
        // come or gone under it: rescan.
        let folder_event = batch.paths.iter().any(|p| source.is_folder(p));
        let changed = if batch.rescan || folder_event {
            source.rescan()
        } else {
            Ok(source.reload(batch.paths.iter().map(PathBuf::as_path)))
        };
        match changed {
            Ok(true) => {
                hub.update_seen(source.snapshot(), source.reports(), seen);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot read config dir; keeping the last good configuration");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, CreateKind, ModifyKind, RenameMode};

    fn event(kind: EventKind, path: &str) -> notify::Result<notify::Event> {
        Ok(notify::Event::new(kind).add_path(PathBuf::from(path)))
    }

    #[test]
    fn reads_and_opens_wake_nothing_and_writes_name_their_files() {
        assert!(wake_of(event(EventKind::Access(AccessKind::Any), "/d/a.yaml")).is_none());
        let renamed = wake_of(event(
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            "/d/a.yaml",
        ));
        assert!(matches!(renamed, Some(Wake::Paths(p)) if p == [PathBuf::from("/d/a.yaml")]));
        assert!(matches!(
            wake_of(event(EventKind::Create(CreateKind::File), "/d/b.yaml")),
            Some(Wake::Paths(_))
        ));
        assert!(matches!(
            wake_of(event(EventKind::Other, "/d")),
            Some(Wake::Rescan)
        ));
    }
}
