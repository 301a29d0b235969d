//! Our SQLite's file locks as Linux open file description (OFD) locks.
//!
//! The extension carries its own SQLite; Python's `sqlite3` runs on another copy in the same
//! process. SQLite's unix VFS locks with POSIX `fcntl` record locks, which belong to the
//! *process*: two copies of SQLite in one process do not exclude each other (same owner), and
//! when Python's copy closes its last connection to the file it drops our locks (any `close()`
//! of the file does), takes an EXCLUSIVE lock no one contests, checkpoints and deletes the WAL
//! we still write to. OFD locks (`F_OFD_SETLK`, Linux 3.15+) belong to the open file
//! description they were taken through instead, and they conflict with POSIX locks even inside
//! one process. So our copy takes OFD locks: Python's copy and ours then exclude each other
//! exactly as two processes do, and nothing Python's copy closes can drop ours.
//!
//! SQLite keeps one lock state per inode for the whole process and may take a lock through one
//! connection's descriptor and release it through another's (with POSIX locks both are the
//! same owner). With OFD locks the owner is the description, so every lock operation of our
//! copy on an inode goes through ONE description, the inode's *owner*: a description of our own
//! (reopened through `/proc/self/fd`, since `dup` would share the caller's), opened on the first
//! lock operation on the inode and closed when SQLite has closed every descriptor it locked
//! through. (Making SQLite's own opens share one description would also tie their file
//! offsets and access modes together; a separate owner touches nothing SQLite sees.)
//!
//! A child made by `fork()` inherits the parent's descriptions, and OFD locks taken through an
//! inherited one would be the parent's. So the owners are kept per process (`PerProcess`): a
//! child opens its own on its first lock operation. As it is forked, the child closes its
//! copies of the parent's owners (`close_inherited_owners`): the parent's locks live on through
//! the parent's own copies, and end with the parent as POSIX locks did. Kept open in the child,
//! a parent killed inside a transaction would leave its write lock held, every other process
//! shut out, until the child exited.
//!
//! Installed into our copy's unix VFS (`xSetSystemCall`, which every unix VFS variant shares)
//! once, before our first connection: SQLite reads its system call table without a lock.

use std::collections::HashMap;
use std::convert::Infallible;
use std::ffi::{c_int, c_void};
use std::sync::{Mutex, MutexGuard, OnceLock};

use rusqlite::ffi;

use crate::process::{unpoisoned, PerProcess};

/// `(st_dev, st_ino)`: what SQLite keys its per-file lock state by.
pub type Inode = (u64, u64);

struct Owner {
    fd: c_int,
    /// SQLite's descriptors on the inode that have locked through this owner and are open.
    users: usize,
}

#[derive(Default)]
struct Owners {
    by_inode: HashMap<Inode, Owner, foldhash::fast::RandomState>,
    inode_of: HashMap<c_int, Inode, foldhash::fast::RandomState>,
    /// Descriptors SQLite closed (or owners no longer used) while this process held POSIX
    /// locks on their file: closed once it holds none (`close`).
    parked: Vec<(c_int, Inode)>,
}

static OWNERS: PerProcess<Mutex<Owners>> = PerProcess::empty();

fn owners() -> MutexGuard<'static, Owners> {
    let Ok(owners) = OWNERS.get_or_try_init(|| Ok::<_, Infallible>(Mutex::default()));
    unpoisoned(owners.lock())
}

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// Opens a new description of the file `fd` is open on (read-write if allowed: write locks
/// need it), close-on-exec.
fn reopen(fd: c_int) -> Result<c_int, c_int> {
    let path = format!("/proc/self/fd/{fd}\0");
    for flags in [libc::O_RDWR, libc::O_RDONLY] {
        // SAFETY: a NUL-terminated path.
        let owner = unsafe { libc::open(path.as_ptr().cast(), flags | libc::O_CLOEXEC) };
        if owner >= 0 {
            return Ok(owner);
        }
        if !matches!(errno(), libc::EACCES | libc::EROFS) {
            break;
        }
    }
    Err(errno())
}

/// The description this process locks `fd`'s inode through, registering `fd` as its user.
fn owner_of(fd: c_int) -> Result<c_int, c_int> {
    let mut owners = owners();
    let owners = &mut *owners;
    if let Some(inode) = owners.inode_of.get(&fd) {
        if let Some(owner) = owners.by_inode.get(inode) {
            return Ok(owner.fd);
        }
    }
    let inode = inode_of_fd(fd).ok_or_else(errno)?;
    let owner = match owners.by_inode.get_mut(&inode) {
        Some(owner) => {
            owner.users += 1;
            owner.fd
        }
        None => {
            let owner = reopen(fd)?;
            owners.by_inode.insert(inode, Owner { fd: owner, users: 1 });
            owner
        }
    };
    owners.inode_of.insert(fd, inode);
    Ok(owner)
}

