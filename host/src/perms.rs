//! Directories and files that only the host's user may write (or read):
//! the state directory, the compile cache and its seal key. Created with
//! those permissions, and checked (owner, mode) before they are trusted.

use std::io;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Creates `dir` and its missing parents with mode 0700 (only the host's
/// user may list, read or write them); an existing directory is left as is.
///
/// # Errors
/// The directory cannot be created.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Checks that `dir` is a directory owned by this process's user and
/// writable by nobody else: what it holds may be trusted.
///
/// # Errors
/// [`io::ErrorKind::PermissionDenied`] naming `what`, the directory and
/// the fix, or the error reading its metadata.
pub fn check_private_dir(dir: &Path, what: &str) -> io::Result<()> {
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!("{what} {dir:?} is not a directory")));
    }
    check_owner_and_mode(&meta, 0o022, dir, what, "chmod go-w")
}

/// Reads `path`, a file only this process's user may read and write
/// (mode 0600 or stricter, owned by it), without following a symbolic
/// link; `Ok(None)` if it does not exist.
///
/// # Errors
/// A file owned by another user, open to group or others, a symbolic link,
/// or one that cannot be read.
pub fn read_private_file(path: &Path, what: &str) -> io::Result<Option<Vec<u8>>> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).custom_flags(libc::O_NOFOLLOW);
    let mut file = match options.open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
            return Err(io::Error::other(format!("{what} {path:?} is a symbolic link: refused")));
        }
        Err(err) => return Err(err),
    };
    check_owner_and_mode(&file.metadata()?, 0o077, path, what, "chmod 600")?;
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut file, &mut bytes)?;
    Ok(Some(bytes))
}

/// Writes `bytes` to a new file `path` with mode 0600: never through an
/// existing file or symbolic link (it fails if `path` exists).
///
/// # Errors
/// `path` exists, or the file cannot be written.
pub fn write_new_private_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW);
    let mut file = options.open(path)?;
    io::Write::write_all(&mut file, bytes)?;
    file.sync_all()
}

fn check_owner_and_mode(
    meta: &std::fs::Metadata,
    forbidden: u32,
    path: &Path,
    what: &str,
    fix: &str,
) -> io::Result<()> {
    let (uid, mode) = (meta.uid(), meta.mode() & 0o7777);
    if uid != euid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{what} {path:?} is owned by uid {uid}, not by this host's user (uid {}): refused, since its owner \
                 could plant what the host trusts; `chown` it or choose another path",
                euid()
            ),
        ));
    }
    if mode & forbidden != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{what} {path:?} has mode {mode:04o}, open to group or others: refused, since they could plant or \
                 read what the host trusts; `{fix} {}`",
                path.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("perms-{name}-{}", uuid::Uuid::new_v4().simple()))
    }

    #[test]
    fn private_dirs_are_0700_and_open_ones_are_refused() {
        let dir = temp("dir").join("a/b");
        create_private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(dir.parent().unwrap()).unwrap().mode() & 0o777, 0o700);
        check_private_dir(&dir, "the dir").unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
        let err = check_private_dir(&dir, "the dir").unwrap_err().to_string();
        assert!(err.contains("mode 0775") && err.contains("chmod go-w"), "{err}");
        let _ = std::fs::remove_dir_all(temp("dir"));
    }

    #[test]
    fn a_dir_owned_by_another_user_is_refused() {
        let dir = temp("owner");
        create_private_dir(&dir).unwrap();
        let foreign = match euid() {
            0 => {
                std::os::unix::fs::chown(&dir, Some(4242), None).unwrap();
                dir.clone()
            }
            // Not root: the root directory is another user's.
            _ => std::path::PathBuf::from("/"),
        };
        let err = check_private_dir(&foreign, "the dir").unwrap_err().to_string();
        assert!(err.contains("is owned by uid") && err.contains("not by this host's user"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_private_file_is_read_only_if_owned_and_closed_and_not_a_link() {
        let dir = temp("file");
        create_private_dir(&dir).unwrap();
        let path = dir.join("key");
        assert!(read_private_file(&path, "key").unwrap().is_none());
        write_new_private_file(&path, b"secret").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(read_private_file(&path, "key").unwrap().unwrap(), b"secret");
        assert!(write_new_private_file(&path, b"other").is_err(), "never over an existing file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(read_private_file(&path, "key").unwrap_err().to_string().contains("mode 0640"));
        let link = dir.join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(read_private_file(&link, "key").unwrap_err().to_string().contains("symbolic link"));
        assert!(write_new_private_file(&link, b"x").is_err(), "never through a link");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
