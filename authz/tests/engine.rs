//! The engine on wire policies, as a data plane receives them from any Istio
//! control plane: lookups by attached name, updates one at a time, malformed
//! policies refused without losing state, ztunnel's clause semantics.

use authz::{Connection, Decision, Engine, Reason, Verdict};
use mesh_api::Identity;
use mesh_api::security::{
    Action, Address, Authorization, Clause, Match, Rule, Scope, StringMatch, string_match,
};

fn policy(
    namespace: &str,
    name: &str,
    scope: Scope,
    action: Action,
    rules: Vec<Rule>,
) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: namespace.into(),
        scope: scope.into(),
        action: action.into(),
        rules,
        dry_run: false,
    }
}

fn rule(matches: Vec<Match>) -> Rule {
    Rule {
        clauses: vec![Clause { matches }],
    }
}

fn from_namespace(namespace: &str) -> Match {
    Match {
        namespaces: vec![StringMatch {
            match_type: Some(string_match::MatchType::Exact(namespace.into())),
        }],
        ..Match::default()
    }
}

fn decide(engine: &Engine, source: Option<&str>, attached: &[String]) -> Decision {
    let identity: Option<Identity> = source.map(|s| s.parse().unwrap());
    engine.evaluate(&Connection {
        source: identity.as_ref(),
        source_ip: "10.0.0.1".parse().unwrap(),
        destination_ip: "10.0.0.2".parse().unwrap(),
        destination_port: 80,
        destination_namespace: "default",
        destination_labels: None,
        destination_policies: attached,
    })
}

const DEFAULT_SA: &str = "spiffe://cluster.local/ns/default/sa/a";
const OTHER_SA: &str = "spiffe://cluster.local/ns/other/sa/a";

#[test]
fn selector_policies_apply_only_where_attached() {
    let mut engine = Engine::new();
    engine
        .upsert(&policy(
            "default",
            "only-other",
            Scope::WorkloadSelector,
            Action::Allow,
            vec![rule(vec![from_namespace("other")])],
        ))
        .unwrap();
    assert_eq!(
        decide(&engine, Some(DEFAULT_SA), &[]).reason,
        Reason::NoAllowPolicy
    );
    let attached = ["default/only-other".to_owned()];
    assert_eq!(
        decide(&engine, Some(DEFAULT_SA), &attached).verdict,
        Verdict::Deny
    );
    assert_eq!(
        decide(&engine, Some(OTHER_SA), &attached).verdict,
        Verdict::Allow
    );
    // A listed name the engine does not hold is skipped.
    let unknown = ["default/missing".to_owned()];
    assert_eq!(
        decide(&engine, Some(DEFAULT_SA), &unknown).reason,
        Reason::NoAllowPolicy
    );
}

#[test]
fn upsert_replaces_and_remove_forgets() {
    let mut engine = Engine::new();
    let deny = |namespace: &str| {
        policy(
            "default",
            "d",
            Scope::Namespace,
            Action::Deny,
            vec![rule(vec![from_namespace(namespace)])],
        )
    };
    engine.upsert(&deny("other")).unwrap();
    assert_eq!(decide(&engine, Some(OTHER_SA), &[]).verdict, Verdict::Deny);
    engine.upsert(&deny("default")).unwrap();
    assert_eq!(engine.len(), 1);
    assert_eq!(decide(&engine, Some(OTHER_SA), &[]).verdict, Verdict::Allow);
    assert_eq!(
        decide(&engine, Some(DEFAULT_SA), &[]).verdict,
        Verdict::Deny
    );
    // A scope change moves the policy between indexes.
    let mut global = deny("default");
    global.scope = Scope::Global.into();
    engine.upsert(&global).unwrap();
    assert_eq!(engine.len(), 1);
    assert!(engine.remove("default/d"));
    assert!(!engine.remove("default/d"));
    assert!(engine.is_empty());
    assert_eq!(
        decide(&engine, Some(DEFAULT_SA), &[]).verdict,
        Verdict::Allow
    );
}

