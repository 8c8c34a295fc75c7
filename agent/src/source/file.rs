//! The file source: a directory of Kubernetes-format YAML, watched for changes.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory is read (hidden files
//! and editor backups are not); a file may hold several documents separated by `---`. The
//! kinds are `v1 Service`, `discovery.k8s.io/v1 EndpointSlice`, `mycel.dev/v1alpha1
//! Workload` and `mycel.dev/v1alpha1 AuthorizationPolicy`.
//!
//! The unit of acceptance is the file: when any document of a changed file is invalid, the
//! problems are reported once and the objects the file had before stay as they were, until
//! the file is fixed. The last accepted version of every file is also saved (see
//! [`FileSource::start`]), so that this holds across restarts: an agent that starts with a
//! broken file takes that file's objects from its saved last good version, reports the
//! file as rejected, and uses the file itself once it is fixed. A file removed from the
//! directory (while the agent runs or not) loses its saved version too.
//! Each batch of filesystem events yields the net difference per object,
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
use notify::{
    EventKind, RecommendedWatcher, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode, ModifyKind},
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_yaml_ng::Value;
use tokio::sync::mpsc;

use super::{
    Error, Location, SourceEvent,
    saved::Saved,
    translate::{self, POLICY_API_VERSION, POLICY_KIND, WORKLOAD_API_VERSION, WORKLOAD_KIND},
};
use crate::state::{Kind, Origin, Resource, ResourceKey, Update};

/// A burst of filesystem events (editors and atomic renames produce several for one save)
/// is over when no event came for this long...
const QUIET: Duration = Duration::from_millis(2);
/// ...or at the latest this long after its first event, so a constant stream of writes
/// still gets applied.
const COALESCE_MAX: Duration = Duration::from_millis(50);
/// How long a batch waits at most for a writer to close a file it wrote to.
const WRITE_LIMIT: Duration = Duration::from_secs(1);
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
    /// `saved`: where the last accepted version of each file is kept (created if missing);
    /// `None` keeps nothing, so a file broken at start-up has no objects.
    ///
    /// Fails if `dir` does not exist, is not a directory, or cannot be watched.
    pub fn start(
        dir: PathBuf,
        saved: Option<PathBuf>,
    ) -> Result<(FileSource, mpsc::Receiver<SourceEvent>), Error> {
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
        let mut files = Files::new(dir.clone());
        if let Some(saved) = saved {
            let store = Saved::open(saved.clone()).map_err(|source| Error::Read {
                path: saved,
                source,
            })?;
            files.saved = Some(store);
        }
        let worker = Worker { files, events, tx };
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
    /// Files to read again.
    paths: BTreeSet<PathBuf>,
    /// Files a writer has open: written to, not closed yet. Reading them now could see half
    /// a file (`>` and `cp` truncate first), so the batch waits for them to close.
    writing: BTreeSet<PathBuf>,
    /// Read the whole directory again.
    rescan: bool,
    errors: Vec<Error>,
}

