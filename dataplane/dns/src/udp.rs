//! Batched UDP I/O for the query path: one `recvmmsg` call takes up to [`BATCH`] queries and
//! one `sendmmsg` call sends all their answers, so under load the per-query cost is the
//! handler, not two system calls. The buffers live as long as the worker: nothing is
//! allocated per packet.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

/// Messages per system call.
pub const BATCH: usize = 32;
/// Largest query accepted; anything longer is cut here and then fails to parse as a query.
const QUERY_MAX: usize = 4096;

/// Receive and send buffers of one UDP worker.
pub struct Batch {
    bufs: Box<[[u8; QUERY_MAX]]>,
    lens: [usize; BATCH],
    peers: Box<[libc::sockaddr_storage]>,
    peer_lens: [libc::socklen_t; BATCH],
    /// Responses, one per received message, and which of them are to be sent.
    out: Vec<Vec<u8>>,
    reply: [bool; BATCH],
    count: usize,
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            bufs: vec![[0u8; QUERY_MAX]; BATCH].into_boxed_slice(),
            lens: [0; BATCH],
            // SAFETY: sockaddr_storage is plain data; all-zero is a valid (AF_UNSPEC) value.
            peers: vec![unsafe { std::mem::zeroed::<libc::sockaddr_storage>() }; BATCH]
                .into_boxed_slice(),
            peer_lens: [0; BATCH],
            out: (0..BATCH).map(|_| Vec::with_capacity(1232)).collect(),
            reply: [false; BATCH],
            count: 0,
        }
    }
}

impl Batch {
    /// Block until at least one datagram arrives (or the socket's read timeout passes), then
    /// take every datagram already queued, up to [`BATCH`]. Returns how many were taken.
    pub fn recv(&mut self, sock: &UdpSocket) -> std::io::Result<usize> {
        // SAFETY: iovec/mmsghdr are plain data; all-zero is valid before we fill them.
        let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (iov, buf) in iovs.iter_mut().zip(self.bufs.iter_mut()) {
            iov.iov_base = buf.as_mut_ptr().cast();
            iov.iov_len = QUERY_MAX;
        }
        let iov_ptr = iovs.as_mut_ptr();
        let peer_ptr = self.peers.as_mut_ptr();
        for (i, hdr) in hdrs.iter_mut().enumerate() {
            hdr.msg_hdr.msg_name = peer_ptr.wrapping_add(i).cast();
            hdr.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_hdr.msg_iov = iov_ptr.wrapping_add(i);
            hdr.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at a live buffer of the advertised size, owned by self
        // or by this stack frame, for the duration of the call.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            self.count = 0;
            return Err(std::io::Error::last_os_error());
        }
        self.count = n as usize;
        for (i, hdr) in hdrs.iter().take(self.count).enumerate() {
            self.lens[i] = hdr.msg_len as usize;
            self.peer_lens[i] = hdr.msg_hdr.msg_namelen;
            self.reply[i] = false;
        }
        Ok(self.count)
    }

    /// Run `f` on each datagram of the last receive with its sender and response buffer;
    /// `f` returns whether the buffer holds a response to send.
    pub fn process(&mut self, mut f: impl FnMut(&[u8], SocketAddr, &mut Vec<u8>) -> bool) {
        for i in 0..self.count {
            let Some(peer) = socket_addr(&self.peers[i]) else {
                continue;
            };
            self.reply[i] = f(&self.bufs[i][..self.lens[i]], peer, &mut self.out[i]);
        }
    }

    /// Send all marked responses. Errors (a full send buffer) lose those answers, as a
    /// dropped datagram would; the client's resolver retries.
    pub fn send(&mut self, sock: &UdpSocket) {
        // SAFETY: as in `recv`.
        let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let mut n = 0;
        let iov_ptr = iovs.as_mut_ptr();
        let peer_ptr = self.peers.as_mut_ptr();
        for i in 0..self.count {
            if !self.reply[i] {
                continue;
            }
            iovs[n] = libc::iovec {
                iov_base: self.out[i].as_mut_ptr().cast(),
                iov_len: self.out[i].len(),
            };
            hdrs[n].msg_hdr.msg_name = peer_ptr.wrapping_add(i).cast();
            hdrs[n].msg_hdr.msg_namelen = self.peer_lens[i];
            hdrs[n].msg_hdr.msg_iov = iov_ptr.wrapping_add(n);
            hdrs[n].msg_hdr.msg_iovlen = 1;
            n += 1;
        }
        let mut sent = 0;
        while sent < n {
            // SAFETY: headers point at live buffers as built above.
            let r = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    hdrs[sent..].as_mut_ptr(),
                    (n - sent) as libc::c_uint,
                    0,
                )
            };
            if r <= 0 {
                return;
            }
            sent += r as usize;
        }
    }
}

fn socket_addr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is sized for.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}
