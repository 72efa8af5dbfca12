//! `ztunnel-run`'s command line as a person meets it: `--help` describes
//! every flag, and a bad argument is refused naming the flag.

use std::path::PathBuf;
use std::process::Command;

/// The `ztunnel-run` example, built by cargo with the tests.
fn ztunnel_run() -> PathBuf {
    test_support::example("ztunnel-core", "ztunnel-run")
}

#[test]
fn help_describes_every_flag() {
    let help = test_support::help(&ztunnel_run());
    for flag in [
        "--control-plane",
        "--root",
        "--token",
        "--workload-uid",
        "--node-id",
        "--cert-ttl",
        "--socks5",
        "--hbone-port",
        "--admin",
        "--metrics",
        "--readiness",
        "--worker-threads",
        "--on-demand",
    ] {
        assert!(help.contains(flag), "{flag} in\n{help}");
    }
    assert!(help.contains("[default: 127.0.0.1:15000]"), "{help}");
}

#[test]
fn a_bad_argument_is_refused_naming_the_flag() {
    let output = Command::new(ztunnel_run())
        .args(["--control-plane", "not-an-address"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let error = String::from_utf8(output.stderr).expect("UTF-8");
    assert!(error.contains("--control-plane"), "{error}");
    let output = Command::new(ztunnel_run())
        .args(["--admin", "nowhere"])
        .output()
        .expect("run");
    let error = String::from_utf8(output.stderr).expect("UTF-8");
    assert!(
        error.contains("--admin") && error.contains("neither an address"),
        "{error}"
    );
}
