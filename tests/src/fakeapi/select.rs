//! Label and field selectors, parsed and matched as the API server does for the forms
//! mycel uses. A selector this module does not understand is an error (HTTP 400), never
//! silently ignored: a test must not pass because a filter was dropped.

use serde_json::Value;

use super::store::ResourceKind;

/// One parsed `labelSelector`: every requirement must hold.
#[derive(Debug, Default)]
pub(crate) struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

#[derive(Debug)]
struct LabelRequirement {
    key: String,
    op: LabelOp,
}

#[derive(Debug)]
enum LabelOp {
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// Parses the equality (`a=b`, `a==b`, `a!=b`), set (`a in (x,y)`, `a notin (x)`) and
    /// existence (`a`, `!a`) forms, comma-separated.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        if text.trim().is_empty() {
            return Ok(Self { requirements });
        }
        for term in split_outside_parens(text)? {
            requirements.push(parse_label_term(term.trim())?);
        }
        Ok(Self { requirements })
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.requirements.iter().all(|r| {
            let value = label(&r.key);
            match &r.op {
                LabelOp::Equals(want) => value == Some(want.as_str()),
                // As in Kubernetes, `a!=b` also selects objects without the label.
                LabelOp::NotEquals(want) => value != Some(want.as_str()),
                LabelOp::In(set) => value.is_some_and(|v| set.iter().any(|s| s == v)),
                LabelOp::NotIn(set) => !value.is_some_and(|v| set.iter().any(|s| s == v)),
                LabelOp::Exists => value.is_some(),
                LabelOp::DoesNotExist => value.is_none(),
            }
        })
    }
}

/// Splits on commas that are not inside `( … )`, so that `a in (x,y),b=c` is two terms.
fn split_outside_parens(text: &str) -> Result<Vec<&str>, String> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("unbalanced ')' in selector {text:?}"))?;
            }
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced '(' in selector {text:?}"));
    }
    terms.push(&text[start..]);
    Ok(terms)
}

fn parse_label_term(term: &str) -> Result<LabelRequirement, String> {
    if term.is_empty() {
        return Err("empty requirement in label selector".to_string());
    }
    if let Some(open) = term.find('(') {
        let close = term
            .strip_suffix(')')
            .ok_or_else(|| format!("set requirement {term:?} must end with ')'"))?;
        let mut head = term[..open].split_whitespace();
        let (Some(key), Some(op), None) = (head.next(), head.next(), head.next()) else {
            return Err(format!("cannot parse set requirement {term:?}"));
        };
        let values: Vec<String> = close[open + 1..]
            .split(',')
            .map(|v| v.trim().to_string())
            .collect();
        for v in &values {
            check_label_value(v)?;
        }
        check_label_key(key)?;
        let op = match op {
            "in" => LabelOp::In(values),
            "notin" => LabelOp::NotIn(values),
            other => return Err(format!("unknown set operator {other:?} in {term:?}")),
        };
        return Ok(LabelRequirement {
            key: key.to_string(),
            op,
        });
    }
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        check_label_key(key)?;
        return Ok(LabelRequirement {
            key: key.to_string(),
            op: LabelOp::DoesNotExist,
        });
    }
    let (key, op) = if let Some((k, v)) = term.split_once("!=") {
        (k, LabelOp::NotEquals(v.trim().to_string()))
    } else if let Some((k, v)) = term.split_once("==") {
        (k, LabelOp::Equals(v.trim().to_string()))
    } else if let Some((k, v)) = term.split_once('=') {
        (k, LabelOp::Equals(v.trim().to_string()))
    } else {
        (term, LabelOp::Exists)
    };
    let key = key.trim();
    check_label_key(key)?;
    if let LabelOp::Equals(v) | LabelOp::NotEquals(v) = &op {
        check_label_value(v)?;
    }
    Ok(LabelRequirement {
        key: key.to_string(),
        op,
    })
}

/// Label keys: an optional DNS prefix and `/`, then alphanumerics, `-`, `_`, `.`.
fn check_label_key(key: &str) -> Result<(), String> {
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid label key {key:?}"))
    }
}

