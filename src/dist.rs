//! Data-parallel training across processes (book appendix A.9, `DistributedDataParallel`), on
//! libtorch's own distributed engine, c10d, through the C++ shim ([`crate::shim::ProcessGroup`]:
//! a `TCPStore` rendezvous, `ProcessGroupGloo` on the CPU, `ProcessGroupNCCL` on CUDA GPUs).
//!
//! * [`DistEnv::parse`] and [`Dist::join`] join a group the way
//!   `torch.distributed.init_process_group("env://")` does: `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` (torchrun, or [`launch_local`]),
//!   else Slurm's `SLURM_PROCID`/`SLURM_NTASKS` with the first host of the allocation as master.
//! * [`Dist::broadcast`] copies rank 0's initial weights to every rank (DDP's constructor does).
//! * [`Dist::overlap_reducer`] averages the gradients in ~25 MB buckets (DDP's `bucket_cap_mb`)
//!   while backward runs, as DDP's reducer does (post-accumulate-grad hooks in the shim);
//!   [`Dist::allreduce_mean`] does it after backward (`LLMLAB_DDP_OVERLAP=0`).
//! * [`launch_local`] is `--nproc N`: N copies of the command line with those variables set.
//!
//! Every wait gives up after a timeout (`LLMLAB_DIST_TIMEOUT`, seconds, default 60), so a rank
//! that dies makes the others exit with an error instead of hanging.
use crate::error::LlmError;
use crate::shim::{Backend, GlooBind, GradReducer, ProcessGroup};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tch::Tensor;

/// DDP's default bucket size (`bucket_cap_mb=25`).
pub const BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Default for `LLMLAB_DIST_TIMEOUT`.
pub const DEFAULT_TIMEOUT_S: u64 = 60;

/// This process's place in a data-parallel group; `world == 1` has no process group and every
/// collective is the identity.
pub struct Dist {
    pub rank: usize,
    pub world: usize,
    /// Where the group's tensors live (the CPU for gloo, this rank's GPU for NCCL).
    device: tch::Device,
    pg: Option<ProcessGroup>,
    /// Wall-clock seconds spent in [`Dist::allreduce_mean`] so far (the overhead DDP adds).
    allreduce_secs: std::cell::Cell<f64>,
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "Dist {{ rank: {}, world: {} }}", self.rank, self.world)
    }
}

/// Where a group's rank and rendezvous come from (parsed from the environment, not joined).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Which variables said so (for messages): `RANK/WORLD_SIZE` or `SLURM_PROCID/SLURM_NTASKS`.
    pub source: &'static str,
}

fn parse_var<T: std::str::FromStr>(
    get: &dyn Fn(&str) -> Option<String>,
    key: &str,
) -> Result<Option<T>, LlmError> {
    match get(key) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            LlmError::Usage(format!(
                "environment variable {key}={v:?} is not a valid number"
            ))
        }),
    }
}

/// The first host of a Slurm node list: `node[01-04,07],gpu5` → `node01`.
pub fn first_slurm_host(list: &str) -> Option<String> {
    let list = list.trim();
    if list.is_empty() {
        return None;
    }
    let (head, rest) = match list.find(['[', ',']) {
        None => return Some(list.to_string()),
        Some(i) => list.split_at(i),
    };
    if rest.starts_with(',') {
        return Some(head.to_string());
    }
    // `prefix[a-b,c]`: the first entry of the range list.
    let inner = rest[1..].split(']').next()?;
    let first = inner.split([',', '-']).next()?;
    Some(format!("{head}{first}"))
}

