//! IPv4 and IPv6 sockets: TCP listeners, TCP sockets fresh or only bound,
//! UDP sockets (bound, connected), their addresses and common options; the
//! refusal of every other socket family; and the network lock that keeps
//! the peers of dumped TCP connections from being answered with RST while
//! the connections have no socket.
//!
//! Established connections are in `tcp.rs` (TCP repair).
//!
//! Dump reads everything through calls that change nothing in the target:
//! getsockname/getpeername, getsockopt, TCP_INFO. A listener whose accept
//! queue holds connections is refused: those are kernel sockets no process
//! holds yet. Queued UDP datagrams cannot be read without consuming them
//! (MSG_PEEK only sees the first), so they are dropped with a warning, as
//! the network may drop any datagram.
//!
//! Restore makes a new socket, sets the options (those that matter for bind
//! first), binds, then listens or connects.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{self as nsock, SockaddrIn, SockaddrIn6, SockaddrStorage};

use super::{sys, tcp, DumpShared, Kind, Probe, RestoreCtx};
use crate::images::records::{FileKind, InetOpts, OpenFile};
use crate::types::{Pid, RemoteFd};

pub const KIND: Kind = Kind { name: "inet", dump };
/// Last in the registry: every socket no kind claimed, refused by family.
pub const OTHER: Kind = Kind { name: "socket", dump: dump_other };

/// TCP states (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_LISTEN: u8 = 10;
pub const TCP_CLOSE: u8 = 7;

pub fn tcp_state_name(s: u8) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "unknown",
    }
}

/// The first bytes of struct tcp_info that snap reads.
pub struct TcpInfo {
    pub state: u8,
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    /// For a listener: connections in its accept queue.
    pub unacked: u32,
    /// For a listener: its backlog.
    pub sacked: u32,
}

pub fn tcp_info(fd: BorrowedFd<'_>) -> nix::Result<TcpInfo> {
    let mut b = [0u8; 32];
    let n = sys::get_bytes(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut b)?;
    if n < 32 {
        return Err(nix::errno::Errno::EINVAL);
    }
    let u32at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    Ok(TcpInfo {
        state: b[0],
        options: b[5],
        snd_wscale: b[6] & 0xf,
        rcv_wscale: b[6] >> 4,
        unacked: u32at(24),
        sacked: u32at(28),
    })
}

fn dump(p: &Probe, sh: &mut DumpShared) -> Option<Result<FileKind>> {
    if p.file_type() != libc::S_IFSOCK {
        return None;
    }
    let family = sys::get_int(p.ours, libc::SOL_SOCKET, libc::SO_DOMAIN).ok()?;
    if family != libc::AF_INET && family != libc::AF_INET6 {
        return None;
    }
    Some(dump_inner(p, sh, family).with_context(|| p.what()))
}

