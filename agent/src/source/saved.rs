//! Last good versions of inputs, kept on disk so that they outlive the agent.
//!
//! A source keeps the last accepted version of what it reads (a file, an object) while it
//! runs; this is where it also writes them, so that an agent started while an input is
//! broken takes that input's last good version instead of dropping it — a DENY edited
//! into an invalid state must not fall out of force at the next restart.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use tracing::warn;

/// A directory of saved versions, one file per input, by name.
#[derive(Clone, Debug)]
pub(crate) struct Saved {
    dir: PathBuf,
}

impl Saved {
    /// The store in `dir`, created if missing.
    pub(crate) fn open(dir: PathBuf) -> io::Result<Saved> {
        fs::create_dir_all(&dir)?;
        Ok(Saved { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Saves `content` under `name`, atomically: a crash leaves the old version or the new
    /// one. A failure is logged; the input itself stays in force.
    pub(crate) fn save(&self, name: &str, content: &[u8]) {
        let target = self.path(name);
        let tmp = self.dir.join(format!(".{name}.saving"));
        let written = fs::File::create(&tmp)
            .and_then(|mut f| {
                io::Write::write_all(&mut f, content)?;
                f.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, &target));
        if let Err(e) = written {
            warn!(saved = %target.display(), "cannot save the last good version of an input: {e}");
        }
    }

    /// The version saved under `name`, if any.
    pub(crate) fn load(&self, name: &str) -> Option<Vec<u8>> {
        fs::read(self.path(name)).ok()
    }

    /// Forgets the version saved under `name` (its input was removed on purpose).
    pub(crate) fn forget(&self, name: &str) {
        let path = self.path(name);
        if let Err(e) = fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(saved = %path.display(), "cannot remove a saved version: {e}");
        }
    }

    /// The names of every saved version.
    pub(crate) fn names(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect()
    }

    /// The directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_forget() {
        let dir = tempfile::tempdir().unwrap();
        let saved = Saved::open(dir.path().join("a/b")).unwrap();
        assert_eq!(saved.load("x.yaml"), None);
        saved.save("x.yaml", b"one");
        saved.save("x.yaml", b"two");
        assert_eq!(saved.load("x.yaml").as_deref(), Some(&b"two"[..]));
        assert_eq!(
            saved.names(),
            vec!["x.yaml".to_owned()],
            "no temporary file is left"
        );
        saved.forget("x.yaml");
        saved.forget("x.yaml");
        assert!(saved.names().is_empty());
    }
}
