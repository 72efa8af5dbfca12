//! Link settings for the crate's examples (the library itself is untouched).
//!
//! `ztunnel-run` is a position-independent executable whose start-up writes
//! about 11,000 relative relocations (vtables, static tables): as RELA entries
//! they are 260 KiB that the loader reads and keeps resident for the process's
//! life. Packed as DT_RELR they take 3 KiB. The loader understands DT_RELR from
//! glibc 2.36 on, so the flag is only passed when building for the host itself
//! (not cross-compiling) on a GNU/Linux host whose glibc is new enough.

use std::process::Command;

/// The first glibc whose loader applies DT_RELR relocations.
const RELR_GLIBC: (u32, u32) = (2, 36);

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    let host = std::env::var("HOST").unwrap_or_default();
    let target_env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target != host || target_os != "linux" || target_env != "gnu" {
        return;
    }
    if host_glibc().is_some_and(|version| version >= RELR_GLIBC) {
        println!("cargo:rustc-link-arg-examples=-Wl,-z,pack-relative-relocs");
    }
}

/// The host's glibc version, from the last word of `ldd --version`'s first
/// line ("ldd (Debian GLIBC 2.36-9+deb12u14) 2.36").
fn host_glibc() -> Option<(u32, u32)> {
    let output = Command::new("ldd").arg("--version").output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let version = text.lines().next()?.split_whitespace().last()?;
    let (major, minor) = version.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}
