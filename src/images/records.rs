//! Image records: the JSON metadata of a checkpoint.
//!
//! Every record is versioned through the inventory's `format_version`. A new
//! optional field is a minor change: it carries `#[serde(default)]` so old
//! images still load, and old readers skip fields they do not know.
//! Page contents are not here: they live in the page store (`pagestore.rs`),
//! referenced by `PageRef`s in the per-process page maps.

use std::collections::BTreeMap;
use serde::{Deserialize, Serialize};

/// Current image format version. Bump on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;

/// `inventory.json`: what the image is and what it needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Inventory {
    pub format_version: u32,
    /// Always "x86_64" for now; checked on load.
    pub arch: String,
    /// `uname -r` of the dumping host.
    pub kernel: String,
    /// XCR0 feature mask of the dumping CPU: restore needs a CPU with these.
    pub xsave_mask: u64,
    /// Size in bytes of the XSAVE area of each thread.
    pub xsave_size: u32,
    /// Seconds since the epoch when the dump finished.
    pub created_unix: u64,
    /// The `-t` roots, in command-line order.
    pub roots: Vec<i32>,
    /// Every process in the image, parents before children.
    pub pids: Vec<i32>,
    /// Features the dump used (e.g. "parasite", "zstd", "shell-job").
    #[serde(default)]
    pub features: Vec<String>,
    /// Total bytes of page data referenced by all processes (logical size).
    #[serde(default)]
    pub memory_bytes: u64,
    /// This image's identity: 32 random hex digits, so a child can tell its
    /// parent from another image put in its place.
    #[serde(default)]
    pub id: String,
    /// Parent image of an incremental chain: its directory, relative to this
    /// image's directory where possible.
    #[serde(default)]
    pub parent: Option<String>,
    /// The parent's `id`, checked when the chain is opened.
    #[serde(default)]
    pub parent_id: Option<String>,
    /// How the memory was read: "full" (every page), "hash" (every page,
    /// only new ones stored), "uffd-wp" or "soft-dirty" (only pages written
    /// since the parent, the rest taken from it).
    #[serde(default)]
    pub memory_backend: String,
    /// Dirty tracking armed by this dump for the next one, if any.
    #[serde(default)]
    pub tracking: Option<Tracking>,
    /// The nftables table (family inet) that drops the packets of the
    /// image's TCP connections until restore puts them back; restore
    /// deletes it once they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_lock: Option<String>,
    /// Set when the image is a whole pid namespace (its init included):
    /// every pid and tid of the image is then the namespace's, and restore
    /// needs `--pidns`, where the saved pid 1 becomes the new namespace's
    /// init (`dump/pidns.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pidns: Option<PidNsInfo>,
    /// With `dump --cgroup`: that cgroup, relative to the cgroup v2 mount
    /// (for information; `restore --cgroup` says where the processes go).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

/// The pid namespace an image was dumped from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PidNsInfo {
    /// The namespace as /proc/PID/ns/pid named it (`pid:[4026532…]`).
    pub ns: String,
    /// Each process's pid in the namespace (in decimal: JSON keys are
    /// strings) -> its pid on the dumping host, for information (nothing at
    /// restore depends on it).
    pub host_pids: std::collections::BTreeMap<String, i32>,
}

/// Where the next incremental dump finds the dirty tracking this dump armed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tracking {
    /// "uffd-wp" or "soft-dirty".
    pub backend: String,
    /// Socket of the process that holds the tracking between dumps (uffd-wp).
    #[serde(default)]
    pub holder: Option<String>,
    /// Token the holder hands out with the tracking; it matches this value
    /// only if no other dump consumed the tracking since.
    pub generation: String,
}