impl Worker {
    fn run(mut self) {
        let seen = Instant::now();
        let mut errors = Vec::new();
        let paths = match self.files.scan() {
            Ok(paths) => {
                // Files removed while no agent ran were removed on purpose.
                self.files.forget_saved_except(&paths);
                paths
            }
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
        let mut rejected = self.files.rejected();
        if rejected > 0 && !self.send(SourceEvent::Rejected(rejected)) {
            return;
        }

        // Ends when the watcher is dropped (its sender goes) or the receiver is.
        while let Ok(first) = self.events.recv() {
            let seen = Instant::now();
            let mut batch = Batch::default();
            if !self.collect(first, &mut batch) {
                continue;
            }
            loop {
                let until = if batch.writing.is_empty() {
                    (Instant::now() + QUIET).min(seen + COALESCE_MAX)
                } else {
                    seen + WRITE_LIMIT
                };
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match self.events.recv_timeout(left) {
                    Ok(event) => {
                        self.collect(event, &mut batch);
                    }
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
            let files = paths.len();
            let changes = self.files.refresh(paths);
            tracing::debug!(
                files,
                upserts = changes.upserts.len(),
                deletes = changes.deletes.len(),
                errors = errors.len() + changes.errors.len(),
                "file source read changed files"
            );
            errors.extend(changes.errors);
            if !self.send_all(errors) {
                return;
            }
            if self.files.rejected() != rejected {
                rejected = self.files.rejected();
                if !self.send(SourceEvent::Rejected(rejected)) {
                    return;
                }
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

    /// Notes which files an event concerns; false if it concerns none.
    fn collect(&self, event: notify::Result<notify::Event>, batch: &mut Batch) -> bool {
        let event = match event {
            Ok(event) => event,
            Err(source) => {
                // Events may have been lost: read everything again.
                batch.rescan = true;
                batch.errors.push(Error::Watch {
                    path: self.files.dir.clone(),
                    source,
                });
                return true;
            }
        };
        if event.need_rescan() {
            batch.rescan = true;
            return true;
        }
        // Whether the event says a writer has the file open (true), is done with it (false),
        // or neither (None).
        let writing = match event.kind {
            EventKind::Create(_) | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
                Some(true)
            }
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Name(_)) => Some(false),
            // Opening and reading, including our own reads: ignoring them keeps a read from
            // causing another. Metadata (permissions, times) does not change the contents.
            EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_)) => return false,
            EventKind::Any | EventKind::Modify(ModifyKind::Other) | EventKind::Other => None,
        };
        let mut noted = false;
        for path in event.paths {
            if path == self.files.dir {
                batch.rescan = true;
                noted = true;
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
                noted = true;
            } else if is_config_file(&name) {
                match writing {
                    Some(true) => batch.writing.insert(path.clone()),
                    Some(false) => batch.writing.remove(&path),
                    None => false,
                };
                batch.paths.insert(path);
                noted = true;
            }
        }
        noted
    }

    fn send(&self, event: SourceEvent) -> bool {
        self.tx.blocking_send(event).is_ok()
    }

    fn send_all(&self, errors: Vec<Error>) -> bool {
        errors.into_iter().all(|e| self.send(SourceEvent::Error(e)))
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
    /// The bytes last read were rejected: `objects` are from an earlier version.
    rejected: bool,
}

/// The files of the directory and the objects accepted from them.
struct Files {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    /// For each object, the files that define it, in the order they were accepted: the
    /// first one's definition is the one in effect.
    defs: BTreeMap<ResourceKey, Vec<PathBuf>>,
    /// Where the last accepted version of each file is saved, under the file's name.
    saved: Option<Saved>,
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
            saved: None,
        }
    }

    /// The name `path`'s last good version is saved under.
    fn saved_name(path: &Path) -> Option<String> {
        path.file_name()?.to_str().map(str::to_owned)
    }

    /// Saves `content` as `path`'s last good version.
    fn save(&self, path: &Path, content: &[u8]) {
        if let (Some(saved), Some(name)) = (&self.saved, Self::saved_name(path)) {
            saved.save(&name, content);
        }
    }

    /// Forgets `path`'s last good version (the file was removed).
    fn forget_saved(&self, path: &Path) {
        if let (Some(saved), Some(name)) = (&self.saved, Self::saved_name(path)) {
            saved.forget(&name);
        }
    }

    /// Forgets the saved versions of files that are not among `present`.
    fn forget_saved_except(&self, present: &BTreeSet<PathBuf>) {
        let Some(saved) = &self.saved else { return };
        for name in saved.names() {
            if is_config_file(&name) && !present.contains(&self.dir.join(&name)) {
                saved.forget(&name);
            }
        }
    }

    /// The objects of `path`'s saved last good version, if there is one and it is valid.
    fn saved_objects(&self, path: &Path) -> Option<Objects> {
        let bytes = self.saved.as_ref()?.load(&Self::saved_name(path)?)?;
        // Parsed as the file itself, so objects and messages name the file.
        let parsed = parse_files(&[(path.to_path_buf(), Some(bytes))]);
        parsed.into_iter().next()?.ok()
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
    /// Files whose current contents are rejected (their last good objects stay in force).
    fn rejected(&self) -> usize {
        self.files.values().filter(|f| f.rejected).count()
    }

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

        // Read, then parse; nothing changes yet. An outcome's flag: its objects are a saved
        // last good version, standing in for a rejected file.
        type Parsed = Option<(Vec<u8>, Objects, bool)>;
        let mut read_files: Vec<(PathBuf, Option<Vec<u8>>)> = Vec::new();
        for path in paths {
            match read(&path) {
                Ok(Some(bytes)) => {
                    if self.files.get(&path).is_none_or(|f| f.content != bytes) {
                        read_files.push((path, Some(bytes)));
                    }
                }
                Ok(None) => {
                    if self.files.contains_key(&path) {
                        read_files.push((path, None));
                    }
                }
                Err(source) => changes.errors.push(Error::Read { path, source }),
            }
        }
        let mut parsed = parse_files(&read_files).into_iter();
        let mut outcomes: Vec<(PathBuf, Parsed)> = Vec::new();
        for (path, bytes) in read_files {
            let Some(bytes) = bytes else {
                outcomes.push((path, None));
                continue;
            };
            match parsed.next().unwrap_or_else(|| Err(Vec::new())) {
                Ok(objects) => outcomes.push((path, Some((bytes, objects, false)))),
                Err(errors) => {
                    changes.errors.extend(errors);
                    // First seen broken (at start-up): its saved last good version stands in.
                    if !self.files.contains_key(&path)
                        && let Some(objects) = self.saved_objects(&path)
                    {
                        tracing::warn!(
                            file = %path.display(),
                            objects = objects.len(),
                            "the file is rejected: keeping its last good version, saved earlier"
                        );
                        outcomes.push((path, Some((bytes, objects, true))));
                        continue;
                    }
                    // Keep what was accepted; remember the bytes so they are not reported again.
                    self.files
                        .entry(path)
                        .and_modify(|f| {
                            f.content.clone_from(&bytes);
                            f.rejected = true;
                        })
                        .or_insert_with(|| FileEntry {
                            content: bytes,
                            objects: BTreeMap::new(),
                            rejected: true,
                        });
                }
            }
        }

        // The objects in effect before, for every object the accepted files had or have.
        let mut before: BTreeMap<ResourceKey, Option<Resource>> = BTreeMap::new();
        for (path, parsed) in &outcomes {
            let old = self.files.get(path).map(|f| f.objects.keys());
            let new = parsed.as_ref().map(|(_, objects, _)| objects.keys());
            for key in old.into_iter().flatten().chain(new.into_iter().flatten()) {
                if !before.contains_key(key) {
                    before.insert(key.clone(), self.effective(key).cloned());
                }
            }
        }

        for (path, parsed) in outcomes {
            let old = match parsed {
                None => {
                    self.forget_saved(&path);
                    self.files
                        .remove(&path)
                        .map(|f| f.objects)
                        .unwrap_or_default()
                }
                Some((content, objects, stand_in)) => {
                    if !stand_in {
                        self.save(&path, &content);
                    }
                    let entry = self.files.entry(path.clone()).or_insert_with(|| FileEntry {
                        content: Vec::new(),
                        objects: BTreeMap::new(),
                        rejected: false,
                    });
                    entry.content = content;
                    entry.rejected = stand_in;
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
                            document: Some(saturate(*document)),
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
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::IsADirectory
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A file's objects, with the document each came from.
type Objects = BTreeMap<ResourceKey, (usize, Resource)>;

/// Parses the files that have contents, in order, spreading them over the CPUs: a cold
/// start may read tens of thousands of objects, and parsing dominates its time.
fn parse_files(files: &[(PathBuf, Option<Vec<u8>>)]) -> Vec<Result<Objects, Vec<Error>>> {
    let work: Vec<(Origin, &[u8])> = files
        .iter()
        .filter_map(|(path, bytes)| {
            let bytes = bytes.as_deref()?;
            Some((Origin::from(path.display().to_string()), bytes))
        })
        .collect();
    let threads = thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .min(work.len());
    if threads <= 1 {
        return work.iter().map(|(o, b)| parse(o, b)).collect();
    }
    let mut results: Vec<_> = (0..work.len()).map(|_| None).collect();
    thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let work = &work;
                scope.spawn(move || {
                    (t..work.len())
                        .step_by(threads)
                        .map(|i| (i, parse(&work[i].0, work[i].1)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            // A parser thread cannot panic on input (the parser returns errors); should one
            // panic anyway, its files stay unparsed and are reported as unreadable below.
            if let Ok(done) = h.join() {
                for (i, r) in done {
                    results[i] = Some(r);
                }
            }
        }
    });
    results
        .into_iter()
        .zip(&work)
        .map(|(r, (origin, _))| {
            r.unwrap_or_else(|| {
                Err(vec![Error::Read {
                    path: PathBuf::from(origin.as_ref()),
                    source: io::Error::other("the parser failed on this file"),
                }])
            })
        })
        .collect()
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
            document: Some(saturate(index + 1)),
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
        location.line = Some((saturate(at.line()), saturate(at.column())));
        // The location is in `location`; don't say it twice.
        message = message.replacen(
            &format!(" at line {} column {}", at.line(), at.column()),
            "",
            1,
        );
    }
    Error::Syntax { location, message }
}

/// A count or position for a message.
fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
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
        (Some("v1"), Some("Namespace")) => {
            let ns: k8s_openapi::api::core::v1::Namespace =
                decode(value, bytes, index, location, Kind::Namespace, object)?;
            translate::namespace_object(&ns, location).map(|n| Some(Resource::Namespace(n)))
        }
        (Some(WORKLOAD_API_VERSION), Some(WORKLOAD_KIND)) => {
            let workload: translate::Workload =
                decode(value, bytes, index, location, Kind::Workload, object)?;
            translate::workload(&workload, location).map(|w| Some(Resource::Workload(w)))
        }
        (Some(POLICY_API_VERSION), Some(POLICY_KIND)) => {
            let policy: translate::AuthorizationPolicy = decode(
                value,
                bytes,
                index,
                location,
                Kind::AuthorizationPolicy,
                object,
            )?;
            translate::authorization_policy(&policy, location)
                .map(|p| Some(Resource::AuthorizationPolicy(p)))
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
        .map(|at| (saturate(at.line()), saturate(at.column())));
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

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, path::Path};

    use tokio::time::timeout;

    use super::*;
    use crate::state::ObjectRef;

    const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports:
  - port: 80
";

    const SLICE: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
ports:
- port: 8080
";

    const WORKLOAD: &str = "\
apiVersion: mycel.dev/v1alpha1
kind: Workload
metadata: {name: web-0}
spec:
  addresses: [10.0.0.1]
  serviceAccount: web
";

    fn key(kind: Kind, name: &str) -> ResourceKey {
        ResourceKey {
            kind,
            id: ObjectRef {
                namespace: "default".to_owned(),
                name: name.to_owned(),
            },
        }
    }

    fn keys(resources: &[Resource]) -> BTreeSet<ResourceKey> {
        resources.iter().map(Resource::key).collect()
    }

    /// The messages of a file that fails to parse.
    fn parse_errors(text: &[u8]) -> Vec<String> {
        parse(&Origin::from("f.yaml"), text)
            .expect_err("the file should fail")
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    // --- Parsing, without a watcher.

    #[test]
    fn multi_document_files_and_empty_documents() {
        let text = format!("---\n# nothing here\n---\n{SERVICE}---\n{SLICE}---\n{WORKLOAD}\n---\n");
        let objects = parse(&Origin::from("f.yaml"), text.as_bytes()).unwrap();
        let documents: Vec<usize> = objects.values().map(|(d, _)| *d).collect();
        assert_eq!(objects.len(), 3);
        // The first `---` opens document 1, which holds only a comment.
        assert_eq!(documents, [2, 3, 4]);
        assert!(parse(&Origin::from("f.yaml"), b"").unwrap().is_empty());
    }

    #[test]
    fn json_documents() {
        let text = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}"#;
        assert_eq!(
            parse(&Origin::from("f.json"), text.as_bytes())
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn syntax_errors_name_file_document_and_line() {
        let text = format!("{SERVICE}---\nfoo: [\n");
        assert_eq!(
            parse_errors(text.as_bytes()),
            [
                "f.yaml:10:1 (document 2): did not find expected node content, while parsing a flow node"
            ]
        );
    }

    #[test]
    fn type_errors_name_the_field_and_line() {
        let text = SERVICE.replace("port: 80", "port: eighty");
        assert_eq!(
            parse_errors(text.as_bytes()),
            [
                r#"f.yaml:7:11 (document 1): Service default/web: spec.ports[0].port: invalid type: string "eighty", expected i32"#
            ]
        );
        let text = WORKLOAD.replace("serviceAccount", "serviceAcount");
        let m = parse_errors(text.as_bytes());
        assert!(m[0].starts_with("f.yaml:6:3 (document 1): Workload default/web-0: spec.serviceAcount: unknown field `serviceAcount`, expected one of"), "{m:?}");
    }

    #[test]
    fn unknown_kinds_are_named() {
        let m = parse_errors(
            format!("{SERVICE}---\napiVersion: apps/v1\nkind: Deployment\n").as_bytes(),
        );
        assert_eq!(
            m,
            [
                r#"f.yaml (document 2): unknown kind "apps/v1" "Deployment" (supported: v1 Service, discovery.k8s.io/v1 EndpointSlice, mycel.dev/v1alpha1 Workload, mycel.dev/v1alpha1 AuthorizationPolicy)"#
            ]
        );
        let m = parse_errors(b"metadata: {name: x}\n");
        assert!(m[0].contains("unknown kind (none) (none)"), "{m:?}");
        let m = parse_errors(b"- a\n- b\n");
        assert_eq!(
            m,
            ["f.yaml (document 1): expected an object with apiVersion and kind, found a list"]
        );
    }

    #[test]
    fn duplicate_objects_in_one_file() {
        let m = parse_errors(format!("{SERVICE}---\n{SERVICE}").as_bytes());
        assert_eq!(
            m,
            [
                "f.yaml (document 2): Service default/web is also defined in document 1 of this file; remove one"
            ]
        );
    }

    #[test]
    fn garbage_never_panics() {
        let inputs: [&[u8]; 8] = [
            b"\xff\xfe\x00\x01garbage\x00",
            b"\x00\x00\x00\x00",
            b"{{{{",
            b"apiVersion: v1\nkind: Service\n",
            b"apiVersion: v1\nkind: Service\nspec: 5\n",
            b"!!binary aGVsbG8=",
            b"&a [*a]",
            b"apiVersion: [1]\nkind: {a: b}\n",
        ];
        for input in inputs {
            assert!(parse(&Origin::from("f.yaml"), input).is_err(), "{input:?}");
        }
        let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(parse(&Origin::from("f.yaml"), deep.as_bytes()).is_err());
        let mut state = 0x1234_5678_u32;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    b"ab: -[]{}\n\"'#&*!|>%@`,?\x00\xff"[(state % 24) as usize]
                })
                .collect();
            let _ = parse(&Origin::from("f.yaml"), &bytes);
        }
    }

    #[test]
    fn config_file_names() {
        for name in ["a.yaml", "b.yml", "c.json", "D.YAML"] {
            assert!(is_config_file(name), "{name}");
        }
        for name in [
            ".a.yaml",
            "a.yaml~",
            "#a.yaml#",
            ".#a.yaml",
            "a.yaml.swp",
            "a.txt",
            "yaml",
            "..data",
        ] {
            assert!(!is_config_file(name), "{name}");
        }
    }

    // --- The watcher.

    const WAIT: Duration = Duration::from_secs(10);
    /// How long to wait to be fairly sure that no event is coming.
    const QUIET: Duration = Duration::from_millis(300);

    /// The next event that is not a count of rejected files (those have their own test).
    async fn next(rx: &mut mpsc::Receiver<SourceEvent>) -> SourceEvent {
        loop {
            match next_any(rx).await {
                SourceEvent::Rejected(_) => continue,
                event => return event,
            }
        }
    }

    async fn next_any(rx: &mut mpsc::Receiver<SourceEvent>) -> SourceEvent {
        timeout(WAIT, rx.recv())
            .await
            .expect("no event from the file source in time")
            .expect("the file source's channel closed")
    }

    /// The next count of rejected files, skipping other events.
    async fn next_rejected(rx: &mut mpsc::Receiver<SourceEvent>) -> usize {
        loop {
            if let SourceEvent::Rejected(n) = next_any(rx).await {
                return n;
            }
        }
    }

    async fn next_update(rx: &mut mpsc::Receiver<SourceEvent>) -> Update {
        match next(rx).await {
            SourceEvent::Update(update) => update,
            SourceEvent::Error(e) => panic!("expected an update, got error: {e}"),
            SourceEvent::Rejected(_) => unreachable!("next() skips these"),
        }
    }

    async fn next_error(rx: &mut mpsc::Receiver<SourceEvent>) -> String {
        match next(rx).await {
            SourceEvent::Error(e) => e.to_string(),
            SourceEvent::Update(u) => panic!("expected an error, got update: {u:?}"),
            SourceEvent::Rejected(_) => unreachable!("next() skips these"),
        }
    }

    async fn quiet(rx: &mut mpsc::Receiver<SourceEvent>) {
        let deadline = tokio::time::Instant::now() + QUIET;
        while let Ok(event) = tokio::time::timeout_at(deadline, rx.recv()).await {
            if !matches!(event, Some(SourceEvent::Rejected(_))) {
                panic!("expected no event, got {event:?}");
            }
        }
    }

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).unwrap();
    }

    async fn start(dir: &Path) -> (FileSource, mpsc::Receiver<SourceEvent>) {
        FileSource::start(dir.to_path_buf(), None).unwrap()
    }

    #[tokio::test]
    async fn initial_load_reads_config_files_only() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "web.yaml", &format!("{SERVICE}---\n{SLICE}"));
        write(dir.path(), "workloads.yml", WORKLOAD);
        write(dir.path(), ".hidden.yaml", "garbage: [");
        write(dir.path(), "web.yaml~", "garbage: [");
        write(dir.path(), "notes.txt", "garbage: [");
        let (source, mut rx) = start(dir.path()).await;
        let update = next_update(&mut rx).await;
        assert!(update.full);
        assert!(update.deletes.is_empty());
        assert_eq!(
            keys(&update.upserts),
            BTreeSet::from([
                key(Kind::Service, "web"),
                key(Kind::EndpointSlice, "web-1"),
                key(Kind::Workload, "web-0"),
            ])
        );
        let origin = source.dir().join("web.yaml").display().to_string();
        let service = update
            .upserts
            .iter()
            .find(|r| r.key().kind == Kind::Service)
            .unwrap();
        assert_eq!(&*service.meta().origin, origin);
        quiet(&mut rx).await;
    }