fn check_label_value(value: &str) -> Result<(), String> {
    if value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(())
    } else {
        Err(format!("invalid label value {value:?}"))
    }
}

/// One parsed `fieldSelector`: `field=value`, `field==value`, `field!=value`, on the
/// fields the API server supports for the kind.
#[derive(Debug, Default)]
pub(crate) struct FieldSelector {
    requirements: Vec<(String, bool, String)>,
}

impl FieldSelector {
    pub(crate) fn parse(text: &str, kind: &ResourceKind) -> Result<Self, String> {
        let mut requirements = Vec::new();
        if text.trim().is_empty() {
            return Ok(Self { requirements });
        }
        for term in text.split(',') {
            let term = term.trim();
            let (field, equal, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!(
                    "invalid field selector term {term:?}: only =, == and != are supported"
                ));
            };
            let field = field.trim();
            let supported = matches!(field, "metadata.name" | "metadata.namespace")
                || kind.field_labels.contains(&field);
            if !supported {
                return Err(format!(
                    "field label not supported: {field} (for {}; supported: metadata.name, metadata.namespace{})",
                    kind.plural,
                    kind.field_labels
                        .iter()
                        .map(|f| format!(", {f}"))
                        .collect::<String>()
                ));
            }
            requirements.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(Self { requirements })
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        self.requirements.iter().all(|(field, equal, want)| {
            let pointer = format!("/{}", field.replace('.', "/"));
            // A missing field compares as the empty string: `spec.nodeName=` selects
            // pods that are not scheduled yet, as in Kubernetes.
            let have = match object.pointer(&pointer) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            (have == *want) == *equal
        })
    }
}

/// What one list or watch request selects: a namespace (or all) and both selectors.
#[derive(Debug, Default)]
pub(crate) struct Filter {
    pub(crate) namespace: Option<String>,
    pub(crate) labels: LabelSelector,
    pub(crate) fields: FieldSelector,
}

impl Filter {
    pub(crate) fn matches(&self, object: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            let have = object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if have != ns {
                return false;
            }
        }
        self.labels.matches(object) && self.fields.matches(object)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::fakeapi::store::kind_by_plural;

    fn pod(labels: Value, node: &str) -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "labels": labels}, "spec": {"nodeName": node}})
    }

    #[test]
    fn label_forms() {
        let obj = pod(json!({"app": "web", "tier": "front"}), "n1");
        let yes = [
            "app=web",
            "app==web",
            "app!=db",
            "app in (web, db)",
            "tier notin (back),app",
            "!missing",
            "missing!=x",
            "",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).expect(s).matches(&obj), "{s}");
        }
        let no = [
            "app=db",
            "app notin (web)",
            "missing",
            "!app",
            "app in (x,y),tier",
        ];
        for s in no {
            assert!(!LabelSelector::parse(s).expect(s).matches(&obj), "{s}");
        }
        for bad in ["app>1", "a in (x", "a foo (x)", "a=b c", ","] {
            assert!(
                LabelSelector::parse(bad).is_err(),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn field_forms() {
        let pods = kind_by_plural("pods").expect("pods");
        let obj = pod(json!({}), "n1");
        let sel = FieldSelector::parse("spec.nodeName=n1,metadata.name==p", pods).expect("parse");
        assert!(sel.matches(&obj));
        let sel = FieldSelector::parse("spec.nodeName!=n1", pods).expect("parse");
        assert!(!sel.matches(&obj));
        let unscheduled = json!({"metadata": {"name": "q"}, "spec": {}});
        let sel = FieldSelector::parse("spec.nodeName=", pods).expect("parse");
        assert!(sel.matches(&unscheduled));
        let err = FieldSelector::parse("spec.hostname=x", pods).expect_err("unsupported");
        assert!(err.contains("spec.hostname"), "{err}");
        let services = kind_by_plural("services").expect("services");
        assert!(FieldSelector::parse("spec.nodeName=n1", services).is_err());
    }
}
