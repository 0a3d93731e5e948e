//! Label selectors, evaluated the way the API server does.
//!
//! A selector the agent cannot evaluate (an unknown operator, `In` without
//! values) is an error rather than "matches nothing": the caller reports it,
//! so a typo is visible instead of quietly dropping a tenant's pods.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use super::kubeovn::NodeSelectorTerm;

pub type Labels = BTreeMap<String, String>;

/// Whether `labels` satisfy `selector`; an empty selector matches everything.
pub fn matches(selector: &LabelSelector, labels: &Labels) -> Result<bool, String> {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(key, value)| labels.get(key) == Some(value));
    if !by_labels {
        // Still evaluate the expressions, so a malformed one is reported
        // whatever the labels are.
        for requirement in selector.match_expressions.iter().flatten() {
            requirement_matches(
                requirement,
                labels.get(&requirement.key).map(String::as_str),
            )?;
        }
        return Ok(false);
    }
    let mut all = true;
    for requirement in selector.match_expressions.iter().flatten() {
        all &= requirement_matches(
            requirement,
            labels.get(&requirement.key).map(String::as_str),
        )?;
    }
    Ok(all)
}

/// Checks a selector once, without labels, so it can be reported up front.
pub fn validate(selector: &LabelSelector) -> Result<(), String> {
    matches(selector, &Labels::new()).map(|_| ())
}

/// One requirement against the value the key has (`None`: no such key).
fn requirement_matches(
    requirement: &LabelSelectorRequirement,
    value: Option<&str>,
) -> Result<bool, String> {
    let values: &[String] = requirement.values.as_deref().unwrap_or_default();
    let key = &requirement.key;
    match requirement.operator.as_str() {
        "In" | "NotIn" if values.is_empty() => Err(format!(
            "{key} {}: needs at least one value",
            requirement.operator
        )),
        "In" => Ok(value.is_some_and(|v| values.iter().any(|x| x == v))),
        "NotIn" => Ok(!value.is_some_and(|v| values.iter().any(|x| x == v))),
        "Exists" | "DoesNotExist" if !values.is_empty() => {
            Err(format!("{key} {}: takes no values", requirement.operator))
        }
        "Exists" => Ok(value.is_some()),
        "DoesNotExist" => Ok(value.is_none()),
        // Node affinity's numeric operators, used by Kube-OVN node selectors.
        "Gt" | "Lt" => {
            let [bound] = values else {
                return Err(format!(
                    "{key} {}: needs exactly one value",
                    requirement.operator
                ));
            };
            let bound: i64 = bound.parse().map_err(|_| {
                format!(
                    "{key} {}: {bound:?} is not an integer",
                    requirement.operator
                )
            })?;
            Ok(value.and_then(|v| v.parse::<i64>().ok()).is_some_and(|v| {
                if requirement.operator == "Gt" {
                    v > bound
                } else {
                    v < bound
                }
            }))
        }
        other => Err(format!("{key}: unknown operator {other:?}")),
    }
}

/// Whether a node (by name and labels) satisfies Kube-OVN's list of node
/// selector terms: terms are ORed, an empty list matches every node.
pub fn node_terms_match(
    terms: &[NodeSelectorTerm],
    name: &str,
    labels: &Labels,
) -> Result<bool, String> {
    if terms.is_empty() {
        return Ok(true);
    }
    let mut any = false;
    for term in terms {
        let selector = LabelSelector {
            match_labels: Some(term.match_labels.clone()),
            match_expressions: Some(term.match_expressions.clone()),
        };
        let mut this = matches(&selector, labels)?;
        for field in &term.match_fields {
            if field.key != "metadata.name" {
                return Err(format!(
                    "matchFields: {} is not a node field (only metadata.name is)",
                    field.key
                ));
            }
            this &= requirement_matches(field, Some(name))?;
        }
        any |= this;
    }
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn requirement(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.to_owned(),
            operator: operator.to_owned(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).to_owned()).collect()),
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert_eq!(matches(&LabelSelector::default(), &Labels::new()), Ok(true));
        assert_eq!(
            matches(&LabelSelector::default(), &labels(&[("a", "b")])),
            Ok(true)
        );
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let selector = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![
                requirement("tier", "In", &["front", "edge"]),
                requirement("canary", "DoesNotExist", &[]),
            ]),
        };
        assert_eq!(
            matches(&selector, &labels(&[("app", "web"), ("tier", "edge")])),
            Ok(true)
        );
        assert_eq!(
            matches(&selector, &labels(&[("app", "web"), ("tier", "back")])),
            Ok(false)
        );
        assert_eq!(
            matches(
                &selector,
                &labels(&[("app", "web"), ("tier", "edge"), ("canary", "1")])
            ),
            Ok(false)
        );
        assert_eq!(matches(&selector, &labels(&[("tier", "edge")])), Ok(false));
    }

    #[test]
    fn not_in_matches_a_missing_key_and_exists_does_not() {
        let not_in = LabelSelector {
            match_expressions: Some(vec![requirement("env", "NotIn", &["prod"])]),
            ..Default::default()
        };
        assert_eq!(matches(&not_in, &Labels::new()), Ok(true));
        assert_eq!(matches(&not_in, &labels(&[("env", "prod")])), Ok(false));
        let exists = LabelSelector {
            match_expressions: Some(vec![requirement("env", "Exists", &[])]),
            ..Default::default()
        };
        assert_eq!(matches(&exists, &Labels::new()), Ok(false));
    }

    #[test]
    fn malformed_requirements_are_errors_even_when_labels_do_not_match() {
        let selector = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![requirement("tier", "Equals", &["x"])]),
        };
        assert!(matches(&selector, &Labels::new()).is_err());
        assert!(validate(&selector).is_err());
        let empty_in = LabelSelector {
            match_expressions: Some(vec![requirement("tier", "In", &[])]),
            ..Default::default()
        };
        assert!(validate(&empty_in).is_err());
    }

    #[test]
    fn node_terms_are_ored_and_match_the_node_name_field() {
        let terms = vec![
            NodeSelectorTerm {
                match_labels: labels(&[("kubernetes.io/hostname", "kube-ovn-worker")]),
                ..Default::default()
            },
            NodeSelectorTerm {
                match_fields: vec![requirement("metadata.name", "In", &["worker-9"])],
                ..Default::default()
            },
        ];
        let worker = labels(&[("kubernetes.io/hostname", "kube-ovn-worker")]);
        assert_eq!(
            node_terms_match(&terms, "kube-ovn-worker", &worker),
            Ok(true)
        );
        assert_eq!(
            node_terms_match(&terms, "worker-9", &Labels::new()),
            Ok(true)
        );
        assert_eq!(
            node_terms_match(&terms, "worker-2", &Labels::new()),
            Ok(false)
        );
        assert_eq!(node_terms_match(&[], "any", &Labels::new()), Ok(true));
        let bad = vec![NodeSelectorTerm {
            match_fields: vec![requirement("spec.unschedulable", "In", &["true"])],
            ..Default::default()
        }];
        assert!(node_terms_match(&bad, "n", &Labels::new()).is_err());
    }

    #[test]
    fn numeric_operators() {
        let selector = LabelSelector {
            match_expressions: Some(vec![requirement("gpus", "Gt", &["1"])]),
            ..Default::default()
        };
        assert_eq!(matches(&selector, &labels(&[("gpus", "2")])), Ok(true));
        assert_eq!(matches(&selector, &labels(&[("gpus", "1")])), Ok(false));
        assert_eq!(matches(&selector, &labels(&[("gpus", "many")])), Ok(false));
    }
}
