//! End-to-end tests for trees on their own pseudo-terminal: `script`
//! (util-linux) running an interactive bash, fed through a FIFO on script's
//! stdin, its output in a file. Dumped and restored without --shell-job:
//! the shell keeps its variables, its terminal settings and window size,
//! its controlling terminal and the foreground process group, so ^C written
//! on the master side still interrupts the foreground job.
//!
//! A tmux server with a shell in a pane, dumped by the server pid while no
//! client is attached, keeps working with send-keys and capture-pane.
//!
//! Run: `cargo test --release --test e2e_pty -- --test-threads=1`.

#[macro_use]
mod common;
use common::*;
use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn script_bin() -> Option<PathBuf> {
    ["/usr/bin/script", "/bin/script"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// `script -qfec "bash -i" /dev/null` in its own session, stdin a FIFO the
/// test writes to, stdout and stderr to a file.
struct Shell {
    feed: fs::File,
    out: PathBuf,
    script: i32,
}

impl Shell {
    fn start(r: &Reaper, t: &TempDir, script: &Path) -> Shell {
        let fifo = t.join("in");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", fifo.display());
        // Read-write: never blocks, and keeps the FIFO open across the dump.
        let feed = fs::OpenOptions::new().read(true).write(true).open(&fifo).unwrap();
        // A writer exists (`feed`): this open does not block.
        let stdin = fs::File::open(&fifo).unwrap();
        let out = t.join("out");
        let o = fs::File::create(&out).unwrap();
        let mut cmd = Command::new(script);
        // SHELL fixed: script runs `$SHELL -c CMD`; bash execs the command
        // in place (bash leads the session), dash (/bin/sh, used when SHELL
        // is unset, as under CI) forks it and stays as session leader.
        cmd.args(["-qfec", "bash --norc --noprofile -i", "/dev/null"])
            .env("SHELL", "/bin/bash")
            .env("TERM", "dumb")
            .env("PS1", "$ ")
            .env("HISTFILE", "/dev/null")
            .stdin(stdin)
            .stdout(o.try_clone().unwrap())
            .stderr(o);
        // SAFETY: setsid and signal are async-signal-safe; nothing else runs
        // in pre_exec. SIGINT and SIGQUIT back to default: a test run as a
        // background job of a shell inherits them ignored, and so would the
        // foreground job that ^C must end.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::signal(libc::SIGQUIT, libc::SIG_DFL);
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn script");
        let pid = child.id() as i32;
        r.add(pid);
        drop(child);
        Shell { feed, out, script: pid }
    }

    fn send(&mut self, s: &str) {
        self.feed.write_all(s.as_bytes()).unwrap();
    }

    fn output(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Wait until the output has `what` (after byte `from`); the text from there.
    fn wait_out(&self, what: &str, from: usize) -> String {
        wait_for(&format!("{what:?} in the output of script"), secs(30), || {
            let o = self.output();
            o.get(from..).filter(|s| s.contains(what)).map(|s| s.to_string())
        })
    }

    /// The interactive bash: script's only child.
    fn bash(&self) -> i32 {
        wait_for("bash under script", secs(30), || {
            descendants(self.script).into_iter().find(|&p| comm(p).as_deref() == Some("bash"))
        })
    }
}

fn comm(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim().to_string())
}

/// Fields 5.. of /proc/PID/stat as numbers: [pgrp, session, tty_nr, tpgid].
fn stat_ids(pid: i32) -> [i64; 4] {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let r = s.rfind(')').unwrap();
    let f: Vec<i64> = s[r + 2..].split_whitespace().skip(2).take(4).map(|x| x.parse().unwrap()).collect();
    [f[0], f[1], f[2], f[3]]
}

/// Blocked reading its terminal (readline: read or pselect6).
fn wait_idle(pid: i32) {
    wait_in_syscall(pid, pid, &[libc::SYS_read, libc::SYS_pselect6, libc::SYS_select], secs(30));
}

/// A value after `key=` in the output, up to the end of its line.
fn value(out: &str, key: &str) -> String {
    let i = out.find(key).unwrap_or_else(|| panic!("{key} not in output:\n{out}"));
    out[i + key.len()..].lines().next().unwrap().trim().to_string()
}

/// bash keeps a variable, its terminal settings (stty -g, a changed window
/// size) and its controlling terminal across dump and restore, without
/// --shell-job; `tty` names a pts.
#[test]
fn script_bash_keeps_state_and_terminal() {
    let _l = lock();
    let script = need!(script_bin(), "script_bash_keeps_state_and_terminal", "no script (util-linux)");
    let t = TempDir::new("pty-state");
    let r = Reaper::new();
    let mut sh = Shell::start(&r, &t, &script);
    let bash = sh.bash();
    // "" inside the words: the echoed command line never matches the output.
    sh.send("x=snapval42; stty cols 123 rows 45 -ixon; echo \"G\"\"1=$(stty -g)\"; echo \"m\"\"ark1=$x\"\n");
    sh.wait_out("mark1=snapval42", 0);
    wait_idle(bash);
    let before = sh.output();
    let g1 = value(&before, "G1=");
    let [_, sid, tty_nr, tpgid] = stat_ids(bash);
    assert_eq!(sid, bash as i64, "bash leads its session");
    assert_ne!(tty_nr, 0, "bash has a controlling terminal");
    assert_eq!(tpgid, bash as i64, "bash's group is in the foreground");

    // A dump that leaves the tree running takes nothing from it.
    dump_ok(&[sh.script], &t.sub("img0"), &["--leave-running"]);
    sh.send("echo \"l\"\"ive=$x\"\n");
    sh.wait_out("live=snapval42", before.len());
    wait_idle(bash);
    let before = sh.output();

    let img = t.sub("img");
    let (run, all) = dump_kill(&[sh.script], &img, &[]);
    assert!(all.contains(&bash));
    let files = fs::read_to_string(img.join("files.json")).unwrap();
    assert!(files.contains("pty_master") && files.contains("pty_slave"), "{files}");
    assert!(!files.contains("\"tty\""), "no --shell-job terminal in the image: {files}");
    assert!(!run.stderr.contains("not saved"), "queues of an idle shell are empty: {}", run.stderr);
    restore_ok(&img, &r, &all);

    let [_, sid2, tty_nr2, tpgid2] = stat_ids(bash);
    assert_eq!(sid2, bash as i64);
    assert_ne!(tty_nr2, 0, "controlling terminal given back");
    assert_eq!(tpgid2, bash as i64, "foreground group given back");
    let from = before.len();
    sh.send("echo \"a\"\"fter=$x\"; echo \"G\"\"2=$(stty -g)\"; echo \"s\"\"ize=$(stty size)\"; echo \"n\"\"ame=$(tty)\"; echo ok >/dev/tty && echo \"c\"\"tty=yes\"\n");
    let after = sh.wait_out("ctty=yes", from);
    assert!(after.contains("after=snapval42"), "{after}");
    assert_eq!(value(&after, "G2="), g1, "termios changed across restore");
    assert_eq!(value(&after, "size="), "45 123", "window size");
    let tty = value(&after, "name=");
    assert!(tty.starts_with("/dev/pts/"), "tty says {tty:?}");
    // tty_nr of bash is its new pts.
    let maj = 136 + tty[9..].parse::<i64>().unwrap() / 256;
    let min = tty[9..].parse::<i64>().unwrap() % 256;
    assert_eq!(tty_nr2, (maj << 8) | (min & 0xff) | ((min & !0xff) << 12), "tty_nr vs {tty}");
}

/// ^C written on the master side (by script, from its stdin) interrupts
/// the foreground job after restore: the controlling terminal and the
/// foreground process group came back, and bash takes the terminal back.
#[test]
fn script_ctrl_c_reaches_foreground_job() {
    ctrl_c("script_ctrl_c_reaches_foreground_job", false);
}

/// The same, restored into a new pid namespace (the saved pids of the
/// session and the foreground group are the namespace's).
#[test]
fn script_ctrl_c_after_pidns_restore() {
    ctrl_c("script_ctrl_c_after_pidns_restore", true);
}

fn ctrl_c(name: &str, pidns: bool) {
    let _l = lock();
    let script = need!(script_bin(), name, "no script (util-linux)");
    let t = TempDir::new("pty-intr");
    let r = Reaper::new();
    let mut sh = Shell::start(&r, &t, &script);
    let bash = sh.bash();
    sh.send("x=intr7; echo \"m\"\"ark=$x\"\n");
    sh.wait_out("mark=intr7", 0);
    sh.send("sleep 1000\n");
    let sleep = wait_for("sleep under bash", secs(30), || {
        descendants(bash).into_iter().find(|&p| comm(p).as_deref() == Some("sleep"))
    });
    wait_for("sleep in the foreground", secs(30), || (stat_ids(bash)[3] == sleep as i64).then_some(()));
    assert_eq!(stat_ids(sleep)[0], sleep as i64, "job control: sleep leads its own group");

    let img = t.sub("img");
    let (_, all) = dump_kill(&[sh.script], &img, &[]);
    assert!(all.contains(&sleep));
    // Saved pid -> pid as this test sees it.
    let host = |p: i32, map: &serde_json::Value| map.get(p.to_string()).and_then(|v| v.as_i64()).unwrap_or(p as i64) as i32;
    let map = if pidns {
        let run = snap(&["restore", "-D", &img.to_string_lossy(), "-d", "--pidns", "--json"]);
        assert!(run.ok(), "snap restore --pidns failed: {}", run.describe());
        let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
        r.add(v["pidns_init"].as_i64().expect("pidns_init") as i32);
        v["host_pids"].clone()
    } else {
        restore_ok(&img, &r, &all);
        serde_json::Value::Null
    };
    let (bash, sleep) = (host(bash, &map), host(sleep, &map));
    assert_eq!(stat_ids(bash)[3], sleep as i64, "foreground group after restore");
    assert_eq!(stat_ids(sleep)[0], sleep as i64);

    let from = sh.output().len();
    sh.send("\x03");
    wait_gone(&[sleep], secs(30)).unwrap_or_else(|e| panic!("^C did not end the foreground sleep: {e}"));
    wait_for("bash back in the foreground", secs(30), || (stat_ids(bash)[3] == bash as i64).then_some(()));
    sh.send("echo \"b\"\"ack=$x\"\n");
    let after = sh.wait_out("back=intr7", from);
    assert!(alive(bash), "{after}");
}

/// A tree whose terminal's master is held outside the dump (here: the test
/// holds the master, the tree the slave) is refused without --shell-job,
/// naming the pts, and keeps running untouched.
#[test]
fn slave_without_master_refused() {
    let _l = lock();
    let py = need!(python3(), "slave_without_master_refused", "no python3");
    let t = TempDir::new("pty-refuse");
    let r = Reaper::new();
    // SAFETY: posix_openpt/grantpt/unlockpt/ptsname_r on a descriptor we own.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    assert!(m >= 0);
    // SAFETY: fcntl on the descriptor we own: the tree must not inherit it.
    assert_eq!(unsafe { libc::fcntl(m, libc::F_SETFD, libc::FD_CLOEXEC) }, 0);
    let mut name = [0u8; 64];
    // SAFETY: as above; `name` is a writable buffer of the size given.
    unsafe {
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        assert_eq!(libc::ptsname_r(m, name.as_mut_ptr() as *mut libc::c_char, name.len()), 0);
    }
    let pts = std::ffi::CStr::from_bytes_until_nul(&name).unwrap().to_str().unwrap().to_string();
    let d = t.sub("st");
    let mut cmd = Command::new(&py);
    cmd.arg("-c").arg(format!(
        "import os, time\nfd = os.open('{pts}', os.O_RDWR | os.O_NOCTTY)\nopen('{}/ready', 'w').write('x')\ntime.sleep(1000)",
        d.display()
    ));
    let pid = spawn(&r, &mut cmd, &t.join("log"));
    wait_ready(&d, pid, secs(30));
    let img = t.sub("img");
    let run = dump_raw(&[pid], &img, &[]);
    assert!(!run.ok(), "dump should refuse: {}", run.describe());
    assert!(run.stderr.contains(&pts) && run.stderr.contains("--shell-job"), "{}", run.stderr);
    assert!(run.stderr.contains(&format!("pid {pid}")) || run.stderr.contains(&pid.to_string()), "{}", run.stderr);
    assert!(alive(pid) && proc_state(pid) != Some('Z'), "the refused tree keeps running");
    // SAFETY: closing the master we opened.
    unsafe { libc::close(m) };
}

fn tmux_bin() -> Option<PathBuf> {
    ["/usr/bin/tmux", "/usr/local/bin/tmux", "/bin/tmux"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// `tmux -S SOCK ARGS…`: its stdout (asserting success).
fn tmux(bin: &Path, sock: &Path, args: &[&str]) -> String {
    let o = Command::new(bin)
        .arg("-S")
        .arg(sock)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("TERM", "xterm")
        .env("PS1", "$ ")
        .env("HISTFILE", "/dev/null")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run tmux");
    assert!(o.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Sockets the process holds (a tmux server with no client has one: its
/// listener).
fn sockets(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.flatten().filter(|f| fs::read_link(f.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))).count())
        .unwrap_or(0)
}

/// A tmux server (no client attached) with a shell in a pane, dumped by the
/// server's pid and restored: send-keys reaches the same shell, which kept
/// its variable and its pane's window size, and capture-pane shows it.
#[test]
fn tmux_server_with_a_shell() {
    let _l = lock();
    let bin = need!(tmux_bin(), "tmux_server_with_a_shell", "no tmux");
    let t = TempDir::new("pty-tmux");
    let r = Reaper::new();
    let sock = t.join("sock");
    tmux(&bin, &sock, &["-f", "/dev/null", "new-session", "-d", "-s", "main", "-x", "100", "-y", "30", "bash --norc --noprofile -i"]);
    let server: i32 = tmux(&bin, &sock, &["display", "-p", "#{pid}"]).trim().parse().unwrap();
    r.add(server);
    let pane = |s: &str| tmux(&bin, &sock, &["send-keys", "-t", "main", s, "Enter"]);
    let capture = || tmux(&bin, &sock, &["capture-pane", "-p", "-t", "main"]);
    pane("x=tmuxval5; stty cols 77; echo \"m\"\"ark=$x\"");
    wait_for("mark in the pane", secs(30), || capture().contains("mark=tmuxval5").then_some(()));
    let bash = wait_for("bash under the tmux server", secs(30), || {
        descendants(server).into_iter().find(|&p| comm(p).as_deref() == Some("bash"))
    });
    wait_idle(bash);
    // The command clients are gone (the server closed their connections).
    wait_for("no client connected to the tmux server", secs(30), || (sockets(server) == 1).then_some(()));

    let img = t.sub("img");
    let (_, all) = dump_kill(&[server], &img, &[]);
    assert!(all.contains(&bash));
    let files = fs::read_to_string(img.join("files.json")).unwrap();
    assert!(files.contains("pty_master") && files.contains("pty_slave"), "{files}");
    restore_ok(&img, &r, &all);

    pane("echo \"r\"\"es=$x $(stty size)\"");
    let out = wait_for("res in the pane", secs(30), || {
        let c = capture();
        c.contains("res=").then_some(c)
    });
    assert!(out.contains("res=tmuxval5 30 77"), "{out}");
}
