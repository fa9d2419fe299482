//! The `pretrain` task: train a GPT from scratch or from another run's weights (book ch05), by
//! [`crate::train::trainer::pretrain`].
use super::super::task::{Summary, Task, TrialRun};
use super::super::{Experiment, Trial};
use crate::error::LlmError;
use crate::train::trainer::TrainEvents as _;
use crate::train::PretrainSpec;
use anyhow::Result;

pub struct Pretrain;

impl Task for Pretrain {
    type Spec = PretrainSpec;
    type Shared = ();
    const NAME: &'static str = "pretrain";
    const METRICS: &'static [&'static str] = &["val/loss", "train/loss"];
    /// An evaluation record, the last line of a pretraining run and of any training task's run
    /// until it ends.
    const SUMMARY: Summary = Summary {
        marker: "train_loss",
        columns: &["train_loss", "val_loss", "step", "tokens_seen"],
    };

    fn validate(&self, spec: &PretrainSpec) -> Result<(), LlmError> {
        spec.validate("")
    }

    /// Files a trial reads must exist before anything runs.
    fn check_inputs(&self, spec: &PretrainSpec, exp: &Experiment, _trial: &Trial) -> Result<()> {
        if let Some(p) = &spec.data.path {
            if !p.is_file() {
                return Err(LlmError::Config {
                    origin: exp.location("data.path"),
                    message: format!("data.path: {} does not exist", p.display()),
                }
                .into());
            }
        }
        if let Some(d) = &spec.data.dataset {
            let reg = crate::data::registry::Registry::builtin()?;
            reg.get(d).map_err(|e| LlmError::Config {
                origin: exp.location("data.dataset"),
                message: format!("data.dataset: {e}"),
            })?;
        }
        if let Some(i) = &spec.model.init_from {
            crate::resolve::ModelSource::parse(i).map_err(|e| LlmError::Config {
                origin: exp.location("model.init_from"),
                message: format!("model.init_from: {e:#}"),
            })?;
        }
        if let Some(p) = &spec.model.preset {
            crate::models::GptConfig::load(p).map_err(|e| LlmError::Config {
                origin: exp.location("model.preset"),
                message: format!("model.preset: {e:#}"),
            })?;
        }
        Ok(())
    }

    const DATA_PARALLEL: bool = true;

    /// One process, or with `train.nproc` N > 1 rank 0 of N: this process starts ranks 1..N
    /// (the same trial, `--trial`) and trains with them; under torchrun/srun (`RANK`, Slurm's
    /// variables) it is the rank they say.
    fn run(&self, spec: &PretrainSpec, _shared: &(), run: &mut TrialRun) -> Result<()> {
        use crate::dist::{Dist, DistEnv};
        let env = DistEnv::parse(&|k| std::env::var(k).ok())?;
        let world = env.as_ref().map_or(spec.train.nproc, |e| e.world);
        crate::dist::check_device(world, run.device)?;
        if let Some(env) = env {
            run.device = crate::dist::rank_device(run.device, Some(&env));
            let dist = Dist::join(&env, crate::dist::timeout_from_env()?, run.device)?;
            return train_rank(spec, run, &dist);
        }
        if world == 1 {
            return crate::train::trainer::pretrain(
                spec,
                run.dir,
                run.device,
                run.restart,
                &mut run.events,
            )
            .map(|_| ());
        }
        let Some(command) = run.command else {
            return Err(LlmError::Usage(format!(
                "train.nproc {world}: this caller cannot start the other ranks; use `llmlab run` or `llmlab pretrain --nproc {world}`"
            ))
            .into());
        };
        // Each rank gets an equal share of the trial's threads unless train.threads says.
        let threads = spec
            .train
            .threads
            .unwrap_or_else(|| crate::device::threads_per_job(run.threads, world));
        crate::device::set_threads(Some(threads));
        let port = crate::dist::free_port()?;
        let mut ranks =
            crate::dist::Ranks::spawn(&|_| command(run.slug, threads), 1..world, world, port)?;
        run.events.log(&format!(
            "data parallel: started ranks 1..{world} of this trial ({}, {threads} thread(s) a rank)",
            if run.device.is_cuda() { "NCCL" } else { "gloo" }
        ));
        let env = DistEnv {
            rank: 0,
            world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            source: "train.nproc",
        };
        run.device = crate::dist::rank_device(run.device, Some(&env));
        let trained = Dist::join(&env, crate::dist::timeout_from_env()?, run.device)
            .map_err(anyhow::Error::from)
            .and_then(|dist| train_rank(spec, run, &dist));
        match trained {
            Ok(()) => ranks
                .wait()
                .map_err(|e| LlmError::Usage(format!("train.nproc {world}: {e}")).into()),
            // Ctrl-C: the other ranks stopped after the same step; let them end.
            Err(e) if crate::signal::interrupted() => {
                let _ = ranks.wait();
                Err(e)
            }
            // A rank that failed is the cause of rank 0's collective error: say which.
            Err(e) => match ranks.poll() {
                Err(why) => Err(e.context(format!("train.nproc {world}: {why}"))),
                Ok(_) => Err(e),
            },
        }
    }

    /// The same update with another kernel (`train.fused_adamw`) is resumable.
    fn same_run(&self, before: &str, spec: &PretrainSpec) -> bool {
        crate::train::trainer::same_but_fused_adamw(before, spec)
    }
}

/// Trains `spec` as this rank of `dist`: rank 0 reports through the trial's events, the others
/// stay quiet.
fn train_rank(spec: &PretrainSpec, run: &mut TrialRun, dist: &crate::dist::Dist) -> Result<()> {
    let mut quiet = |_: &str| {};
    let events: &mut dyn crate::train::trainer::TrainEvents = if dist.is_main() {
        &mut run.events
    } else {
        &mut quiet
    };
    crate::train::trainer::pretrain_dist(spec, run.dir, run.device, run.restart, events, dist)
        .map(|_| ())
}
