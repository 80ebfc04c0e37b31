//! quad: quality- and diversity-aware selection of LLM pretraining data (the "Quad" method)
//! as a long-lived timely-dataflow ETL job from Parquet shards to Parquet output.
//!
//! One module a stage, each with its settings, its logic and its timely operator
//! (`<stage>::operator`, or the stage's named operator files): `source` reads shards, `select`
//! dedups and decides `random` and `dsir` (the admit operator; `dsir` holds DSIR's weights),
//! `embed` embeds, `cluster` fits and assigns clusters (`cluster::assign`), `membership` draws a cluster's members and fetches their texts,
//! `bandit` chooses clusters, `influence` scores, `sink` writes the output (`sink::epoch_sink`
//! for ingest, `sink::round_sink` for the rounds), `state` holds the transactional job state.
//! `eval` judges selections by training small models on them (`quad eval`).
//! `dataflow` wires the operators into the job's one timely graph (`dataflow/quad_loop.rs` the
//! Quad loop) and builds each operator's context from the job. `config` composes the stages'
//! settings into the job spec; `schema` is the file formats.

pub mod assets;
pub mod bandit;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod corpus;
pub mod cost;
pub mod dataflow;
pub mod dedup;
pub mod dedup_filter;
pub mod doctor;
pub mod dsir;
pub mod embed;
pub mod error;
pub mod eval;
pub mod gpucheck;
pub mod hash;
pub mod influence;
pub mod inspect;
pub mod membership;
pub mod metrics;
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
pub mod status;
pub mod tokens;
pub mod tune;
pub mod warmup;
