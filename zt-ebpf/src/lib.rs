//! Host builds of this crate are empty; the kernel programs are the `zt` binary,
//! built for bpfel-unknown-none by zt-agent's build script.
#![no_std]