/// `proc-<pid>.json`: one process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcessImage {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// Alive, or a zombie with its wait status.
    pub state: ProcState,
    pub comm: String,
    /// Target of /proc/PID/exe at dump time.
    pub exe: String,
    pub cwd: String,
    pub root: String,
    pub umask: u32,
    pub creds: Creds,
    pub rlimits: Vec<Rlimit>,
    pub personality: u32,
    pub nice: i32,
    pub sched: Sched,
    pub no_new_privs: bool,
    pub dumpable: i32,
    /// seccomp mode from /proc/PID/status (0 = none). Non-zero is refused for now.
    pub seccomp: u32,
    pub mm: MmInfo,
    pub vmas: Vec<Vma>,
    pub fds: Vec<FdEntry>,
    /// Signal dispositions 1..=64 (index 0 is signal 1).
    pub sigactions: Vec<SigAction>,
    pub itimers: ITimers,
    /// Process-directed pending signals.
    pub shared_pending: Vec<SigInfo>,
    /// Threads; the first is the thread-group leader (tid == pid).
    pub threads: Vec<ThreadImage>,
    /// Children in creation order (ascending pid of the dump).
    pub children: Vec<i32>,
    /// POSIX timers (timer_create), with their ids.
    #[serde(default)]
    pub posix_timers: Vec<PosixTimer>,
    /// Stopped by a job-control signal (SIGSTOP, SIGTSTP, …) at dump time.
    #[serde(default)]
    pub stopped: bool,
    /// File locks (flock, POSIX record, OFD) held at dump time, restored
    /// through the process's own descriptors (`kinds/locks.rs`).
    #[serde(default)]
    pub file_locks: Vec<FileLock>,
    /// Start time (/proc/PID/stat field 22): with the pid, tells the same
    /// process apart from a later one with the same pid.
    #[serde(default)]
    pub start_time: u64,
}

/// One POSIX timer, armed or not.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PosixTimer {
    pub id: i32,
    pub clock: i32,
    /// SIGEV_SIGNAL (0), SIGEV_NONE (1) or SIGEV_THREAD_ID (4).
    pub notify: i32,
    /// Target thread for SIGEV_THREAD_ID.
    pub notify_tid: i32,
    pub signo: i32,
    pub sigval: u64,
    /// Remaining time until the next expiry (0: disarmed) and the interval.
    pub value_ns: u64,
    pub interval_ns: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProcState {
    Alive,
    /// Raw wait status as `waitpid` would return it.
    Zombie { wait_status: i32 },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Creds {
    pub uid: [u32; 4], // real, effective, saved, fs
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Rlimit {
    /// RLIMIT_* number.
    pub resource: u32,
    /// u64::MAX means unlimited.
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Sched {
    pub policy: u32,
    pub priority: u32,
}

/// The `mm` fields that `PR_SET_MM_MAP` restores, plus auxv.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MmInfo {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// Raw auxv as (key, value) pairs, terminating AT_NULL excluded.
    pub auxv: Vec<(u64, u64)>,
}

/// One mapping of /proc/PID/maps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: u32,
    /// true for MAP_SHARED.
    pub shared: bool,
    /// File offset in bytes (file mappings).
    pub pgoff: u64,
    pub kind: VmaKind,
    /// VM_GROWSDOWN (the main stack).
    #[serde(default)]
    pub growsdown: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VmaKind {
    /// Private anonymous memory (heap, stacks, anonymous mmaps).
    Anon,
    /// Memory backed by a file. Private mappings have their written
    /// (copy-on-write) pages in the page map; shared ones are not dumped.
    File { file: FileId },
    /// Shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, /dev/zero, SysV
    /// shm): its content is in `shmem-<id>` page map, shared by every
    /// process that maps the same object.
    SharedAnon { shmem_id: u64, size: u64 },
    /// A SysV shared memory attachment (`shmat`): segment `shmid` of
    /// `ipc.json`, attached at `start - pgoff`; `rdonly` for `SHM_RDONLY`
    /// (the mapping may never be made writable). Its content is the
    /// segment's, saved once in `ipc.json`'s page map, not per process.
    SysvShm { shmid: i32, rdonly: bool },
    /// [vdso], [vvar], [vvar_vclock]: provided by the kernel.
    Special { name: String },
    /// [vsyscall]: fixed by the kernel, never touched.
    Vsyscall,
}

/// `ipc.json`: SysV IPC objects (`ipc/sysv.rs`). With `own_namespace` the
/// processes had an IPC namespace of their own and these are all of its
/// objects (restore makes a new namespace); otherwise they are the objects
/// of the host's namespace that the processes used.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IpcImage {
    pub own_namespace: bool,
    /// With an own namespace: its limits (`kernel.shmmax`, `msgmnb`, ...).
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    #[serde(default)]
    pub shm: Vec<ShmSegment>,
    #[serde(default)]
    pub sem: Vec<SemSet>,
    #[serde(default)]
    pub msg: Vec<MsgQueue>,
}

/// What every SysV object has: id, key (0 = IPC_PRIVATE), permission bits
/// (the low 9 bits of the mode), owner and creator.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IpcPerm {
    pub id: i32,
    pub key: i32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub cuid: u32,
    pub cgid: u32,
}

