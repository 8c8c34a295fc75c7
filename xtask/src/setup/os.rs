//! Which Linux distribution this is, from `/etc/os-release` (`ID` and `ID_LIKE`).

/// The fields of `/etc/os-release` that setup cares about.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OsRelease {
    /// `ID`, e.g. `debian`.
    pub id: String,
    /// `ID_LIKE`, split on spaces, e.g. `["debian"]` on Ubuntu.
    pub id_like: Vec<String>,
    /// `PRETTY_NAME`, for messages.
    pub pretty_name: String,
}

impl OsRelease {
    /// Reads `/etc/os-release` (or `/usr/lib/os-release`); empty if neither exists.
    pub fn read() -> Self {
        ["/etc/os-release", "/usr/lib/os-release"]
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
            .map(|text| Self::parse(&text))
            .unwrap_or_default()
    }

    /// Parses the `KEY=value` lines of an os-release file.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            let Some((key, value)) = line.trim().split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
            match key {
                "ID" => out.id = value.to_owned(),
                "ID_LIKE" => out.id_like = value.split_whitespace().map(str::to_owned).collect(),
                "PRETTY_NAME" => out.pretty_name = value.to_owned(),
                _ => {}
            }
        }
        out
    }

    /// Whether this is Debian, Ubuntu or a derivative of either (apt and dpkg available).
    pub fn is_debian_like(&self) -> bool {
        std::iter::once(&self.id)
            .chain(&self.id_like)
            .any(|id| id == "debian" || id == "ubuntu")
    }

    /// A name for messages.
    pub fn name(&self) -> &str {
        match (self.pretty_name.as_str(), self.id.as_str()) {
            ("", "") => "an unknown distribution",
            ("", id) => id,
            (pretty, _) => pretty,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ubuntu_is_debian_like() {
        let os = OsRelease::parse(
            "NAME=\"Ubuntu\"\nID=ubuntu\nID_LIKE=debian\nPRETTY_NAME=\"Ubuntu 24.04 LTS\"\n",
        );
        assert_eq!(os.id, "ubuntu");
        assert_eq!(os.id_like, ["debian"]);
        assert!(os.is_debian_like());
        assert_eq!(os.name(), "Ubuntu 24.04 LTS");
    }

    #[test]
    fn fedora_is_not() {
        let os = OsRelease::parse("ID=fedora\nPRETTY_NAME='Fedora Linux 41'\n");
        assert!(!os.is_debian_like());
        assert!(!OsRelease::default().is_debian_like());
    }
}
