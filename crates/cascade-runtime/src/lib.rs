//! The cascade runtime: everything between a front end (`bench`, `run`,
//! `serve`, a cluster worker, Python) and the algorithm.
//!
//! - [`build`]: the one function that turns a config (and overrides) into a
//!   cascade, budget included;
//! - [`session`]: the one per-item cycle (route, audit, ask, settle, learn, count);
//! - [`pipeline`]: the ordered driver with N expert calls in flight;
//! - [`checkpoint`], [`live`] (a run's or a service's start), [`jsonl`] (a
//!   session over a JSONL file), [`input`], [`experts`].

pub mod build;
pub mod checkpoint;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod error;
pub mod experts;
pub mod input;
pub mod jsonl;
pub mod live;
pub mod pipeline;
pub mod progress;
pub mod session;
pub mod students;

pub use build::{build, build_session, config_from_toml, load_config, session_options, Overrides};
pub use checkpoint::{Position, Resume, StateDir};
pub use error::{Result, RuntimeError};
pub use experts::{build_expert, ExpertSpec};
pub use live::{Live, LiveSpec};
pub use pipeline::{Finished, Pipeline};
pub use session::{
    Counts, Demonstration, Next, OnExpertFailure, Routed, Session, SessionOptions, Settled, Ticket,
};

/// The async runtime every front end runs its expert calls on.
pub fn async_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| RuntimeError::setting("the async runtime", format!("cannot start: {e}")))
}