fn dump_inner(p: &Probe, sh: &mut DumpShared, family: i32) -> Result<FileKind> {
    let fd = p.ours;
    let typ = sys::get_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).context("SO_TYPE")?;
    let proto = sys::get_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL).context("SO_PROTOCOL")?;
    let fam = if family == libc::AF_INET { "IPv4" } else { "IPv6" };
    let local = local_addr(fd)?;
    let peer = peer_addr(fd)?;
    match (typ, proto) {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) => {
            let ti = tcp_info(fd).context("TCP_INFO")?;
            let opts = dump_opts(fd, family, true)?;
            match ti.state {
                TCP_LISTEN => {
                    if ti.unacked > 0 {
                        bail!(
                            "TCP listener on {local} has {} connection(s) waiting in its accept queue (not yet accepted): they cannot be captured; dump again once the program has accepted them",
                            ti.unacked
                        );
                    }
                    Ok(FileKind::Inet {
                        family: family as u32,
                        proto: proto as u32,
                        local: local.to_string(),
                        peer: None,
                        listen: true,
                        backlog: ti.sacked as u64,
                        opts,
                    })
                }
                TCP_CLOSE => Ok(FileKind::Inet {
                    family: family as u32,
                    proto: proto as u32,
                    local: local.to_string(),
                    peer: None,
                    listen: false,
                    backlog: 0,
                    opts,
                }),
                TCP_ESTABLISHED => {
                    let peer = peer.context("an established TCP socket without a peer address")?;
                    tcp::dump(p, sh, family, local, peer, opts)
                }
                s => bail!(
                    "TCP socket {local}{} in state {}: only listening, closed and established TCP sockets are supported",
                    peer.map(|a| format!(" -> {a}")).unwrap_or_default(),
                    tcp_state_name(s)
                ),
            }
        }
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => {
            let opts = dump_opts(fd, family, false)?;
            // FIONREAD on UDP is the size of the first datagram (a recv,
            // even MSG_PEEK, could take a pending error from the process).
            let queued = sys::ioctl_get_int(fd, libc::FIONREAD).unwrap_or(0);
            if queued > 0 {
                eprintln!(
                    "snap: warning: {}: UDP socket {local}: its queued datagrams (the first has {queued} bytes) are dropped: they cannot be read without consuming them",
                    p.what()
                );
            }
            Ok(FileKind::Inet {
                family: family as u32,
                proto: proto as u32,
                local: local.to_string(),
                peer: peer.map(|a| a.to_string()),
                listen: false,
                backlog: 0,
                opts,
            })
        }
        _ => bail!("{fam} sockets of type {typ} and protocol {proto} are not supported (only TCP and UDP)"),
    }
}

/// Sockets of the families no kind handles (netlink, packet, …).
fn dump_other(p: &Probe, _: &mut DumpShared) -> Option<Result<FileKind>> {
    if p.file_type() != libc::S_IFSOCK {
        return None;
    }
    let family = sys::get_int(p.ours, libc::SOL_SOCKET, libc::SO_DOMAIN).ok()?;
    let name = match family {
        libc::AF_NETLINK => "AF_NETLINK".to_string(),
        libc::AF_PACKET => "AF_PACKET".to_string(),
        libc::AF_ALG => "AF_ALG".to_string(),
        libc::AF_VSOCK => "AF_VSOCK".to_string(),
        libc::AF_BLUETOOTH => "AF_BLUETOOTH".to_string(),
        f => format!("family {f}"),
    };
    Some(Err(anyhow::anyhow!("{}: sockets of family {name} are not supported yet", p.what())))
}

fn to_std(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(a) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4((*a).into()));
    }
    s.as_sockaddr_in6().map(|a| SocketAddr::V6((*a).into()))
}

pub fn local_addr(fd: BorrowedFd<'_>) -> Result<SocketAddr> {
    let s: SockaddrStorage = nsock::getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd)).context("getsockname")?;
    to_std(&s).context("getsockname: not an IPv4/IPv6 address")
}

pub fn peer_addr(fd: BorrowedFd<'_>) -> Result<Option<SocketAddr>> {
    match nsock::getpeername::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(&fd)) {
        Ok(s) => Ok(to_std(&s)),
        Err(nix::errno::Errno::ENOTCONN) => Ok(None),
        Err(e) => Err(e).context("getpeername"),
    }
}

