//! Command line: CRIU users should feel at home (DESIGN §3).

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "snap", version, about = "Checkpoint and restore Linux process trees and application groups",
    long_about = "snap captures the complete state of a process tree (or several) at one consistent \
instant into an image directory, and restores it later with the same PIDs, here or on another host.\n\n\
Examples:\n  snap dump -t 1234 -D /tmp/img          checkpoint the tree under 1234, then kill it (as CRIU does)\n  \
snap restore -D /tmp/img               bring it back (snap waits for the root and exits with its status)\n  \
snap image show /tmp/img               what an image holds\n  snap check                             what this kernel supports")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Checkpoint the process trees under each -t PID at one consistent instant.
    Dump(DumpArgs),
    /// Restore the processes of an image directory with their PIDs and state.
    Restore(RestoreArgs),
    /// Report which kernel features snap can use on this machine.
    Check {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Inspect images.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Internal: holds dirty tracking between two dumps (started by dump).
    #[command(name = "__track-holder", hide = true)]
    TrackHolder { socket: PathBuf },
    /// Start a program as an application group: its own cgroup, and a
    /// supervisor that checkpoints it (on a schedule, or when asked with
    /// `snap dump --group`) and holds its dirty tracking between dumps.
    Run(RunArgs),
    /// Start an independent program inside a running group (like cgexec):
    /// it keeps the caller's stdio and parent, and later checkpoints include it.
    Join {
        /// The group's name (see `snap ps`).
        name: String,
        /// The program and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "PROGRAM")]
        program: Vec<String>,
    },
    /// Roll a running group back to its last good checkpoint now: kill
    /// every member and restore the checkpoint under the supervisor.
    Recover {
        /// The group's name (see `snap ps`).
        name: String,
        /// Print the recovery as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The hooks of a systemd unit whose service comes back where it
    /// stopped: `ExecStart=snap service start`, `ExecStop=snap service stop`
    /// (docs/systemd.md).
    Service {
        #[command(subcommand)]
        cmd: ServiceCmd,
    },
    /// List the groups started with `snap run`, their members and checkpoints.
    Ps {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Internal: the detached supervisor of `snap run -d` (its arguments as JSON).
    #[command(name = "__supervise", hide = true)]
    Supervise { spec: String },
    /// Internal: pid 1 of a `snap run --pidns` group's pid namespace.
    #[command(name = "__pidns-init", hide = true)]
    PidnsInit {
        /// Where to report the program's pid (or why it did not start).
        #[arg(long)]
        report_fd: i32,
        #[arg(last = true, required = true)]
        program: Vec<String>,
    },
}

/// `snap run`: see docs/groups.md.
#[derive(clap::Args, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunArgs {
    /// Name of the group (default: the program's name, with a number added
    /// if a group of that name runs).
    #[arg(long)]
    pub name: Option<String>,
    /// Take a checkpoint this often (e.g. 30s, 500ms, 2m, 1h); without it,
    /// only when asked (`snap dump --group NAME`).
    #[arg(long, value_name = "DURATION", value_parser = crate::group::parse_duration)]
    pub checkpoint_every: Option<std::time::Duration>,
    /// Keep this many checkpoints under the images root; older ones are
    /// pruned after each checkpoint.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub keep: u64,
    /// Where checkpoints go, one numbered directory each
    /// (default /var/lib/snap/groups/NAME).
    #[arg(long, value_name = "DIR")]
    pub images_root: Option<PathBuf>,
    /// Run the supervisor in the background and return once the program
    /// runs; the program's output goes to IMAGES_ROOT/output.log.
    #[arg(short = 'd', long = "detach")]
    pub detach: bool,
    /// With -d: print what was started as JSON.
    #[arg(long)]
    pub json: bool,
    /// Run the group in a pid namespace of its own, under a small init
    /// (pid 1 there); its checkpoints restore with `snap restore --pidns`
    /// with the namespace's pids, whatever runs on the host.
    #[arg(long)]
    #[serde(default)]
    pub pidns: bool,
    /// When the program dies abnormally (killed by a signal, or exit status
    /// other than 0), kill what is left of the group and restore its newest
    /// good checkpoint in its place, with the same PIDs (docs/groups.md,
    /// "Recovery"). Not with --pidns.
    #[arg(long)]
    #[serde(default)]
    pub recover: bool,
    /// With --recover: give up (end the group) when the program dies again
    /// after this many automatic recoveries within --recovery-window
    /// [default: 5].
    #[arg(long, value_name = "N", requires = "recover")]
    #[serde(default)]
    pub max_recoveries: Option<u32>,
    /// With --recover: the window --max-recoveries counts in [default: 10m].
    #[arg(long, value_name = "DURATION", requires = "recover", value_parser = crate::group::parse_duration)]
    #[serde(default)]
    pub recovery_window: Option<std::time::Duration>,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    pub program: Vec<String>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct DumpArgs {
    /// Root of a process tree to dump (repeat for an application group).
    #[arg(short = 't', long = "tree", required_unless_present_any = ["group", "cgroup"])]
    pub tree: Vec<i32>,
    /// Dump every process of this cgroup v2 and the cgroups below it (a
    /// systemd service: `system.slice/web.service`, or the absolute path
    /// under the cgroup2 mount). The cgroup is frozen while the processes
    /// are seized; the roots are the members whose parent is not one.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["tree", "group"])]
    pub cgroup: Option<PathBuf>,
    /// Image directory (created if missing; must be empty). With --group it
    /// may be left out: the group's next checkpoint directory.
    #[arg(short = 'D', long = "images-dir", required_unless_present = "group", default_value = "", hide_default_value = true, value_parser = path_or_empty)]
    pub dir: PathBuf,
    /// Checkpoint the group NAME started with `snap run`: its supervisor
    /// dumps it, incrementally against its last checkpoint, and leaves it
    /// running.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["tree", "prev_images_dir"])]
    pub group: Option<String>,
    /// Resume the processes after the dump instead of killing them.
    #[arg(long)]
    pub leave_running: bool,
    /// Allow terminals on stdio; restore attaches them to its own terminal.
    #[arg(long)]
    pub shell_job: bool,
    /// A Unix stream connection to a named socket outside the dump (an
    /// outside server's listener) is saved by that name, and `snap restore
    /// --ext-unix-sk` connects to it again; without it such a connection
    /// is refused.
    #[arg(long)]
    pub ext_unix_sk: bool,
    /// Dump established TCP connections (TCP repair; their packets are
    /// dropped by an nftables table until restore); without it they are
    /// refused.
    #[arg(long)]
    pub tcp_established: bool,
    /// Compress page packs with zstd.
    #[arg(long)]
    pub compress: bool,
    /// Keep tracking which pages the processes write, so that a later dump
    /// with --prev-images-dir of this image reads only those (needs
    /// --leave-running).
    #[arg(long)]
    pub track_mem: bool,
    /// Incremental dump against this earlier image of the same processes:
    /// only pages it does not hold are stored, and with tracking armed by
    /// it (--track-mem) only pages written since are read.
    #[arg(long, value_name = "DIR")]
    pub prev_images_dir: Option<PathBuf>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RestoreArgs {
    /// Image directory written by `snap dump`.
    #[arg(short = 'D', long = "images-dir")]
    pub dir: PathBuf,
    /// Return once everything runs, instead of waiting for the root.
    #[arg(short = 'd', long = "restore-detached")]
    pub detached: bool,
    /// Restore into a new pid namespace with its own /proc: inside, PIDs and
    /// TIDs are the saved ones, so the saved PIDs need not be free here.
    #[arg(long)]
    pub pidns: bool,
    /// Give terminal descriptors snap's own terminal.
    #[arg(long)]
    pub shell_job: bool,
    /// Connect Unix sockets saved with `dump --ext-unix-sk` again to their
    /// outside server's name (which must be listening).
    #[arg(long)]
    pub ext_unix_sk: bool,
    /// Write the restored root's PID to this file (for systemd PIDFile=).
    #[arg(long)]
    pub pidfile: Option<PathBuf>,
    /// Restore every process into this cgroup v2 (made if missing; path
    /// relative to the cgroup2 mount, or absolute under it). Without it
    /// they start in snap's own cgroup (under systemd, the service's).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ServiceCmd {
    /// Restore ROOT/current with -d (an ExecStart= of Type=forking); with
    /// no checkpoint, or if it cannot be restored (said on stderr), start
    /// PROGRAM afresh, detached. Returns once the service runs.
    Start {
        /// Directory of the service's checkpoints (current, previous).
        #[arg(short = 'D', long = "images-dir", value_name = "ROOT")]
        root: PathBuf,
        /// Write the service's main pid here (for PIDFile=).
        #[arg(long)]
        pidfile: Option<PathBuf>,
        /// The program for a cold start, after `--`.
        #[arg(last = true, required = true, value_name = "PROGRAM")]
        program: Vec<String>,
    },
    /// Checkpoint the cgroup this runs in (the service's, as ExecStop=
    /// runs) into ROOT/next, then make it ROOT/current (the old one becomes
    /// ROOT/previous). The service's processes are killed, as a stop should.
    Stop {
        /// Directory of the service's checkpoints.
        #[arg(short = 'D', long = "images-dir", value_name = "ROOT")]
        root: PathBuf,
        /// As `snap dump --tcp-established`.
        #[arg(long)]
        tcp_established: bool,
        /// As `snap dump --ext-unix-sk`.
        #[arg(long)]
        ext_unix_sk: bool,
        /// Compress page packs with zstd.
        #[arg(long)]
        compress: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Print what an image holds.
    Show {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write an image as a standalone copy that needs no parent.
    ///
    /// The copy has the image's records and page maps unchanged, a page
    /// store of its own holding exactly the pages they use (read through the
    /// chain of parents, each checked against its hash), and no parent. It
    /// keeps the image's id: a later dump against the original may name the
    /// copy as its --prev-images-dir. Works on standalone images too (a copy
    /// with a minimal store).
    Merge {
        /// Image directory (usually an incremental one).
        dir: PathBuf,
        /// New image directory (must not exist, or be empty; removed again on failure).
        #[arg(short = 'o', long, value_name = "OUT")]
        output: PathBuf,
        /// Compress the new page pack with zstd.
        #[arg(long)]
        compress: bool,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Remove old images from a directory of checkpoints, never breaking the ones left.
    ///
    /// The images are the subdirectories of ROOT holding inventory.json
    /// (others, e.g. a dump being written, are skipped and listed). With
    /// --keep N the newest N (by creation time, then name) stay; a kept
    /// image whose parent goes is first rewritten in place as standalone,
    /// and every kept image is checked before anything is deleted. With
    /// --remove, exactly the named images go, and the command refuses if an
    /// image left needs one of them as a parent.
    ///
    /// Examples:  snap image prune /ckpt --keep 3
    ///            snap image prune /ckpt --remove c1 c2
    #[command(verbatim_doc_comment, group(clap::ArgGroup::new("what").required(true).args(["keep", "remove"])))]
    Prune {
        /// Directory whose subdirectories are images (e.g. the -D of successive dumps).
        root: PathBuf,
        /// Keep the newest N images, remove the others (0 removes all).
        #[arg(long, value_name = "N")]
        keep: Option<usize>,
        /// Remove exactly these images (directory names in ROOT; give ROOT first).
        #[arg(long, value_name = "NAME", num_args = 1..)]
        remove: Vec<String>,
        /// Print a JSON report on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// `-D`'s parser: clap's own refuses the empty default, which stands for
/// "not given" (allowed only with `--group`).
fn path_or_empty(s: &str) -> std::result::Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

/// Entry point: parse, run, print the error chain on failure.
/// Write command output to stdout. A reader that went away (`snap image
/// show DIR | head`) ends the output quietly instead of failing.
pub fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()).and_then(|_| std::io::stdout().flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => anyhow::Context::context(r, "writing to standard output"),
    }
}

/// `println!` for command output, through [`emit`]: `?` after it.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::cli::emit("\n")
    };
    ($($t:tt)*) => {
        $crate::cli::emit(&format!("{}\n", format_args!($($t)*)))
    };
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("snap: error: {e:#}");
            1
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Dump(a) if a.group.is_some() => crate::group::dump(&a).map(|_| 0),
        Cmd::Dump(a) if a.dir.as_os_str().is_empty() => anyhow::bail!("snap dump: -D needs a directory"),
        Cmd::Dump(a) => crate::dump::run(&a).map(|_| 0),
        Cmd::Restore(a) => crate::restore::run(&a),
        Cmd::Check { json } => crate::check::run(json).map(|_| 0),
        Cmd::Image { cmd: ImageCmd::Show { dir, json } } => crate::images::show::run(&dir, json).map(|_| 0),
        Cmd::Image { cmd: ImageCmd::Merge { dir, output, compress, json } } => {
            crate::images::prune::run_merge(&dir, &output, compress, json).map(|_| 0)
        }
        Cmd::Image { cmd: ImageCmd::Prune { root, keep, remove, json } } => {
            crate::images::prune::run_prune(&root, keep, &remove, json).map(|_| 0)
        }
        Cmd::TrackHolder { socket } => crate::track::holder::serve(&socket).map(|_| 0),
        Cmd::Run(a) => crate::group::run(a),
        Cmd::Join { name, program } => crate::group::join(&name, &program),
        Cmd::Ps { json } => crate::group::ps(json),
        Cmd::Service { cmd: ServiceCmd::Start { root, pidfile, program } } => {
            crate::service::start(&root, pidfile.as_deref(), &program)
        }
        Cmd::Service { cmd: ServiceCmd::Stop { root, tcp_established, ext_unix_sk, compress } } => {
            let a = DumpArgs {
                tree: vec![],
                cgroup: None,
                dir: PathBuf::new(),
                group: None,
                leave_running: false,
                shell_job: false,
                ext_unix_sk,
                tcp_established,
                compress,
                track_mem: false,
                prev_images_dir: None,
                json: false,
            };
            crate::service::stop(&root, &a).map(|_| 0)
        }
        Cmd::Recover { name, json } => crate::group::recover(&name, json).map(|_| 0),
        Cmd::Supervise { spec } => crate::group::supervise_detached(&spec),
        Cmd::PidnsInit { report_fd, program } => crate::group::init::main(report_fd, &program),
    }
}
