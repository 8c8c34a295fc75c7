//! The mycel node agent.
//!
//! Data flows one way: a [`source`] (a directory of YAML files today, the Kubernetes API
//! later) produces resources; the pure [`state`] model turns them into what the kernel
//! should hold; the [`datapath`] writes only the differences into the eBPF maps.
//! Observability flows back through [`metrics`] and the [`admin`] endpoints.

// `deny`, not `forbid`: the one syscall wrapper in `sys` needs `unsafe` (no safe crate
// offers SO_NETNS_COOKIE); everything else stays safe.
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod discovery;
pub mod flows;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod podnet;
pub mod proxy;
pub mod source;
pub mod state;
mod sys;