impl DistEnv {
    /// The group the environment describes, or `None` for a single process. `get` reads a
    /// variable (tests pass a map). `RANK`/`WORLD_SIZE` win over Slurm's variables, and a Slurm
    /// step of one task (`SLURM_NTASKS=1`, e.g. an `sbatch` script) is a single process.
    pub fn parse(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Self>, LlmError> {
        let (rank, world, source) = match (
            parse_var::<usize>(get, "RANK")?,
            parse_var::<usize>(get, "WORLD_SIZE")?,
        ) {
            (Some(r), Some(w)) => (r, w, "RANK/WORLD_SIZE"),
            (Some(_), None) | (None, Some(_)) => {
                return Err(LlmError::Usage(
                    "set both RANK and WORLD_SIZE (torchrun-style), or neither".into(),
                ))
            }
            (None, None) => match (
                parse_var::<usize>(get, "SLURM_PROCID")?,
                parse_var::<usize>(get, "SLURM_NTASKS")?,
            ) {
                (Some(r), Some(w)) if w > 1 => (r, w, "SLURM_PROCID/SLURM_NTASKS"),
                _ => return Ok(None),
            },
        };
        if world == 0 || rank >= world {
            return Err(LlmError::Usage(format!(
                "rank {rank} is not below the world size {world} ({source})"
            )));
        }
        if world == 1 {
            return Ok(None);
        }
        let master_addr = get("MASTER_ADDR")
            .or_else(|| {
                get("SLURM_STEP_NODELIST")
                    .or_else(|| get("SLURM_JOB_NODELIST"))
                    .or_else(|| get("SLURM_NODELIST"))
                    .and_then(|l| first_slurm_host(&l))
            })
            .or_else(|| get("SLURM_LAUNCH_NODE_IPADDR"))
            .ok_or_else(|| {
                LlmError::Usage(format!(
                    "{source} say this is rank {rank} of {world}, but MASTER_ADDR is not set (the host of rank 0)"
                ))
            })?;
        let master_port = match parse_var::<u16>(get, "MASTER_PORT")? {
            Some(p) => p,
            // Under Slurm, a port per job so that two jobs on one node do not collide.
            None => match parse_var::<u64>(get, "SLURM_JOB_ID")? {
                Some(id) if source.starts_with("SLURM") => 29500 + (id % 10_000) as u16,
                _ => {
                    return Err(LlmError::Usage(format!(
                        "{source} say this is rank {rank} of {world}, but MASTER_PORT is not set"
                    )))
                }
            },
        };
        Ok(Some(Self {
            rank,
            world,
            master_addr,
            master_port,
            source,
        }))
    }
}

/// A group of more than one rank trains on the CPU (gloo) or on CUDA GPUs (NCCL, when this
/// build has it: [`crate::shim::nccl_built`]).
pub fn check_device(world: usize, device: tch::Device) -> Result<(), LlmError> {
    if world <= 1 || device == tch::Device::Cpu || (device.is_cuda() && crate::shim::nccl_built()) {
        return Ok(());
    }
    Err(LlmError::Usage(if device.is_cuda() {
        format!(
            "data-parallel training on {} needs ProcessGroupNCCL, and this llmlab was built without \
             NCCL's headers (make setup installs them; then cargo build again); or run the {world} \
             ranks with --device cpu (gloo)",
            crate::device::device_name(device)
        )
    } else {
        format!(
            "data-parallel training runs on the CPU (gloo) or CUDA GPUs (NCCL), not on {}",
            crate::device::device_name(device)
        )
    }))
}

/// The device a rank of `env` trains on: with CUDA, its GPU on this machine is its local rank
/// (`LOCAL_RANK` from torchrun or `--nproc`, `SLURM_LOCALID` under srun, else its rank) modulo the
/// GPUs libtorch sees (CUDA_VISIBLE_DEVICES picks them); other devices as given.
pub fn rank_device(device: tch::Device, env: Option<&DistEnv>) -> tch::Device {
    let Some(env) = env else { return device };
    if !device.is_cuda() {
        return device;
    }
    let get = |k: &str| std::env::var(k).ok();
    let local = parse_var::<usize>(&get, "LOCAL_RANK")
        .ok()
        .flatten()
        .or_else(|| parse_var::<usize>(&get, "SLURM_LOCALID").ok().flatten())
        .unwrap_or(env.rank);
    let n = tch::Cuda::device_count().max(1) as usize;
    tch::Device::Cuda(local % n)
}

/// `LLMLAB_DIST_TIMEOUT` (seconds) or the default.
pub fn timeout_from_env() -> Result<Duration, LlmError> {
    let get = |k: &str| std::env::var(k).ok();
    let s = parse_var::<u64>(&get, "LLMLAB_DIST_TIMEOUT")?.unwrap_or(DEFAULT_TIMEOUT_S);
    Ok(Duration::from_secs(s.max(1)))
}

impl Dist {
    /// One process, no group.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            device: tch::Device::Cpu,
            pg: None,
            allreduce_secs: Default::default(),
        }
    }

    /// Joins a group: rank 0 serves the store at `master_addr:master_port`; gloo for tensors on
    /// the CPU, NCCL for tensors on `device` when it is a CUDA GPU ([`rank_device`]).
    pub fn join(env: &DistEnv, timeout: Duration, device: tch::Device) -> Result<Self, LlmError> {
        let (addr, port) = (&env.master_addr, env.master_port);
        let backend = if device.is_cuda() {
            Backend::Nccl
        } else {
            Backend::Gloo(match std::env::var("GLOO_SOCKET_IFNAME") {
                Ok(i) if !i.is_empty() => GlooBind::Interface(i),
                _ if addr == "localhost" || addr.starts_with("127.") => {
                    GlooBind::Host("127.0.0.1".into())
                }
                _ => GlooBind::Default,
            })
        };
        let pg = ProcessGroup::join(&backend, addr, port, env.rank, env.world, timeout)
        .map_err(|e| {
            LlmError::Usage(format!(
                "rank {} of {} could not join the group at {}:{} ({}; timeout {} s, LLMLAB_DIST_TIMEOUT): {e}",
                env.rank,
                env.world,
                env.master_addr,
                env.master_port,
                env.source,
                timeout.as_secs()
            ))
        })?;
        Ok(Self {
            rank: env.rank,
            world: env.world,
            device,
            pg: Some(pg),
            allreduce_secs: Default::default(),
        })
    }

    /// Rank 0 writes files (checkpoints, metrics, TensorBoard) and prints.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    fn context(&self, what: &str, e: LlmError) -> LlmError {
        LlmError::Usage(format!(
            "rank {} of {}: {what} failed, most likely because another rank stopped (see its error above) or timed out (LLMLAB_DIST_TIMEOUT): {e}",
            self.rank, self.world
        ))
    }

    /// Copies rank 0's values of `tensors` into every rank's (in place, no autograd).
    pub fn broadcast(&self, tensors: &[Tensor]) -> Result<(), LlmError> {
        let Some(pg) = &self.pg else { return Ok(()) };
        let _g = tch::no_grad_guard();
        for bucket in buckets(tensors) {
            let flat = Tensor::cat(&bucket.iter().map(|t| t.reshape(-1)).collect::<Vec<_>>(), 0);
            pg.broadcast(&[&flat], 0)
                .map_err(|e| self.context("broadcasting the weights", e))?;
            scatter_back(&flat, &bucket);
        }
        Ok(())
    }

    /// Replaces each tensor by its mean over the ranks (gradients after backward): buckets of
    /// about [`BUCKET_BYTES`] are flattened, summed over the ranks together, divided by the
    /// world size and copied back. Undefined tensors (parameters without a gradient) are skipped.
    pub fn allreduce_mean(&self, tensors: &[Tensor]) -> Result<(), LlmError> {
        let Some(pg) = &self.pg else { return Ok(()) };
        let start = std::time::Instant::now();
        let _g = tch::no_grad_guard();
        let defined: Vec<Tensor> = tensors
            .iter()
            .filter(|t| t.defined())
            .map(|t| t.shallow_clone())
            .collect();
        let groups = buckets(&defined);
        let flats: Vec<Tensor> = groups
            .iter()
            .map(|b| Tensor::cat(&b.iter().map(|t| t.reshape(-1)).collect::<Vec<_>>(), 0))
            .collect();
        pg.allreduce_sum(&flats.iter().collect::<Vec<_>>())
            .map_err(|e| self.context("the gradient all-reduce", e))?;
        for (flat, bucket) in flats.into_iter().zip(&groups) {
            let mean = flat / self.world as f64;
            scatter_back(&mean, bucket);
        }
        self.allreduce_secs
            .set(self.allreduce_secs.get() + start.elapsed().as_secs_f64());
        Ok(())
    }

    /// DDP's overlap of the gradient all-reduce with backward ([`ProcessGroup::reducer`]):
    /// buckets of about [`BUCKET_BYTES`] in reverse parameter order, the order backward
    /// produces the gradients. `None` for one process, or with `LLMLAB_DDP_OVERLAP=0` (then
    /// [`Dist::allreduce_mean`] after backward, to compare).
    pub fn overlap_reducer(&self, params: &[Tensor]) -> Result<Option<GradReducer<'_>>, LlmError> {
        let Some(pg) = &self.pg else { return Ok(None) };
        if std::env::var("LLMLAB_DDP_OVERLAP").is_ok_and(|v| v == "0") {
            return Ok(None);
        }
        let reversed: Vec<Tensor> = params.iter().rev().map(|t| t.shallow_clone()).collect();
        pg.reducer(&buckets(&reversed), self.world)
            .map(Some)
            .map_err(|e| self.context("setting up the gradient reducer", e))
    }

    /// Ends a step's overlapped all-reduce ([`GradReducer::finish`]): every gradient is its
    /// mean over the ranks. The time spent here, the communication backward did not hide,
    /// counts in [`Dist::allreduce_secs`].
    pub fn finish_reduce(&self, reducer: &GradReducer) -> Result<(), LlmError> {
        let start = std::time::Instant::now();
        reducer
            .finish()
            .map_err(|e| self.context("the gradient all-reduce", e))?;
        self.allreduce_secs
            .set(self.allreduce_secs.get() + start.elapsed().as_secs_f64());
        Ok(())
    }

    /// Seconds spent averaging gradients so far (flatten, all-reduce, copy back).
    pub fn allreduce_secs(&self) -> f64 {
        self.allreduce_secs.get()
    }

    /// The mean of a number over the ranks (the logged loss of a step).
    pub fn mean_f64(&self, x: f64) -> Result<f64, LlmError> {
        let Some(pg) = &self.pg else { return Ok(x) };
        let t = Tensor::from_slice(&[x]).to_device(self.device);
        pg.allreduce_sum(&[&t])
            .map_err(|e| self.context("the loss all-reduce", e))?;
        Ok(t.double_value(&[0]) / self.world as f64)
    }

    /// Whether any rank says `yes` (Ctrl-C reaches the ranks at different moments: they must
    /// stop after the same step, or one waits for the others' gradients until the timeout).
    pub fn any(&self, yes: bool) -> Result<bool, LlmError> {
        Ok(self.mean_f64(if yes { 1.0 } else { 0.0 })? > 0.0)
    }

    pub fn barrier(&self) -> Result<(), LlmError> {
        let Some(pg) = &self.pg else { return Ok(()) };
        pg.barrier().map_err(|e| self.context("a barrier", e))
    }
}