/// A shared memory segment. Its pages are in page map `pagemap` (offsets in
/// the segment), through the page store.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ShmSegment {
    pub perm: IpcPerm,
    pub size: u64,
    /// Removed with IPC_RMID while still attached (SHM_DEST).
    pub dest: bool,
    /// Locked in memory with SHM_LOCK (SHM_LOCKED).
    pub locked: bool,
    pub pagemap: String,
}

/// A semaphore set: each semaphore's value and the pid of the last
/// operation on it (`semctl GETPID`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SemSet {
    pub perm: IpcPerm,
    pub values: Vec<u16>,
    pub pids: Vec<i32>,
}

/// A message queue: its byte limit, last sender and receiver, and every
/// queued message in order; the message texts are concatenated in `blob`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MsgQueue {
    pub perm: IpcPerm,
    pub qbytes: u64,
    pub lspid: i32,
    pub lrpid: i32,
    pub messages: Vec<Msg>,
    pub blob: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Msg {
    pub mtype: i64,
    pub len: u64,
}

/// Identity of a file when it was dumped: restore refuses if it changed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileId {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
}

/// One entry of the fd table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FdEntry {
    pub fd: i32,
    pub cloexec: bool,
    /// Index into `files.json` (open file descriptions, shared between
    /// processes when they were shared at dump time).
    pub file: u32,
}

