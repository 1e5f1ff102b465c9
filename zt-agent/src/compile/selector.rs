//! Label selector matching with Kubernetes semantics: all of matchLabels and all
//! expressions must hold (AND); an empty selector matches everything; NotIn and
//! DoesNotExist match when the key is absent. Selectors are validated at load time,
//! so an unknown operator here is a bug and matches nothing (fail closed).

use std::collections::BTreeMap;

use crate::model::k8s::LabelSelector;

pub fn matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    labels_ok
        && sel.match_expressions.iter().flatten().all(|req| {
            let values = req.values.as_deref().unwrap_or(&[]);
            let got = labels.get(&req.key);
            match req.operator.as_str() {
                "In" => got.is_some_and(|v| values.contains(v)),
                "NotIn" => got.is_none_or(|v| !values.contains(v)),
                "Exists" => got.is_some(),
                "DoesNotExist" => got.is_none(),
                _ => false,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::k8s::LabelSelectorRequirement;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: Some(values.iter().map(|v| v.to_string()).collect()),
            }]),
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(matches(&LabelSelector::default(), &labels(&[])));
        assert!(matches(&LabelSelector::default(), &labels(&[("a", "b")])));
        let empty_parts = LabelSelector {
            match_labels: Some(BTreeMap::new()),
            match_expressions: Some(vec![]),
        };
        assert!(matches(&empty_parts, &labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_and() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "web"), ("tier", "fe")])),
            match_expressions: None,
        };
        assert!(matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "fe"), ("x", "y")])
        ));
        assert!(!matches(&sel, &labels(&[("app", "web")])));
        assert!(!matches(&sel, &labels(&[("app", "web"), ("tier", "be")])));
    }

    #[test]
    fn operators() {
        let l = labels(&[("env", "prod")]);
        assert!(matches(&expr("env", "In", &["prod", "dev"]), &l));
        assert!(!matches(&expr("env", "In", &["dev"]), &l));
        assert!(!matches(&expr("missing", "In", &["prod"]), &l));
        assert!(!matches(&expr("env", "NotIn", &["prod"]), &l));
        assert!(matches(&expr("env", "NotIn", &["dev"]), &l));
        // NotIn and DoesNotExist match an absent key.
        assert!(matches(&expr("missing", "NotIn", &["prod"]), &l));
        assert!(matches(&expr("missing", "DoesNotExist", &[]), &l));
        assert!(!matches(&expr("env", "DoesNotExist", &[]), &l));
        assert!(matches(&expr("env", "Exists", &[]), &l));
        assert!(!matches(&expr("missing", "Exists", &[]), &l));
        assert!(!matches(&expr("env", "Bogus", &[]), &l));
    }

    #[test]
    fn labels_and_expressions_combine() {
        let mut sel = expr("tier", "NotIn", &["db"]);
        sel.match_labels = Some(labels(&[("app", "web")]));
        assert!(matches(&sel, &labels(&[("app", "web")])));
        assert!(!matches(&sel, &labels(&[("app", "web"), ("tier", "db")])));
        assert!(!matches(&sel, &labels(&[("tier", "fe")])));
    }
}
