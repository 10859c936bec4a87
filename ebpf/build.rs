//! Compiles the C tc programs with clang into OUT_DIR (KERNEL-NOTES: the
//! toolchain cannot build Rust eBPF, so the datapath is C loaded by aya).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "src/bpf/datapath.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out =
        PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("datapath.bpf.o");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    let arch_include = format!("-I/usr/include/{}-linux-gnu", env::consts::ARCH);
    let status = Command::new(&clang)
        .args([
            "-O2",
            "-g",
            "-Wall",
            "-Werror",
            "-target",
            "bpf",
            &arch_include,
            "-c",
            src,
            "-o",
        ])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("clang failed to compile {src} ({s}); see the errors above"),
        Err(e) => panic!(
            "cannot run `{clang}` ({e}): install clang and libbpf-dev (Debian/Ubuntu: apt-get install clang llvm libbpf-dev), or run scripts/setup.sh"
        ),
    }
}