/// `files.json`: every open file description of the image.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FilesImage {
    pub files: Vec<OpenFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OpenFile {
    pub id: u32,
    /// O_* status flags (without O_CLOEXEC), from fdinfo.
    pub flags: u32,
    pub kind: FileKind,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FileKind {
    /// Regular file or directory opened by path.
    Regular { file: FileId, pos: u64 },
    /// Unlinked but open file: its content is stored in `blob`.
    Deleted { path: String, pos: u64, mode: u32, blob: String },
    /// A memfd: its name, content (in `blob`) and seals (u32::MAX: created
    /// without MFD_ALLOW_SEALING). One memfd per `ino`.
    Memfd { name: String, ino: u64, pos: u64, seals: u32, blob: String },
    /// A pidfd of process `pid` of the dump (opened by its holder at restore).
    Pidfd { pid: i32 },
    /// Character device (/dev/null, /dev/zero, /dev/urandom, ...).
    CharDev { path: String, rdev: u64 },
    /// One end of a pipe. Both ends of a pipe share `pipe_id`; the bytes
    /// buffered in it are stored once, in `pipe-<pipe_id>.data`.
    Pipe { pipe_id: u64, write_end: bool, buffered: u64, pipe_size: u64 },
    /// An eventfd: its counter and whether it is in semaphore mode
    /// (`O_NONBLOCK` is in `OpenFile::flags`).
    Eventfd { count: u64, semaphore: bool },
    /// A timerfd: its clock, unread expirations (`ticks`), `timerfd_settime` flags
    /// (`TFD_TIMER_ABSTIME`, `TFD_TIMER_CANCEL_ON_SET`), time left until the
    /// next expiration and the interval (ns; 0/0 = disarmed), and for an
    /// absolute timer the expiration time on its clock (ns).
    Timerfd { clockid: i32, ticks: u64, settime_flags: u32, value_ns: u64, interval_ns: u64, abs_ns: u64 },
    /// A signalfd: the set of signals it accepts (bit N-1 = signal N).
    Signalfd { sigmask: u64 },
    /// An epoll instance and its watches. A watch names the target by its
    /// descriptor number in process `owner` (the one that was checked to hold
    /// that very file at that number); restore adds the watches inside that
    /// process once its fd table is in place.
    Epoll { owner: i32, watches: Vec<crate::kinds::epoll::EpollWatch> },
    /// An inotify instance: its watches (path resolved at dump, mask, wd)
    /// and its unread events in queue order (see `kinds/inotify.rs`).
    Inotify {
        watches: Vec<crate::kinds::inotify::InotifyWatch>,
        #[serde(default)]
        events: Vec<crate::kinds::inotify::InotifyEvent>,
    },
    /// A POSIX message queue (`mq_open`), see `kinds/mqueue.rs`. `name`:
    /// `/name` in its IPC namespace; `linked`: the name still led to this
    /// queue at dump; `ino`: queue inode at dump (the descriptions of one
    /// queue share it); attributes, mode and owner of the queue; `messages`
    /// queued, stored once per queue in blob `blob` (empty when none) in
    /// receive order as (priority u32 LE, length u32 LE, bytes); `notify`:
    /// its `mq_notify` registration.
    Mqueue {
        name: String,
        linked: bool,
        ino: u64,
        maxmsg: u64,
        msgsize: u64,
        mode: u32,
        uid: u32,
        gid: u32,
        messages: u64,
        blob: String,
        notify: Option<crate::kinds::mqueue::MqNotify>,
    },
    /// A named pipe (FIFO) opened by path; data as for pipes.
    Fifo { path: String, pipe_id: u64, write_end: bool, buffered: u64, pipe_size: u64 },
    /// A terminal that restore replaces with its own (`--shell-job`).
    Tty { path: String },
    /// The master side of a pseudo-terminal (`/dev/ptmx`), pts number
    /// `index` at dump, with the state of the pair (`kinds/pty.rs`).
    /// Restore opens a new pair; the pts number may differ.
    PtyMaster { path: String, index: u32, state: crate::kinds::pty::PtyState },
    /// A slave side (`/dev/pts/N`) of a pseudo-terminal whose master is in
    /// the dump too (the `PtyMaster` with the same `index`).
    /// `exclusive`: TIOCEXCL was set on it.
    PtySlave { path: String, index: u32, exclusive: bool },
    /// A connected Unix-domain socket whose peer is in the dump too
    /// (socketpair, or an accepted socket and its client), or a client
    /// whose connection waits in the backlog of a listener of the dump
    /// (`listener` ≠ 0, `peer` 0). `ino`/`peer`: socket inodes at dump.
    /// `name`, `peer_name`: the two ends' addresses ("/path", "@abstract",
    /// "" unnamed; an accepted socket's is its listener's), given back at
    /// restore. Its receive queue is in blob `unix-<ino>.rcvq`; `msgs` are
    /// the message lengths for SOCK_DGRAM/SOCK_SEQPACKET (one entry per
    /// message, in order). `file`: the socket file of a datagram socket
    /// bound to a path of its own. `scm`: files in flight in its queue.
    UnixPeer {
        ino: u64,
        peer: u64,
        sock_type: u32,
        name: String,
        #[serde(default)]
        peer_name: String,
        #[serde(default)]
        listener: u64,
        rcvq: u64,
        msgs: Vec<u64>,
        /// sk_shutdown bits (1 = receive, 2 = send).
        shutdown: u32,
        opts: UnixOpts,
        #[serde(default)]
        file: Option<SockFile>,
        #[serde(default)]
        scm: Vec<ScmFiles>,
        /// The peer is outside the dump (`dump --ext-unix-sk`): restore
        /// connects a new socket to `peer_name`, the outside listener's.
        #[serde(default)]
        ext: bool,
    },
    /// A listening Unix-domain socket bound to a path (`/…`) or an abstract
    /// name (`@…`). `mode`, `uid`, `gid`: of the socket file (path names
    /// only). `pending`: connections waiting in its backlog, in accept
    /// order, from clients of the dump.
    UnixListen {
        ino: u64,
        sock_type: u32,
        name: String,
        backlog: u64,
        mode: u32,
        uid: u32,
        gid: u32,
        opts: UnixOpts,
        #[serde(default)]
        pending: Vec<PendingConn>,
    },
    /// An IPv4/IPv6 socket other than an established TCP connection: a TCP
    /// listener (`listen`, with its `backlog`), a TCP socket fresh or only
    /// bound, or a UDP socket, bound and/or connected (`peer`). `family`:
    /// AF_INET or AF_INET6; `proto`: IPPROTO_TCP or IPPROTO_UDP; `local`,
    /// `peer`: socket addresses as text ("127.0.0.1:80", "[::1]:80"); a
    /// local port 0 means unbound. Queued UDP datagrams are not kept.
    Inet {
        family: u32,
        proto: u32,
        local: String,
        #[serde(default)]
        peer: Option<String>,
        #[serde(default)]
        listen: bool,
        #[serde(default)]
        backlog: u64,
        opts: InetOpts,
    },
    /// An established TCP connection (`dump --tcp-established`), read in
    /// repair mode (TCP_REPAIR): its addresses, sequence numbers, queues
    /// (blobs `tcp-<ino>.inq` and `tcp-<ino>.outq`) and negotiated options.
    TcpConn {
        family: u32,
        local: String,
        peer: String,
        opts: InetOpts,
        tcp: TcpRepair,
    },
    /// A Unix-domain socket neither connected nor listening: fresh from
    /// socket(), or bound to a name (`file`: its socket file, for a path).
    /// A datagram socket's queue is in blob `unix-<ino>.rcvq`, one entry of
    /// `msgs` and of `senders` (address, "" unnamed) per datagram.
    UnixLone {
        ino: u64,
        sock_type: u32,
        name: String,
        file: Option<SockFile>,
        rcvq: u64,
        msgs: Vec<u64>,
        senders: Vec<String>,
        shutdown: u32,
        opts: UnixOpts,
        #[serde(default)]
        scm: Vec<ScmFiles>,
    },
}

/// Socket options of an IPv4/IPv6 socket that restore sets again.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct InetOpts {
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub keepalive: bool,
    pub broadcast: bool,
    /// IPV6_V6ONLY (AF_INET6 only).
    pub v6only: bool,
    pub priority: i64,
    /// SO_MARK (0: none).
    pub mark: u64,
    pub rcvlowat: i64,
    /// SO_RCVTIMEO / SO_SNDTIMEO in microseconds (0: none).
    pub rcvtimeo_us: u64,
    pub sndtimeo_us: u64,
    /// SO_LINGER: seconds when on.
    pub linger: Option<i64>,
    /// IP_TOS (IPv4) or IPV6_TCLASS (IPv6).
    pub tos: i64,
    /// IP_TTL / IPV6_UNICAST_HOPS as set (-1 or 0: the default).
    pub ttl: i64,
    /// TCP only.
    pub nodelay: bool,
    pub cork: bool,
    pub keepidle: i64,
    pub keepintvl: i64,
    pub keepcnt: i64,
    pub user_timeout: i64,
}

