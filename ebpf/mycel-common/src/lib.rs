//! Types shared by mycel's kernel programs and the agent.
//!
//! Every map key, value and event lives here, in a module named after its map. The rules
//! (see the project's style notes): `#[repr(C)]`, `Clone + Copy`, no `bool`, explicit padding,
//! byte order in the field name, a size guard per type, and fields are retired rather than
//! reordered so that pinned maps survive agent upgrades.
#![no_std]

pub mod flow;
pub mod mesh;
pub mod policy;
pub mod service;
pub mod stats;

/// Declares `unsafe impl aya::Pod` for plain-old-data types when built for the agent.
macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: the type is `#[repr(C)]`, `Copy`, made only of integers and arrays of
            // integers, with every padding byte spelled out as a field.
            #[cfg(feature = "user")]
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use pod;
