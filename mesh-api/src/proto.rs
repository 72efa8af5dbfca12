//! Code generated from the `.proto` files in `mesh-api/proto/` (prost messages,
//! tonic client and server stubs). The module tree mirrors the protobuf packages;
//! the crate root re-exports each package under a short name.

#![allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    clippy::all,
    clippy::pedantic,
    rustdoc::all
)]

/// Protobuf package `istio`.
pub mod istio {
    /// Protobuf package `istio.workload`.
    pub mod workload {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));

        /// Protobuf package `istio.workload.zds`.
        pub mod zds {
            include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
        }
    }

    /// Protobuf package `istio.security`.
    pub mod security {
        include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    }

    /// Protobuf package `istio.v1`.
    pub mod v1 {
        /// Protobuf package `istio.v1.auth`.
        pub mod auth {
            include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
        }
    }
}

/// Protobuf package `envoy`.
pub mod envoy {
    /// Protobuf package `envoy.config`.
    pub mod config {
        /// Protobuf package `envoy.config.core`.
        pub mod core {
            /// Protobuf package `envoy.config.core.v3`.
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.config.core.v3.rs"));
            }
        }
    }

    /// Protobuf package `envoy.service`.
    pub mod service {
        /// Protobuf package `envoy.service.discovery`.
        pub mod discovery {
            /// Protobuf package `envoy.service.discovery.v3`.
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
            }
        }
    }
}

/// Protobuf package `google`.
pub mod google {
    /// Protobuf package `google.rpc`.
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
}