/// SQLite's `fcntl`: its lock commands become OFD commands through the inode's owner.
/// Declared with a fixed third argument (stable Rust cannot define a variadic function): on
/// x86_64 and aarch64 Linux a variadic call passes it in the same register.
unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: *mut c_void) -> c_int {
    let ofd = match cmd {
        libc::F_SETLK => libc::F_OFD_SETLK,
        libc::F_SETLKW => libc::F_OFD_SETLKW,
        libc::F_GETLK => libc::F_OFD_GETLK,
        // SAFETY: SQLite's own call, passed on as it came.
        _ => return unsafe { libc::fcntl(fd, cmd, arg) },
    };
    match owner_of(fd) {
        Ok(owner) => {
            let lock = arg.cast::<libc::flock>();
            // SAFETY: SQLite passes a `struct flock` with every lock command; OFD commands
            // require `l_pid` 0.
            unsafe {
                (*lock).l_pid = 0;
                libc::fcntl(owner, ofd, lock)
            }
        }
        Err(e) => {
            // SAFETY: this thread's errno.
            unsafe { *libc::__errno_location() = e };
            -1
        }
    }
}

/// The inode of the file at `path` as SQLite keys its lock state (none if it cannot be read).
pub fn inode_of_path(path: &str) -> Option<Inode> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether byte `at` of the file `inode` is locked through another description than the one our
/// copy locks that file through: by another process (its SQLite), or by Python's copy in this
/// one. Asked through our owner (`F_OFD_GETLK`), so our copy's own locks never count; false
/// when no connection of ours has locked the file (there is no owner) or the kernel says no.
pub fn locked_elsewhere(inode: Inode, at: i64) -> bool {
    let owners = owners();
    let Some(owner) = owners.by_inode.get(&inode) else { return false };
    // SAFETY: plain data; l_pid 0 as OFD commands require.
    let mut query: libc::flock = unsafe { std::mem::zeroed() };
    query.l_type = libc::F_WRLCK as _;
    query.l_whence = libc::SEEK_SET as _;
    (query.l_start, query.l_len) = (at as _, 1);
    // SAFETY: our owner's descriptor (open while the map is locked) and a valid `flock`.
    (unsafe { libc::fcntl(owner.fd, libc::F_OFD_GETLK, &mut query) }) == 0 && query.l_type != libc::F_UNLCK as libc::c_short
}

/// Releases every lock taken through the description `fd` (ours only: POSIX locks of the
/// process are another owner's).
fn unlock_all(fd: c_int) {
    // SAFETY: plain data; whole file (l_len 0), l_pid 0 as OFD commands require.
    let mut all: libc::flock = unsafe { std::mem::zeroed() };
    all.l_type = libc::F_UNLCK as _;
    all.l_whence = libc::SEEK_SET as _;
    // SAFETY: our own descriptor and a valid `flock`.
    unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &mut all) };
}

fn inode_of_fd(fd: c_int) -> Option<Inode> {
    // SAFETY: `stat` is plain data, filled by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev as u64, st.st_ino as u64))
}

/// The files this process holds POSIX locks on (from `/proc/locks`; none if it cannot be read).
fn posix_locked() -> Vec<Inode> {
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else { return Vec::new() };
    let pid = std::process::id().to_string();
    // "1: POSIX  ADVISORY  READ 4242 fe:00:10346613 128 128" (major and minor in hex); lines
    // of waiters have "->" after the number.
    locks
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let (kind, _, _, owner, file) = (fields.next()?, fields.next()?, fields.next()?, fields.next()?, fields.next()?);
            if kind != "POSIX" || owner != pid {
                return None;
            }
            let mut parts = file.split(':');
            let major = u32::from_str_radix(parts.next()?, 16).ok()?;
            let minor = u32::from_str_radix(parts.next()?, 16).ok()?;
            Some((libc::makedev(major, minor) as u64, parts.next()?.parse().ok()?))
        })
        .collect()
}

/// SQLite's `close`. The inode's owner is closed with the last descriptor that used it. But
/// closing any descriptor of a file drops every POSIX lock the process holds on it: Python's
/// sqlite3's, when it has the file open (our connections closing, e.g. on `configure()` of
/// another database, would leave its connection unprotected). So a descriptor of a file this
/// process holds POSIX locks on is kept open (`parked`) and closed on a later close once the
/// process holds none there (closes are rare: connections and their journals).
unsafe extern "C" fn close(fd: c_int) -> c_int {
    let mut owners = owners();
    let owners = &mut *owners;
    if let Some(inode) = owners.inode_of.remove(&fd) {
        if let Some(owner) = owners.by_inode.get_mut(&inode) {
            owner.users -= 1;
            if owner.users == 0 {
                // SQLite counts on the close of the last descriptor it locked through to drop
                // what it still holds there (the shared memory's locks): an owner parked open
                // must hold nothing.
                unlock_all(owner.fd);
                owners.parked.push((owner.fd, inode));
                owners.by_inode.remove(&inode);
            }
        }
    }
    let ours = inode_of_fd(fd).map(|inode| (fd, inode));
    owners.parked.extend(ours);
    let locked = posix_locked();
    let mut result = 0;
    owners.parked.retain(|&(parked, inode)| {
        if locked.contains(&inode) {
            return true;
        }
        // SAFETY: SQLite closed it or it is an owner no one uses: ours to close.
        let r = unsafe { libc::close(parked) };
        if parked == fd {
            result = r;
        }
        false
    });
    if ours.is_none() {
        // Not a file (fstat failed): closed as SQLite asked, errors and all.
        // SAFETY: SQLite's descriptor.
        result = unsafe { libc::close(fd) };
    }
    result
}