fn dump_opts(fd: BorrowedFd<'_>, family: i32, tcp: bool) -> Result<InetOpts> {
    let int = |level: i32, opt: i32, name: &str| -> Result<i64> {
        sys::get_int(fd, level, opt).map(|v| v as i64).with_context(|| format!("getsockopt {name}"))
    };
    let sol = libc::SOL_SOCKET;
    let mut o = InetOpts {
        reuseaddr: int(sol, libc::SO_REUSEADDR, "SO_REUSEADDR")? != 0,
        reuseport: int(sol, libc::SO_REUSEPORT, "SO_REUSEPORT")? != 0,
        keepalive: int(sol, libc::SO_KEEPALIVE, "SO_KEEPALIVE")? != 0,
        broadcast: int(sol, libc::SO_BROADCAST, "SO_BROADCAST")? != 0,
        priority: int(sol, libc::SO_PRIORITY, "SO_PRIORITY")?,
        mark: int(sol, libc::SO_MARK, "SO_MARK")? as u32 as u64,
        rcvlowat: int(sol, libc::SO_RCVLOWAT, "SO_RCVLOWAT")?,
        rcvtimeo_us: sys::get_timeo(fd, libc::SO_RCVTIMEO).context("SO_RCVTIMEO")?,
        sndtimeo_us: sys::get_timeo(fd, libc::SO_SNDTIMEO).context("SO_SNDTIMEO")?,
        ..Default::default()
    };
    let mut lb = [0u8; 8];
    sys::get_bytes(fd, sol, libc::SO_LINGER, &mut lb).context("SO_LINGER")?;
    if i32::from_ne_bytes(lb[0..4].try_into().expect("4")) != 0 {
        o.linger = Some(i32::from_ne_bytes(lb[4..8].try_into().expect("4")) as i64);
    }
    if family == libc::AF_INET6 {
        o.v6only = int(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, "IPV6_V6ONLY")? != 0;
        o.tos = int(libc::IPPROTO_IPV6, libc::IPV6_TCLASS, "IPV6_TCLASS")?;
        o.ttl = int(libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, "IPV6_UNICAST_HOPS")?;
    } else {
        o.tos = int(libc::IPPROTO_IP, libc::IP_TOS, "IP_TOS")?;
        o.ttl = int(libc::IPPROTO_IP, libc::IP_TTL, "IP_TTL")?;
    }
    if tcp {
        let t = libc::IPPROTO_TCP;
        o.nodelay = int(t, libc::TCP_NODELAY, "TCP_NODELAY")? != 0;
        o.cork = int(t, libc::TCP_CORK, "TCP_CORK")? != 0;
        o.keepidle = int(t, libc::TCP_KEEPIDLE, "TCP_KEEPIDLE")?;
        o.keepintvl = int(t, libc::TCP_KEEPINTVL, "TCP_KEEPINTVL")?;
        o.keepcnt = int(t, libc::TCP_KEEPCNT, "TCP_KEEPCNT")?;
        o.user_timeout = int(t, libc::TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT")?;
    }
    Ok(o)
}

/// Options that bind looks at: before bind.
pub fn set_opts_before_bind(fd: BorrowedFd<'_>, family: u32, o: &InetOpts) -> Result<()> {
    let set = |level: i32, opt: i32, v: i64, name: &str| -> Result<()> {
        sys::set_int(fd, level, opt, v as i32).with_context(|| format!("setsockopt {name} {v}"))
    };
    if family == libc::AF_INET6 as u32 {
        set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, o.v6only as i64, "IPV6_V6ONLY")?;
    }
    set(libc::SOL_SOCKET, libc::SO_REUSEADDR, o.reuseaddr as i64, "SO_REUSEADDR")?;
    set(libc::SOL_SOCKET, libc::SO_REUSEPORT, o.reuseport as i64, "SO_REUSEPORT")?;
    Ok(())
}

