//! Local mode's source of objects: a folder of Kubernetes manifests.
//!
//! Every `*.yaml` / `*.yml` file under the folder (hidden files and folders skipped, so
//! editors' swap files and ConfigMap `..data` links do not count twice) may hold several YAML
//! documents of kind `TrafficPolicy`, `Service` and `EndpointSlice`. A file that cannot be
//! read or parsed keeps the objects it held before: one broken save must not wipe routing.
//! A TrafficPolicy document that is valid YAML but not a valid TrafficPolicy is still handed
//! on (as an `Err` spec) so that the routing computation can report it on the policy and keep
//! the policy's last good version routing.

use crate::model::{EndpointSlice, ObjectKey, Service, TrafficPolicy};
use crate::routing::{PolicyInput, Snapshot};
use crate::serve::hub::FileReport;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// The objects one file contributed, as last parsed successfully. Shared with the snapshots
/// handed to the hub; an object that a re-parse finds unchanged keeps its `Arc`, so the
/// routing computation sees by pointer what did not change.
#[derive(Clone, Debug, Default)]
struct FileObjects {
    policies: Vec<Arc<PolicyInput>>,
    services: Vec<(ObjectKey, Arc<Service>)>,
    slices: Vec<(ObjectKey, Arc<EndpointSlice>)>,
}

impl FileObjects {
    /// `self`, with every object equal to one of `old` replaced by `old`'s `Arc`.
    fn reusing(mut self, old: &FileObjects) -> Self {
        for p in &mut self.policies {
            if let Some(o) = old.policies.iter().find(|o| o.key == p.key && **o == *p) {
                *p = o.clone();
            }
        }
        reuse(&mut self.services, &old.services);
        reuse(&mut self.slices, &old.slices);
        self
    }
}

fn reuse<T: PartialEq>(new: &mut [(ObjectKey, Arc<T>)], old: &[(ObjectKey, Arc<T>)]) {
    for (key, object) in new {
        if let Some((_, o)) = old.iter().find(|(k, o)| k == key && **o == **object) {
            *object = o.clone();
        }
    }
}

/// What identifies a version of a file cheaply: a periodic rescan reads only files whose
/// stamp changed. (A file named by a watch event is always read: mtime granularity is coarse
/// enough that two quick same-size writes can share a stamp.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode: meta.ino(),
        }
    }
}

#[derive(Debug, Default)]
struct FileState {
    /// The stamp and a hash of the bytes last read; `None` until read successfully, so a file
    /// that could not be read is read again.
    read: Option<(Stamp, u64)>,
    objects: FileObjects,
    /// Set while the current content is broken; `objects` are then the previous good ones.
    error: Option<String>,
    /// Problems that did not stop the file from loading (unknown kinds, duplicates).
    warnings: Vec<String>,
}

/// The folder's files and the objects each holds.
#[derive(Debug)]
pub(crate) struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

impl DirSource {
    pub(crate) fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    /// Lists the folder again and reads every file that is new or whose stamp changed;
    /// returns whether any file's objects or errors changed. Linear in the number of files.
    ///
    /// An unreadable folder is an error, and the objects already loaded stay in force.
    pub(crate) fn rescan(&mut self) -> std::io::Result<bool> {
        let mut found = Vec::new();
        collect_manifests(&self.dir, &mut found)?;
        let found: BTreeMap<PathBuf, Stamp> = found.into_iter().collect();
        let before = self.files.len();
        self.files.retain(|path, _| found.contains_key(path));
        let mut changed = self.files.len() != before;
        for (path, stamp) in found {
            let unchanged = self
                .files
                .get(&path)
                .and_then(|f| f.read)
                .is_some_and(|(s, _)| s == stamp);
            if !unchanged {
                changed |= self.read_file(path);
            }
        }
        Ok(changed)
    }

