//! SPIFFE identity parsing: a table of rejected inputs, each with the problem it
//! must be reported as, and property tests over generated identities.

use mesh_api::identity::{IdentityProblem, Segment};
use mesh_api::{Identity, IdentityError};
use proptest::prelude::*;

fn problem_of(uri: &str) -> IdentityProblem {
    Identity::parse_uri(uri)
        .expect_err(&format!("{uri:?} should be rejected"))
        .problem()
        .clone()
}

#[test]
fn rejected_uris_name_their_problem() {
    use IdentityProblem::*;
    let wrong_path = |path: &str| WrongPath { path: path.into() };
    let table: Vec<(&str, IdentityProblem)> = vec![
        ("", MissingScheme),
        ("cluster.local/ns/a/sa/b", MissingScheme),
        ("SPIFFE://cluster.local/ns/a/sa/b", MissingScheme),
        ("https://cluster.local/ns/a/sa/b", MissingScheme),
        ("spiffe:/cluster.local/ns/a/sa/b", MissingScheme),
        ("spiffe://", EmptyTrustDomain),
        ("spiffe:///ns/a/sa/b", EmptyTrustDomain),
        (
            "spiffe://Cluster.local/ns/a/sa/b",
            InvalidTrustDomainChar { character: 'C' },
        ),
        (
            "spiffe://td:8080/ns/a/sa/b",
            InvalidTrustDomainChar { character: ':' },
        ),
        (
            "spiffe://user@td/ns/a/sa/b",
            InvalidTrustDomainChar { character: '@' },
        ),
        (
            "spiffe://tdé/ns/a/sa/b",
            InvalidTrustDomainChar { character: 'é' },
        ),
        ("spiffe://td", wrong_path("")),
        ("spiffe://td/", wrong_path("/")),
        ("spiffe://td/ns/a", wrong_path("/ns/a")),
        ("spiffe://td/ns/a/sa", wrong_path("/ns/a/sa")),
        ("spiffe://td/sa/b/ns/a", wrong_path("/sa/b/ns/a")),
        ("spiffe://td/ns/a/sa/b/", wrong_path("/ns/a/sa/b/")),
        ("spiffe://td/ns/a/sa/b/c", wrong_path("/ns/a/sa/b/c")),
        (
            "spiffe://td/namespace/a/sa/b",
            wrong_path("/namespace/a/sa/b"),
        ),
        ("spiffe://td//ns/a/sa/b", wrong_path("//ns/a/sa/b")),
        (
            "spiffe://td/ns//sa/b",
            EmptySegment {
                segment: Segment::Namespace,
            },
        ),
        (
            "spiffe://td/ns/a/sa/",
            EmptySegment {
                segment: Segment::ServiceAccount,
            },
        ),
        (
            "spiffe://td/ns/../sa/b",
            DotSegment {
                segment: Segment::Namespace,
            },
        ),
        (
            "spiffe://td/ns/a/sa/.",
            DotSegment {
                segment: Segment::ServiceAccount,
            },
        ),
        (
            "spiffe://td/ns/a b/sa/b",
            InvalidSegmentChar {
                segment: Segment::Namespace,
                character: ' ',
            },
        ),
        (
            "spiffe://td/ns/a/sa/b?x=1",
            InvalidSegmentChar {
                segment: Segment::ServiceAccount,
                character: '?',
            },
        ),
        (
            "spiffe://td/ns/a/sa/b#frag",
            InvalidSegmentChar {
                segment: Segment::ServiceAccount,
                character: '#',
            },
        ),
        (
            "spiffe://td/ns/a%2F/sa/b",
            InvalidSegmentChar {
                segment: Segment::Namespace,
                character: '%',
            },
        ),
    ];
    for (uri, expected) in table {
        assert_eq!(problem_of(uri), expected, "for {uri:?}");
    }
}

