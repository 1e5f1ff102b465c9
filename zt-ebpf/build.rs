//! Linker flags for the kernel object (bpf-linker).
//!
//! bpf-linker passes `--bpf-expand-memcpy-in-order` to LLVM by default, and in that mode
//! LLVM expands no `memset` inline: every zeroed struct or array (a `Flow`, an
//! IPv4-mapped address) became a call to a byte-at-a-time loop, some 570 instructions on
//! every IPv4 packet's path. Without it, constant-size memsets and memcpys are plain
//! stores again. (The in-order expansion only serves kernel JITs that pattern-match
//! memcpy; nothing here relies on it.)
fn main() {
    println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