/// What TCP repair mode tells of an established connection.
/// `snd_seq`: the send queue's sequence number (write_seq: the byte after
/// the last one queued); `rcv_seq`: the receive queue's (rcv_nxt: the
/// byte after the last one received). `inq`/`outq`: bytes unread in the
/// receive queue / not yet acknowledged in the send queue, of which
/// `unsent` were never sent. `options`: tcpi_options bits (1 timestamps,
/// 2 SACK, 4 window scaling); `window`: TCP_REPAIR_WINDOW (snd_wl1,
/// snd_wnd, max_window, rcv_wnd, rcv_wup).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TcpRepair {
    pub ino: u64,
    pub snd_seq: u64,
    pub rcv_seq: u64,
    pub inq: u64,
    pub outq: u64,
    pub unsent: u64,
    pub mss: u64,
    pub options: u64,
    pub snd_wscale: u64,
    pub rcv_wscale: u64,
    pub timestamp: u64,
    pub window: Option<[u64; 5]>,
    /// SO_SNDBUF / SO_RCVBUF at dump (as getsockopt returns them): given
    /// back where the queues would not fit the new socket's defaults.
    #[serde(default)]
    pub sndbuf: u64,
    #[serde(default)]
    pub rcvbuf: u64,
}

/// Files in flight (SCM_RIGHTS) with one queued message of a Unix socket:
/// the message's index in `msgs` (on a stream socket with files in flight,
/// `msgs` holds the lengths of the runs of bytes read at once), and the
/// open files passed, by id in this files image, in order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScmFiles {
    pub msg: u32,
    pub files: Vec<u32>,
}