/// Every other option.
pub fn set_opts(fd: BorrowedFd<'_>, family: u32, tcp: bool, o: &InetOpts) -> Result<()> {
    let set = |level: i32, opt: i32, v: i64, name: &str| -> Result<()> {
        sys::set_int(fd, level, opt, v as i32).with_context(|| format!("setsockopt {name} {v}"))
    };
    let sol = libc::SOL_SOCKET;
    set(sol, libc::SO_KEEPALIVE, o.keepalive as i64, "SO_KEEPALIVE")?;
    set(sol, libc::SO_BROADCAST, o.broadcast as i64, "SO_BROADCAST")?;
    set(sol, libc::SO_PRIORITY, o.priority, "SO_PRIORITY")?;
    if o.mark != 0 {
        set(sol, libc::SO_MARK, o.mark as i64, "SO_MARK")?;
    }
    set(sol, libc::SO_RCVLOWAT, o.rcvlowat, "SO_RCVLOWAT")?;
    sys::set_timeo(fd, libc::SO_RCVTIMEO, o.rcvtimeo_us).context("SO_RCVTIMEO")?;
    sys::set_timeo(fd, libc::SO_SNDTIMEO, o.sndtimeo_us).context("SO_SNDTIMEO")?;
    if let Some(s) = o.linger {
        let mut b = [0u8; 8];
        b[0..4].copy_from_slice(&1i32.to_ne_bytes());
        b[4..8].copy_from_slice(&(s as i32).to_ne_bytes());
        sys::set_bytes(fd, sol, libc::SO_LINGER, &b).context("SO_LINGER")?;
    }
    if family == libc::AF_INET6 as u32 {
        set(libc::IPPROTO_IPV6, libc::IPV6_TCLASS, o.tos, "IPV6_TCLASS")?;
        set(libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, o.ttl, "IPV6_UNICAST_HOPS")?;
    } else {
        set(libc::IPPROTO_IP, libc::IP_TOS, o.tos, "IP_TOS")?;
        if o.ttl > 0 {
            set(libc::IPPROTO_IP, libc::IP_TTL, o.ttl, "IP_TTL")?;
        }
    }
    if tcp {
        let t = libc::IPPROTO_TCP;
        set(t, libc::TCP_NODELAY, o.nodelay as i64, "TCP_NODELAY")?;
        set(t, libc::TCP_CORK, o.cork as i64, "TCP_CORK")?;
        for (opt, v, name) in [
            (libc::TCP_KEEPIDLE, o.keepidle, "TCP_KEEPIDLE"),
            (libc::TCP_KEEPINTVL, o.keepintvl, "TCP_KEEPINTVL"),
            (libc::TCP_KEEPCNT, o.keepcnt, "TCP_KEEPCNT"),
        ] {
            if v > 0 {
                set(t, opt, v, name)?;
            }
        }
        set(t, libc::TCP_USER_TIMEOUT, o.user_timeout, "TCP_USER_TIMEOUT")?;
    }
    Ok(())
}

/// A saved address, checked against the socket's family.
pub fn parse_addr(text: &str, family: u32) -> Result<SocketAddr> {
    let a: SocketAddr = text.parse().with_context(|| format!("bad socket address {text:?} in the image"))?;
    let ok = matches!((a, family as i32), (SocketAddr::V4(_), libc::AF_INET) | (SocketAddr::V6(_), libc::AF_INET6));
    anyhow::ensure!(ok, "socket address {text} does not match family {family}");
    Ok(a)
}

pub fn new_socket(family: u32, stream: bool) -> Result<OwnedFd> {
    let fam = match family as i32 {
        libc::AF_INET => nsock::AddressFamily::Inet,
        libc::AF_INET6 => nsock::AddressFamily::Inet6,
        f => bail!("socket family {f} is not IPv4 or IPv6"),
    };
    let (t, p) = if stream {
        (nsock::SockType::Stream, nsock::SockProtocol::Tcp)
    } else {
        (nsock::SockType::Datagram, nsock::SockProtocol::Udp)
    };
    nsock::socket(fam, t, nsock::SockFlag::SOCK_CLOEXEC, p).context("socket")
}

pub fn bind(fd: BorrowedFd<'_>, a: &SocketAddr) -> Result<()> {
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let r = match a {
        SocketAddr::V4(v) => nsock::bind(raw, &SockaddrIn::from(*v)),
        SocketAddr::V6(v) => nsock::bind(raw, &SockaddrIn6::from(*v)),
    };
    r.with_context(|| format!("bind {a}"))
}