    /// Reads again just the files at `paths` (as named by watch events: created, written,
    /// renamed or removed); returns whether any file's objects or errors changed. Paths that
    /// are not manifests of this folder are ignored; the caller rescans the whole folder for
    /// events about folders.
    pub(crate) fn reload<'p>(&mut self, paths: impl IntoIterator<Item = &'p Path>) -> bool {
        let mut changed = false;
        for path in paths {
            if !self.is_manifest_path(path) {
                continue;
            }
            match std::fs::metadata(path) {
                Ok(meta) if meta.is_file() => changed |= self.read_file(path.to_path_buf()),
                Ok(_) => {}
                Err(_) => changed |= self.files.remove(path).is_some(),
            }
        }
        changed
    }

    /// Whether `path` is a visible folder under this source's, or was one (files are known
    /// under it): an event about it may stand for files that came or went.
    pub(crate) fn is_folder(&self, path: &Path) -> bool {
        if !self.is_visible(path) {
            return false;
        }
        path.is_dir()
            || self
                .files
                .range(path.to_path_buf()..)
                .next()
                .is_some_and(|(f, _)| f.as_path() != path && f.starts_with(path))
    }

    /// Whether `path` is a manifest this source reads: under the folder, no hidden part,
    /// a `.yaml` / `.yml` name.
    pub(crate) fn is_manifest_path(&self, path: &Path) -> bool {
        self.is_visible(path) && is_manifest_name(path)
    }

    /// Under the folder, with no hidden part (editors' swap files, ConfigMap `..data`).
    fn is_visible(&self, path: &Path) -> bool {
        path.strip_prefix(&self.dir).is_ok_and(|rel| {
            rel.components()
                .all(|c| !c.as_os_str().to_string_lossy().starts_with('.'))
        })
    }

    /// Reads and parses one file; returns whether its objects or errors changed.
    fn read_file(&mut self, path: PathBuf) -> bool {
        let read =
            std::fs::metadata(&path).and_then(|meta| Ok((Stamp::of(&meta), std::fs::read(&path)?)));
        let (stamp, content) = match read {
            Ok(r) => r,
            // Deleted between the listing and the read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return self.files.remove(&path).is_some();
            }
            Err(e) => {
                let state = self.files.entry(path).or_default();
                let msg = format!("cannot read file: {e}");
                if state.error.as_deref() == Some(msg.as_str()) {
                    return false;
                }
                state.error = Some(msg);
                state.read = None;
                return true;
            }
        };
        let hash = content_hash(&content);
        let display = self.display_path(&path);
        let state = self.files.entry(path).or_default();
        if state.read.is_some_and(|(_, h)| h == hash) {
            state.read = Some((stamp, hash));
            return false;
        }
        match parse_file(&display, &content) {
            Ok((objects, warnings)) => {
                state.objects = objects.reusing(&state.objects);
                state.error = None;
                state.warnings = warnings;
            }
            Err(e) => state.error = Some(e),
        }
        state.read = Some((stamp, hash));
        true
    }

    fn display_path(&self, path: &Path) -> String {
        path.strip_prefix(&self.dir)
            .map(|p| self.dir.join(p))
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string()
    }

    /// Problems per file, for `/state` and logs; files without problems are left out.
    pub(crate) fn reports(&self) -> Vec<FileReport> {
        let mut out: Vec<FileReport> = self
            .files
            .iter()
            .filter(|(_, s)| s.error.is_some() || !s.warnings.is_empty())
            .map(|(p, s)| FileReport {
                path: self.display_path(p),
                error: s.error.clone(),
                warnings: s.warnings.clone(),
            })
            .collect();
        out.extend(self.duplicate_reports());
        out
    }

    /// The same object in two files: the first file (in path order) wins, the other is named.
    fn duplicate_reports(&self) -> Vec<FileReport> {
        let mut seen: BTreeMap<(&'static str, &ObjectKey), &Path> = BTreeMap::new();
        let mut out = Vec::new();
        for (path, state) in &self.files {
            let keys = state
                .objects
                .policies
                .iter()
                .map(|p| ("TrafficPolicy", &p.key))
                .chain(state.objects.services.iter().map(|(k, _)| ("Service", k)))
                .chain(
                    state
                        .objects
                        .slices
                        .iter()
                        .map(|(k, _)| ("EndpointSlice", k)),
                );
            for (kind, key) in keys {
                if let Some(first) = seen.get(&(kind, key)) {
                    out.push(FileReport {
                        path: self.display_path(path),
                        error: None,
                        warnings: vec![format!(
                            "{kind} {key} is also defined in {}; that definition is used and this one is ignored",
                            self.display_path(first)
                        )],
                    });
                } else {
                    seen.insert((kind, key), path);
                }
            }
        }
        out
    }

    /// Every object currently in force, for the routing computation.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let mut policies: BTreeMap<ObjectKey, Arc<PolicyInput>> = BTreeMap::new();
        let mut services = BTreeMap::new();
        let mut slices = BTreeMap::new();
        for state in self.files.values() {
            for p in &state.objects.policies {
                policies.entry(p.key.clone()).or_insert_with(|| p.clone());
            }
            for (k, s) in &state.objects.services {
                services.entry(k.clone()).or_insert_with(|| s.clone());
            }
            for (k, s) in &state.objects.slices {
                slices.entry(k.clone()).or_insert_with(|| s.clone());
            }
        }
        // Local mode has no creation timestamps: namespace/name order decides host conflicts.
        Snapshot {
            policies: policies.into_values().collect(),
            services,
            slices,
        }
    }
}

