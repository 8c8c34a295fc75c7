//! The file source: a directory of Kubernetes-format YAML, watched for changes.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory is read (hidden files
//! and editor backups are not); a file may hold several documents separated by `---`. The
//! kinds are `v1 Service`, `discovery.k8s.io/v1 EndpointSlice` and `mycel.dev/v1alpha1
//! Workload`.
//!
//! The unit of acceptance is the file: when any document of a changed file is invalid, the
//! problems are reported once and the objects the file had before stay as they were, until
//! the file is fixed. Each batch of filesystem events yields the net difference per object,
//! so an object moved to another file is one upsert, and rewriting a file with the same bytes
//! yields nothing. An object defined in two files is taken from the one seen first.
//!
//! The watcher's events are handled on a thread of their own (file reads block), which sends
//! [`SourceEvent`]s to a Tokio channel. Dropping the [`FileSource`] stops the watcher, which
//! ends the thread and closes the channel.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io, mem,
    path::{Path, PathBuf},
    sync::mpsc as std_mpsc,
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use serde::{Deserialize, de::DeserializeOwned};
use serde_yaml_ng::Value;
use tokio::sync::mpsc;

use super::{
    Error, Location, SourceEvent,
    translate::{self, WORKLOAD_API_VERSION, WORKLOAD_KIND},
};
use crate::state::{Kind, Origin, Resource, ResourceKey, Update};

/// How long to collect filesystem events after the first of a burst: editors and atomic
/// renames produce several events for one save.
const COALESCE: Duration = Duration::from_millis(10);
/// Events the agent has not taken yet before the source waits for it.
const CHANNEL_CAPACITY: usize = 64;

/// Watches a directory of YAML files and sends their objects as [`SourceEvent`]s.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    /// Dropping the watcher stops its thread, which drops the sender our thread reads from.
    _watcher: RecommendedWatcher,
}

impl FileSource {
    /// Reads every file once and starts watching. The first events on the channel are the
    /// errors of files that failed, then exactly one `Update { full: true, .. }` with
    /// everything valid; after that, one `Update { full: false, .. }` per batch of changes
    /// that changed something, and the errors of changed files.
    ///
    /// Fails if `dir` does not exist, is not a directory, or cannot be watched.
    pub fn start(dir: PathBuf) -> Result<(FileSource, mpsc::Receiver<SourceEvent>), Error> {
        match fs::metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(Error::NotADirectory(dir)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Error::NoDirectory(dir)),
            Err(source) => return Err(Error::Read { path: dir, source }),
        }
        // Events name paths under the watched path as given; a canonical one makes them, and
        // the origins in messages, unambiguous.
        let dir = fs::canonicalize(&dir).map_err(|source| Error::Read {
            path: dir.clone(),
            source,
        })?;

        let (events_tx, events) = std_mpsc::channel();
        let watch_error = |source| Error::Watch {
            path: dir.clone(),
            source,
        };
        let mut watcher = notify::recommended_watcher(events_tx).map_err(watch_error)?;
        // Watch before the first read, so that no change falls between the two.
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(watch_error)?;

        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let worker = Worker {
            files: Files::new(dir.clone()),
            events,
            tx,
        };
        thread::Builder::new()
            .name("mycel-files".to_owned())
            .spawn(move || worker.run())
            .map_err(Error::Thread)?;
        Ok((
            FileSource {
                dir,
                _watcher: watcher,
            },
            rx,
        ))
    }

    /// The directory watched (canonical).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The thread that turns filesystem events into [`SourceEvent`]s.
struct Worker {
    files: Files,
    events: std_mpsc::Receiver<notify::Result<notify::Event>>,
    tx: mpsc::Sender<SourceEvent>,
}

/// Filesystem events collected over one coalescing window.
#[derive(Default)]
struct Batch {
    paths: BTreeSet<PathBuf>,
    rescan: bool,
    errors: Vec<Error>,
}