pub fn connect(fd: BorrowedFd<'_>, a: &SocketAddr) -> Result<()> {
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let r = match a {
        SocketAddr::V4(v) => nsock::connect(raw, &SockaddrIn::from(*v)),
        SocketAddr::V6(v) => nsock::connect(raw, &SockaddrIn6::from(*v)),
    };
    r.with_context(|| format!("connect {a}"))
}

/// Restore a socket of kind `Inet`.
pub fn restore(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::Inet { family, proto, local, peer, listen, backlog, opts } = &of.kind else {
        return tcp::restore(of, ctx);
    };
    let stream = match *proto as i32 {
        libc::IPPROTO_TCP => true,
        libc::IPPROTO_UDP => false,
        p => bail!("inet socket of protocol {p} in the image"),
    };
    let what = format!("{} socket {local}", if stream { "TCP" } else { "UDP" });
    let fd = new_socket(*family, stream).with_context(|| what.clone())?;
    let b = fd.as_fd();
    set_opts_before_bind(b, *family, opts).with_context(|| what.clone())?;
    let la = parse_addr(local, *family)?;
    if la.port() != 0 {
        bind(b, &la).with_context(|| what.clone())?;
    }
    set_opts(b, *family, stream, opts).with_context(|| what.clone())?;
    if *listen {
        sys::listen(b, (*backlog).min(i32::MAX as u64) as i32).with_context(|| format!("{what}: listen"))?;
    }
    if let Some(p) = peer {
        let pa = parse_addr(p, *family)?;
        connect(b, &pa).with_context(|| what.clone())?;
    }
    set_nonblock(b, of.flags).with_context(|| what.clone())?;
    Ok(fd)
}

pub fn set_nonblock(fd: BorrowedFd<'_>, flags: u32) -> Result<()> {
    if flags & libc::O_NONBLOCK as u32 != 0 {
        sys::set_status_flags(fd, libc::O_RDWR | libc::O_NONBLOCK).context("fcntl(F_SETFL, O_NONBLOCK)")?;
    }
    Ok(())
}

// ----------------------------------------------------------- network lock

