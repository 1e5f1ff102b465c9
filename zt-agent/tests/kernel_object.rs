//! The kernel object as bpf-linker wrote it, read as an ELF file (no kernel needed).
//!
//! With bpf-linker's default `--bpf-expand-memcpy-in-order`, LLVM expands no memset
//! inline: every zeroed struct (a packet's `Flow`) or array (an IPv4-mapped address)
//! became a call to compiler_builtins' byte-at-a-time loop, some 570 instructions on
//! every IPv4 packet's path (BENCHMARKS.md, "Verdict cost"). zt-ebpf/build.rs turns that
//! mode off; this test fails if any program calls such a function again.
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

/// compiler_builtins' memory functions: byte loops in BPF.
const BYTE_LOOPS: [&str; 5] = ["memset", "memcpy", "memmove", "memcmp", "bcmp"];

#[test]
fn no_program_calls_a_byte_loop_memory_builtin() {
    let file = object::File::parse(zt_agent::loader::OBJECT).expect("the embedded kernel object is ELF");
    // A call carries a relocation only to a global symbol: bpf-linker exports these
    // functions by default. Were they static, calls to them would not show below.
    for name in BYTE_LOOPS {
        assert!(
            file.symbols().any(|s| s.name() == Ok(name) && s.is_global()),
            "{name} is no global symbol of the kernel object: this test would see no call to it"
        );
    }
    let mut calls = vec![];
    let mut map_refs = 0;
    for section in file.sections() {
        for (offset, r) in section.relocations() {
            let RelocationTarget::Symbol(index) = r.target() else { continue };
            let name = file.symbol_by_index(index).and_then(|s| s.name()).unwrap_or("");
            if name.starts_with("ZT_") {
                map_refs += 1;
            }
            if BYTE_LOOPS.contains(&name) {
                calls.push(format!("{} +{offset:#x} -> {name}", section.name().unwrap_or("?")));
            }
        }
    }
    // The programs reach every map through relocations: none read means the code's
    // relocations were not read, and the check above proved nothing.
    assert!(map_refs > 100, "only {map_refs} map references read from the kernel object's code");
    assert!(calls.is_empty(), "{} calls to byte-loop memory builtins, e.g. {:?}", calls.len(), &calls[..calls.len().min(5)]);
}
