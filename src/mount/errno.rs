//! The one place that decides which errno a mount returns for a failure.

use super::remote::RemoteError;
use crate::proto::PathError;

/// A positive errno value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const EACCES: Errno = Errno(libc::EACCES);
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const ESTALE: Errno = Errno(libc::ESTALE);
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);

    /// The errno for a name that makes no share path: `ENAMETOOLONG` past
    /// NAME_MAX or PATH_MAX, `EINVAL` for the rest (backslashes, control
    /// characters: names a share cannot hold).
    pub fn for_path(e: &PathError) -> Errno {
        match e {
            PathError::TooLong => Errno::ENAMETOOLONG,
            _ => Errno::EINVAL,
        }
    }

    /// The system's text for this errno ("No such file or directory").
    pub fn describe(self) -> String {
        std::io::Error::from_raw_os_error(self.0).to_string()
    }

    /// The errno for a failure talking to the partner.
    ///
    /// - unreachable partner, broken chunk: `EIO` (the read may work later);
    /// - the path or share does not exist (for us): `ENOENT`;
    /// - no read access: `EACCES`;
    /// - the file changed under an open handle: `ESTALE`;
    /// - anything else the partner refused: `EIO`.
    pub fn from_remote(e: &RemoteError) -> Errno {
        match e {
            RemoteError::Offline { .. } | RemoteError::Chunk { .. } | RemoteError::Unexpected { .. } => Errno::EIO,
            RemoteError::Stale { .. } => Errno::ESTALE,
            RemoteError::Refused { code, .. } => match *code {
                "NOT_FOUND" | "UNKNOWN_SHARE" | "BAD_PATH" | "BAD_NAME" => Errno::ENOENT,
                "ACCESS_DENIED" => Errno::EACCES,
                "STALE" => Errno::ESTALE,
                "BUSY" => Errno::EBUSY,
                "EXISTS" => Errno(libc::EEXIST),
                "NOT_EMPTY" => Errno(libc::ENOTEMPTY),
                "IS_DIR" => Errno::EISDIR,
                "NOT_DIR" => Errno::ENOTDIR,
                _ => Errno::EIO,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_the_errno_a_local_disk_would_give() {
        let refused = |code| RemoteError::Refused { partner: "p".into(), code, message: String::new() };
        assert_eq!(Errno::from_remote(&refused("NOT_FOUND")), Errno::ENOENT);
        assert_eq!(Errno::from_remote(&refused("UNKNOWN_SHARE")), Errno::ENOENT);
        assert_eq!(Errno::from_remote(&refused("ACCESS_DENIED")), Errno::EACCES);
        assert_eq!(Errno::from_remote(&refused("INTERNAL")), Errno::EIO);
        let offline = RemoteError::Offline { partner: "p".into(), detail: String::new() };
        assert_eq!(Errno::from_remote(&offline), Errno::EIO);
    }
}
