//! quad: quality- and diversity-aware selection of LLM pretraining data (the "Quad" method)
//! as a long-lived timely-dataflow ETL job from Parquet shards to Parquet output.
//!
//! One module a stage, each with its settings: `source` reads shards, `select` dedups and
//! decides `random`, `embed` and `cluster`/`assign` place documents in clusters, `bandit`
//! chooses clusters, `influence` scores, `sink` writes the output, `state` holds the
//! transactional job state. `dataflow` (ingest operators in `dataflow/`) and `quad_loop` (the
//! rounds' operators) wire them into the job's one timely graph. `config` composes the stages'
//! settings into the job spec; `schema` is the file formats.

pub mod bandit;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod corpus;
pub mod cost;
pub mod dataflow;
pub mod dedup_filter;
pub mod doctor;
pub mod embed;
pub mod error;
pub mod gpucheck;
pub mod influence;
pub mod inspect;
pub mod membership;
pub mod model;
pub mod plot;
pub mod progress;
pub mod report;
pub mod schema;
pub mod score;
pub mod select;
pub mod sink;
pub mod source;
pub mod state;
pub mod tokens;
pub mod tune;
pub mod warmup;
