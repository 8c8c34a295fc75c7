//! Present so that `agent`'s build-dependency on this crate makes cargo rebuild the agent
//! when the kernel programs change; the programs themselves are the `mycel` binary target.
#![no_std]
