//! Thin wrappers around the SysV IPC system calls (`shm*`, `sem*`, `msg*`)
//! for `ipc/sysv.rs`. Each acts in the IPC namespace of the calling thread.
//! Errors keep the errno reachable (`io::Error`) so callers can branch on it.

use std::io;

/// The fields of `ipc_perm` snap saves and sets.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Perm {
    pub key: i32,
    /// Mode bits as the kernel keeps them (for shm including SHM_DEST and
    /// SHM_LOCKED).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub cuid: u32,
    pub cgid: u32,
}

fn perm_of(p: &libc::ipc_perm) -> Perm {
    Perm { key: p.__key, mode: p.mode as u32, uid: p.uid, gid: p.gid, cuid: p.cuid, cgid: p.cgid }
}

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub const SHM_DEST: u32 = 0o1000;
pub const SHM_LOCKED: u32 = 0o2000;
pub const SHM_EXEC: i32 = 0o100000;

/// `shmctl(IPC_STAT)`.
#[derive(Debug, Clone, Copy)]
pub struct ShmStat {
    pub perm: Perm,
    pub size: u64,
    pub cpid: i32,
    pub lpid: i32,
    pub nattch: u64,
}

pub fn shm_stat(id: i32) -> io::Result<ShmStat> {
    // SAFETY: shmid_ds is plain data; all-zero is a valid value.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes one shmid_ds into `ds`, which lives for the call.
    check(unsafe { libc::syscall(libc::SYS_shmctl, id, libc::IPC_STAT, &mut ds as *mut libc::shmid_ds) })?;
    Ok(ShmStat {
        perm: perm_of(&ds.shm_perm),
        size: ds.shm_segsz as u64,
        cpid: ds.shm_cpid,
        lpid: ds.shm_lpid,
        nattch: ds.shm_nattch,
    })
}

/// `shmctl(IPC_SET)`: owner and the low 9 mode bits.
pub fn shm_set(id: i32, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    // SAFETY: shmid_ds is plain data; all-zero is a valid value.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    ds.shm_perm.uid = uid;
    ds.shm_perm.gid = gid;
    ds.shm_perm.mode = (mode & 0o777) as libc::c_ushort;
    // SAFETY: the kernel reads one shmid_ds from `ds`, alive for the call.
    check(unsafe { libc::syscall(libc::SYS_shmctl, id, libc::IPC_SET, &mut ds as *mut libc::shmid_ds) })?;
    Ok(())
}

/// `shmctl(cmd)` for commands without a buffer (IPC_RMID, SHM_LOCK).
pub fn shm_cmd(id: i32, cmd: i32) -> io::Result<()> {
    // SAFETY: integer arguments only; a null buffer is not read for these commands.
    check(unsafe { libc::syscall(libc::SYS_shmctl, id, cmd, 0usize) })?;
    Ok(())
}

pub fn shmget(key: i32, size: u64, flags: i32) -> io::Result<i32> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::syscall(libc::SYS_shmget, key, size as usize, flags) }).map(|r| r as i32)
}

/// A segment attached in snap's own address space (detached on drop).
pub struct Attached {
    pub addr: u64,
    pub len: u64,
}

pub fn shm_attach(id: i32, size: u64, rdonly: bool) -> io::Result<Attached> {
    let flags = if rdonly { libc::SHM_RDONLY } else { 0 };
    // SAFETY: the kernel picks a free address (null hint); snap never
    // dereferences the mapping, it reads and writes it through
    // /proc/self/map_files.
    let r = unsafe { libc::syscall(libc::SYS_shmat, id, 0usize, flags) };
    check(r)?;
    Ok(Attached { addr: r as u64, len: size.div_ceil(4096) * 4096 })
}

impl Drop for Attached {
    fn drop(&mut self) {
        // SAFETY: detaches the mapping shm_attach made; nothing refers to it.
        unsafe { libc::syscall(libc::SYS_shmdt, self.addr as usize) };
    }
}

/// `semctl(IPC_STAT)`: permissions and the number of semaphores.
pub fn sem_stat(id: i32) -> io::Result<(Perm, usize)> {
    // SAFETY: semid_ds is plain data; all-zero is a valid value.
    let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes one semid_ds into `ds`, alive for the call.
    check(unsafe { libc::syscall(libc::SYS_semctl, id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) })?;
    Ok((perm_of(&ds.sem_perm), ds.sem_nsems as usize))
}

pub fn sem_set(id: i32, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    // SAFETY: semid_ds is plain data; all-zero is a valid value.
    let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
    ds.sem_perm.uid = uid;
    ds.sem_perm.gid = gid;
    ds.sem_perm.mode = (mode & 0o777) as libc::c_ushort;
    // SAFETY: the kernel reads one semid_ds from `ds`, alive for the call.
    check(unsafe { libc::syscall(libc::SYS_semctl, id, 0, libc::IPC_SET, &mut ds as *mut libc::semid_ds) })?;
    Ok(())
}

pub fn sem_getall(id: i32, n: usize) -> io::Result<Vec<u16>> {
    let mut v = vec![0u16; n];
    // SAFETY: GETALL writes nsems u16s; `v` holds `n` = nsems of them.
    check(unsafe { libc::syscall(libc::SYS_semctl, id, 0, libc::GETALL, v.as_mut_ptr()) })?;
    Ok(v)
}