#[test]
fn malformed_wire_policies_are_refused_and_state_is_kept() {
    let mut engine = Engine::new();
    let good = policy(
        "default",
        "p",
        Scope::Namespace,
        Action::Deny,
        vec![rule(vec![from_namespace("other")])],
    );
    engine.upsert(&good).unwrap();

    let bad_cases: Vec<(Authorization, &str)> = vec![
        (
            {
                let mut p = good.clone();
                p.scope = 9;
                p
            },
            "unknown scope 9",
        ),
        (
            {
                let mut p = good.clone();
                p.action = 5;
                p
            },
            "unknown action 5",
        ),
        (
            {
                let mut p = good.clone();
                p.name.clear();
                p
            },
            "name: must be set",
        ),
        (
            policy(
                "default",
                "p",
                Scope::Namespace,
                Action::Deny,
                vec![rule(vec![Match {
                    source_ips: vec![Address {
                        address: vec![10, 0, 0],
                        length: 8,
                    }],
                    ..Match::default()
                }])],
            ),
            "source_ips[0]: an IP address on the wire is 4 or 16 bytes, got 3",
        ),
        (
            policy(
                "default",
                "p",
                Scope::Namespace,
                Action::Deny,
                vec![rule(vec![Match {
                    not_destination_ips: vec![Address {
                        address: vec![10, 0, 0, 0],
                        length: 33,
                    }],
                    ..Match::default()
                }])],
            ),
            "prefix length 33 is too long",
        ),
        (
            policy(
                "default",
                "p",
                Scope::Namespace,
                Action::Deny,
                vec![rule(vec![Match {
                    destination_ports: vec![80, 70_000],
                    ..Match::default()
                }])],
            ),
            "destination_ports[1]: port 70000 is above 65535",
        ),
        (
            policy(
                "default",
                "p",
                Scope::Namespace,
                Action::Deny,
                vec![rule(vec![Match {
                    principals: vec![StringMatch { match_type: None }],
                    ..Match::default()
                }])],
            ),
            "principals[0]: string match without",
        ),
    ];
    for (bad, needle) in bad_cases {
        let err = engine.upsert(&bad).unwrap_err();
        assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
        // The earlier version still decides.
        assert_eq!(engine.len(), 1);
        assert_eq!(
            decide(&engine, Some(OTHER_SA), &[]).verdict,
            Verdict::Deny,
            "after {needle}"
        );
    }
}

#[test]
fn ztunnel_clause_semantics() {
    let mut engine = Engine::new();
    // A clause with no matches holds; a clause of only empty matches never does.
    let rules = |clauses: Vec<Clause>| vec![Rule { clauses }];
    engine
        .upsert(&policy(
            "default",
            "no-matches",
            Scope::Namespace,
            Action::Deny,
            rules(vec![Clause { matches: vec![] }]),
        ))
        .unwrap();
    assert_eq!(
        decide(&engine, None, &[]).policy.as_deref(),
        Some("default/no-matches")
    );
    engine.remove("default/no-matches");
    engine
        .upsert(&policy(
            "default",
            "empty-match",
            Scope::Namespace,
            Action::Deny,
            rules(vec![Clause {
                matches: vec![Match::default()],
            }]),
        ))
        .unwrap();
    assert_eq!(decide(&engine, None, &[]).verdict, Verdict::Allow);
    // An empty match next to a real one: the real one decides.
    engine
        .upsert(&policy(
            "default",
            "empty-match",
            Scope::Namespace,
            Action::Deny,
            rules(vec![Clause {
                matches: vec![Match::default(), from_namespace("other")],
            }]),
        ))
        .unwrap();
    assert_eq!(decide(&engine, Some(OTHER_SA), &[]).verdict, Verdict::Deny);
    assert_eq!(
        decide(&engine, Some(DEFAULT_SA), &[]).verdict,
        Verdict::Allow
    );
    // A policy with no rules never matches: as ALLOW it closes the namespace.
    engine
        .upsert(&policy(
            "default",
            "no-rules",
            Scope::Namespace,
            Action::Allow,
            vec![],
        ))
        .unwrap();
    assert_eq!(
        decide(&engine, Some(DEFAULT_SA), &[]).reason,
        Reason::NoAllowPolicyMatched
    );
}

#[test]
fn dry_run_is_reported_once_even_when_reached_twice() {
    let mut engine = Engine::new();
    let mut dry = policy(
        "default",
        "dry",
        Scope::Namespace,
        Action::Deny,
        vec![Rule::default()],
    );
    dry.dry_run = true;
    engine.upsert(&dry).unwrap();
    // Reached through the namespace index and through the attached name.
    let decision = decide(&engine, Some(DEFAULT_SA), &["default/dry".to_owned()]);
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.dry_run.len(), 1);
    assert!(decision.dry_run[0].matched);
}

#[test]
fn engine_is_shareable() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<Engine>();
}
