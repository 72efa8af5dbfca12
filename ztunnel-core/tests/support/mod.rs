//! Helpers shared by the integration tests (each test binary uses a part).

#![allow(dead_code, unreachable_pub)]

pub mod mesh;
pub mod netns;
