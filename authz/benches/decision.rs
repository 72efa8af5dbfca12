//! Decision time against mesh size: 10, 1,000 and 100,000 policies in the mesh,
//! of which 5 apply to the destination (one global, one namespace-wide, three
//! selected: two attached by name as a control plane sends them, one found through
//! the label index). The rest are spread over 1,000 other namespaces and selectors.
//!
//! The connection is allowed by the last ALLOW policy after every DENY policy was
//! checked, so all five applicable policies are evaluated.
//!
//! Run: `cargo bench -p podless-authz --bench decision`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use authz::{Connection, Engine, Labels, Selector, Verdict};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mesh_api::Identity;
use mesh_api::security::{
    Action, Address, Authorization, Clause, Match, Rule, Scope, StringMatch, string_match,
};

const ROOT: &str = "istio-system";

fn exact(value: &str) -> StringMatch {
    StringMatch {
        match_type: Some(string_match::MatchType::Exact(value.into())),
    }
}

/// A typical policy body: sources by principal or namespace, a port, an IP range.
fn rules(seed: usize, principal: &str) -> Vec<Rule> {
    vec![
        Rule {
            clauses: vec![
                Clause {
                    matches: vec![Match {
                        destination_ports: vec![9000 + u32::try_from(seed % 100).unwrap()],
                        ..Match::default()
                    }],
                },
                Clause {
                    matches: vec![
                        Match {
                            principals: vec![exact(principal)],
                            ..Match::default()
                        },
                        Match {
                            namespaces: vec![exact(&format!("team-{seed}"))],
                            ..Match::default()
                        },
                    ],
                },
            ],
        },
        Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    source_ips: vec![Address {
                        address: vec![192, 168, u8::try_from(seed % 250).unwrap(), 0],
                        length: 24,
                    }],
                    ..Match::default()
                }],
            }],
        },
    ]
}

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

fn selector(namespace: &str, app: &str) -> Selector {
    Selector {
        namespace: namespace.into(),
        root: false,
        match_labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
    }
}

struct Mesh {
    engine: Engine,
    attached: Vec<String>,
    labels: Labels,
    source: Identity,
}

/// A mesh of `total` policies, 5 of which apply to `default/echo`.
fn mesh(total: usize) -> Mesh {
    let mut engine = Engine::new();
    let other = "cluster.local/ns/elsewhere/sa/nobody";
    let shell = "cluster.local/ns/default/sa/shell";
    // The five that apply: DENYs that do not match, then the ALLOW that does.
    let applicable = [
        (
            policy(
                ROOT,
                "mesh-deny",
                Scope::Global,
                Action::Deny,
                rules(1, other),
            ),
            None,
        ),
        (
            policy(
                "default",
                "ns-deny",
                Scope::Namespace,
                Action::Deny,
                rules(2, other),
            ),
            None,
        ),
        (
            policy(
                "default",
                "echo-deny",
                Scope::WorkloadSelector,
                Action::Deny,
                rules(3, other),
            ),
            None,
        ),
        (
            policy(
                "default",
                "echo-deny-2",
                Scope::WorkloadSelector,
                Action::Deny,
                rules(4, other),
            ),
            Some(selector("default", "echo")),
        ),
        (
            policy(
                "default",
                "echo-allow",
                Scope::WorkloadSelector,
                Action::Allow,
                {
                    let mut allow = rules(5, shell);
                    allow[0].clauses[0].matches[0].destination_ports = vec![8080];
                    allow
                },
            ),
            None,
        ),
    ];
    for (authorization, selector) in &applicable {
        engine
            .upsert_with_selector(authorization, selector.clone())
            .unwrap();
    }
    // The rest: selector policies on other apps and namespace policies elsewhere.
    for i in 0..total.saturating_sub(applicable.len()) {
        let namespace = format!("ns-{}", i % 1000);
        let action = if i % 3 == 0 {
            Action::Deny
        } else {
            Action::Allow
        };
        let name = format!("p-{i}");
        if i % 10 == 0 {
            engine
                .upsert(&policy(
                    &namespace,
                    &name,
                    Scope::Namespace,
                    action,
                    rules(i, other),
                ))
                .unwrap();
        } else {
            let app = format!("app-{}", i % 5000);
            let selected = if i % 2 == 0 {
                "default"
            } else {
                namespace.as_str()
            };
            engine
                .upsert_with_selector(
                    &policy(
                        selected,
                        &name,
                        Scope::WorkloadSelector,
                        action,
                        rules(i, other),
                    ),
                    Some(selector(selected, &app)),
                )
                .unwrap();
        }
    }
    assert_eq!(engine.len(), total.max(applicable.len()));
    Mesh {
        engine,
        attached: vec!["default/echo-deny".into(), "default/echo-allow".into()],
        labels: BTreeMap::from([
            ("app".to_owned(), "echo".to_owned()),
            ("version".to_owned(), "v1".to_owned()),
        ]),
        source: "spiffe://cluster.local/ns/default/sa/shell"
            .parse()
            .unwrap(),
    }
}

fn connection(mesh: &Mesh) -> Connection<'_> {
    Connection {
        source: Some(&mesh.source),
        source_ip: "10.42.0.5".parse().unwrap(),
        destination_ip: "10.42.1.9".parse().unwrap(),
        destination_port: 8080,
        destination_namespace: "default",
        destination_labels: Some(&mesh.labels),
        destination_policies: &mesh.attached,
    }
}

const SIZES: [usize; 3] = [10, 1_000, 100_000];

fn decisions(c: &mut Criterion) {
    let meshes: Vec<Mesh> = SIZES.iter().map(|&total| mesh(total)).collect();
    let mut group = c.benchmark_group("decision");
    group.measurement_time(Duration::from_secs(8));
    for (total, mesh) in SIZES.iter().zip(&meshes) {
        let connection = connection(mesh);
        let decision = mesh.engine.evaluate(&connection);
        assert_eq!(decision.verdict, Verdict::Allow);
        assert_eq!(decision.policy.as_deref(), Some("default/echo-allow"));
        group.bench_function(BenchmarkId::from_parameter(total), |b| {
            b.iter(|| mesh.engine.evaluate(black_box(&connection)));
        });
    }
    group.finish();
    interleaved(&meshes);
}

/// The three sizes measured in alternation (31 rounds of 20,000 decisions each),
/// so that drift in machine speed affects them alike; medians and the ratio of
/// the largest mesh to the smallest.
#[allow(clippy::print_stdout)]
fn interleaved(meshes: &[Mesh]) {
    const ROUNDS: usize = 31;
    const DECISIONS: u32 = 20_000;
    let mut samples = vec![Vec::with_capacity(ROUNDS); meshes.len()];
    for _ in 0..ROUNDS {
        for (mesh, samples) in meshes.iter().zip(&mut samples) {
            let connection = connection(mesh);
            let start = Instant::now();
            for _ in 0..DECISIONS {
                black_box(mesh.engine.evaluate(black_box(&connection)));
            }
            samples.push(start.elapsed().as_secs_f64() * 1e9 / f64::from(DECISIONS));
        }
    }
    let medians: Vec<f64> = samples
        .iter_mut()
        .map(|s| {
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        })
        .collect();
    for (total, median) in SIZES.iter().zip(&medians) {
        println!(
            "interleaved: {total} policies: {median:.0} ns/decision (median of {ROUNDS} rounds)"
        );
    }
    println!(
        "interleaved: ratio 100000/10 = {:.2}, 1000/10 = {:.2}",
        medians[2] / medians[0],
        medians[1] / medians[0]
    );
}

criterion_group!(benches, decisions);
criterion_main!(benches);
