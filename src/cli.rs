//! The command line. `main.rs` maps errors to exit codes.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::config::JobSpec;
use crate::dataflow::processes::{read_hostfile, Processes};
use crate::dataflow::{run_job, RunOptions};

/// Exit codes: what a script driving quad can rely on.
pub mod exit {
    pub const OK: i32 = 0;
    /// The job failed (I/O, state store, internal error).
    pub const FAILED: i32 = 1;
    /// Bad usage or an invalid job spec: nothing was done.
    pub const USAGE: i32 = 2;
    /// The job finished, but some shards were quarantined (see the summary).
    pub const QUARANTINED: i32 = 3;
    /// Interrupted by a second Ctrl-C.
    pub const INTERRUPTED: i32 = 130;
}

#[derive(Debug, Parser)]
#[command(
    name = "quad",
    version,
    about = "Quality- and diversity-aware pretraining data selection (Quad) as a timely-dataflow ETL job"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a job spec: read the shards, select, write Parquet. Resumes where a previous run stopped.
    Run {
        /// The job spec (TOML), e.g. dataflows/demo.toml.
        job: PathBuf,
        /// Timely worker threads (of each process). The output does not depend on it.
        #[arg(short = 'w', long, default_value_t = 1)]
        workers: usize,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Process the shards found now and exit, even if the spec says `watch`.
        #[arg(long)]
        once: bool,
        /// Delete the job's output files and state first, and start over.
        #[arg(long)]
        reset: bool,
        /// Also print the summary as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Where a job stands: shards done and waiting, documents, clusters, rounds, selected
    /// tokens against the budget, the last commit, quarantined shards. While the job runs, from
    /// the status file it publishes at each commit (it holds the store locked); otherwise
    /// from the state store.
    Status {
        /// The job spec (TOML).
        job: PathBuf,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the run's HTML report (SVG plots of rewards, cluster scores, pulls, influence,
    /// source mix and costs) from its state store.
    Report {
        /// The job spec (TOML) of the run.
        job: PathBuf,
        /// Where to write the page; default `<sink.path>/report.html`.
        #[arg(short = 'o', long)]
        out: Option<PathBuf>,
    },
    /// Show the libtorch in use, whether CUDA works and which device quad uses.
    Doctor,
    /// Build corpora from the fetched assets.
    Corpus {
        #[command(subcommand)]
        which: CorpusCommand,
    },
    /// Influence scores of every document of a Parquet file against the job's reference set
    /// (its `[influence]` section): id, tokens, influence, norm, written with zstd.
    Score {
        #[arg(long)]
        job: PathBuf,
        /// Parquet with the job's id and text columns.
        #[arg(long)]
        input: PathBuf,
        /// The scores file (schemas/score.json).
        #[arg(long)]
        output: PathBuf,
        /// Also write the documents' gradient sketches (needs influence.sketch_dim) as a
        /// safetensors file: "sketches" [docs, len] in the output's row order and "reference".
        #[arg(long)]
        sketches: Option<PathBuf>,
        /// Score only the first N documents.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Train the small Llama proxy of the job's `[warmup]` section on a seeded sample of the
    /// pool and save it as a Hugging Face directory (the demo's default influence model).
    Warmup {
        /// The job spec (TOML), e.g. dataflows/demo.toml.
        job: PathBuf,
        /// Optimiser steps (default: warmup.steps).
        #[arg(long)]
        steps: Option<usize>,
        /// Output directory (default: warmup.out).
        #[arg(long)]
        out: Option<PathBuf>,
        /// "auto", "cpu", "cuda" or "cuda:N" (default: warmup.device).
        #[arg(long)]
        device: Option<String>,
    },
    /// Judge selections (DESIGN 1.4): for each selection and seed, train a small Llama from
    /// scratch on the same number of its tokens and measure the loss on held-out sets; compare
    /// each selection with the baseline, paired by seed. Writes OUT/eval.json, eval.md and
    /// eval.svg; runs already finished in OUT/runs are reused.
    Eval(EvalArgs),
    /// Tuning commands (DESIGN 1.2): each prints a table and writes an SVG plot.
    Tune {
        #[command(subcommand)]
        which: TuneCommand,
    },
    /// The prepared GPU check (README, "Measuring on a GPU"); `gpu-check.sh` drives it.
    #[command(hide = true, name = "gpu-check")]
    GpuCheck {
        #[command(subcommand)]
        what: GpuCheckCommand,
    },
    /// Print a Parquet file's schema, row count and first rows (`quad inspect FILE`), a job's
    /// clusters (`quad inspect clusters JOB`) or its rejected rows (`quad inspect rejects JOB`).
    #[command(args_conflicts_with_subcommands = true)]
    Inspect {
        #[command(subcommand)]
        what: Option<InspectCommand>,
        /// A Parquet file.
        file: Option<PathBuf>,
        #[arg(short = 'n', long, default_value_t = 5)]
        rows: usize,
    },
}

/// Several processes on timely's cluster mode (README, "Several processes and machines").
#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// Processes of the job (timely's cluster mode); each writes `<sink.path>/p<index>` and
    /// keeps its own state store. The output does not depend on it.
    #[arg(short = 'n', long, default_value_t = 1)]
    pub processes: usize,
    /// This process's index, 0 to processes - 1.
    #[arg(short = 'p', long, default_value_t = 0)]
    pub process: usize,
    /// The processes' `host:port`, one a line, in index order (timely's hostfile).
    #[arg(long)]
    pub hostfile: Option<PathBuf>,
    /// Seconds to connect to every peer and agree on the job before giving up.
    #[arg(long, default_value_t = 60)]
    pub connect_timeout: u64,
}

impl ClusterArgs {
    /// This process's place, or None for a job of one process.
    pub fn processes(&self) -> Result<Option<Processes>> {
        if self.process >= self.processes.max(1) {
            anyhow::bail!(
                "--process {} is not below --processes {}",
                self.process,
                self.processes
            );
        }
        if self.processes <= 1 {
            return Ok(None);
        }
        let hostfile = self
            .hostfile
            .as_ref()
            .with_context(|| format!("--processes {} needs --hostfile", self.processes))?;
        let addresses = read_hostfile(hostfile)?;
        if addresses.len() != self.processes {
            anyhow::bail!(
                "--processes {} but {} lists {} addresses",
                self.processes,
                hostfile.display(),
                addresses.len()
            );
        }
        Ok(Some(Processes {
            index: self.process,
            addresses,
            connect_timeout: std::time::Duration::from_secs(self.connect_timeout),
        }))
    }
}

/// `quad eval`'s arguments (the `[eval]` settings come from `--config`, `--model`, `--device`).
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// NAME=PATH of a selection: a Parquet file, a folder of them or a glob; repeat for
    /// each selection.
    #[arg(long = "selection", required = true)]
    pub selections: Vec<crate::eval::Named>,
    /// The selection the others are compared with (default: the first).
    #[arg(long)]
    pub baseline: Option<String>,
    /// NAME=FILE of a held-out set (Parquet with a text column); repeat for each.
    #[arg(long = "heldout", required = true)]
    pub heldouts: Vec<crate::eval::Named>,
    /// Tokens each model trains on (rounded up to whole optimiser steps).
    #[arg(long, default_value_t = 400_000)]
    pub tokens: u64,
    /// Seeds: each fixes the initial weights and the data order, the same for every
    /// selection.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub seeds: Vec<u64>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// A TOML file whose [eval] section is used (a job spec, or a file with only that
    /// section).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// KEY=VALUE of [eval.model], e.g. `--model layers=4 --model lr=1e-3`.
    #[arg(long = "model")]
    pub model: Vec<String>,
    /// "auto", "cpu", "cuda" or "cuda:N" (default: eval.device).
    #[arg(long)]
    pub device: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum InspectCommand {
    /// A clustering job's clusters: size, tokens, dominant sources, example titles.
    Clusters {
        job: PathBuf,
        /// Example documents shown per cluster.
        #[arg(short = 'e', long, default_value_t = 3)]
        examples: usize,
        /// Show only the largest this-many clusters.
        #[arg(short = 'l', long)]
        limit: Option<usize>,
    },
    /// A job's rejected rows (file, row, column, reason; for a duplicate id, where the id was
    /// first accepted), their count by kind, and its quarantined shards. Reads the state
    /// store, so not while the job runs (see `quad status`).
    Rejects {
        job: PathBuf,
        /// Only rows whose reason contains this (case-insensitive), e.g. "duplicate".
        #[arg(long)]
        reason: Option<String>,
        /// Rows listed.
        #[arg(short = 'n', long, default_value_t = 20)]
        rows: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum GpuCheckCommand {
    /// Gathers the check's folder: this binary, gpu-check.sh, the encoder's config and
    /// tokenizer, the tiny Llama, the SmolLM2 tokenizer and a slice of the demo corpus.
    Bundle {
        /// The folder to write (must not exist or be empty), e.g. dist/gpu.
        out: PathBuf,
        /// The fetched assets (scripts/fetch-assets.sh).
        #[arg(long, default_value = "assets")]
        assets: PathBuf,
    },
    /// Prints the budget and the steps with their time limits, in run order (for the script).
    Steps {
        #[arg(long)]
        quick: bool,
    },
    /// Runs one step and writes <work>/steps/<step>.json.
    Step {
        step: crate::gpucheck::Step,
        /// The bundle folder.
        #[arg(long)]
        bundle: PathBuf,
        /// This check run's scratch folder.
        #[arg(long)]
        work: PathBuf,
        /// "cuda", "cuda:N" or "cpu".
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Small sizes, for the CPU.
        #[arg(long)]
        quick: bool,
    },
    /// Prints the table of every step's figures; with --out also writes gpu-check.md,
    /// gpu-check.json and the steps' logs there. Exit code 1 unless every step ran and every
    /// tolerance held.
    Report {
        #[arg(long)]
        work: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CorpusCommand {
    /// The demo corpus: shards, reference set and eval split, as the job's [corpus] section says.
    Demo { job: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum TuneCommand {
    /// WCSS of spherical k-means over a grid of k on an embedded sample; picks the knee
    /// (Kneedle) and writes tune-k.svg and tune-k.json.
    K {
        job: PathBuf,
        /// Documents in the sample (default: cluster.tune.sample).
        #[arg(long)]
        sample: Option<usize>,
        /// The grid of k, e.g. 8,16,32 (default: cluster.tune.ks).
        #[arg(long, value_delimiter = ',')]
        ks: Option<Vec<usize>>,
        /// Output folder (default: <sink.path>/tune).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Scores a seeded sample of every committed cluster, takes the lower edges of equal-count
    /// score buckets as candidate thresholds, trains a copy of the proxy briefly on each
    /// candidate's selection and picks the lowest reference loss; writes tune-tau.svg/.json.
    /// Needs the job's clusters (run `quad run` first).
    Tau {
        job: PathBuf,
        /// Members scored per cluster.
        #[arg(long, default_value_t = 20)]
        per_cluster: usize,
        /// Score buckets (candidates).
        #[arg(long, default_value_t = 20)]
        buckets: usize,
        /// Training steps on each candidate's selection (the [warmup] optimiser).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Output folder (default: <sink.path>/tune).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// For the largest committed clusters, the smallest sample ratio whose mean influence is
    /// within the tolerance of the cluster's mean, averaged; writes tune-gamma.svg/.json.
    /// Needs the job's clusters (run `quad run` first).
    Gamma {
        job: PathBuf,
        /// Clusters measured (the largest).
        #[arg(long, default_value_t = 4)]
        clusters: usize,
        /// Members scored per cluster (their mean stands for the cluster's).
        #[arg(long, default_value_t = 200)]
        members: usize,
        /// Ratios tried: 0.01, 0.02, ... up to this.
        #[arg(long, default_value_t = 0.2)]
        max_ratio: f64,
        /// Accepted relative error of the sample mean.
        #[arg(long, default_value_t = 0.1)]
        tolerance: f64,
        /// Output folder (default: <sink.path>/tune).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Runs a command; returns the exit code for a completed command.
pub fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Run {
            job,
            workers,
            cluster,
            once,
            reset,
            json,
        } => {
            let options = RunOptions {
                workers,
                once,
                processes: cluster.processes()?,
            };
            run_cmd(&job, &options, reset, json)
        }
        Command::Status { job, json } => {
            let status = crate::status::job_status(&JobSpec::load(&job)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{status}");
            }
            Ok(exit::OK)
        }
        Command::Report { job, out } => {
            let path = crate::report::write_report(&job, out.as_deref())?;
            println!("{}", path.display());
            Ok(exit::OK)
        }
        Command::Doctor => {
            println!("{}", crate::doctor::report()?);
            Ok(exit::OK)
        }
        Command::Corpus {
            which: CorpusCommand::Demo { job },
        } => {
            let spec = JobSpec::load(&job)?;
            let corpus = spec.corpus.as_ref().with_context(|| {
                format!("{}: the job spec has no [corpus] section", job.display())
            })?;
            let report = crate::corpus::build_demo(corpus, spec.seed)?;
            println!("{report}");
            Ok(exit::OK)
        }
        Command::Score {
            job,
            input,
            output,
            sketches,
            limit,
        } => {
            let spec = JobSpec::load(&job)?;
            let summary =
                crate::score::score_file(&spec, &input, &output, sketches.as_deref(), limit)?;
            eprintln!("{summary}");
            Ok(exit::OK)
        }
        Command::Warmup {
            job,
            steps,
            out,
            device,
        } => {
            let spec = JobSpec::load(&job)?;
            let overrides = crate::warmup::WarmupOverrides { steps, out, device };
            let report = crate::warmup::run_warmup(
                &spec.warmup,
                &spec.source,
                &spec.influence.reference,
                spec.seed,
                &overrides,
            )
            .with_context(|| format!("quad warmup {}", job.display()))?;
            println!("{report}");
            Ok(exit::OK)
        }
        Command::Eval(args) => eval_cmd(args),
        Command::Tune { which } => run_tune(which),
        Command::GpuCheck { what } => run_gpu_check(what),
        Command::Inspect {
            what:
                Some(InspectCommand::Clusters {
                    job,
                    examples,
                    limit,
                }),
            ..
        } => {
            let spec = JobSpec::load(&job)?;
            print!(
                "{}",
                crate::inspect::inspect_clusters(&spec, examples, limit)?
            );
            Ok(exit::OK)
        }
        Command::Inspect {
            what: Some(InspectCommand::Rejects { job, reason, rows }),
            ..
        } => {
            let spec = JobSpec::load(&job)?;
            print!(
                "{}",
                crate::inspect::inspect_rejects(&spec, reason.as_deref(), rows)?
            );
            Ok(exit::OK)
        }
        Command::Inspect {
            what: None,
            file,
            rows,
        } => {
            let file = file.context("quad inspect: give a Parquet file, or `clusters JOB`")?;
            print!("{}", crate::inspect::inspect(&file, rows)?);
            Ok(exit::OK)
        }
    }
}

/// `quad run`.
fn run_cmd(job: &Path, options: &RunOptions, reset: bool, json: bool) -> Result<i32> {
    let spec = JobSpec::load(job)?;
    if options.workers == 0 {
        anyhow::bail!("--workers must be at least 1");
    }
    let (process, processes) = options
        .processes
        .as_ref()
        .map_or((0, 1), |p| (p.index, p.count()));
    if reset {
        reset_job(&spec.for_process(process, processes))?;
    }
    tracing::info!(job = %job.display(), workers = options.workers, process, processes, "starting");
    let summary = run_job(&spec, options)?;
    eprintln!("{summary}");
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(if summary.shards_quarantined > 0 {
        exit::QUARANTINED
    } else {
        exit::OK
    })
}

/// `quad eval`: the `[eval]` settings (from `--config`, then `--model` and `--device`), the
/// runs, and the table on stdout.
fn eval_cmd(args: EvalArgs) -> Result<i32> {
    let config = args.config.as_deref();
    let usage = |message: String| crate::error::SpecError::Invalid {
        path: config.unwrap_or(Path::new("quad eval")).to_path_buf(),
        message,
    };
    let base = match config {
        Some(path) => crate::eval::EvalConfig::from_file(path).map_err(usage)?,
        None => crate::eval::EvalConfig::default(),
    };
    let mut cfg = base.with_model_settings(&args.model).map_err(usage)?;
    if let Some(device) = args.device {
        cfg.device = device;
    }
    let plan = crate::eval::EvalPlan {
        selections: args.selections,
        baseline: args.baseline,
        heldouts: args.heldouts,
        tokens: args.tokens,
        seeds: args.seeds,
        out: args.out,
    };
    let report =
        crate::eval::run_eval(&plan, &cfg, &crate::dataflow::STOP).map_err(|e| match e {
            crate::eval::EvalError::Settings(message) => anyhow::Error::new(usage(message)),
            e => anyhow::Error::new(e).context("quad eval"),
        })?;
    println!("{report}");
    Ok(exit::OK)
}

/// `quad tune k|tau|gamma`.
fn run_tune(which: TuneCommand) -> Result<i32> {
    match which {
        TuneCommand::K {
            job,
            sample,
            ks,
            out,
        } => {
            let spec = JobSpec::load(&job)?;
            let options = crate::tune::k::TuneKOptions { sample, ks, out };
            println!("{}", crate::tune::k::tune_k(&spec, &options)?);
            Ok(exit::OK)
        }
        TuneCommand::Tau {
            job,
            per_cluster,
            buckets,
            steps,
            out,
        } => {
            let spec = JobSpec::load(&job)?;
            let options = crate::tune::TuneTauOptions {
                per_cluster,
                buckets,
                steps,
                out,
            };
            println!("{}", crate::tune::tune_tau_cmd(&spec, &options)?);
            Ok(exit::OK)
        }
        TuneCommand::Gamma {
            job,
            clusters,
            members,
            max_ratio,
            tolerance,
            out,
        } => {
            let spec = JobSpec::load(&job)?;
            let options = crate::tune::TuneGammaOptions {
                clusters,
                members,
                max_ratio,
                tolerance,
                out,
            };
            println!("{}", crate::tune::tune_gamma_cmd(&spec, &options)?);
            Ok(exit::OK)
        }
    }
}

fn run_gpu_check(what: GpuCheckCommand) -> Result<i32> {
    use crate::gpucheck::{assemble_report, run_step, write_bundle, CheckOptions};
    match what {
        GpuCheckCommand::Bundle { out, assets } => {
            println!("{}", write_bundle(&assets, &out)?);
            Ok(exit::OK)
        }
        GpuCheckCommand::Steps { quick } => {
            print!("{}", crate::gpucheck::plan(quick));
            Ok(exit::OK)
        }
        GpuCheckCommand::Step {
            step,
            bundle,
            work,
            device,
            quick,
        } => {
            let device = crate::influence::scorer::parse_device(&device)
                .map_err(|e| anyhow::anyhow!(e.replace("influence.device", "--device")))?;
            let opts = CheckOptions {
                device,
                quick,
                bundle,
                work,
            };
            run_step(step, &opts).with_context(|| format!("gpu-check step {}", step.name()))?;
            Ok(exit::OK)
        }
        GpuCheckCommand::Report { work, out } => {
            let report = assemble_report(&work)?;
            println!("{report}");
            if let Some(out) = out {
                report.write(&out, &work)?;
            }
            Ok(if report.passed() {
                exit::OK
            } else {
                exit::FAILED
            })
        }
    }
}

/// Removes the job's output files and state store.
fn reset_job(spec: &JobSpec) -> Result<()> {
    let state = spec.state_path();
    if state.exists() {
        std::fs::remove_file(&state).with_context(|| format!("removing {}", state.display()))?;
    }
    let removed = crate::sink::remove_uncommitted(&spec.sink.path, &Default::default())?;
    tracing::info!(
        files = removed.len(),
        "reset: removed output files and state"
    );
    Ok(())
}