pub fn sem_setall(id: i32, vals: &[u16]) -> io::Result<()> {
    // SAFETY: SETALL reads nsems u16s from the buffer; the caller passes
    // exactly nsems values (checked against IPC_STAT below).
    let (_, n) = sem_stat(id)?;
    if n != vals.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: as above; `vals` lives for the call and is only read.
    check(unsafe { libc::syscall(libc::SYS_semctl, id, 0, libc::SETALL, vals.as_ptr()) })?;
    Ok(())
}

/// `semctl(cmd)` with an integer argument: GETPID, GETNCNT, GETZCNT,
/// SETVAL, IPC_RMID.
pub fn sem_int(id: i32, num: i32, cmd: i32, arg: i32) -> io::Result<i32> {
    // SAFETY: integer arguments only (these commands take `val`, not a pointer).
    check(unsafe { libc::syscall(libc::SYS_semctl, id, num, cmd, arg as libc::c_long) }).map(|r| r as i32)
}

pub fn semget(key: i32, nsems: i32, flags: i32) -> io::Result<i32> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::syscall(libc::SYS_semget, key, nsems, flags) }).map(|r| r as i32)
}

/// `msgctl(IPC_STAT)`.
#[derive(Debug, Clone, Copy)]
pub struct MsgStat {
    pub perm: Perm,
    pub cbytes: u64,
    pub qnum: u64,
    pub qbytes: u64,
    pub lspid: i32,
    pub lrpid: i32,
}

pub fn msg_stat(id: i32) -> io::Result<MsgStat> {
    // SAFETY: msqid_ds is plain data; all-zero is a valid value.
    let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes one msqid_ds into `ds`, alive for the call.
    check(unsafe { libc::syscall(libc::SYS_msgctl, id, libc::IPC_STAT, &mut ds as *mut libc::msqid_ds) })?;
    Ok(MsgStat {
        perm: perm_of(&ds.msg_perm),
        cbytes: ds.__msg_cbytes,
        qnum: ds.msg_qnum,
        qbytes: ds.msg_qbytes,
        lspid: ds.msg_lspid,
        lrpid: ds.msg_lrpid,
    })
}

pub fn msg_set(id: i32, uid: u32, gid: u32, mode: u32, qbytes: u64) -> io::Result<()> {
    // SAFETY: msqid_ds is plain data; all-zero is a valid value.
    let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
    ds.msg_perm.uid = uid;
    ds.msg_perm.gid = gid;
    ds.msg_perm.mode = (mode & 0o777) as libc::c_ushort;
    ds.msg_qbytes = qbytes;
    // SAFETY: the kernel reads one msqid_ds from `ds`, alive for the call.
    check(unsafe { libc::syscall(libc::SYS_msgctl, id, libc::IPC_SET, &mut ds as *mut libc::msqid_ds) })?;
    Ok(())
}

pub fn msg_rmid(id: i32) -> io::Result<()> {
    // SAFETY: integer arguments; IPC_RMID reads no buffer.
    check(unsafe { libc::syscall(libc::SYS_msgctl, id, libc::IPC_RMID, 0usize) })?;
    Ok(())
}

pub fn msgget(key: i32, flags: i32) -> io::Result<i32> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::syscall(libc::SYS_msgget, key, flags) }).map(|r| r as i32)
}

/// A copy of message number `index` (from 0) of the queue, left in place
/// (`MSG_COPY`), with room for `max` bytes of text: (type, text).
pub fn msg_copy(id: i32, index: u64, max: usize) -> io::Result<(i64, Vec<u8>)> {
    let mut buf = vec![0u8; 8 + max];
    // SAFETY: the kernel writes at most 8 + `max` bytes (type and text)
    // into `buf`, which is that long and lives for the call.
    let n = check(unsafe {
        libc::syscall(libc::SYS_msgrcv, id, buf.as_mut_ptr(), max, index as libc::c_long, libc::IPC_NOWAIT | libc::MSG_COPY)
    })? as usize;
    let mtype = i64::from_ne_bytes(buf[..8].try_into().expect("8 bytes"));
    buf.drain(..8);
    buf.truncate(n);
    Ok((mtype, buf))
}

/// Take the first message off the queue, whatever its size (truncated into
/// a small buffer): for emptying a queue. `Ok(false)` when it is empty.
pub fn msg_drop_one(id: i32) -> io::Result<bool> {
    let mut buf = [0u8; 16];
    // SAFETY: at most 8 bytes of text (MSG_NOERROR truncates) plus the type
    // are written into the 16-byte buffer.
    let r = unsafe { libc::syscall(libc::SYS_msgrcv, id, buf.as_mut_ptr(), 8usize, 0, libc::IPC_NOWAIT | libc::MSG_NOERROR) };
    match check(r) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOMSG) => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn msgsnd(id: i32, mtype: i64, text: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(8 + text.len());
    buf.extend_from_slice(&mtype.to_ne_bytes());
    buf.extend_from_slice(text);
    // SAFETY: the kernel reads the type and `text.len()` bytes from `buf`.
    check(unsafe { libc::syscall(libc::SYS_msgsnd, id, buf.as_ptr(), text.len(), libc::IPC_NOWAIT) })?;
    Ok(())
}

/// Run `f` on a thread of its own whose effective uid and gid are
/// `uid`/`gid` (set with raw system calls, which change only the calling
/// thread), so objects it creates get them as creator (cuid/cgid).
pub fn as_creator<T: Send>(uid: u32, gid: u32, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: integer system calls changing this thread's credentials only.
            check(unsafe { libc::syscall(libc::SYS_setresgid, -1i32, gid, -1i32) })?;
            // SAFETY: as above.
            check(unsafe { libc::syscall(libc::SYS_setresuid, -1i32, uid, -1i32) })?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("creator thread panicked")))
    })
}
