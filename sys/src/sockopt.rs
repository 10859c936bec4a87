//! Socket options that `socket2` and `nix` lack, set on any socket.
//! What it must not do: create sockets or know what they are for.

use std::os::fd::AsRawFd;

/// `setsockopt` of an `int` option (for the ones socket2 lacks, such as
/// `SO_RCVBUFFORCE` and `NETLINK_NO_ENOBUFS`).
pub fn set_int_opt(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: valid fd, option pointer and size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