/// In a child made by `fork()`: closes the child's copies of the parent's owners (module
/// comment). The parent's locks are not touched: an OFD lock ends when the last descriptor of
/// its description closes, and the parent holds its own. Runs in the forking thread before
/// anything else in the child: no allocation, and a map left locked by a thread the fork
/// caught inside a wrapper (only if the fork gate gave up waiting) is left as it is.
extern "C" fn close_inherited_owners() {
    let Some(owners) = OWNERS.inherited() else { return };
    let Ok(mut owners) = owners.try_lock() else { return };
    // Drained (no allocation): a child of this child that never used SQLite inherits this
    // map too, and must not close these numbers again (they may name other files by then).
    for (_, owner) in owners.by_inode.drain() {
        // SAFETY: this process's copy of a descriptor only the parent's map names; the child
        // builds its own map and never uses these numbers.
        unsafe { libc::close(owner.fd) };
    }
}

/// Whether the kernel has OFD locks, asked through `getlk` (`F_OFD_GETLK`) on a pipe (any open
/// file takes the query). Kernels before Linux 3.15 refuse the commands with EINVAL, which
/// SQLite would report at every lock as a bare disk I/O error: the error names the kernel
/// instead. Any other answer is left to SQLite's own locks to report.
fn check_kernel(getlk: impl FnOnce(c_int, *mut libc::flock) -> c_int) -> Result<(), String> {
    let mut pipe = [0; 2];
    // SAFETY: room for the two descriptors.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Ok(());
    }
    // SAFETY: plain data; l_pid 0 as OFD commands require.
    let mut query: libc::flock = unsafe { std::mem::zeroed() };
    query.l_type = libc::F_WRLCK as _;
    query.l_whence = libc::SEEK_SET as _;
    let refused = getlk(pipe[0], &mut query) != 0 && errno() == libc::EINVAL;
    for fd in pipe {
        // SAFETY: our own descriptors, closed once.
        unsafe { libc::close(fd) };
    }
    if refused {
        return Err("tenantllm's SQLite locks its files with open file description locks (F_OFD_SETLK), which need \
                    Linux 3.15 or later; this kernel refused them (EINVAL)"
            .into());
    }
    Ok(())
}

/// Installs the wrappers into our SQLite's unix VFS; call before our first connection (and
/// after anything that must precede SQLite's initialisation: finding the VFS initialises it).
/// An error names what failed: without them our locks would not exclude Python's.
pub fn install() -> Result<(), String> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            // SAFETY: our own descriptor and a valid `flock`.
            check_kernel(|fd, query| unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, query) })?;
            // SAFETY: the handler only closes descriptors (see it).
            unsafe { libc::pthread_atfork(None, None, Some(close_inherited_owners)) };
            type Fcntl = unsafe extern "C" fn(c_int, c_int, *mut c_void) -> c_int;
            type Close = unsafe extern "C" fn(c_int) -> c_int;
            // SAFETY: the default VFS lives as long as the library; xSetSystemCall takes a
            // function pointer of any type (SQLite casts it back to the call's real type), and
            // it runs once, before any connection of ours reads the table.
            unsafe {
                let vfs = ffi::sqlite3_vfs_find(std::ptr::null());
                let set = vfs.as_ref().and_then(|v| v.xSetSystemCall).ok_or("SQLite has no default VFS with system calls")?;
                let wrappers = [
                    (c"fcntl", std::mem::transmute::<Fcntl, unsafe extern "C" fn()>(fcntl)),
                    (c"close", std::mem::transmute::<Close, unsafe extern "C" fn()>(close)),
                ];
                for (name, wrapper) in wrappers {
                    if set(vfs, name.as_ptr(), Some(wrapper)) != ffi::SQLITE_OK {
                        return Err(format!("SQLite's VFS refused a wrapper for {name:?}"));
                    }
                }
            }
            Ok(())
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failing_with(e: c_int) -> impl FnOnce(c_int, *mut libc::flock) -> c_int {
        move |_, _| {
            // SAFETY: this thread's errno.
            unsafe { *libc::__errno_location() = e };
            -1
        }
    }

    #[test]
    fn a_kernel_without_ofd_locks_is_named_instead_of_an_io_error_at_every_lock() {
        // SAFETY: the pipe's descriptor and a valid `flock`.
        assert_eq!(check_kernel(|fd, query| unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, query) }), Ok(()));
        let refused = check_kernel(failing_with(libc::EINVAL)).unwrap_err();
        assert!(refused.contains("Linux 3.15 or later") && refused.contains("EINVAL"), "{refused}");
        assert_eq!(check_kernel(failing_with(libc::EBADF)), Ok(()));
    }
}
