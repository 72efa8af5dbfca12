//! Reading a `Config` from YAML: defaults for what is left out, errors that
//! name the file and the field, nothing accepted that was misspelt.

use std::time::Duration;

use mesh_net::HandshakeLimits;
use mesh_net::config::{ConfigError, from_yaml};
use proptest::prelude::*;

#[test]
fn what_is_left_out_keeps_its_default() {
    let limits: HandshakeLimits = from_yaml("", "empty.yaml").expect("defaults");
    assert_eq!(limits, HandshakeLimits::default());
    let limits: HandshakeLimits =
        from_yaml("maxInProgressPerIp: 8\ntimeout: 2m 30s\n", "l.yaml").expect("read");
    assert_eq!(limits.max_in_progress_per_ip, 8);
    assert_eq!(limits.timeout, Duration::from_secs(150));
    assert_eq!(limits.max_in_progress, 1024);
}

#[test]
fn json_is_read_too() {
    let limits: HandshakeLimits =
        from_yaml(r#"{"timeout": "250ms", "maxInProgress": 10}"#, "l.json").expect("read");
    assert_eq!(limits.timeout, Duration::from_millis(250));
    assert_eq!(limits.max_in_progress, 10);
}

#[test]
fn a_misspelt_field_is_refused_by_name() {
    let err = from_yaml::<HandshakeLimits>("max_in_progress: 3\n", "l.yaml").expect_err("refused");
    assert_eq!(err.source_name, "l.yaml");
    assert!(
        err.message.contains("unknown field `max_in_progress`"),
        "{err}"
    );
    assert!(err.message.contains("maxInProgress"), "{err}");
}

#[test]
fn a_wrong_value_names_its_field() {
    let err = from_yaml::<HandshakeLimits>("maxInProgress: many\n", "l.yaml").expect_err("refused");
    assert_eq!(err.path, "maxInProgress");
    assert!(
        err.to_string().starts_with("l.yaml: maxInProgress: "),
        "{err}"
    );
}

#[test]
fn text_that_is_not_yaml_names_the_file() {
    let err: ConfigError = from_yaml::<HandshakeLimits>("timeout: [1,\n", "l.yaml").expect_err("x");
    assert!(err.to_string().starts_with("l.yaml: "), "{err}");
    assert!(err.path.is_empty());
}

#[test]
fn yaml_1_1_booleans_stay_text() {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Names {
        node_id: String,
        socks5: String,
        on: bool,
    }
    let names: Names = from_yaml("nodeId: n\nsocks5: off\non: true\n", "names.yaml").expect("read");
    assert_eq!(names.node_id, "n");
    assert_eq!(names.socks5, "off");
    assert!(names.on);
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(text in ".{0,200}") {
        let _ = from_yaml::<HandshakeLimits>(&text, "fuzz.yaml");
    }
}
