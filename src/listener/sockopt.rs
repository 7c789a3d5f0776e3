//! The socket options no safe crate exposes (socket2 has no TCP_DEFER_ACCEPT and no TCP_INFO for
//! listeners). This is the one module with `unsafe`; each call passes a live descriptor borrowed
//! from its owner and a correctly sized buffer.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// Sets TCP_DEFER_ACCEPT in whole seconds (rounded up; zero disables). The kernel rounds the value
/// to its SYN-ACK retransmission schedule, so reading it back may give a larger number.
pub fn set_defer_accept(fd: BorrowedFd<'_>, d: Duration) -> io::Result<()> {
    let secs: libc::c_int = if d.is_zero() {
        0
    } else {
        d.as_secs_f64().ceil().min(i32::MAX as f64) as libc::c_int
    };
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, secs)
}

/// TCP_DEFER_ACCEPT as the kernel holds it, in seconds.
pub fn defer_accept(fd: BorrowedFd<'_>) -> io::Result<i32> {
    getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT)
}

/// For a listening socket, Linux reports the accept queue's current length in `tcpi_unacked` and
/// its effective backlog (after the somaxconn cap) in `tcpi_sacked`: one syscall, no netlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenQueue {
    pub queued: u32,
    pub backlog: u32,
}

pub fn listen_queue(fd: BorrowedFd<'_>) -> io::Result<ListenQueue> {
    // SAFETY: tcp_info is plain old data; zeroed is a valid value and the kernel fills at most
    // `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: fd is a live socket borrowed for this call; info and len point to valid memory of
    // the declared size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ListenQueue {
        queued: info.tcpi_unacked,
        backlog: info.tcpi_sacked,
    })
}

fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32, v: libc::c_int) -> io::Result<()> {
    // SAFETY: fd is live for the call; the value is a c_int and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: fd is live for the call; v and len are valid for writes of their sizes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Registers a listening socket with tokio's reactor for readability. A plain socket2 `Socket`
/// rather than tokio's `TcpListener`, so the accept loop can call accept4 itself and leave
/// refused connections unregistered.
///
/// Shared (`Arc`): the accept loop registers it anew on the runtime it moves to, and the
/// metrics read its queue while any loop holds it.
pub fn register_listener(
    socket: std::sync::Arc<socket2::Socket>,
) -> io::Result<tokio::io::unix::AsyncFd<std::sync::Arc<socket2::Socket>>> {
    // SAFETY: the Socket owns its descriptor, and the AsyncFd holds the Socket (a strong
    // reference) for its whole life: the descriptor stays open and unchanged while registered.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE)
    }
    .map_err(io::Error::from)
}
