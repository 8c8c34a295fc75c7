//! Enrollment in the mesh and the mutual TLS mode of each workload, from labels.
//!
//! A workload is enrolled when it or its namespace carries `mycel.dev/mode: mesh`; a
//! workload's own `mycel.dev/mode: none` takes it out of an enrolled namespace. The mutual
//! TLS mode comes from `mycel.dev/mtls-mode` (`STRICT`, `PERMISSIVE` or `DISABLE`, Istio's
//! words), the workload's label winning over its namespace's; the default is `PERMISSIVE`,
//! as in Istio: enrolled clients always use mutual TLS, and clients outside the mesh keep
//! working until the operator asks for `STRICT`. `DISABLE` takes the workload out of the
//! mesh as `mode: none` does.

use std::collections::BTreeMap;

use serde::Serialize;

/// The label that enrolls a workload or namespace.
pub const MODE_LABEL: &str = "mycel.dev/mode";
/// [`MODE_LABEL`] value that enrolls.
pub const MODE_MESH: &str = "mesh";
/// [`MODE_LABEL`] value that opts a workload out of its namespace's enrollment.
pub const MODE_NONE: &str = "none";
/// The label that sets the mutual TLS mode.
pub const MTLS_MODE_LABEL: &str = "mycel.dev/mtls-mode";

/// How an enrolled workload accepts connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Only through the mesh: plaintext from outside the proxy is dropped.
    Strict,
    /// Mutual TLS from enrolled clients, plaintext from the others.
    Permissive,
}

impl std::fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
        })
    }
}

/// What one object's labels say; `None` fields are unset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshLabels {
    /// `Some(true)` for `mesh`, `Some(false)` for `none`.
    pub enrolled: Option<bool>,
    /// `None` when unset; `Some(None)` for `DISABLE`.
    pub mtls: Option<Option<MtlsMode>>,
}

/// A label with a value mycel does not know: (label, problem).
pub type LabelError = (&'static str, String);

impl MeshLabels {
    /// Reads the mesh labels of an object; an unknown value is an error naming the label.
    pub fn parse(labels: &BTreeMap<String, String>) -> Result<MeshLabels, Vec<LabelError>> {
        let mut errors = Vec::new();
        let enrolled = match labels.get(MODE_LABEL).map(String::as_str) {
            None => None,
            Some(MODE_MESH) => Some(true),
            Some(MODE_NONE) => Some(false),
            Some(other) => {
                errors.push((
                    MODE_LABEL,
                    format!("{other:?} is not a mode ({MODE_MESH} or {MODE_NONE})"),
                ));
                None
            }
        };
        let mtls = match labels.get(MTLS_MODE_LABEL).map(String::as_str) {
            None => None,
            Some("STRICT") => Some(Some(MtlsMode::Strict)),
            Some("PERMISSIVE") => Some(Some(MtlsMode::Permissive)),
            Some("DISABLE") => Some(None),
            Some(other) => {
                errors.push((
                    MTLS_MODE_LABEL,
                    format!("{other:?} is not a mode (STRICT, PERMISSIVE or DISABLE)"),
                ));
                None
            }
        };
        if errors.is_empty() {
            Ok(MeshLabels { enrolled, mtls })
        } else {
            Err(errors)
        }
    }

    /// The mode of a workload with these labels in a namespace with `namespace`'s:
    /// `None` when it is not in the mesh. Labels were validated on the way in; a value
    /// that is not known counts as unset.
    pub fn resolve(workload: &MeshLabels, namespace: &MeshLabels) -> Option<MtlsMode> {
        let enrolled = workload.enrolled.or(namespace.enrolled).unwrap_or(false);
        if !enrolled {
            return None;
        }
        workload
            .mtls
            .or(namespace.mtls)
            .unwrap_or(Some(MtlsMode::Permissive))
    }
}

/// The mode of a workload labelled `workload` in a namespace labelled `namespace`.
pub fn mode_of(
    workload: &BTreeMap<String, String>,
    namespace: Option<&BTreeMap<String, String>>,
) -> Option<MtlsMode> {
    let w = MeshLabels::parse(workload).unwrap_or_default();
    let n = namespace
        .map(|l| MeshLabels::parse(l).unwrap_or_default())
        .unwrap_or_default();
    MeshLabels::resolve(&w, &n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn enrollment_and_modes() {
        let none = labels(&[]);
        let mesh = labels(&[(MODE_LABEL, MODE_MESH)]);
        let opt_out = labels(&[(MODE_LABEL, MODE_NONE)]);
        let strict = labels(&[(MTLS_MODE_LABEL, "STRICT")]);
        let disable = labels(&[(MTLS_MODE_LABEL, "DISABLE")]);
        let mesh_strict = labels(&[(MODE_LABEL, MODE_MESH), (MTLS_MODE_LABEL, "STRICT")]);
        let mesh_permissive = labels(&[(MODE_LABEL, MODE_MESH), (MTLS_MODE_LABEL, "PERMISSIVE")]);

        assert_eq!(mode_of(&none, None), None);
        assert_eq!(mode_of(&none, Some(&none)), None);
        assert_eq!(mode_of(&mesh, None), Some(MtlsMode::Permissive));
        assert_eq!(mode_of(&none, Some(&mesh)), Some(MtlsMode::Permissive));
        assert_eq!(mode_of(&opt_out, Some(&mesh)), None);
        assert_eq!(mode_of(&strict, Some(&mesh)), Some(MtlsMode::Strict));
        assert_eq!(mode_of(&none, Some(&mesh_strict)), Some(MtlsMode::Strict));
        assert_eq!(
            mode_of(&mesh_permissive, Some(&mesh_strict)),
            Some(MtlsMode::Permissive)
        );
        assert_eq!(mode_of(&disable, Some(&mesh_strict)), None);
        // A mode without enrollment enrolls nothing.
        assert_eq!(mode_of(&strict, Some(&none)), None);
    }

    #[test]
    fn unknown_values_are_errors_naming_the_label() {
        let errors = MeshLabels::parse(&labels(&[
            (MODE_LABEL, "ambient"),
            (MTLS_MODE_LABEL, "strict"),
        ]))
        .unwrap_err();
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].0, MODE_LABEL);
        assert!(errors[0].1.contains("\"ambient\""), "{errors:?}");
        assert_eq!(errors[1].0, MTLS_MODE_LABEL);
        assert!(errors[1].1.contains("\"strict\""), "{errors:?}");
    }
}
