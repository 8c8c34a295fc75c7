//! mycel's integration-test harness.
//!
//! Each test builds its own isolated "node": a network namespace with a bridge, pods
//! (network namespaces with a veth on the bridge and their own cgroup), a cgroup and a
//! bpffs directory for the agent, and a directory of resource YAML. Tests run in parallel
//! and clean up after themselves, also when they panic.
//!
//! ```no_run
//! use mycel_tests::{EndpointSliceYaml, Node, ServiceYaml, require_root};
//!
//! require_root!();
//! let node = Node::new();
//! let web = node.pod("web-1");
//! let _server = web.tcp_server(8080);
//! node.resources().write(
//!     "web.yaml",
//!     &[
//!         ServiceYaml::new("web", "10.96.0.10").port("http", 80, "TCP", 8080).to_yaml(),
//!         EndpointSliceYaml::ipv4("web-1", "web").endpoint(web.ipv4).port("http", 8080, "TCP").to_yaml(),
//!     ],
//! );
//! let _agent = node.start_agent();
//! let client = node.pod("client");
//! let report = client.tcp_client("10.96.0.10:80".parse().expect("address"), 10);
//! assert_eq!(report.answers_without_errors("web").get("web-1"), Some(&10));
//! ```
//!
//! Privileged: everything here needs root. [`require_root!`] skips a test without it, or
//! fails it when `MYCEL_REQUIRE_PRIVILEGED=1` (as CI sets).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod cluster;
pub mod env;
pub mod fakeapi;
pub mod netns;
pub mod node;
pub mod process;
pub mod resources;
pub mod scenario;
pub mod sniff;
pub mod stats;
pub mod testpod;
pub mod twonode;

pub use agent::{Agent, AgentOptions, ServiceInfo};
pub use node::{Node, Pod};
pub use process::Proc;
pub use resources::{EndpointSliceYaml, ResourceDir, Resources, ServiceYaml, WorkloadYaml};
pub use testpod::{ClientReport, ConnectResult};

/// Skips the calling test (returns from it) unless the machine can run privileged tests:
/// root, a bpffs mount and a cgroup v2 hierarchy. With `MYCEL_REQUIRE_PRIVILEGED=1` it
/// panics instead of skipping, so that CI cannot pass by skipping everything.
///
/// Inside this crate's integration tests it also tells the harness where Cargo built the
/// `mycel-testpod` binary.
#[macro_export]
macro_rules! require_root {
    () => {
        if let Some(bin) = option_env!("CARGO_BIN_EXE_mycel-testpod") {
            $crate::env::set_testpod_bin(bin);
        }
        if !$crate::env::privileged_or_skip(module_path!()) {
            return;
        }
    };
}
