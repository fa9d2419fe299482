//! Ctrl-C (and SIGTERM) handling: the first signal asks running work to stop after its current
//! step, once its state is written; a second one exits at once (status 130).
//!
//! Child processes (`llmlab run --jobs N` runs each trial in its own process, in a process group
//! of its own so that the terminal's Ctrl-C reaches the parent only) are registered with
//! [`add_child`]: every signal the parent gets is passed on to them as one SIGINT, so the first
//! Ctrl-C lets each child checkpoint and exit 130, and a second one stops them at once too.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Process ids of the running children. The handler sets [`INTERRUPTED`] and signals them while
/// holding this lock, so a child registered concurrently is signalled exactly once.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Installs the handler (once per process; later calls do nothing).
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            let again = {
                let children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
                let again = INTERRUPTED.swap(true, Ordering::SeqCst);
                children.iter().for_each(|&pid| sigint(pid));
                again
            };
            if again {
                eprintln!("\nsecond interrupt: exiting now");
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: stopping after this step, once its state is saved (Ctrl-C again to quit at once)");
        });
    });
}

/// Whether a stop was asked for.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Asks for a stop as a signal would (tests, embedding code). Registered children are not
/// signalled; see [`stop_children`].
pub fn request_stop() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Clears a stop request.
pub fn reset() {
    INTERRUPTED.store(false, Ordering::SeqCst);
}

/// Registers a child process to pass signals on to; if a stop was already asked for, it gets
/// its SIGINT now.
pub fn add_child(pid: u32) {
    let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    children.push(pid);
    if interrupted() {
        sigint(pid);
    }
}

/// Polls a registered child; one that has exited is forgotten under the same lock, so no signal
/// can reach a reaped (and maybe reused) process id.
pub fn try_wait_child(
    child: &mut std::process::Child,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    let status = child.try_wait();
    if !matches!(status, Ok(None)) {
        children.retain(|&p| p != child.id());
    }
    status
}

/// Asks for a stop and sends each registered child one SIGINT, unless a signal already did.
pub fn stop_children() {
    let children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    if !INTERRUPTED.swap(true, Ordering::SeqCst) {
        children.iter().for_each(|&pid| sigint(pid));
    }
}

#[allow(unsafe_code)]
fn sigint(pid: u32) {
    #[cfg(unix)]
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) only sends a signal. Callers hold the CHILDREN lock, and a child leaves
        // that list in the same critical section that reaps it (`try_wait_child`), so `pid` is
        // still our unreaped child and cannot name another process.
        unsafe {
            libc::kill(pid, libc::SIGINT);
        }
    }
    #[cfg(not(unix))]
    let _ = pid;
}

/// Starts `cmd` in a process group of its own (the terminal's Ctrl-C reaches only this
/// process, which passes it on once through [`add_child`]) and, on Linux, with a SIGINT when
/// this process dies, so no child is left running unattended.
#[allow(unsafe_code)]
pub fn detach(cmd: &mut std::process::Command) {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        #[cfg(target_os = "linux")]
        {
            // SAFETY: the closure runs in the forked child before exec and calls only
            // async-signal-safe functions (prctl, getppid); it allocates nothing.
            let parent = std::process::id() as libc::pid_t;
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent died before the prctl: no signal will come.
                    if libc::getppid() != parent {
                        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                    }
                    Ok(())
                });
            }
        }
    }
}

/// Whether process `pid` is alive (Linux: `/proc/<pid>` exists; elsewhere assumed alive).
pub fn process_alive(pid: u32) -> bool {
    !std::path::Path::new("/proc/self").exists()
        || std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// `<dir>/.running` holding this process's id while a trial runs in `dir`, removed when
/// dropped, so `llmlab report` can tell a running trial from an interrupted one.
pub struct RunningMarker(std::path::PathBuf);

impl RunningMarker {
    pub fn new(dir: &std::path::Path) -> Self {
        let path = dir.join(".running");
        let _ = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&path, std::process::id().to_string()));
        Self(path)
    }

    /// Whether a live process has marked `dir` as running.
    pub fn is_running(dir: &std::path::Path) -> bool {
        std::fs::read_to_string(dir.join(".running"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .is_some_and(process_alive)
    }
}

impl Drop for RunningMarker {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
