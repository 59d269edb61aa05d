//! `BPF_PROG_TEST_RUN` for the tc programs: runs a program once on a packet the caller built
//! and returns its verdict and the packet as the program left it. aya 0.14 has no wrapper for
//! this command, so this is the one raw `bpf(2)` call of the crate.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The leading fields of `union bpf_attr` for `BPF_PROG_TEST_RUN` (`struct { ... } test` in
/// `include/uapi/linux/bpf.h`); the kernel zero-extends shorter attrs.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Runs `prog` once on `packet` (starting at the Ethernet header). Returns the verdict and the
/// output packet.
pub fn run(prog: BorrowedFd<'_>, packet: &[u8]) -> io::Result<(i32, Vec<u8>)> {
    // Room for programs that grow the packet; ours never do.
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: u32::try_from(packet.len()).map_err(io::Error::other)?,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    // SAFETY: `attr` describes buffers that outlive the call; the size passed is its own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval as i32, out))
}
