//! `#[repr(C)]` map keys and values shared by the BPF programs in `ebpf/lb-ebpf` and the loader in `dataplane/lb`.
#![no_std]
