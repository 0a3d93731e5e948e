//! The two patch formats the server applies itself: JSON merge patch
//! (RFC 7386, also standing in for strategic merge and server-side apply)
//! and JSON patch (RFC 6902, which kube-runtime's finalizer helper sends).

use serde_json::{Map, Value};

/// RFC 7386: objects merge key by key, `null` removes a key, anything else
/// (arrays included) replaces what was there.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in fields {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// RFC 6902: applies every operation in order, or none (the document is
/// only replaced when all of them succeed).
pub fn json_patch(document: &mut Value, operations: &Value) -> Result<(), String> {
    let Value::Array(operations) = operations else {
        return Err("a JSON patch must be an array of operations".into());
    };
    let mut patched = document.clone();
    for operation in operations {
        let field = |name: &str| {
            operation
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("operation {operation} has no {name:?}"))
        };
        let path = pointer(field("path")?)?;
        let value = || {
            operation
                .get("value")
                .cloned()
                .ok_or_else(|| format!("operation {operation} has no \"value\""))
        };
        match field("op")? {
            "add" => add(&mut patched, &path, value()?)?,
            "remove" => {
                remove(&mut patched, &path)?;
            }
            "replace" => {
                remove(&mut patched, &path)?;
                add(&mut patched, &path, value()?)?;
            }
            "move" => {
                let from = pointer(field("from")?)?;
                let moved = remove(&mut patched, &from)?;
                add(&mut patched, &path, moved)?;
            }
            "copy" => {
                let from = pointer(field("from")?)?;
                let copied = get(&patched, &from)
                    .cloned()
                    .ok_or_else(|| format!("copy from a missing path {from:?}"))?;
                add(&mut patched, &path, copied)?;
            }
            "test" => {
                if get(&patched, &path) != Some(&value()?) {
                    return Err(format!("test failed at {path:?}"));
                }
            }
            other => return Err(format!("unknown JSON patch operation {other:?}")),
        }
    }
    *document = patched;
    Ok(())
}

/// The unescaped tokens of a JSON pointer ("" is the whole document).
fn pointer(text: &str) -> Result<Vec<String>, String> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = text.strip_prefix('/') else {
        return Err(format!("{text:?} is not a JSON pointer"));
    };
    Ok(rest
        .split('/')
        .map(|token| token.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn get<'a>(document: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(document, |node, token| match node {
        Value::Object(map) => map.get(token),
        Value::Array(items) => token.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

fn parent<'a>(document: &'a mut Value, path: &[String]) -> Result<&'a mut Value, String> {
    let mut node = document;
    for token in path {
        node = match node {
            Value::Object(map) => map.get_mut(token),
            Value::Array(items) => token.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("missing path segment {token:?}"))?;
    }
    Ok(node)
}

fn add(document: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let Some((last, init)) = path.split_last() else {
        *document = value;
        return Ok(());
    };
    match parent(document, init)? {
        Value::Object(map) => {
            map.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(items) => {
            let index = if last == "-" {
                items.len()
            } else {
                last.parse::<usize>()
                    .ok()
                    .filter(|i| *i <= items.len())
                    .ok_or_else(|| format!("array index {last:?} out of range"))?
            };
            items.insert(index, value);
            Ok(())
        }
        _ => Err(format!("cannot add {last:?} to a scalar")),
    }
}

fn remove(document: &mut Value, path: &[String]) -> Result<Value, String> {
    let Some((last, init)) = path.split_last() else {
        return Err("cannot remove the whole document".into());
    };
    let removed = match parent(document, init)? {
        Value::Object(map) => map.remove(last),
        Value::Array(items) => last
            .parse::<usize>()
            .ok()
            .filter(|i| *i < items.len())
            .map(|i| items.remove(i)),
        _ => None,
    };
    removed.ok_or_else(|| format!("nothing to remove at {last:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(
            &mut doc,
            &json!({"a": "z", "c": {"f": null}, "l": [3], "n": {"x": 1}}),
        );
        assert_eq!(
            doc,
            json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": {"x": 1}})
        );
    }

    #[test]
    fn json_patch_is_all_or_nothing() {
        let mut doc = json!({"metadata": {"finalizers": ["a", "b"]}});
        json_patch(
            &mut doc,
            &json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": "a"},
                {"op": "remove", "path": "/metadata/finalizers/0"},
                {"op": "add", "path": "/metadata/finalizers/-", "value": "c"},
                {"op": "copy", "from": "/metadata/finalizers", "path": "/copy"},
                {"op": "move", "from": "/copy", "path": "/moved"},
                {"op": "replace", "path": "/metadata/finalizers/0", "value": "d"}
            ]),
        )
        .expect("valid patch");
        assert_eq!(
            doc,
            json!({"metadata": {"finalizers": ["d", "c"]}, "moved": ["b", "c"]})
        );
        let before = doc.clone();
        let failed = json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/x", "value": 1},
                {"op": "test", "path": "/moved/0", "value": "nope"}
            ]),
        );
        assert!(failed.is_err());
        assert_eq!(doc, before);
    }
}
