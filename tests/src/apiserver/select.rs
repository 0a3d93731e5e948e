//! Which objects a list or watch sees: its namespace, `labelSelector` (the
//! full string syntax: `=`, `==`, `!=`, `in`, `notin`, `key`, `!key`, `>`,
//! `<`) and `fieldSelector`.
//!
//! Field selectors are more lenient than a real API server's: any dotted
//! path into the object can be compared (a real one allows a few per kind,
//! always `metadata.name` and `metadata.namespace`, and answers 400 for
//! others). A missing field compares as the empty string.

use serde_json::Value;

use super::store::ApiError;

/// The namespace and selectors of one list or watch.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// `None` for cluster-scoped kinds and the all-namespaces paths.
    pub namespace: Option<String>,
    pub labels: Vec<LabelRequirement>,
    pub fields: Vec<FieldRequirement>,
}

impl Filter {
    pub fn new(
        namespace: Option<String>,
        labels: Option<&str>,
        fields: Option<&str>,
    ) -> Result<Self, ApiError> {
        Ok(Self {
            namespace,
            labels: parse_labels(labels.unwrap_or(""))?,
            fields: parse_fields(fields.unwrap_or(""))?,
        })
    }

    pub fn matches(&self, object: &Value) -> bool {
        let namespace = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("");
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
            && self.labels.iter().all(|r| r.matches(object))
            && self.fields.iter().all(|r| r.matches(object))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

impl LabelRequirement {
    fn matches(&self, object: &Value) -> bool {
        let label = |key: &str| {
            object
                .pointer("/metadata/labels")
                .and_then(|labels| labels.get(key))
                .and_then(Value::as_str)
        };
        let number = |key: &str| label(key).and_then(|v| v.parse::<i64>().ok());
        match self {
            Self::Equals(key, value) => label(key) == Some(value),
            // As in Kubernetes, `!=` and `notin` also select objects without
            // the label.
            Self::NotEquals(key, value) => label(key) != Some(value),
            Self::In(key, values) => label(key).is_some_and(|v| values.iter().any(|x| x == v)),
            Self::NotIn(key, values) => label(key).is_none_or(|v| values.iter().all(|x| x != v)),
            Self::Exists(key) => label(key).is_some(),
            Self::DoesNotExist(key) => label(key).is_none(),
            Self::GreaterThan(key, bound) => number(key).is_some_and(|v| v > *bound),
            Self::LessThan(key, bound) => number(key).is_some_and(|v| v < *bound),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRequirement {
    path: Vec<String>,
    value: String,
    equal: bool,
}

impl FieldRequirement {
    fn matches(&self, object: &Value) -> bool {
        let found = self
            .path
            .iter()
            .try_fold(object, |node, key| node.get(key))
            .map(|value| match value {
                Value::String(text) => text.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            })
            .unwrap_or_default();
        (found == self.value) == self.equal
    }
}

pub fn parse_labels(text: &str) -> Result<Vec<LabelRequirement>, ApiError> {
    split_requirements(text)
        .into_iter()
        .map(|part| {
            parse_label(part).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unable to parse requirement: {part:?} in labelSelector {text:?}"
                ))
            })
        })
        .collect()
}

fn parse_label(part: &str) -> Option<LabelRequirement> {
    use LabelRequirement::*;
    let pair = |separator: &str| {
        part.split_once(separator)
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .filter(|(k, v)| valid_key(k) && valid_value(v))
    };
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        return valid_key(key).then(|| DoesNotExist(key.into()));
    }
    if part.contains("!=") {
        return pair("!=").map(|(k, v)| NotEquals(k, v));
    }
    if part.contains("==") {
        return pair("==").map(|(k, v)| Equals(k, v));
    }
    if part.contains('=') {
        return pair("=").map(|(k, v)| Equals(k, v));
    }
    if part.contains('(') {
        let (key, rest) = part.split_once(char::is_whitespace)?;
        let rest = rest.trim();
        let (operator, values) = rest.split_once('(')?;
        let values: Vec<String> = values
            .strip_suffix(')')?
            .split(',')
            .map(|v| v.trim().to_string())
            .collect();
        if !valid_key(key) || !values.iter().all(|v| valid_value(v)) {
            return None;
        }
        return match operator.trim() {
            "in" => Some(In(key.into(), values)),
            "notin" => Some(NotIn(key.into(), values)),
            _ => None,
        };
    }
    for (separator, greater) in [(">", true), ("<", false)] {
        if let Some((key, bound)) = part.split_once(separator) {
            let (key, bound) = (key.trim(), bound.trim().parse().ok()?);
            if !valid_key(key) {
                return None;
            }
            return Some(if greater {
                GreaterThan(key.into(), bound)
            } else {
                LessThan(key.into(), bound)
            });
        }
    }
    valid_key(part).then(|| Exists(part.into()))
}

pub fn parse_fields(text: &str) -> Result<Vec<FieldRequirement>, ApiError> {
    split_requirements(text)
        .into_iter()
        .map(|part| {
            let (path, value, equal) = if let Some((p, v)) = part.split_once("!=") {
                (p, v, false)
            } else if let Some((p, v)) = part.split_once("==") {
                (p, v, true)
            } else if let Some((p, v)) = part.split_once('=') {
                (p, v, true)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: {part:?} in fieldSelector {text:?}"
                )));
            };
            Ok(FieldRequirement {
                path: path.trim().split('.').map(str::to_string).collect(),
                value: value.trim().to_string(),
                equal,
            })
        })
        .collect()
}

/// Splits on the commas that separate requirements, not those inside a
/// set `(a,b)`.
fn split_requirements(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(value: &str) -> bool {
    value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labelled(labels: Value) -> Value {
        json!({"metadata": {"name": "x", "namespace": "ns", "labels": labels}, "spec": {"nodeName": "n1"}})
    }

    fn selects(selector: &str, object: &Value) -> bool {
        Filter::new(None, Some(selector), None)
            .expect("valid selector")
            .matches(object)
    }

    #[test]
    fn label_selectors() {
        let object = labelled(json!({"app": "web", "tier": "3"}));
        assert!(selects("app=web", &object));
        assert!(selects("app==web,tier", &object));
        assert!(!selects("app!=web", &object));
        assert!(selects("app in (db, web),!missing", &object));
        assert!(!selects("app notin (web)", &object));
        assert!(selects("missing notin (web)", &object));
        assert!(selects("tier>2,tier<4", &object));
        assert!(selects("", &object));
        assert!(Filter::new(None, Some("app in web"), None).is_err());
        assert!(Filter::new(None, Some("a b=c"), None).is_err());
    }

    #[test]
    fn field_selectors_and_namespace() {
        let object = labelled(json!({}));
        let filter = |ns: Option<&str>, fields: &str| {
            Filter::new(ns.map(str::to_string), None, Some(fields))
                .expect("valid selector")
                .matches(&object)
        };
        assert!(filter(Some("ns"), "metadata.name=x"));
        assert!(!filter(Some("other"), "metadata.name=x"));
        assert!(filter(None, "metadata.namespace==ns,spec.nodeName!=n2"));
        assert!(filter(None, "status.phase="));
        assert!(Filter::new(None, None, Some("metadata.name")).is_err());
    }
}
