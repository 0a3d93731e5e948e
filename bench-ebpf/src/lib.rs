//! Empty on purpose: the programs are the `bench` binary (src/main.rs),
//! built for the BPF target by egress-bench's build script.
#![no_std]
