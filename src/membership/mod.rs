//! The membership stage: the members of each cluster, kept in the state store in a seeded
//! draw order (`StateStore::draw`, `bandit::draw`), and their texts fetched back from their
//! shards by location (ids and texts are never stored). `operator` runs it in the Quad loop:
//! each pull drawn on the worker that owns its cluster.
pub mod operator;