/// Consecutive tensors of one dtype and device, about [`BUCKET_BYTES`] each.
fn buckets(tensors: &[Tensor]) -> Vec<Vec<Tensor>> {
    let mut out: Vec<Vec<Tensor>> = Vec::new();
    let mut bytes = 0;
    for t in tensors {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        let fits = out.last().is_some_and(|b: &Vec<Tensor>| {
            b[0].kind() == t.kind() && b[0].device() == t.device() && bytes + size <= BUCKET_BYTES
        });
        if fits {
            if let Some(b) = out.last_mut() {
                b.push(t.shallow_clone());
            }
            bytes += size;
        } else {
            out.push(vec![t.shallow_clone()]);
            bytes = size;
        }
    }
    out
}

/// Copies the slices of `flat` back into the tensors it was concatenated from.
fn scatter_back(flat: &Tensor, bucket: &[Tensor]) {
    let mut at = 0i64;
    for t in bucket {
        let n = t.numel() as i64;
        let mut dst = t.shallow_clone();
        dst.copy_(&flat.narrow(0, at, n).view(t.size().as_slice()));
        at += n;
    }
}

/// A port that was free a moment ago on the loopback interface (for `MASTER_PORT`).
pub fn free_port() -> Result<u16, LlmError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| {
        LlmError::Usage(format!(
            "could not find a free local port for MASTER_PORT: {e}"
        ))
    })?;
    l.local_addr().map(|a| a.port()).map_err(|e| {
        LlmError::Usage(format!(
            "could not find a free local port for MASTER_PORT: {e}"
        ))
    })
}

