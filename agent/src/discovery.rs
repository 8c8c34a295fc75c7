//! Finding a pod's host-side interface and cgroup on a node.