impl Worker {
    fn run(mut self) {
        let seen = Instant::now();
        let mut errors = Vec::new();
        let paths = match self.files.scan() {
            Ok(paths) => paths,
            Err(e) => {
                errors.push(e);
                BTreeSet::new()
            }
        };
        let changes = self.files.refresh(paths);
        errors.extend(changes.errors);
        let full = Update {
            seen,
            full: true,
            upserts: self.files.all(),
            deletes: Vec::new(),
        };
        if !self.send_all(errors) || !self.send(SourceEvent::Update(full)) {
            return;
        }

        // Ends when the watcher is dropped (its sender goes) or the receiver is.
        while let Ok(first) = self.events.recv() {
            let seen = Instant::now();
            let mut batch = Batch::default();
            self.collect(first, &mut batch);
            let deadline = seen + COALESCE;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match self.events.recv_timeout(left) {
                    Ok(event) => self.collect(event, &mut batch),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => break,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }

            let mut errors = batch.errors;
            let mut paths = batch.paths;
            if batch.rescan {
                match self.files.scan() {
                    Ok(present) => {
                        paths.extend(present);
                        paths.extend(self.files.known());
                    }
                    Err(e) => errors.push(e),
                }
            }
            let changes = self.files.refresh(paths);
            errors.extend(changes.errors);
            if !self.send_all(errors) {
                return;
            }
            if !changes.upserts.is_empty() || !changes.deletes.is_empty() {
                let update = Update {
                    seen,
                    full: false,
                    upserts: changes.upserts,
                    deletes: changes.deletes,
                };
                if !self.send(SourceEvent::Update(update)) {
                    return;
                }
            }
        }
    }

    /// Notes which files an event concerns.
    fn collect(&self, event: notify::Result<notify::Event>, batch: &mut Batch) {
        let event = match event {
            Ok(event) => event,
            Err(source) => {
                // Events may have been lost: read everything again.
                batch.rescan = true;
                batch.errors.push(Error::Watch {
                    path: self.files.dir.clone(),
                    source,
                });
                return;
            }
        };
        if event.need_rescan() {
            batch.rescan = true;
        }
        for path in event.paths {
            if path == self.files.dir {
                batch.rescan = true;
                continue;
            }
            if path.parent() != Some(self.files.dir.as_path()) {
                continue;
            }
            let Some(name) = path.file_name() else {
                continue;
            };
            let name = name.to_string_lossy();
            if name.starts_with("..") {
                // A Kubernetes ConfigMap volume swaps a `..data` symlink; the visible files
                // are symlinks through it and see no event of their own.
                batch.rescan = true;
            } else if is_config_file(&name) {
                batch.paths.insert(path);
            }
        }
    }

    fn send(&self, event: SourceEvent) -> bool {
        self.tx.blocking_send(event).is_ok()
    }

    fn send_all(&self, errors: Vec<Error>) -> bool {
        errors
            .into_iter()
            .all(|e| self.send(SourceEvent::Error(e)))
    }
}

/// Whether a file name is one the source reads: `*.yaml`, `*.yml` or `*.json`, not hidden,
/// not an editor's backup or lock file.
fn is_config_file(name: &str) -> bool {
    if name.starts_with('.') || name.starts_with('#') || name.ends_with('~') {
        return false;
    }
    let Some((_, extension)) = name.rsplit_once('.') else {
        return false;
    };
    ["yaml", "yml", "json"]
        .iter()
        .any(|e| extension.eq_ignore_ascii_case(e))
}

/// What a file last held.
struct FileEntry {
    /// The bytes last read, accepted or not: the same bytes again are not parsed again.
    content: Vec<u8>,
    /// The objects last accepted, with the (1-based) document each came from.
    objects: BTreeMap<ResourceKey, (usize, Resource)>,
}

/// The files of the directory and the objects accepted from them.
struct Files {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    /// For each object, the files that define it, in the order they were accepted: the
    /// first one's definition is the one in effect.
    defs: BTreeMap<ResourceKey, Vec<PathBuf>>,
}

/// The net result of re-reading some files.
#[derive(Default)]
struct Changes {
    errors: Vec<Error>,
    upserts: Vec<Resource>,
    deletes: Vec<ResourceKey>,
}

impl Files {
    fn new(dir: PathBuf) -> Self {
        Files {
            dir,
            files: BTreeMap::new(),
            defs: BTreeMap::new(),
        }
    }

    /// The config files now in the directory.
    fn scan(&self) -> Result<BTreeSet<PathBuf>, Error> {
        let read_error = |source| Error::Read {
            path: self.dir.clone(),
            source,
        };
        let mut paths = BTreeSet::new();
        for entry in fs::read_dir(&self.dir).map_err(read_error)? {
            let entry = entry.map_err(read_error)?;
            if is_config_file(&entry.file_name().to_string_lossy()) {
                paths.insert(entry.path());
            }
        }
        Ok(paths)
    }