/// Mode and owner of the socket file of a Unix socket bound to a path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SockFile {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A connection waiting in a listener's backlog: the client socket's inode
/// and name (its own, "" if unnamed).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PendingConn {
    pub ino: u64,
    pub name: String,
}

/// Socket options of a Unix-domain socket that restore sets again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UnixOpts {
    pub passcred: bool,
    /// As getsockopt returns them (the kernel's doubled value).
    pub sndbuf: u64,
    pub rcvbuf: u64,
    /// SO_PEEK_OFF (-1: off).
    pub peek_off: i64,
    #[serde(default)]
    pub passsec: bool,
    /// SO_PASSPIDFD (false where the kernel lacks it).
    #[serde(default)]
    pub passpidfd: bool,
    /// SO_RCVTIMEO / SO_SNDTIMEO in microseconds (0: none).
    #[serde(default)]
    pub rcvtimeo_us: u64,
    #[serde(default)]
    pub sndtimeo_us: u64,
}

/// Disposition of one signal.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct SigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct ITimerVal {
    pub interval_us: u64,
    pub value_us: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct ITimers {
    pub real: ITimerVal,
    pub virt: ITimerVal,
    pub prof: ITimerVal,
}

/// A queued signal: the raw 128-byte siginfo, hex-encoded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SigInfo {
    pub signo: i32,
    pub raw_hex: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SigAltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Rseq {
    pub ptr: u64,
    pub len: u32,
    pub sig: u32,
}

/// One thread.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ThreadImage {
    pub tid: i32,
    pub comm: String,
    /// `user_regs_struct` as 27 u64 words, already adjusted so that an
    /// interrupted system call is re-issued (see docs/architecture.md).
    pub regs: Vec<u64>,
    /// Raw XSAVE area (NT_X86_XSTATE), hex-encoded.
    pub xsave_hex: String,
    pub sigmask: u64,
    pub pending: Vec<SigInfo>,
    pub robust_list: u64,
    pub robust_list_len: u64,
    pub rseq: Option<Rseq>,
    pub sigaltstack: SigAltStack,
    pub clear_child_tid: u64,
}

/// Hex helpers for the byte blobs kept in JSON.
pub fn to_hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

pub fn from_hex(s: &str) -> anyhow::Result<Vec<u8>> {
    fn nib(c: u8) -> anyhow::Result<u8> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => anyhow::bail!("invalid hex digit {:?}", c as char),
        }
    }
    let b = s.as_bytes();
    anyhow::ensure!(b.len() % 2 == 0, "hex string of odd length {}", b.len());
    b.chunks(2).map(|p| Ok(nib(p[0])? << 4 | nib(p[1])?)).collect()
}

/// One file lock a process held (see `kinds/locks.rs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileLock {
    pub kind: FileLockKind,
    /// A write (exclusive) lock, else a read (shared) one.
    pub write: bool,
    /// First byte; always 0 for flock.
    pub start: u64,
    /// Last byte, inclusive; `None`: to the end of the file (and beyond).
    pub end: Option<u64>,
    /// The process's descriptor it is taken again through.
    pub fd: i32,
    /// The locked file (st_dev, st_ino), for messages and checks.
    pub dev: u64,
    pub ino: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileLockKind {
    /// flock(2): belongs to the open file description.
    Flock,
    /// fcntl F_SETLK record lock: belongs to the process.
    Posix,
    /// fcntl F_OFD_SETLK: belongs to the open file description.
    Ofd,
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn hex_roundtrip() {
        let v: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&v)).unwrap(), v);
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
    }
}