    #[tokio::test]
    async fn initial_errors_come_before_the_full_update() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", SERVICE);
        write(dir.path(), "b.yaml", "apiVersion: v1\nkind: ConfigMap\n");
        write(
            dir.path(),
            "c.yaml",
            &SLICE.replace("10.0.0.1", "10.0.0.999"),
        );
        let (_source, mut rx) = start(dir.path()).await;
        let first = next_error(&mut rx).await;
        assert!(
            first.contains("b.yaml (document 1): unknown kind \"v1\" \"ConfigMap\""),
            "{first}"
        );
        let second = next_error(&mut rx).await;
        assert!(second.contains("c.yaml (document 1): EndpointSlice default/web-1: endpoints[0].addresses[0]: \"10.0.0.999\" is not an IP address"), "{second}");
        let update = next_update(&mut rx).await;
        assert!(update.full);
        assert_eq!(
            keys(&update.upserts),
            BTreeSet::from([key(Kind::Service, "web")])
        );
    }

    #[tokio::test]
    async fn the_shipped_examples_are_valid_and_compile() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/standalone");
        let (_source, mut rx) = start(&dir).await;
        let update = match next(&mut rx).await {
            SourceEvent::Update(u) => u,
            other => panic!("manifests/examples/standalone should load cleanly: {other:?}"),
        };
        assert!(update.full);
        let mut state = crate::state::State::default();
        let applied = state.apply(update);
        assert!(applied.errors.is_empty(), "{:?}", applied.errors);
        assert_eq!(state.frontends().len(), 1);
        assert_eq!(state.policy().policies_loaded(), 1);
        assert_eq!(
            state.policy().endpoints().len(),
            2,
            "web-1 and web-2 are local"
        );
    }

    #[tokio::test]
    async fn empty_directory_gives_an_empty_full_update() {
        let dir = tempfile::tempdir().unwrap();
        let (_source, mut rx) = start(dir.path()).await;
        let update = next_update(&mut rx).await;
        assert!(update.full && update.upserts.is_empty());
    }

    #[tokio::test]
    async fn modify_upserts_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "web.yaml", &format!("{SERVICE}---\n{SLICE}"));
        let (_source, mut rx) = start(dir.path()).await;
        next_update(&mut rx).await;

        let before = Instant::now();
        write(
            dir.path(),
            "web.yaml",
            &format!("{SERVICE}---\n{}", SLICE.replace("10.0.0.1", "10.0.0.2")),
        );
        let update = next_update(&mut rx).await;
        assert!(!update.full);
        assert!(update.seen >= before);
        assert!(update.deletes.is_empty());
        assert_eq!(
            keys(&update.upserts),
            BTreeSet::from([key(Kind::EndpointSlice, "web-1")])
        );
        let Resource::EndpointSlice(slice) = &update.upserts[0] else {
            panic!("expected a slice");
        };
        assert_eq!(slice.endpoints[0].addresses, [IpAddr::from([10, 0, 0, 2])]);

        // The same bytes again: nothing.
        write(
            dir.path(),
            "web.yaml",
            &format!("{SERVICE}---\n{}", SLICE.replace("10.0.0.1", "10.0.0.2")),
        );
        quiet(&mut rx).await;
        // Other bytes, same objects (a comment): nothing either.
        write(
            dir.path(),
            "web.yaml",
            &format!(
                "# web\n{SERVICE}---\n{}",
                SLICE.replace("10.0.0.1", "10.0.0.2")
            ),
        );
        quiet(&mut rx).await;
    }

    use std::net::IpAddr;

    #[tokio::test]
    async fn deleting_a_file_deletes_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "web.yaml", SERVICE);
        write(dir.path(), "workloads.yaml", WORKLOAD);
        let (_source, mut rx) = start(dir.path()).await;
        next_update(&mut rx).await;
        fs::remove_file(dir.path().join("web.yaml")).unwrap();
        let update = next_update(&mut rx).await;
        assert!(update.upserts.is_empty());
        assert_eq!(update.deletes, [key(Kind::Service, "web")]);
    }

    /// Writes a valid `web.yaml` (port 81) and expects its Service as the one upsert.
    async fn fix_web(dir: &Path, rx: &mut mpsc::Receiver<SourceEvent>) {
        write(dir, "web.yaml", &SERVICE.replace("port: 80", "port: 81"));
        let update = next_update(rx).await;
        assert_eq!(
            keys(&update.upserts),
            BTreeSet::from([key(Kind::Service, "web")])
        );
    }

    #[tokio::test]
    async fn broken_file_keeps_its_last_good_objects() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "web.yaml", SERVICE);
        let (_source, mut rx) = start(dir.path()).await;
        next_update(&mut rx).await;

        write(dir.path(), "web.yaml", &format!("{SERVICE}  - port: [\n"));
        let error = next_error(&mut rx).await;
        assert!(
            error.starts_with(&format!(
                "{}:",
                dir.path()
                    .canonicalize()
                    .unwrap()
                    .join("web.yaml")
                    .display()
            )),
            "{error}"
        );
        assert!(error.contains(":9:1 (document 1): "), "{error}");
        quiet(&mut rx).await;

        // Fixed: the change applies.
        fix_web(dir.path(), &mut rx).await;
    }

    #[tokio::test]
    async fn the_last_good_version_survives_a_restart_and_a_removal_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let saved = tempfile::tempdir().unwrap();
        let restart = || FileSource::start(dir.path().to_path_buf(), Some(saved.path().into()));
        write(dir.path(), "web.yaml", SERVICE);
        write(dir.path(), "other.yaml", WORKLOAD);
        let (source, mut rx) = restart().unwrap();
        let update = next_update(&mut rx).await;
        assert_eq!(update.upserts.len(), 2);
        // Broken while the agent runs: the good version stays (as before).
        write(dir.path(), "web.yaml", &format!("{SERVICE}  - port: [\n"));
        next_error(&mut rx).await;
        drop((source, rx));

        // Started again with the file still broken: its saved version is in force, and
        // the file is reported as rejected.
        let (source, mut rx) = restart().unwrap();
        next_error(&mut rx).await;
        let update = next_update(&mut rx).await;
        assert!(update.full);
        assert_eq!(
            keys(&update.upserts),
            BTreeSet::from([key(Kind::Service, "web"), key(Kind::Workload, "web-0")]),
            "the broken file's last good objects are kept"
        );
        assert_eq!(next_rejected(&mut rx).await, 1);
        // Fixed: the file's own contents apply, and become the saved version.
        fix_web(dir.path(), &mut rx).await;
        drop((source, rx));
        let text = fs::read_to_string(saved.path().join("web.yaml")).unwrap();
        assert!(text.contains("port: 81"), "{text}");

        // Removed while no agent ran: gone for good, even if it comes back broken.
        fs::remove_file(dir.path().join("web.yaml")).unwrap();
        let (source, mut rx) = restart().unwrap();
        let update = next_update(&mut rx).await;
        assert_eq!(
            keys(&update.upserts),
            BTreeSet::from([key(Kind::Workload, "web-0")])
        );
        assert!(!saved.path().join("web.yaml").exists());
        drop((source, rx));
        write(dir.path(), "web.yaml", "kind: [\n");
        let (_source, mut rx) = restart().unwrap();
        next_error(&mut rx).await;
        let update = next_update(&mut rx).await;
        assert_eq!(
            keys(&update.upserts),
            BTreeSet::from([key(Kind::Workload, "web-0")])
        );
    }

    #[tokio::test]
    async fn rejected_files_are_counted_until_fixed_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", "kind: [\n");
        let (_source, mut rx) = start(dir.path()).await;
        assert_eq!(next_rejected(&mut rx).await, 1, "a broken file at start");
        write(dir.path(), "b.yaml", "kind: Nonsense\napiVersion: v1\n");
        assert_eq!(next_rejected(&mut rx).await, 2);
        write(dir.path(), "a.yaml", SERVICE);
        assert_eq!(next_rejected(&mut rx).await, 1, "a fixed");
        fs::remove_file(dir.path().join("b.yaml")).unwrap();
        assert_eq!(next_rejected(&mut rx).await, 0, "b removed");
    }

    #[tokio::test]
    async fn one_bad_document_rejects_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "web.yaml", SERVICE);
        let (_source, mut rx) = start(dir.path()).await;
        next_update(&mut rx).await;
        write(
            dir.path(),
            "web.yaml",
            &format!("{SLICE}---\n{}", SERVICE.replace("port: 80", "port: 70000")),
        );
        let error = next_error(&mut rx).await;
        assert!(error.contains("(document 2): Service default/web: spec.ports[0].port: 70000 is out of range 1-65535"), "{error}");
        quiet(&mut rx).await;
    }

    const POLICY: &str = "\
apiVersion: mycel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-from-a, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from: [{source: {namespaces: [a]}}]
    to: [{operation: {ports: [\"8080\"]}}]
";

    #[test]
    fn authorization_policies_are_read() {
        let objects = parse(&Origin::from("f.yaml"), POLICY.as_bytes()).unwrap();
        let [(key, (_, Resource::AuthorizationPolicy(policy)))] =
            objects.iter().collect::<Vec<_>>()[..]
        else {
            panic!("{objects:?}")
        };
        assert_eq!(key.to_string(), "AuthorizationPolicy shop/web-from-a");
        assert_eq!(policy.rules[0].to[0].ports, [8080]);
        // A problem in a policy rejects the file, naming the field and the line of a
        // decoding problem.
        let m = parse_errors(format!("{SERVICE}---\n{}", POLICY.replace("8080", "80a")).as_bytes());
        assert_eq!(
            m,
            [
                r#"f.yaml (document 2): AuthorizationPolicy shop/web-from-a: spec.rules[0].to[0].operation.ports[0]: "80a" is not a port number (1-65535)"#
            ]
        );
        let m = parse_errors(POLICY.replace("namespaces", "namespace").as_bytes());
        assert!(m[0].starts_with("f.yaml:7:"), "{m:?}");
        assert!(m[0].contains("AuthorizationPolicy shop/web-from-a: spec.rules[0].from[0].source.namespace: unknown field `namespace`"), "{m:?}");
    }

    #[tokio::test]
    async fn a_rejected_policy_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "policy.yaml", POLICY);
        let (_source, mut rx) = start(dir.path()).await;
        let update = next_update(&mut rx).await;
        assert_eq!(update.upserts.len(), 1);
        write(
            dir.path(),
            "policy.yaml",
            &POLICY.replace("rules:", "action: AUDIT\n  rules:"),
        );
        let error = next_error(&mut rx).await;
        assert!(
            error.contains("spec.action: AUDIT is not supported"),
            "{error}"
        );
        assert_eq!(next_rejected(&mut rx).await, 1);
        quiet(&mut rx).await;
        write(dir.path(), "policy.yaml", &POLICY.replace("8080", "9090"));
        let update = next_update(&mut rx).await;
        let [Resource::AuthorizationPolicy(policy)] = &update.upserts[..] else {
            panic!("{update:?}")
        };
        assert_eq!(policy.rules[0].to[0].ports, [9090]);
    }

    #[tokio::test]
    async fn new_files_with_problems() {
        let dir = tempfile::tempdir().unwrap();
        let (_source, mut rx) = start(dir.path()).await;
        next_update(&mut rx).await;
        write(dir.path(), "kind.yaml", "apiVersion: v2\nkind: Service\n");
        let error = next_error(&mut rx).await;
        assert!(
            error.contains("kind.yaml (document 1): unknown kind \"v2\" \"Service\" (supported: "),
            "{error}"
        );
        write(
            dir.path(),
            "ip.yaml",
            &SERVICE.replace("10.96.0.10", "10.96.0.999"),
        );
        let error = next_error(&mut rx).await;
        assert!(error.contains("ip.yaml (document 1): Service default/web: spec.clusterIP: \"10.96.0.999\" is not an IP address"), "{error}");
        write(dir.path(), "garbage.yaml", "\u{0}\u{1}\u{2}\u{fffd}");
        let error = next_error(&mut rx).await;
        assert!(error.contains("garbage.yaml"), "{error}");
        quiet(&mut rx).await;
    }

    #[tokio::test]
    async fn atomic_rename_into_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "web.yaml", SERVICE);
        let (_source, mut rx) = start(dir.path()).await;
        next_update(&mut rx).await;
        // What editors and `kubectl`-like tools do: write a hidden temporary file, rename it.
        write(
            dir.path(),
            ".web.yaml.tmp",
            &SERVICE.replace("port: 80", "port: 81"),
        );
        fs::rename(
            dir.path().join(".web.yaml.tmp"),
            dir.path().join("web.yaml"),
        )
        .unwrap();
        let update = next_update(&mut rx).await;
        assert_eq!(
            keys(&update.upserts),
            BTreeSet::from([key(Kind::Service, "web")])
        );
        assert!(update.deletes.is_empty());
        quiet(&mut rx).await;
    }

    #[tokio::test]
    async fn objects_moved_to_another_file_are_upserts() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &format!("{SERVICE}---\n{WORKLOAD}"));
        let (source, mut rx) = start(dir.path()).await;
        next_update(&mut rx).await;
        // Renaming the file moves both objects at once.
        fs::rename(dir.path().join("a.yaml"), dir.path().join("b.yaml")).unwrap();
        let update = next_update(&mut rx).await;
        assert!(update.deletes.is_empty(), "{:?}", update.deletes);
        assert_eq!(
            keys(&update.upserts),
            BTreeSet::from([key(Kind::Service, "web"), key(Kind::Workload, "web-0")])
        );
        let b = source.dir().join("b.yaml").display().to_string();
        assert!(update.upserts.iter().all(|r| *r.meta().origin == *b));
    }

    #[tokio::test]
    async fn an_object_in_two_files_stays_with_the_first() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", SERVICE);
        let (source, mut rx) = start(dir.path()).await;
        next_update(&mut rx).await;
        let a = source.dir().join("a.yaml").display().to_string();
        let b = source.dir().join("b.yaml").display().to_string();

        write(
            dir.path(),
            "b.yaml",
            &format!("{}---\n{WORKLOAD}", SERVICE.replace("port: 80", "port: 81")),
        );
        let error = next_error(&mut rx).await;
        assert_eq!(
            error,
            format!(
                "{b} (document 1): Service default/web is already defined in {a}; this definition is ignored while that one exists"
            )
        );
        // b's other object is accepted.
        let update = next_update(&mut rx).await;
        assert_eq!(
            keys(&update.upserts),
            BTreeSet::from([key(Kind::Workload, "web-0")])
        );

        // a lets go of the service: b's definition takes over.
        write(dir.path(), "a.yaml", "");
        let update = next_update(&mut rx).await;
        assert!(update.deletes.is_empty());
        assert_eq!(
            keys(&update.upserts),
            BTreeSet::from([key(Kind::Service, "web")])
        );
        assert_eq!(&*update.upserts[0].meta().origin, b);
    }

    #[tokio::test]
    async fn waits_for_a_writer_to_close_the_file() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "web.yaml", &format!("{SERVICE}---\n{SLICE}"));
        let (_source, mut rx) = start(dir.path()).await;
        next_update(&mut rx).await;
        // Truncate, write half, pause, write the rest: only the finished file counts.
        let text = format!("{SERVICE}---\n{}", SLICE.replace("10.0.0.1", "10.0.0.2"));
        let (head, tail) = text.split_at(SERVICE.len() / 2);
        let mut file = fs::File::create(dir.path().join("web.yaml")).unwrap();
        file.write_all(head.as_bytes()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        file.write_all(tail.as_bytes()).unwrap();
        drop(file);
        let update = next_update(&mut rx).await;
        assert!(update.deletes.is_empty(), "{update:?}");
        assert_eq!(
            keys(&update.upserts),
            BTreeSet::from([key(Kind::EndpointSlice, "web-1")])
        );
        quiet(&mut rx).await;
    }

    #[tokio::test]
    async fn configmap_volume_swap() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // The layout the kubelet gives a ConfigMap volume.
        fs::create_dir(root.join("..v1")).unwrap();
        write(&root.join("..v1"), "web.yaml", SERVICE);
        symlink("..v1", root.join("..data")).unwrap();
        symlink("..data/web.yaml", root.join("web.yaml")).unwrap();
        let (_source, mut rx) = start(root).await;
        assert_eq!(next_update(&mut rx).await.upserts.len(), 1);

        fs::create_dir(root.join("..v2")).unwrap();
        write(
            &root.join("..v2"),
            "web.yaml",
            &SERVICE.replace("port: 80", "port: 81"),
        );
        symlink("..v2", root.join("..data_tmp")).unwrap();
        fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        let update = next_update(&mut rx).await;
        assert_eq!(
            keys(&update.upserts),
            BTreeSet::from([key(Kind::Service, "web")])
        );
        assert!(update.deletes.is_empty());
    }

    #[tokio::test]
    async fn subdirectories_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let (_source, mut rx) = start(dir.path()).await;
        next_update(&mut rx).await;
        fs::create_dir(dir.path().join("sub")).unwrap();
        write(&dir.path().join("sub"), "web.yaml", SERVICE);
        fs::create_dir(dir.path().join("dir.yaml")).unwrap();
        quiet(&mut rx).await;
    }

    #[tokio::test]
    async fn dropping_the_source_closes_the_channel() {
        let dir = tempfile::tempdir().unwrap();
        let (source, mut rx) = start(dir.path()).await;
        next_update(&mut rx).await;
        drop(source);
        let end = timeout(WAIT, rx.recv())
            .await
            .expect("the channel should close");
        assert!(end.is_none());
    }

    #[tokio::test]
    async fn start_fails_without_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = FileSource::start(missing.clone(), None).unwrap_err();
        assert!(
            matches!(err, Error::NoDirectory(ref p) if *p == missing),
            "{err}"
        );
        write(dir.path(), "file.yaml", "");
        let err = FileSource::start(dir.path().join("file.yaml"), None).unwrap_err();
        assert!(matches!(err, Error::NotADirectory(_)), "{err}");
    }
}
