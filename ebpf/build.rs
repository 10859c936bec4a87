//! Compiles the C tc programs with clang into OUT_DIR (docs/design.md, kernel facts: the
//! toolchain cannot build Rust eBPF, so the datapath is C loaded by aya), and
//! generates OUT_DIR/abi.rs from the ABI header `src/bpf/abi.h`: a host probe
//! (`src/bpf/abi_probe.c`, built with the same clang, no libclang needed)
//! prints the shared constants and struct layouts, which become Rust
//! constants and compile-time layout assertions on the hand-written structs.

use std::collections::{BTreeMap, BTreeSet};
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DATAPATH: &str = "src/bpf/datapath.bpf.c";
const ABI_HEADER: &str = "src/bpf/abi.h";
const ABI_PROBE: &str = "src/bpf/abi_probe.c";
/// The prefix of the shared constants in abi.h, dropped in Rust.
const PREFIX: &str = "NF_";

fn main() {
    for src in [DATAPATH, ABI_HEADER, ABI_PROBE] {
        println!("cargo:rerun-if-changed={src}");
    }
    println!("cargo:rerun-if-env-changed=CLANG");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    let arch_include = format!("-I/usr/include/{}-linux-gnu", env::consts::ARCH);

    let abi = probe_abi(&clang, &out_dir);
    check_constants_listed(&abi);
    // The probe measured the host's layout; the kernel sees the BPF target's.
    let check = out_dir.join("abi_check.c");
    fs::write(&check, bpf_layout_check(&abi)).expect("writing abi_check.c");
    run_clang(
        &clang,
        &[
            "-target",
            "bpf",
            &arch_include,
            "-Isrc/bpf",
            "-fsyntax-only",
        ],
        &check,
        None,
    );
    fs::write(out_dir.join("abi.rs"), rust_abi(&abi)).expect("writing abi.rs");

    let object = out_dir.join("datapath.bpf.o");
    let flags = ["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"];
    let mut args = flags.to_vec();
    args.extend([arch_include.as_str(), "-c"]);
    run_clang(&clang, &args, Path::new(DATAPATH), Some(&object));
}

/// Runs `clang ARGS SRC [-o OUT]`; panics with what to do when it fails.
fn run_clang(clang: &str, args: &[&str], src: &Path, out: Option<&Path>) {
    let mut cmd = Command::new(clang);
    cmd.args(args).arg(src);
    if let Some(out) = out {
        cmd.arg("-o").arg(out);
    }
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "clang failed to compile {} ({s}); see the errors above",
            src.display()
        ),
        Err(e) => panic!(
            "cannot run `{clang}` ({e}): install clang and libbpf-dev (Debian/Ubuntu: apt-get install clang llvm libbpf-dev), or run scripts/setup.sh"
        ),
    }
}

/// What the probe printed.
struct Abi {
    consts: Vec<Const>,
    structs: Vec<Struct>,
    /// The `NF_*` defines of abi.h, with their comments.
    docs: BTreeMap<String, Vec<String>>,
}

struct Const {
    c_name: String,
    /// `u8`, `u32`, `usize`, or `str` (a C identifier, as text).
    rust_type: String,
    value: String,
}

struct Struct {
    c_name: String,
    rust_name: String,
    size: usize,
    fields: Vec<Field>,
}

struct Field {
    name: String,
    offset: usize,
    size: usize,
}

/// Builds and runs the host probe, and parses its output.
fn probe_abi(clang: &str, out_dir: &Path) -> Abi {
    let probe = out_dir.join("abi_probe");
    run_clang(
        clang,
        &["-Wall", "-Werror"],
        Path::new(ABI_PROBE),
        Some(&probe),
    );
    let output = Command::new(&probe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e})", probe.display()));
    if !output.status.success() {
        panic!(
            "{ABI_PROBE} rejected {ABI_HEADER} ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8(output.stdout).expect("the probe prints ASCII");
    let mut abi = Abi {
        consts: Vec::new(),
        structs: Vec::new(),
        docs: defines(ABI_HEADER),
    };
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |s: &str| -> usize {
            s.parse()
                .unwrap_or_else(|_| panic!("abi_probe: bad number in {line:?}"))
        };
        match words.as_slice() {
            ["const", rust_type, c_name, value] => abi.consts.push(Const {
                c_name: c_name.to_string(),
                rust_type: rust_type.to_string(),
                value: value.to_string(),
            }),
            ["struct", c_name, rust_name, size] => abi.structs.push(Struct {
                c_name: c_name.to_string(),
                rust_name: rust_name.to_string(),
                size: number(size),
                fields: Vec::new(),
            }),
            ["field", name, offset, size] => abi
                .structs
                .last_mut()
                .expect("abi_probe: a field before any struct")
                .fields
                .push(Field {
                    name: name.to_string(),
                    offset: number(offset),
                    size: number(size),
                }),
            ["end"] => {}
            _ => panic!("abi_probe: unexpected line {line:?}"),
        }
    }
    abi
}