#[test]
fn overlong_identities_are_rejected() {
    let long = format!("spiffe://td/ns/{}/sa/b", "a".repeat(2048));
    assert!(matches!(problem_of(&long), IdentityProblem::TooLong { .. }));
    // Exactly at the limit is fine.
    let prefix = "spiffe://td/ns/a/sa/";
    let at_limit = format!("{prefix}{}", "b".repeat(2048 - prefix.len()));
    assert_eq!(Identity::parse_uri(&at_limit).unwrap().as_uri().len(), 2048);
}

#[test]
fn principals_have_no_scheme() {
    let id = Identity::from_principal("cluster.local/ns/default/sa/shell").unwrap();
    assert_eq!(id.as_uri(), "spiffe://cluster.local/ns/default/sa/shell");
    let err = Identity::from_principal("spiffe://cluster.local/ns/default/sa/shell").unwrap_err();
    assert_eq!(err.problem(), &IdentityProblem::UnexpectedScheme);
    let err = Identity::from_principal("cluster.local/ns/default").unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid SPIFFE identity \"cluster.local/ns/default\": \
         the path must be /ns/<namespace>/sa/<service-account>, got \"/ns/default\""
    );
}

#[test]
fn error_messages_say_what_was_wrong() {
    let cases = [
        (
            "spiffe://td/ns/a",
            "the path must be /ns/<namespace>/sa/<service-account>",
        ),
        ("spiffe://TD/ns/a/sa/b", "the trust domain has 'T'"),
        ("spiffe://td/ns//sa/b", "the namespace is empty"),
        ("spiffe://td/ns/a/sa/b!", "the service account has '!'"),
        (
            "cluster.local/ns/a/sa/b",
            "it must start with \"spiffe://\"",
        ),
    ];
    for (input, needle) in cases {
        let message = Identity::parse_uri(input).unwrap_err().to_string();
        assert!(
            message.contains(needle),
            "{message:?} should contain {needle:?}"
        );
        assert!(
            message.contains(input),
            "{message:?} should quote the input"
        );
    }
}

fn trust_domain() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{1,40}"
}

fn segment() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,40}".prop_filter("dot segments are invalid", |s| s != "." && s != "..")
}

proptest! {
    #[test]
    fn valid_identities_round_trip(td in trust_domain(), ns in segment(), sa in segment()) {
        let id = Identity::new(&td, &ns, &sa).unwrap();
        prop_assert_eq!(id.trust_domain(), td.as_str());
        prop_assert_eq!(id.namespace(), ns.as_str());
        prop_assert_eq!(id.service_account(), sa.as_str());
        let uri = format!("spiffe://{td}/ns/{ns}/sa/{sa}");
        prop_assert_eq!(id.as_uri(), uri.as_str());
        prop_assert_eq!(&Identity::parse_uri(&uri).unwrap(), &id);
        prop_assert_eq!(&Identity::from_principal(id.principal()).unwrap(), &id);
        prop_assert_eq!(&id.to_string().parse::<Identity>().unwrap(), &id);
    }

    #[test]
    fn arbitrary_strings_never_panic(input in ".{0,80}") {
        // Either a valid identity whose URI is the input, or an error quoting it.
        match Identity::parse_uri(&input) {
            Ok(id) => prop_assert_eq!(id.as_uri(), input.as_str()),
            Err(err) => prop_assert!(err.to_string().starts_with("invalid SPIFFE identity")),
        }
        let _ = Identity::from_principal(&input);
    }

    #[test]
    fn a_bad_character_anywhere_in_a_part_is_rejected(
        td in trust_domain(),
        ns in segment(),
        sa in segment(),
        bad in "[^A-Za-z0-9._-]",
        part in 0..3usize,
        at in any::<prop::sample::Index>(),
    ) {
        let mut parts = [td, ns, sa];
        let target = &mut parts[part];
        let mut at = at.index(target.len() + 1);
        while !target.is_char_boundary(at) { at -= 1; }
        target.insert_str(at, &bad);
        let [td, ns, sa] = parts;
        let result: Result<Identity, IdentityError> = Identity::new(&td, &ns, &sa);
        prop_assert!(result.is_err(), "{td}/{ns}/{sa} was accepted");
    }
}
