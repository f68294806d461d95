//! The XDP object is linked by bpf-linker, which cargo does not know about: rebuild when the
//! linker binary changes so a new bpf-linker (e.g. built against another LLVM) takes effect.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
