//! Empty on purpose: the programs are the `egress` binary (src/main.rs), built
//! for the BPF target by egress-agent's build script. This library target only
//! exists so egress-agent can name this crate as a build dependency.
#![no_std]