/// One established TCP connection of the dump, seen from /proc/PID/net/tcp*.
#[derive(Debug, Clone)]
pub struct Conn {
    pub ino: u64,
    pub pid: Pid,
    pub fd: RemoteFd,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// The nftables table that drops the packets of the dumped connections
/// (both directions) from before they go into repair mode until restore
/// has them back. Deleted on drop unless `keep`: a failed dump and a dump
/// with --leave-running remove it.
pub struct NetLock {
    table: Option<String>,
    /// (local, remote) of every connection found (and locked if needed).
    pub conns: std::collections::HashSet<(SocketAddr, SocketAddr)>,
}

impl NetLock {
    /// Find the established TCP connections of the (seized) processes;
    /// refuse them without `--tcp-established`; lock their traffic.
    pub fn prepare(pids: &[Pid], tcp_established: bool) -> Result<NetLock> {
        let conns = established(pids)?;
        if conns.is_empty() {
            return Ok(NetLock { table: None, conns: Default::default() });
        }
        if !tcp_established {
            let c = &conns[0];
            bail!(
                "{} {} (socket:[{}]): established TCP connection {} -> {}: dumping it needs --tcp-established",
                c.pid,
                c.fd,
                c.ino,
                c.local,
                c.remote
            );
        }
        let me = std::fs::read_link("/proc/self/ns/net").ok();
        for c in &conns {
            let theirs = std::fs::read_link(format!("/proc/{}/ns/net", c.pid.0)).ok();
            if theirs != me {
                bail!(
                    "{} {}: established TCP connection {} -> {} in another network namespace: not supported yet",
                    c.pid,
                    c.fd,
                    c.local,
                    c.remote
                );
            }
        }
        let tuples: std::collections::HashSet<(SocketAddr, SocketAddr)> =
            conns.iter().map(|c| (c.local, c.remote)).collect();
        let outside: Vec<&Conn> = conns.iter().filter(|c| !tuples.contains(&(c.remote, c.local))).collect();
        let Some(nft) = nft_path() else {
            if let Some(c) = outside.first() {
                bail!(
                    "{} {}: TCP connection {} -> {} has its peer outside the dump: locking its traffic needs nftables (the nft tool); install it (apt-get install nftables)",
                    c.pid,
                    c.fd,
                    c.local,
                    c.remote
                );
            }
            // Both ends of every connection are dumped: no packet comes
            // from outside while they are in repair mode.
            return Ok(NetLock { table: None, conns: tuples });
        };
        let mut b = [0u8; 8];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
            .context("reading /dev/urandom")?;
        let name = format!("snap_lock_{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>());
        let script = lock_script(&name, &conns);
        nft_run(&nft, &script).with_context(|| format!("installing the network lock (nftables table inet {name})"))?;
        Ok(NetLock { table: Some(name), conns: tuples })
    }

    pub fn name(&self) -> Option<String> {
        self.table.clone()
    }

    /// The image needs the table until restore: leave it.
    pub fn keep(mut self) {
        self.table = None;
    }
}

impl Drop for NetLock {
    fn drop(&mut self) {
        if let Some(t) = self.table.take() {
            if let Err(e) = unlock(&t) {
                eprintln!("snap: warning: {e:#}");
            }
        }
    }
}

fn lock_script(name: &str, conns: &[Conn]) -> String {
    let mut rules = String::new();
    for c in conns {
        for (s, d) in [(c.local, c.remote), (c.remote, c.local)] {
            rules.push_str(&format!("    {} drop\n", match_tuple(s, d)));
        }
    }
    format!(
        "table inet {name} {{\n  chain snap_in {{\n    type filter hook input priority -300; policy accept;\n{rules}  }}\n  chain snap_out {{\n    type filter hook output priority -300; policy accept;\n{rules}  }}\n}}\n"
    )
}

fn plain_ip(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v) => v.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v)),
        v4 => v4,
    }
}

fn match_tuple(s: SocketAddr, d: SocketAddr) -> String {
    let (si, di) = (plain_ip(s.ip()), plain_ip(d.ip()));
    let ip = if si.is_ipv4() { "ip" } else { "ip6" };
    format!("{ip} saddr {si} tcp sport {} {ip} daddr {di} tcp dport {}", s.port(), d.port())
}

/// Where the nft tool is, if installed.
pub fn nft_path() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join("nft")).find(|p| p.is_file())
}

