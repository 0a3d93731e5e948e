//! Dataplane-wide settings and the roles of interfaces.

use crate::shared_layout;

shared_layout! {
    /// The single value of `DP_CONFIG`.
    pub struct DataplaneConfig {
        /// `CONFIG_F_*` bits.
        pub flags: u32,
        /// Future use.
        pub _reserved: [u32; 7],
    }
}

/// Some tenant is chosen by ingress port: look frames up in `INGRESS_PORTS`.
pub const CONFIG_F_INGRESS_PORTS: u32 = 1;
/// Report each new flow to the agent through `FLOW_EVENTS` (set while a
/// translation log is configured or someone follows the flows live).
pub const CONFIG_F_FLOW_EVENTS: u32 = 2;

shared_layout! {
    /// Value of `INTERFACES`, keyed by ifindex.
    pub struct InterfaceInfo {
        /// `ROLE_*`.
        pub role: u32,
        /// Future use.
        pub _reserved: u32,
    }
}

/// Tenant traffic arrives here; replies leave here.
pub const ROLE_INTERNAL: u32 = 1;
/// Translated traffic leaves here; replies arrive here.
pub const ROLE_EXTERNAL: u32 = 2;