    /// The files read so far.
    fn known(&self) -> impl Iterator<Item = PathBuf> + '_ {
        self.files.keys().cloned()
    }

    /// Every object in effect.
    fn all(&self) -> Vec<Resource> {
        self.defs
            .keys()
            .filter_map(|key| self.effective(key).cloned())
            .collect()
    }

    fn effective(&self, key: &ResourceKey) -> Option<&Resource> {
        let path = self.defs.get(key)?.first()?;
        self.files
            .get(path)?
            .objects
            .get(key)
            .map(|(_, resource)| resource)
    }

    /// Reads `paths` again (in name order: between two new files, the first name wins an
    /// object both define) and returns the net difference of the objects in effect.
    fn refresh(&mut self, paths: BTreeSet<PathBuf>) -> Changes {
        let mut changes = Changes::default();

        // Read and parse; nothing changes yet.
        type Parsed = Option<(Vec<u8>, BTreeMap<ResourceKey, (usize, Resource)>)>;
        let mut outcomes: Vec<(PathBuf, Parsed)> = Vec::new();
        for path in paths {
            let bytes = match read(&path) {
                Ok(Some(bytes)) => bytes,
                Ok(None) => {
                    if self.files.contains_key(&path) {
                        outcomes.push((path, None));
                    }
                    continue;
                }
                Err(source) => {
                    changes.errors.push(Error::Read { path, source });
                    continue;
                }
            };
            if self.files.get(&path).is_some_and(|f| f.content == bytes) {
                continue;
            }
            let origin = Origin::from(path.display().to_string());
            match parse(&origin, &bytes) {
                Ok(objects) => outcomes.push((path, Some((bytes, objects)))),
                Err(errors) => {
                    changes.errors.extend(errors);
                    // Keep what was accepted; remember the bytes so they are not reported again.
                    self.files
                        .entry(path)
                        .or_insert_with(|| FileEntry {
                            content: Vec::new(),
                            objects: BTreeMap::new(),
                        })
                        .content = bytes;
                }
            }
        }

        // The objects in effect before, for every object the accepted files had or have.
        let mut before: BTreeMap<ResourceKey, Option<Resource>> = BTreeMap::new();
        for (path, parsed) in &outcomes {
            let old = self.files.get(path).map(|f| f.objects.keys());
            let new = parsed.as_ref().map(|(_, objects)| objects.keys());
            for key in old.into_iter().flatten().chain(new.into_iter().flatten()) {
                if !before.contains_key(key) {
                    before.insert(key.clone(), self.effective(key).cloned());
                }
            }
        }

        for (path, parsed) in outcomes {
            let old = match parsed {
                None => self.files.remove(&path).map(|f| f.objects).unwrap_or_default(),
                Some((content, objects)) => {
                    let entry = self.files.entry(path.clone()).or_insert_with(|| FileEntry {
                        content: Vec::new(),
                        objects: BTreeMap::new(),
                    });
                    entry.content = content;
                    mem::replace(&mut entry.objects, objects)
                }
            };
            for key in old.keys() {
                let kept = self
                    .files
                    .get(&path)
                    .is_some_and(|f| f.objects.contains_key(key));
                if !kept && let Some(defs) = self.defs.get_mut(key) {
                    defs.retain(|p| p != &path);
                    if defs.is_empty() {
                        self.defs.remove(key);
                    }
                }
            }
            let Some(entry) = self.files.get(&path) else {
                continue;
            };
            for (key, (document, resource)) in &entry.objects {
                let defs = self.defs.entry(key.clone()).or_default();
                if !old.contains_key(key) {
                    defs.push(path.clone());
                }
                if let Some(owner) = defs.first().filter(|owner| **owner != path) {
                    changes.errors.push(Error::Duplicate {
                        location: Location {
                            origin: resource.meta().origin.clone(),
                            document: Some(*document),
                            line: None,
                        },
                        key: key.clone(),
                        owner: Origin::from(owner.display().to_string()),
                    });
                }
            }
        }

        for (key, before) in before {
            match (before, self.effective(&key)) {
                (Some(before), Some(after)) if before == *after => {}
                (_, Some(after)) => changes.upserts.push(after.clone()),
                (Some(_), None) => changes.deletes.push(key),
                (None, None) => {}
            }
        }
        changes
    }
}

