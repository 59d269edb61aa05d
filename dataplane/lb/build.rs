//! Builds `ebpf/lb-ebpf` for the BPF target and leaves the object in OUT_DIR for
//! `include_bytes_aligned!`.

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../../ebpf/lb-ebpf").canonicalize()?;
    let common_dir = manifest_dir.join("../../ebpf/lb-common").canonicalize()?;
    println!("cargo:rerun-if-changed={}", common_dir.display());
    // The BPF crate is outside the workspace (it builds for another target), so cargo must be
    // started from its own directory; and `-Z build-std=core` needs RUSTC_BOOTSTRAP on stable.
    std::env::set_current_dir(&ebpf_dir)?;
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "weir-lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("stable"),
    )
}