/// The `#define PREFIX…` names in a C source, each with the `//` comment
/// above it or above its group (the defines that follow it up to a blank
/// line).
fn defines(path: &str) -> BTreeMap<String, Vec<String>> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let mut out = BTreeMap::new();
    let mut comment: Vec<String> = Vec::new();
    let mut in_comment = false;
    for line in text.lines().map(str::trim) {
        if let Some(c) = line.strip_prefix("//") {
            if !in_comment {
                comment.clear();
            }
            in_comment = true;
            comment.push(c.trim().to_string());
            continue;
        }
        in_comment = false;
        let name = line
            .strip_prefix('#')
            .and_then(|l| l.trim_start().strip_prefix("define"))
            .and_then(|l| {
                l.split(|c: char| c.is_whitespace() || c == '(')
                    .find(|w| !w.is_empty())
            });
        match name {
            Some(name) if name.starts_with(PREFIX) => {
                out.insert(name.to_string(), comment.clone());
            }
            Some(_) => {}
            None => comment.clear(),
        }
    }
    out
}

/// Every shared constant of abi.h reaches Rust, and the datapath keeps none
/// of its own: a constant cannot be silently left out of the ABI.
fn check_constants_listed(abi: &Abi) {
    let listed: BTreeSet<&str> = abi.consts.iter().map(|c| c.c_name.as_str()).collect();
    let missing: Vec<&String> = abi
        .docs
        .keys()
        .filter(|name| !listed.contains(name.as_str()))
        .collect();
    if !missing.is_empty() {
        panic!("{ABI_HEADER} defines {missing:?}, which {ABI_PROBE} does not list: add them to its main()");
    }
    let stray: Vec<String> = defines(DATAPATH).into_keys().collect();
    if !stray.is_empty() {
        panic!("{DATAPATH} defines {stray:?}: shared constants ({PREFIX}*) belong in {ABI_HEADER}");
    }
}

/// C that compiles for `-target bpf` only if the BPF layout is the probe's.
fn bpf_layout_check(abi: &Abi) -> String {
    let mut c = String::from(
        "// Generated by build.rs: the probe's (host) layout is the BPF target's.\n\
         #include <stddef.h>\n#include \"abi.h\"\n",
    );
    for s in &abi.structs {
        let st = &s.c_name;
        let msg = format!("struct {st}: the host and BPF layouts differ");
        writeln!(
            c,
            "_Static_assert(sizeof(struct {st}) == {}, \"{msg}\");",
            s.size
        )
        .unwrap();
        for f in &s.fields {
            let (name, offset, size) = (&f.name, f.offset, f.size);
            writeln!(
                c,
                "_Static_assert(offsetof(struct {st}, {name}) == {offset} && \
                 sizeof(((struct {st} *)0)->{name}) == {size}, \"{msg} at {name}\");"
            )
            .unwrap();
        }
    }
    c
}

/// OUT_DIR/abi.rs: the constants and the layout assertions.
fn rust_abi(abi: &Abi) -> String {
    let mut rs = format!(
        "// @generated by ebpf/build.rs from {ABI_HEADER} (via {ABI_PROBE}). Do not edit.\n"
    );
    for c in &abi.consts {
        let name = c.c_name.strip_prefix(PREFIX).unwrap_or_else(|| {
            panic!(
                "{ABI_PROBE} lists {}: shared constants are named {PREFIX}*",
                c.c_name
            )
        });
        let (ty, value) = match c.rust_type.as_str() {
            "str" => ("&str".to_string(), format!("{:?}", c.value)),
            ty => (ty.to_string(), c.value.clone()),
        };
        rs.push('\n');
        for line in abi.docs.get(&c.c_name).into_iter().flatten() {
            writeln!(rs, "/// {line}").unwrap();
        }
        writeln!(rs, "///\n/// `{}` in abi.h.", c.c_name).unwrap();
        writeln!(rs, "pub const {name}: {ty} = {value};").unwrap();
    }
    rs.push_str(
        "\n/// Size of a field's type, for the layout assertions below.\n\
         const fn field_size<S, F>(_: fn(&S) -> &F) -> usize {\n    \
         ::core::mem::size_of::<F>()\n}\n",
    );
    for s in &abi.structs {
        let (st, ty) = (&s.c_name, &s.rust_name);
        writeln!(rs, "\n// struct {st} (abi.h) = crate::{ty}").unwrap();
        writeln!(
            rs,
            "const _: () = assert!(::core::mem::size_of::<crate::{ty}>() == {}, \
             \"{ty}: its size differs from struct {st} in abi.h ({} bytes)\");",
            s.size, s.size
        )
        .unwrap();
        for f in &s.fields {
            let (name, offset, size) = (&f.name, f.offset, f.size);
            writeln!(
                rs,
                "const _: () = assert!(::core::mem::offset_of!(crate::{ty}, {name}) == {offset}, \
                 \"{ty}.{name}: its offset differs from struct {st}.{name} in abi.h ({offset})\");"
            )
            .unwrap();
            writeln!(
                rs,
                "const _: () = assert!(field_size(|s: &crate::{ty}| &s.{name}) == {size}, \
                 \"{ty}.{name}: its size differs from struct {st}.{name} in abi.h ({size} bytes)\");"
            )
            .unwrap();
        }
    }
    rs
}
