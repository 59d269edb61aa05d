//! `BPF_MAP_UPDATE_BATCH`: many map entries in one syscall. aya 0.14 has no wrapper for it,
//! and programming 10,000 Services one entry per syscall costs tens of milliseconds.

use std::os::fd::{AsFd, AsRawFd};

use aya::Pod;
use aya::maps::MapData;

use crate::Error;

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `entries` (create or replace) into `map` with as few syscalls as the kernel allows.
pub fn update<K: Pod, V: Pod>(map: &MapData, name: &str, entries: &[(K, V)]) -> Result<(), Error> {
    if entries.is_empty() {
        return Ok(());
    }
    let keys: Vec<K> = entries.iter().map(|(k, _)| *k).collect();
    let values: Vec<V> = entries.iter().map(|(_, v)| *v).collect();
    let fd = map.fd().as_fd().as_raw_fd();
    let mut done = 0usize;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: (keys.len() - done).min(u32::MAX as usize) as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at `count` keys and values that outlive the call; the kernel
        // writes back only `attr.count`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            return Err(Error::Bpf(format!(
                "batch update of {name} failed after {} of {} entries: {err}",
                done + attr.count as usize,
                keys.len()
            )));
        }
        done += attr.count as usize;
    }
    Ok(())
}