/// A file's bytes; `None` when it is gone (or is not a file).
fn read(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::IsADirectory) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Parses and translates every document of a file. Any problem rejects the whole file.
fn parse(
    origin: &Origin,
    bytes: &[u8],
) -> Result<BTreeMap<ResourceKey, (usize, Resource)>, Vec<Error>> {
    let mut objects: BTreeMap<ResourceKey, (usize, Resource)> = BTreeMap::new();
    let mut errors = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_slice(bytes).enumerate() {
        let location = Location {
            origin: origin.clone(),
            document: Some(index + 1),
            line: None,
        };
        let value = match Value::deserialize(document) {
            Ok(value) => value,
            Err(e) => {
                errors.push(syntax_error(location, &e));
                // The parser cannot resume after a syntax error (and would repeat it forever).
                break;
            }
        };
        match resource(value, bytes, index, &location) {
            Ok(None) => {}
            Ok(Some(resource)) => {
                let key = resource.key();
                if let Some((first, _)) = objects.get(&key) {
                    errors.push(Error::DuplicateInFile {
                        location,
                        key,
                        first: *first,
                    });
                } else {
                    objects.insert(key, (index + 1, resource));
                }
            }
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(errors)
    }
}

fn syntax_error(mut location: Location, error: &serde_yaml_ng::Error) -> Error {
    let mut message = error.to_string();
    if let Some(at) = error.location() {
        location.line = Some((at.line(), at.column()));
        // The location is in `location`; don't say it twice.
        message = message.replacen(
            &format!(" at line {} column {}", at.line(), at.column()),
            "",
            1,
        );
    }
    Error::Syntax { location, message }
}

/// One document to a resource; `None` for an empty document.
fn resource(
    value: Value,
    bytes: &[u8],
    index: usize,
    location: &Location,
) -> Result<Option<Resource>, Vec<Error>> {
    let found = match &value {
        Value::Null => return Ok(None),
        Value::Mapping(_) => None,
        Value::Bool(_) => Some("a boolean"),
        Value::Number(_) => Some("a number"),
        Value::String(_) => Some("a string"),
        Value::Sequence(_) => Some("a list"),
        Value::Tagged(_) => Some("a tagged value"),
    };
    if let Some(found) = found {
        return Err(vec![Error::NotAnObject {
            location: location.clone(),
            found,
        }]);
    }
    let api_version = value.get("apiVersion").and_then(scalar);
    let kind = value.get("kind").and_then(scalar);
    let object = value_object_name(&value);
    match (api_version.as_deref(), kind.as_deref()) {
        (Some("v1"), Some("Service")) => {
            let service: core::Service =
                decode(value, bytes, index, location, Kind::Service, object)?;
            translate::service(&service, location).map(|s| Some(Resource::Service(s)))
        }
        (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => {
            let slice: discovery::EndpointSlice =
                decode(value, bytes, index, location, Kind::EndpointSlice, object)?;
            translate::endpoint_slice(&slice, location).map(|s| Some(Resource::EndpointSlice(s)))
        }
        (Some(WORKLOAD_API_VERSION), Some(WORKLOAD_KIND)) => {
            let workload: translate::Workload =
                decode(value, bytes, index, location, Kind::Workload, object)?;
            translate::workload(&workload, location).map(|w| Some(Resource::Workload(w)))
        }
        _ => Err(vec![Error::UnknownKind {
            location: location.clone(),
            api_version,
            kind,
        }]),
    }
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `namespace/name` from a document that may not decode, for messages.
fn value_object_name(value: &Value) -> String {
    let field = |name| {
        value
            .get("metadata")
            .and_then(|m| m.get(name))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    match field("name") {
        Some(name) => format!(
            "{}/{name}",
            field("namespace").unwrap_or(translate::DEFAULT_NAMESPACE)
        ),
        None => "(unnamed)".to_owned(),
    }
}

/// Deserializes a document into its type; a failure names the field's path and line.
fn decode<T: DeserializeOwned>(
    value: Value,
    bytes: &[u8],
    index: usize,
    location: &Location,
    kind: Kind,
    object: String,
) -> Result<T, Vec<Error>> {
    let error = match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(decoded) => return Ok(decoded),
        Err(error) => error,
    };
    // A parsed value has no positions: parse the document again, from the text, to find the
    // line. This happens only for documents that fail.
    let line = serde_yaml_ng::Deserializer::from_slice(bytes)
        .nth(index)
        .and_then(|document| serde_path_to_error::deserialize::<_, T>(document).err())
        .and_then(|e| e.inner().location())
        .map(|at| (at.line(), at.column()));
    Err(vec![Error::Decode {
        location: Location {
            line,
            ..location.clone()
        },
        kind,
        object,
        field: error.path().to_string(),
        message: error.inner().to_string(),
    }])
}
