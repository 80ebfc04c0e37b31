//! quad: quality- and diversity-aware selection of LLM pretraining data (the "Quad" method)
//! as a long-lived timely-dataflow ETL job from Parquet shards to Parquet output.
//!
//! One module a stage: `source` reads shards, `select` decides which documents are kept,
//! `sink` writes the output, `state` holds the transactional job state, and `dataflow` wires
//! them into a timely graph. `config` is the job spec, `schema` the file formats.

pub mod assign;
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
pub mod model;
pub mod plot;
pub mod progress;
pub mod quad_loop;
pub mod report;
pub mod schema;
pub mod select;
pub mod sink;
pub mod source;
pub mod state;
pub mod tokens;
pub mod tune;