fn prefix_lines(
    r: impl Read + Send + 'static,
    rank: usize,
    err: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if err {
                eprintln!("[rank {rank}] {line}");
            } else {
                println!("[rank {rank}] {line}");
            }
        }
    })
}

/// Processes started as ranks of one group on this machine (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
/// `LOCAL_WORLD_SIZE`, `MASTER_ADDR=127.0.0.1`, `MASTER_PORT`), each output line prefixed with
/// `[rank r]`, each in a process group of its own: Ctrl-C reaches them once, passed on by this
/// process ([`crate::signal::add_child`]), and the ranks agree on the step to stop at
/// ([`Dist::any`]). Dropped with ranks still running, it kills them.
pub struct Ranks {
    /// (rank, process, whether it has exited)
    children: Vec<(usize, Child, bool)>,
    pipes: Vec<std::thread::JoinHandle<()>>,
}

impl Ranks {
    /// Starts `command(rank)` as each of `ranks` of a group of `world` whose store rank 0 serves
    /// at 127.0.0.1:`port`.
    pub fn spawn(
        command: &dyn Fn(usize) -> Command,
        ranks: std::ops::Range<usize>,
        world: usize,
        port: u16,
    ) -> Result<Self, LlmError> {
        let mut this = Self {
            children: Vec::new(),
            pipes: Vec::new(),
        };
        for rank in ranks {
            let mut cmd = command(rank);
            cmd.env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            crate::signal::detach(&mut cmd);
            let mut child = cmd.spawn().map_err(|e| {
                LlmError::Usage(format!(
                    "{world} ranks: could not start rank {rank} ({:?}): {e}",
                    cmd.get_program()
                ))
            })?;
            crate::signal::add_child(child.id());
            if let Some(o) = child.stdout.take() {
                this.pipes.push(prefix_lines(o, rank, false));
            }
            if let Some(e) = child.stderr.take() {
                this.pipes.push(prefix_lines(e, rank, true));
            }
            this.children.push((rank, child, false));
        }
        Ok(this)
    }