fn nft_run(nft: &PathBuf, script: &str) -> Result<()> {
    let mut ch = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", nft.display()))?;
    ch.stdin.take().context("nft stdin")?.write_all(script.as_bytes()).context("writing to nft")?;
    let out = ch.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!("nft failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Delete the lock table `name` (saved in an image: checked first).
pub fn unlock(name: &str) -> Result<()> {
    anyhow::ensure!(
        name.starts_with("snap_lock_") && name.len() <= 64 && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_'),
        "network lock table name {name:?} is not one snap makes"
    );
    let nft = nft_path().with_context(|| format!("deleting the network lock table inet {name}: the nft tool is not installed"))?;
    nft_run(&nft, &format!("delete table inet {name}\n")).with_context(|| format!("deleting the network lock table inet {name}"))
}

/// `snap check`: can a lock table be made and removed here?
pub fn probe_lock() -> std::result::Result<String, String> {
    let nft = nft_path().ok_or("the nft tool is not installed (apt-get install nftables)")?;
    let name = format!("snap_lock_check{}", std::process::id());
    let script = format!("table inet {name} {{\n  chain snap_in {{\n    type filter hook input priority -300; policy accept;\n  }}\n}}\n");
    nft_run(&nft, &script).map_err(|e| format!("{e:#}"))?;
    unlock(&name).map_err(|e| format!("{e:#}"))?;
    Ok(format!("{} made and removed a table", nft.display()))
}

/// Established TCP connections held by `pids`, from /proc/PID/net/tcp{,6}
/// matched by socket inode.
pub fn established(pids: &[Pid]) -> Result<Vec<Conn>> {
    let mut socks: BTreeMap<u64, (Pid, RemoteFd)> = BTreeMap::new();
    let mut netns: HashMap<PathBuf, Pid> = HashMap::new();
    for &pid in pids {
        let Ok(fds) = super::list_fds(pid) else { continue };
        let mut any = false;
        for fd in fds {
            let Ok(l) = std::fs::read_link(format!("/proc/{}/fd/{}", pid.0, fd.0)) else { continue };
            let l = l.to_string_lossy();
            if let Some(ino) = l.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')).and_then(|s| s.parse().ok()) {
                socks.entry(ino).or_insert((pid, fd));
                any = true;
            }
        }
        if any {
            if let Ok(ns) = std::fs::read_link(format!("/proc/{}/ns/net", pid.0)) {
                netns.entry(ns).or_insert(pid);
            }
        }
    }
    let mut out = Vec::new();
    for pid in netns.values() {
        for f in ["tcp", "tcp6"] {
            let path = format!("/proc/{}/net/{f}", pid.0);
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            for row in parse_proc_tcp(&text) {
                if row.state != TCP_ESTABLISHED {
                    continue;
                }
                if let Some(&(pid, fd)) = socks.get(&row.ino) {
                    out.push(Conn { ino: row.ino, pid, fd, local: row.local, remote: row.remote });
                }
            }
        }
    }
    out.sort_by_key(|c| (c.pid, c.fd));
    Ok(out)
}

pub struct ProcTcpRow {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    pub ino: u64,
}

/// Rows of /proc/net/tcp or tcp6 (addresses as the kernel prints them:
/// each 32-bit word of the address in host byte order, port in hex).
pub fn parse_proc_tcp(text: &str) -> Vec<ProcTcpRow> {
    let addr = |s: &str| -> Option<SocketAddr> {
        let (a, p) = s.split_once(':')?;
        let port = u16::from_str_radix(p, 16).ok()?;
        let mut bytes = Vec::new();
        for i in (0..a.len()).step_by(8) {
            let w = u32::from_str_radix(a.get(i..i + 8)?, 16).ok()?;
            bytes.extend_from_slice(&w.to_ne_bytes());
        }
        let ip: IpAddr = match bytes.len() {
            4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
            16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(ProcTcpRow {
                local: addr(f.get(1)?)?,
                remote: addr(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                ino: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_tcp_rows() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 20 4 30 10 -1\n";
        let r = parse_proc_tcp(t);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(r[0].remote, "127.0.0.1:54321".parse().unwrap());
        assert_eq!(r[0].state, 1);
        assert_eq!(r[0].ino, 12345);
        let t6 = "hdr\n   0: 00000000000000000000000001000000:1F90 0000000000000000FFFF00000100007F:D431 01 0:0 0:0 0 0 0 777 1\n";
        let r = parse_proc_tcp(t6);
        assert_eq!(r[0].local, "[::1]:8080".parse().unwrap());
        assert_eq!(r[0].remote, "[::ffff:127.0.0.1]:54321".parse().unwrap());
    }

    #[test]
    fn lock_rules() {
        let s = match_tuple("[::ffff:127.0.0.1]:5".parse().unwrap(), "127.0.0.1:6".parse().unwrap());
        assert_eq!(s, "ip saddr 127.0.0.1 tcp sport 5 ip daddr 127.0.0.1 tcp dport 6");
        assert!(unlock("x; flush ruleset").is_err());
    }
}
