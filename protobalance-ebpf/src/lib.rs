//! Empty on purpose: the XDP program is the `protobalance` binary target (src/main.rs).
#![no_std]