    /// Polls the ranks: `Err` names the first that ended with an error; `Ok(true)` once all
    /// have ended well.
    pub fn poll(&mut self) -> Result<bool, LlmError> {
        for (rank, c, done) in self.children.iter_mut().filter(|c| !c.2) {
            let failed = match crate::signal::try_wait_child(c) {
                Ok(None) => continue,
                Ok(Some(status)) if status.success() => {
                    *done = true;
                    continue;
                }
                Ok(Some(status)) => status.to_string(),
                Err(e) => e.to_string(),
            };
            *done = true;
            return Err(LlmError::Usage(format!(
                "rank {rank} failed ({failed}); its output, if any, is above, prefixed [rank {rank}]"
            )));
        }
        Ok(self.children.iter().all(|c| c.2))
    }

    /// Waits for every rank to end; the first failure is the error (the others are killed
    /// when this is dropped). After Ctrl-C every rank is waited for: rank 0 may still be saving
    /// the step they stopped at while another has already exited.
    pub fn wait(mut self) -> Result<(), LlmError> {
        let mut first = None;
        loop {
            match self.poll() {
                Ok(true) => return first.map_or(Ok(()), Err),
                Ok(false) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) if crate::signal::interrupted() => {
                    first.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for (_, c, _) in self.children.iter_mut() {
            if matches!(crate::signal::try_wait_child(c), Ok(None)) {
                let _ = c.kill();
                let _ = c.wait();
                let _ = crate::signal::try_wait_child(c);
            }
        }
        for p in self.pipes.drain(..) {
            let _ = p.join();
        }
    }
}

/// `--nproc N`: runs `program args` N times on this machine as ranks 0..N of one group
/// ([`Ranks`]). When a rank exits with an error the others are killed and the error names it.
pub fn launch_local(
    program: &std::path::Path,
    args: &[std::ffi::OsString],
    nproc: usize,
) -> Result<(), LlmError> {
    let port = free_port()?;
    let command = |_| {
        let mut c = Command::new(program);
        c.args(args);
        c
    };
    crate::signal::install();
    Ranks::spawn(&command, 0..nproc, nproc, port)?
        .wait()
        .map_err(|e| LlmError::Usage(format!("--nproc {nproc}: {e}; stopped the other ranks")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn groups_train_on_the_cpu_or_on_cuda_with_nccl() {
        assert!(
            check_device(1, tch::Device::Mps).is_ok(),
            "one process trains anywhere"
        );
        assert!(check_device(2, tch::Device::Cpu).is_ok());
        let cuda = check_device(2, tch::Device::Cuda(0));
        assert_eq!(cuda.is_ok(), crate::shim::nccl_built(), "{cuda:?}");
        let mps = check_device(2, tch::Device::Mps).map_err(|e| e.to_string());
        assert!(
            mps.as_ref()
                .is_err_and(|e| e.contains("the CPU (gloo) or CUDA GPUs (NCCL), not on")),
            "{mps:?}"
        );
        let one = DistEnv {
            rank: 1,
            world: 2,
            master_addr: "h".into(),
            master_port: 1,
            source: "test",
        };
        assert_eq!(rank_device(tch::Device::Cpu, Some(&one)), tch::Device::Cpu);
        assert_eq!(
            rank_device(tch::Device::Cuda(0), None),
            tch::Device::Cuda(0)
        );
    }

    #[test]
    fn slurm_node_lists_give_their_first_host() {
        assert_eq!(
            first_slurm_host("node[01-04,07]").as_deref(),
            Some("node01")
        );
        assert_eq!(first_slurm_host("a1,b2").as_deref(), Some("a1"));
        assert_eq!(first_slurm_host("solo").as_deref(), Some("solo"));
        assert_eq!(first_slurm_host("gpu[3,5]").as_deref(), Some("gpu3"));
        assert_eq!(first_slurm_host(""), None);
    }

    #[test]
    fn env_variables_describe_the_group() -> Result<(), LlmError> {
        assert_eq!(DistEnv::parse(&env(&[]))?, None);
        assert_eq!(
            DistEnv::parse(&env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]))?,
            None,
            "an sbatch script is one process"
        );
        let t = DistEnv::parse(&env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "1234"),
        ]))?;
        assert_eq!(
            t.map(|e| (e.rank, e.world, e.master_addr, e.master_port)),
            Some((1, 2, "10.0.0.1".to_string(), 1234))
        );
        let s = DistEnv::parse(&env(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_STEP_NODELIST", "n[7-8]"),
            ("SLURM_JOB_ID", "123456"),
        ]))?;
        assert_eq!(
            s.map(|e| (e.rank, e.world, e.master_addr, e.master_port)),
            Some((3, 4, "n7".to_string(), 29500 + 3456))
        );
        for bad in [
            &[("RANK", "0")][..],
            &[
                ("RANK", "2"),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "1"),
            ],
            &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")],
            &[("RANK", "x"), ("WORLD_SIZE", "2")],
        ] {
            assert!(DistEnv::parse(&env(bad)).is_err(), "{bad:?}");
        }
        Ok(())
    }
}