/// A hash of a file's bytes, to skip parsing a file whose content did not change.
fn content_hash(content: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    content.hash(&mut h);
    h.finish()
}

fn is_manifest_name(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

fn collect_manifests(dir: &Path, out: &mut Vec<(PathBuf, Stamp)>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follow symlinks (ConfigMap volumes are made of them).
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            collect_manifests(&path, out)?;
        } else if is_manifest_name(&path) {
            out.push((path, Stamp::of(&meta)));
        }
    }
    Ok(())
}

/// Parses one file's documents. An `Err` means the whole file is unusable (syntax error, or
/// a Service / EndpointSlice that is not one), so its previous objects stay in force.
fn parse_file(path: &str, content: &[u8]) -> Result<(FileObjects, Vec<String>), String> {
    use serde::Deserialize;
    let text = std::str::from_utf8(content).map_err(|e| format!("{path}: not UTF-8: {e}"))?;
    let mut objects = FileObjects::default();
    let mut warnings = Vec::new();
    for (i, doc) in yaml_serde::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let value = yaml_serde::Value::deserialize(doc)
            .map_err(|e| format!("{path}: document {n}: invalid YAML: {e}"))?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let api_version = value
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or("");
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("");
        let namespace = value
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(|n| n.as_str())
            .unwrap_or("default");
        let what = format!("{path}: document {n} ({kind} {namespace}/{name})");
        if name.is_empty() && !kind.is_empty() {
            return Err(format!("{what}: metadata.name is missing"));
        }
        let key = ObjectKey::new(namespace, name);
        match (kind, api_version) {
            ("TrafficPolicy", "weir.dev/v1alpha1") => {
                let generation = value
                    .get("metadata")
                    .and_then(|m| m.get("generation"))
                    .and_then(|g| g.as_i64());
                let spec = yaml_serde::from_value::<TrafficPolicy>(value)
                    .map(|tp| tp.spec)
                    .map_err(|e| format!("{path}: not a valid TrafficPolicy: {e}"));
                objects.policies.push(Arc::new(PolicyInput {
                    key,
                    source: path.to_string(),
                    generation,
                    spec,
                }));
            }
            ("Service", "v1") => {
                let svc = yaml_serde::from_value::<Service>(value)
                    .map_err(|e| format!("{what}: not a valid Service: {e}"))?;
                objects.services.push((key, Arc::new(svc)));
            }
            ("EndpointSlice", "discovery.k8s.io/v1") => {
                let slice = yaml_serde::from_value::<EndpointSlice>(value)
                    .map_err(|e| format!("{what}: not a valid EndpointSlice: {e}"))?;
                objects.slices.push((key, Arc::new(slice)));
            }
            ("", _) => return Err(format!("{what}: `kind` is missing")),
            _ => warnings.push(format!(
                "{what}: {api_version} {kind} is not read by weir; ignored"
            )),
        }
    }
    Ok((objects, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("write test file");
    }

    const SVC: &str =
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80}]\n";
    const TP: &str = "apiVersion: weir.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web}\nspec:\n  hosts: [web]\n  rules: [{backendRefs: [{name: web, port: 80}]}]\n";

    #[test]
    fn reads_several_documents_across_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a.yaml", &format!("{SVC}---\n{TP}"));
        write(dir.path(), "notes.txt", "not yaml: [");
        let mut src = DirSource::new(dir.path());
        assert!(src.rescan().expect("rescan"));
        let snap = src.snapshot();
        assert_eq!(snap.policies.len(), 1);
        assert_eq!(snap.services.len(), 1);
        assert!(src.reports().is_empty());
        assert!(!src.rescan().expect("rescan"), "nothing changed");
    }

    #[test]
    fn broken_file_keeps_its_previous_objects_and_reports_the_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "svc.yaml", SVC);
        let mut src = DirSource::new(dir.path());
        src.rescan().expect("rescan");
        write(
            dir.path(),
            "svc.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web\n",
        );
        assert!(src.rescan().expect("rescan"));
        assert_eq!(src.snapshot().services.len(), 1, "last good Service kept");
        let reports = src.reports();
        assert_eq!(reports.len(), 1);
        let err = reports[0].error.as_deref().unwrap_or_default();
        assert!(
            err.contains("svc.yaml") && err.contains("invalid YAML"),
            "{err}"
        );
    }

    #[test]
    fn invalid_policy_document_is_passed_on_as_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "tp.yaml",
            "apiVersion: weir.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web}\nspec: {hosts: 3}\n",
        );
        let mut src = DirSource::new(dir.path());
        src.rescan().expect("rescan");
        let snap = src.snapshot();
        let err = snap.policies[0].spec.as_ref().expect_err("invalid spec");
        assert!(err.contains("tp.yaml"), "{err}");
    }

    #[test]
    fn deleted_file_removes_its_objects() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "svc.yaml", SVC);
        let mut src = DirSource::new(dir.path());
        src.rescan().expect("rescan");
        std::fs::remove_file(dir.path().join("svc.yaml")).expect("remove");
        assert!(src.rescan().expect("rescan"));
        assert!(src.snapshot().services.is_empty());
    }

    #[test]
    fn duplicate_object_is_reported_and_first_file_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a.yaml", SVC);
        write(dir.path(), "b.yaml", SVC);
        let mut src = DirSource::new(dir.path());
        src.rescan().expect("rescan");
        let reports = src.reports();
        assert_eq!(reports.len(), 1);
        assert!(reports[0].path.ends_with("b.yaml"));
        assert!(reports[0].warnings[0].contains("a.yaml"));
    }

    #[test]
    fn reload_reads_only_the_named_files_and_ignores_hidden_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a.yaml", SVC);
        let mut src = DirSource::new(dir.path());
        src.rescan().expect("rescan");
        // A temp file written before a rename is hidden: no change.
        write(dir.path(), ".a.yaml.tmp", TP);
        assert!(!src.reload([dir.path().join(".a.yaml.tmp").as_path()]));
        write(dir.path(), "b.yaml", TP);
        write(
            dir.path(),
            "c.yaml",
            TP.replace("name: web", "name: other").as_str(),
        );
        assert!(src.reload([dir.path().join("b.yaml").as_path()]));
        let snap = src.snapshot();
        assert_eq!(
            snap.policies.len(),
            1,
            "c.yaml was not named, so not read yet"
        );
        // Removing a file named by an event drops its objects.
        std::fs::remove_file(dir.path().join("b.yaml")).expect("remove");
        assert!(src.reload([dir.path().join("b.yaml").as_path()]));
        assert!(src.snapshot().policies.is_empty());
        assert!(src.rescan().expect("rescan"), "the rescan finds c.yaml");
        assert_eq!(src.snapshot().policies.len(), 1);
        assert!(src.is_folder(dir.path()));
        assert!(!src.is_folder(&dir.path().join("a.yaml")));
    }

    #[test]
    fn an_unchanged_object_keeps_its_pointer_when_its_file_is_parsed_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a.yaml", &format!("{SVC}---\n{TP}"));
        let mut src = DirSource::new(dir.path());
        src.rescan().expect("rescan");
        let before = src.snapshot();
        write(
            dir.path(),
            "a.yaml",
            &format!("{SVC}---\n{}", TP.replace("[web]", "[web2]")),
        );
        assert!(src.reload([dir.path().join("a.yaml").as_path()]));
        let after = src.snapshot();
        let key = ObjectKey::new("default", "web");
        assert!(Arc::ptr_eq(&before.services[&key], &after.services[&key]));
        assert!(!Arc::ptr_eq(&before.policies[0], &after.policies[0]));
    }
}
